"""Data: image-caption WebDataset shards and the built-in shapes dataset.

    python -m ldm.data.shapes --out data/shapes          # built-in dataset -> shards
    python scripts/make_shards.py my_images/ data/mine   # folder of images + captions -> shards

Modules (import them directly; this package imports nothing heavy):
    format       the shard format: url expansion, manifest, sizes.json, sample counts, caption decoding, extensions
    transforms   PIL image of any mode -> (3, H, W) tensor, resized to cover its target and cropped (+ its geometry)
    shards       write (key, image, caption[, mask]) samples as tar shards + manifest.json + sizes.json
    hf           (key, image, caption) samples from a Hugging Face `datasets` directory
    sizes        each image's (width, height) per shard: from sizes.json, else read once from the image headers
    webdataset   read shards into {"pixel_values", "caption", "key", geometry} samples; `collate`
    buckets      aspect-ratio buckets: generate, parse `data.buckets`, assign an image to its bucket
    plan         the order of a bucketed pass: one bucket per batch, every sample once, leftovers carried
    bucketed     read planned batches by key from local tars (PlannedBatches, KeyReader)
    captions     tag captions: keep_tokens, shuffle, dropout, trigger word
    dreambooth   DreamBooth settings and the sizes of the class images to generate
    datamodule   ShardDataModule, the LightningDataModule over train/val shards (exact epochs, buckets, resume)
    latents      cached latents: write them (precompute_latents) and train on them (LatentShardDataModule)
    health       DataHealth: skip counters shared by the loader workers
    workers      stop a DataLoader's worker processes now (stop_workers, WorkerLoaders), not at interpreter exit
    shapes       procedural "a small red circle at the top left" images (the built-in default)
    synthetic    photo-like random images for benchmarks

May import: ldm.utils. Nothing else of ldm (the diffusion math and the models are not data).
"""
