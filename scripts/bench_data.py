"""Data loading throughput: decoded-and-augmented images per second, and how long training waits.

Writes synthetic photo-like JPEG shards (smooth colour fields + grain, long side 1.5x the
resolution, as after `make_shards.py --max-size`) under --shard-dir unless they exist, then
for every (resolution, workers) pair runs the train loader of ShardDataModule for --batches
batches behind a simulated training step of --step-ms, and prints one summary line:

    python scripts/bench_data.py --resolution 256 512 --workers 2 --batches 20          # a laptop
    python scripts/bench_data.py --resolution 512 --workers 12 --batches 200 --pixels uint8 float  # a 16-core box
    python scripts/bench_data.py --latents data/bench_train/cifar/latents32 --workers 0 12 --batch-size 256  # cached latents

`--latents DIR` times `data=latents`' loader (LatentShardDataModule) on latent shards written by
`scripts/precompute_latents.py` (or `bench_train.py`'s setup) instead.
"""

import gc
import sys
import time
from pathlib import Path

from ldm.data.datamodule import ShardDataModule
from ldm.data.latents import LatentShardDataModule
from ldm.data.synthetic import synthetic_shards
from ldm.utils.cli import ArgumentParser, run_command


def bench(shards: Path, resolution: int, workers: int, batches: int, batch_size: int, step_s: float,
          jpeg_draft: bool, pixels: str) -> str:  # fmt: skip
    if pixels == "latents":
        dm = LatentShardDataModule(str(shards), None, batch_size, num_workers=workers, shuffle_buffer=256,
                                   samples_per_epoch=10**9)  # fmt: skip
    else:
        dm = ShardDataModule(str(shards), None, resolution, batch_size, num_workers=workers, shuffle_buffer=256,
                             samples_per_epoch=10**9, jpeg_draft=jpeg_draft, uint8=pixels == "uint8")  # fmt: skip
    loader = iter(dm.train_dataloader())
    for _ in range(max(2, workers)):  # warm-up: start workers, fill their prefetch queues
        next(loader)
    waited, images, start = 0.0, 0, time.perf_counter()
    for _ in range(batches):
        t0 = time.perf_counter()
        batch = next(loader)  # the time a training loop would block on data
        waited += time.perf_counter() - t0
        images += len(batch["caption"])
        if step_s:
            time.sleep(step_s)  # stand-in for the GPU step
    elapsed = time.perf_counter() - start
    rate = images / elapsed
    del loader  # shut this config's workers down before the next forks its own
    gc.collect()
    return (f"res={resolution} workers={workers} batch={batch_size} draft={jpeg_draft} pixels={pixels}: {rate:7.1f} img/s total, "
            f"{rate / max(workers, 1):6.1f} img/s/worker, data wait {1000 * waited / batches:6.1f} ms/batch "
            f"({waited / elapsed:4.0%} of the loop), {images} images in {elapsed:.1f} s")  # fmt: skip


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--batches", type=int, default=20, help="batches timed per config (after warm-up)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--step-ms", type=float, default=0.0, help="simulated training step per batch")
    parser.add_argument("--images", type=int, default=640, help="synthetic images per resolution")
    parser.add_argument("--shard-dir", default="data/bench", help="where synthetic shards are written / reused")
    parser.add_argument("--shards", default=None, help="benchmark these shards instead of synthetic ones")
    parser.add_argument("--no-draft", action="store_true", help="decode JPEGs at full size")
    parser.add_argument("--pixels", nargs="+", choices=["uint8", "float"], default=["uint8"],
                        help="what workers deliver: uint8 (the default configs) or float in [-1, 1]")
    parser.add_argument("--latents", default=None, help="time the cached-latent loader on these latent shards")
    args = parser.parse_args(argv)
    if args.latents:
        for workers in args.workers:
            print(bench(Path(args.latents), 0, workers, args.batches, args.batch_size, args.step_ms / 1000, False,
                        "latents"), flush=True)  # fmt: skip
        return

    for resolution in args.resolution:
        shards = Path(args.shards) if args.shards else synthetic_shards(Path(args.shard_dir), resolution, args.images)
        for workers in args.workers:
            for pixels in args.pixels:
                print(bench(shards, resolution, workers, args.batches, args.batch_size, args.step_ms / 1000,
                            not args.no_draft, pixels), flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(run_command(main))
