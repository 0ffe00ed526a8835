"""Reference (real-data) FID statistics from shards, computed once and cached on disk.

    states = reference_states(fid, "data/shapes/val", resolution=32, num_images=10_000, cache_dir="data/fid_cache")
    set_real_states(fid, states)

The cache file is named by a hash of its key and holds the key: the shard files (absolute path, size,
mtime), the resolution, the number of images, the network file (path and SHA-256) and the preprocessing.
Any change gives another key, so a stale file is never read; a file whose stored key differs is recomputed.
Remote shards (s3://, pipe:) are keyed by their URL only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance

from ldm.data.format import expand_urls, is_remote
from ldm.data.webdataset import make_shard_dataset
from ldm.metrics.fid import real_states, set_real_states, to_uint8
from ldm.metrics.inception import default_network_path

# Bump when the way images become features changes (crop, resize, quantisation, input range).
PREPROCESSING = "v1: shard image -> ImageTransform(resolution, center crop) -> uint8 -> TF1 bilinear 299 -> (x-128)/128"


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, computed once per (path, size, mtime) in this process."""
    st = os.stat(path)
    return _sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _shard_entry(url: str) -> dict:
    if is_remote(url):
        return {"url": url}
    st = os.stat(url)
    return {"path": os.path.abspath(url), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def reference_key(urls, resolution: int, num_images: int, network: str | Path | None = None) -> dict:
    """Everything the reference statistics depend on, as a JSON-able dict."""
    network_path = Path(network) if network is not None else default_network_path()
    return {
        "shards": [_shard_entry(url) for url in expand_urls(urls)],
        "resolution": int(resolution),
        "num_images": int(num_images),
        "network": {"path": str(network_path.resolve()), "sha256": file_sha256(network_path)},
        "preprocessing": PREPROCESSING,
    }


def cache_path(cache_dir: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"fid_reference_{digest}.pt"


def shard_images(urls, resolution: int, num_images: int, batch_size: int = 50) -> Iterator[Tensor]:
    """The first ``num_images`` images of the shards in shard order, as uint8 batches (B, 3, R, R)."""
    dataset = make_shard_dataset(urls, resolution, center_crop=True, random_flip=False, shuffle_buffer=0,
                                 shardshuffle=False, split_by_node=False)
    batch, seen = [], 0
    for sample in dataset:
        if seen >= num_images:
            break
        batch.append(sample["pixel_values"])  # (3, R, R) in [-1, 1]
        seen += 1
        if len(batch) == batch_size:
            yield to_uint8(torch.stack(batch) / 2 + 0.5)
            batch = []
    if batch:
        yield to_uint8(torch.stack(batch) / 2 + 0.5)


def compute_reference_states(fid: FrechetInceptionDistance, urls, resolution: int, num_images: int,
                             batch_size: int = 50) -> dict[str, Tensor]:
    """Real-side sum states of ``fid`` over the shards' first ``num_images`` images (fid's real side is reset)."""
    set_real_states(fid, None)
    for images in shard_images(urls, resolution, num_images, batch_size):
        fid.update(images.to(fid.device), real=True)
    if int(fid.real_features_num_samples) < 2:
        raise ValueError(f"FID reference: fewer than 2 images in {urls}")
    return real_states(fid)


def reference_states(fid: FrechetInceptionDistance, urls, resolution: int, num_images: int,
                     cache_dir: str | Path, network: str | Path | None = None, batch_size: int = 50,
                     ) -> dict[str, Tensor]:
    """Reference states from the cache when its key matches, else computed and written (atomically)."""
    key = reference_key(urls, resolution, num_images, network)
    path = cache_path(cache_dir, key)
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == json.loads(json.dumps(key)):
            return cached["states"]
    states = compute_reference_states(fid, urls, resolution, num_images, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"key": key, "states": states}, tmp)
    os.replace(tmp, path)
    return states
