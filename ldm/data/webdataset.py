"""Read image-caption shards into training samples.

    >>> from ldm.data.webdataset import make_shard_dataset, collate
    >>> dataset = make_shard_dataset("data/shapes/train/{000000..000009}.tar", resolution=32)  # doctest: +SKIP
    >>> batch = collate([next(iter(dataset))])  # doctest: +SKIP
    >>> batch["pixel_values"].shape  # doctest: +SKIP
    torch.Size([1, 3, 32, 32])

Each sample is `{"pixel_values": (3, R, R) float in [-1, 1], "caption": str, "key": str}`.
Corrupt samples are skipped with a warning naming shard and key.
"""

import glob
import io
import json
import os
import random
import warnings
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from ldm.data.shards import IMAGE_EXTENSIONS, read_manifest
from ldm.data.transforms import ImageTransform

CAPTION_EXTENSIONS = ("txt", "json")
_READ_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + CAPTION_EXTENSIONS)


class SampleError(Exception):
    """A sample that cannot be turned into a training example."""

    def __init__(self, url, key, reason):
        super().__init__(f"shard {url}, key {key}: {reason}")
        self.url, self.key = url, key


def warn_and_skip(error: Exception) -> bool:
    """WebDataset exception handler: warn naming shard and key, then go on (no sleep)."""
    url, key = getattr(error, "url", None), getattr(error, "key", None)
    if url is not None or key is not None:
        cause = error.__cause__ if error.__cause__ is not None else error
        message = f"skipping sample {key!r} of shard {url}: {cause!r}"
    else:  # errors while opening or reading a tar carry the shard in their args
        message = f"skipping unreadable shard data: {error!r}"
    warnings.warn(message, stacklevel=2)
    return True


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_urls(urls: str | os.PathLike | list | tuple) -> list[str]:
    """Expand shard specs to a list of urls.

    Accepts a brace pattern (`dir/{000000..000009}.tar`), a glob (`dir/*.tar`), a folder
    (all `*.tar` inside, sorted), `::`-joined specs, or a list of any of these.
    Local files must exist.
    """
    if isinstance(urls, (list, tuple)):
        return [url for spec in urls for url in expand_urls(spec)]
    pattern = os.fspath(urls)
    expanded = []
    for url in wds.shardlists.expand_urls(pattern):
        if _is_remote(url):
            expanded.append(url)
        elif os.path.isdir(url):
            expanded.extend(sorted(glob.glob(os.path.join(url, "*.tar"))))
        elif glob.has_magic(url):
            expanded.extend(sorted(glob.glob(url)))
        elif os.path.exists(url):
            expanded.append(url)
        else:
            raise FileNotFoundError(f"shard {url} of {pattern!r} does not exist")
    if not expanded:
        raise FileNotFoundError(f"no shards match {pattern!r}")
    return expanded


def count_samples(urls: list[str]) -> int | None:
    """Total samples in local shards according to their folders' manifest.json, else None."""
    counts: dict[str, int] = {}
    for folder in {os.path.dirname(url) for url in urls if not _is_remote(url)}:
        manifest = read_manifest(folder) or {"shards": []}
        counts.update({os.path.join(folder, s["name"]): s["count"] for s in manifest["shards"]})
    if not all(url in counts for url in urls):
        return None
    return sum(counts[url] for url in urls)


def caption_choices(sample: dict) -> list[str]:
    """Captions of a decoded sample: .json "caption" (or "text"), a string or list, else .txt."""
    record = sample.get("json")
    captions = record.get("caption", record.get("text")) if isinstance(record, dict) else None
    if captions is None and "txt" in sample:
        captions = sample["txt"]
    if captions is None:
        raise ValueError("no caption (.txt, or .json with 'caption')")
    captions = [captions] if isinstance(captions, str) else captions
    if not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"caption must be a string or a non-empty list of strings, got {captions!r}")
    return [c.strip() for c in captions]


def _is_read_file(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in _READ_EXTENSIONS


def _is_caption_file(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in CAPTION_EXTENSIONS


def _decode_image(key: str, data: bytes):
    """WebDataset decoder: image bytes -> PIL image in its own mode (converted later by to_rgb)."""
    if key.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
        return None
    image = Image.open(io.BytesIO(data))
    image.load()  # raises now on truncated files, not later inside a transform
    return image


class ToTrainingSample:
    """Decoded wds sample -> {"pixel_values", "caption", "key"}.

    A JSON caption list yields one random caption per visit, from an RNG seeded by
    (seed, rank, dataloader worker) so workers differ but runs repeat.
    """

    def __init__(self, transform: ImageTransform, seed: int = 0):
        self.transform = transform
        self.seed = seed
        self._rng = None

    def rng(self) -> random.Random:
        if self._rng is None:  # created lazily, inside the worker process
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            self._rng = random.Random(f"{self.seed}-{rank}-{worker}")
        return self._rng

    def caption(self, sample: dict) -> str:
        return self.rng().choice(caption_choices(sample))

    def __call__(self, sample: dict) -> dict:
        url, key = sample.get("__url__"), sample.get("__key__")
        try:
            image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
            if image is None:
                raise ValueError(f"no image ({', '.join(IMAGE_EXTENSIONS)})")
            return {"pixel_values": self.transform(image), "caption": self.caption(sample), "key": key}
        except Exception as error:
            raise SampleError(url, key, repr(error)) from error


def make_shard_dataset(
    urls,
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = True,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    shardshuffle: bool = True,
    split_by_node: bool = True,
) -> wds.WebDataset:
    """A WebDataset pipeline yielding {"pixel_values": (3, R, R), "caption", "key"} dicts.

    Shards are split over DDP ranks (`split_by_node`) and then dataloader workers; a rank or
    worker with no shard yields nothing. `shuffle_buffer=0` keeps the order within shards.
    Shuffles are seeded by `seed` and change every pass.
    """
    shard_urls = expand_urls(urls)
    dataset = wds.WebDataset(
        shard_urls,
        handler=warn_and_skip,
        shardshuffle=len(shard_urls) if shardshuffle else False,
        detshuffle=True,
        seed=seed,
        nodesplitter=wds.split_by_node if split_by_node else None,
        workersplitter=wds.split_by_worker,
        select_files=_is_read_file,
        empty_check=False,  # fewer shards than workers is fine: idle workers yield nothing
    )
    if shuffle_buffer > 0:
        dataset = dataset.compose(wds.detshuffle(shuffle_buffer, initial=min(100, shuffle_buffer), seed=seed))
    dataset = dataset.decode(_decode_image, only=_READ_EXTENSIONS, handler=warn_and_skip)
    transform = ImageTransform(resolution, center_crop=center_crop, random_flip=random_flip)
    return dataset.map(ToTrainingSample(transform, seed=seed), handler=warn_and_skip)


def read_captions(urls, n: int) -> list[str]:
    """The first n captions of the shards, in shard order (first caption of a JSON list)."""
    captions = []
    dataset = wds.WebDataset(
        expand_urls(urls),
        shardshuffle=False,
        nodesplitter=None,
        workersplitter=None,
        select_files=_is_caption_file,
        empty_check=False,
    ).decode(only=CAPTION_EXTENSIONS)
    for sample in dataset:
        if len(captions) >= n:
            break
        try:
            captions.append(caption_choices(sample)[0])
        except ValueError as error:
            warn_and_skip(SampleError(sample.get("__url__"), sample.get("__key__"), error))
    return captions


def collate(batch: list[dict]) -> dict:
    """List of samples -> {"pixel_values": (B, 3, R, R), "caption": list[str], "key": list[str]}."""
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in batch]),
        "caption": [sample["caption"] for sample in batch],
        "key": [sample["key"] for sample in batch],
    }
