"""Data: image-caption WebDataset shards and the built-in shapes dataset.

    python -m ldm.data.shapes --out data/shapes          # built-in dataset -> shards
    python scripts/make_shards.py my_images/ data/mine   # folder of images + captions -> shards

Modules (import them directly; this package imports nothing heavy):
    format       the shard format: url expansion, manifest, sample counts, caption decoding, extensions
    transforms   PIL image of any mode -> (3, R, R) tensor in [-1, 1]
    shards       write (key, image, caption) samples as tar shards + manifest.json
    webdataset   read shards into {"pixel_values", "caption", "key"} samples; `collate`
    datamodule   ShardDataModule, the LightningDataModule over train/val shards (exact epochs, resume)
    latents      cached latents: write them (precompute_latents) and train on them (LatentShardDataModule)
    health       DataHealth: skip counters shared by the loader workers
    shapes       procedural "a small red circle at the top left" images (the built-in default)
    synthetic    photo-like random images for benchmarks

May import: ldm.utils. Nothing else of ldm (the diffusion math and the models are not data).
"""
