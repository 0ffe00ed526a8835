"""Synthetic photo-like JPEG shards, for benchmarks (throughput of loading, encoding and training).

    >>> from ldm.data.synthetic import synthetic_shards
    >>> synthetic_shards("data/bench", resolution=256, n=640)  # doctest: +SKIP
    PosixPath('data/bench/photos256')
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

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
