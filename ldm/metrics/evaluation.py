"""Standalone evaluation: FID / CLIP score of a generator against shards, or FID between two image sets.

    evaluate_generator(generate, resolution, "data/shapes/val", num_images=1000, cache_dir="data/fid_cache")
    fid_between("imgs/a", "data/shapes/val", num_images=1000, resolution=32)   # folders or shard sets

An image set is a folder of image files (read as 8-bit RGB at their own size, sorted by path, recursively) or
a shard spec (read with `shard_images` at ``resolution``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldm.data.webdataset import read_captions
from ldm.metrics.clip_score import make_clip_score
from ldm.metrics.fid import make_fid, set_real_states
from ldm.metrics.generated import Generate, cycle_to, update_generated
from ldm.metrics.reference import reference_states, shard_images

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def folder_images(folder: str | Path, num_images: int | None = None, batch_size: int = 50) -> Iterator[Tensor]:
    """uint8 batches (B, 3, H, W) of a folder's images; a batch is cut early where the image size changes."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:num_images]
    if not paths:
        raise FileNotFoundError(f"no images in {folder}")
    batch: list[np.ndarray] = []
    for path in paths:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))  # (H, W, 3)
        if batch and array.shape != batch[0].shape:
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
            batch = []
        batch.append(array)
        if len(batch) == batch_size:
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
            batch = []
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)


def image_set(source: str, num_images: int | None, resolution: int | None, batch_size: int = 50) -> Iterator[Tensor]:
    if Path(source).is_dir() and not list(Path(source).glob("*.tar")):
        return folder_images(source, num_images, batch_size)
    if resolution is None:
        raise ValueError(f"{source} is a shard set: give the resolution to read it at")
    return shard_images(source, resolution, num_images if num_images is not None else 2**62, batch_size)


def fid_between(a: str, b: str, num_images: int | None = None, resolution: int | None = None,
                network: str | None = None, batch_size: int = 50, device: str = "cpu") -> dict:
    """FID between two image sets (folders or shards), each limited to its first ``num_images``."""
    t0 = time.perf_counter()
    fid = make_fid(network).to(device)
    for source, real in ((a, True), (b, False)):
        for images in image_set(source, num_images, resolution, batch_size):
            fid.update(images.to(device), real=real)
    return {"fid": float(fid.compute()), "num_images_a": int(fid.real_features_num_samples),
            "num_images_b": int(fid.fake_features_num_samples), "seconds": time.perf_counter() - t0}


def evaluate_generator(generate: Generate, resolution: int, shards: str, num_images: int,
                       num_reference: int | None = None, cache_dir: str = "data/fid_cache",
                       network: str | None = None, clip_model: str | None = None, batch_size: int = 50,
                       seed: int = 0, device: str = "cpu", guidance_scales: Sequence[float] | None = None,
                       progress: Callable[[dict], None] | None = None) -> dict:
    """FID (and CLIP score) of ``num_images`` images for the shards' captions, image i with seed seed + i.

    ``guidance_scales`` (a sweep; ``generate`` then takes ``guidance_scale=``): one evaluation per scale on the same
    reference statistics, captions and seeds; the result lists them under "sweep" (each with its "guidance_scale")
    and its top-level figures are those of the lowest FID. None or one scale: one evaluation, no "sweep".
    ``progress`` gets each scale's figures as soon as they are computed.
    """
    t0 = time.perf_counter()
    fid = make_fid(network).to(device)
    set_real_states(fid, reference_states(fid, shards, resolution, num_reference or num_images, cache_dir,
                                          network, batch_size))
    clip = make_clip_score(clip_model).to(device) if clip_model else None
    captions = cycle_to(read_captions(shards, num_images), num_images)
    seeds = [seed + i for i in range(num_images)]
    rows = []
    for scale in guidance_scales or [None]:
        start = time.perf_counter()
        fid.reset()  # the generated side only (reset_real_features=False)
        if clip is not None:
            clip.reset()
        at_scale = generate if scale is None else functools.partial(generate, guidance_scale=scale)
        update_generated(at_scale, captions, seeds, fid, clip, batch_size)
        row = {} if scale is None else {"guidance_scale": scale}
        row |= {"val/fid": float(fid.compute()), "num_images": num_images,
                "num_reference": int(fid.real_features_num_samples)}
        if clip is not None:
            row["val/clip_score"] = float(clip.compute())
        rows.append(row | {"seconds": time.perf_counter() - start})
        if progress is not None:
            progress(rows[-1])
    if len(rows) == 1:
        return rows[0] | {"seconds": time.perf_counter() - t0}
    best = min(rows, key=lambda row: row["val/fid"])
    return best | {"sweep": rows, "seconds": time.perf_counter() - t0}
