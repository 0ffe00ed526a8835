"""Synthetic photo-like JPEG shards, for benchmarks (throughput of loading, encoding and training), square-ish or
spread over aspect-ratio buckets.

    >>> from ldm.data.synthetic import synthetic_shards
    >>> synthetic_shards("data/bench", resolution=256, n=640)  # doctest: +SKIP
    PosixPath('data/bench/photos256')
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.buckets import generate_buckets
from ldm.data.format import read_manifest
from ldm.data.shards import write_shards


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth random colour field with fine grain: JPEG-compresses like a photo, unlike pure noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                     Image.Resampling.BICUBIC)  # fmt: skip
    grain = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


def synthetic_shards(root: str | Path, resolution: int, n: int) -> Path:
    """n images (4:3, short side a bit above `resolution`, as after `make_shards.py --max-size`) as JPEG
    shards under root/photos<resolution>, written unless they exist."""
    out = Path(root) / f"photos{resolution}"
    if read_manifest(out) is None or read_manifest(out)["total"] != n:
        rng = np.random.default_rng(resolution)
        size = (resolution * 3 // 2, resolution * 9 // 8)  # 4:3, short side a bit above the resolution
        samples = ((f"{i:07d}", photo_like(rng, *size), f"synthetic photo {i}") for i in range(n))
        write_shards(samples, out, samples_per_shard=max(1, n // 32), image_format="jpg", quality=90, total=n)
    return out


def bucket_step(resolution: int) -> int:
    """The bucket step benchmarks use: 64 (SD's U-Net wants latents divisible by 8), 8 below 256 px (smoke runs)."""
    return 64 if resolution >= 256 else 8


def synthetic_bucket_shards(root: str | Path, resolution: int, n: int, max_aspect: float = 2.0) -> Path:
    """n photo-like JPEGs spread evenly over the aspect-ratio buckets of `resolution` squared pixels (step
    `bucket_step`, aspect ratio up to `max_aspect`), each 1/8 larger than its bucket, under
    root/mixed<resolution>, written unless they exist. A mixed-aspect set for bucketed-throughput benchmarks."""
    out = Path(root) / f"mixed{resolution}"
    if read_manifest(out) is None or read_manifest(out)["total"] != n:
        rng = np.random.default_rng(resolution + 1)
        buckets = generate_buckets(resolution * resolution, bucket_step(resolution), max_aspect)
        sizes = [(w * 9 // 8, h * 9 // 8) for w, h in buckets]
        samples = ((f"{i:07d}", photo_like(rng, *sizes[i % len(sizes)]), f"synthetic photo {i}") for i in range(n))
        write_shards(samples, out, samples_per_shard=max(1, n // 32), image_format="jpg", quality=90, total=n)
    return out
