"""Cached latents: image shards encoded once by the frozen VAE and text encoder.

Training on them (`data=latents`) runs only the U-Net: the frozen encoders are not even loaded
until something needs to decode or encode (sample grids, FID, export).

    python scripts/precompute_latents.py data/laion data/laion-latents --resolution 512 \\
        --vae runs/vae/export --text-encoder data/models/clip --device cuda
    python -m ldm.train data=latents data.train_shards=data/laion-latents data.val_shards=data/laion-val

A latent shard holds, per sample `<key>`:
    mean.npy, std.npy            (C, h, w) float16: the VAE posterior's mean and std, already scaled,
                                 ((mean - shift) * scaling_factor, std * scaling_factor): mean + std * eps
                                 is a training latent, drawn afresh at every visit as on the fly
    flip_mean.npy, flip_std.npy  the same for the horizontally flipped image (written unless flips are off;
                                 `random_flip` then picks one of the two per visit, like the image pipeline)
    text.npy                     (K, L, D) float16: the text encoder's hidden states of the sample's K captions
    json                         the K captions (one is chosen per visit, as for image shards)
Beside the shards: `latents.json` (what wrote them: VAE, text encoder, resolution, scaling) and
`empty_text.npy`, the empty caption's hidden states (1, L, D) that caption dropout substitutes.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from ldm.data.datamodule import ShardDataModule
from ldm.data.format import (
    caption_choices,
    decode_texts,
    expand_urls,
    image_bytes,
    shard_counts,
    shard_folder,
    write_manifest_file,
)
from ldm.data.health import DataHealth
from ldm.data.shards import ShardSink
from ldm.data.transforms import ImageTransform, to_model_range
from ldm.data.webdataset import (
    ReadShards,
    SampleError,
    ShardList,
    ToTrainingSample,
    ToTrainingSamples,
    warn_and_skip,
)

META = "latents.json"
EMPTY = "empty_text.npy"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_meta(urls) -> dict:
    path = shard_folder(urls) / META
    if not path.exists():
        raise FileNotFoundError(f"data.train_shards={urls}: no {META} beside the shards; these are not latent "
                                f"shards (write them with scripts/precompute_latents.py)")  # fmt: skip
    return json.loads(path.read_text())


# --- writing -----------------------------------------------------------------------------------
class _SourceSamples:
    """Pipeline stage: raw image-shard samples -> {"key", "pixels" (3, R, R) uint8, "captions": [str]}."""

    def __init__(self, resolution: int, health: DataHealth):
        transform = ImageTransform(resolution, center_crop=True, random_flip=False, uint8=True)
        self.decode, self.transform, self.health = ToTrainingSample(transform, jpeg_draft=True), transform, health

    def __call__(self, samples):
        for sample in samples:
            try:
                data = image_bytes(sample)
                if data is None:
                    raise ValueError("no image")
                out = {"key": sample["__key__"], "pixels": self.transform(self.decode.image(data)),
                       "captions": caption_choices(decode_texts(sample))}  # fmt: skip
            except Exception as error:  # counted and named, never fatal: same policy as training reads
                self.health.add("skipped")
                warn_and_skip(SampleError(sample.get("__url__"), sample.get("__key__"), repr(error)))
                continue
            self.health.add("ok")
            yield out


def _collate_source(samples: list[dict]) -> dict:
    return {"key": [s["key"] for s in samples], "pixels": torch.stack([s["pixels"] for s in samples]),
            "captions": [s["captions"] for s in samples]}  # fmt: skip


@torch.no_grad()
def encode_batch(vae, text_encoder, pixels: torch.Tensor, captions: list[list[str]], flip: bool) -> list[dict]:
    """One batch of images (B, 3, R, R) uint8 and their captions -> per-sample arrays of a latent shard."""
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    x = to_model_range(pixels.to(vae.device)).to(vae.dtype)  # (B, 3, R, R) in [-1, 1]
    views = {"": x, "flip_": x.flip(-1)} if flip else {"": x}
    arrays: dict[str, np.ndarray] = {}
    for prefix, view in views.items():
        posterior = vae.encode(view).latent_dist  # mean, std: (B, C, R/f, R/f)
        arrays[prefix + "mean.npy"] = ((posterior.mean.float() - shift) * scale).half().cpu().numpy()
        arrays[prefix + "std.npy"] = (posterior.std.float() * scale).half().cpu().numpy()
    distinct = list(dict.fromkeys(c for cs in captions for c in cs))
    hidden = dict(zip(distinct, text_encoder.encode(distinct).half().cpu().numpy()))  # caption -> (L, D)
    return [
        {**{name: a[i] for name, a in arrays.items()}, "text.npy": np.stack([hidden[c] for c in captions[i]]),
         "json": captions[i]}  # fmt: skip
        for i in range(len(captions))
    ]


def precompute_latents(
    image_shards,
    out_dir: str | os.PathLike,
    vae,
    text_encoder,
    resolution: int,
    batch_size: int = 32,
    flip: bool = True,
    samples_per_shard: int = 1000,
    num_workers: int = 4,
    source: dict | None = None,
    progress: bool = True,
) -> dict:
    """Encode every sample of ``image_shards`` (centre-cropped to ``resolution``) into latent shards under
    ``out_dir``; returns the manifest. Shards are written as `*.tar.tmp` and renamed when complete;
    ``source`` (what the VAE and text encoder are) goes into latents.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    urls = expand_urls(image_shards)
    health = DataHealth()
    pipeline = wds.DataPipeline(
        ShardList(urls, 0, 1, shuffle=False, seed=0, resampled=False),
        ReadShards(health, expected_counts=shard_counts(urls)),
        _SourceSamples(resolution, health),
        wds.batched(batch_size, collation_fn=_collate_source, partial=True),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=min(num_workers, len(urls)))
    shards: list[dict] = []
    latent_shape = None
    total = sum(shard_counts(urls).values()) or None
    with ShardSink(out, shards) as sink, tqdm(total=total, desc=f"encoding -> {out}", unit="img",
                                              disable=not progress) as bar:  # fmt: skip
        for batch in loader:
            for key, arrays in zip(batch["key"], encode_batch(vae, text_encoder, batch["pixels"], batch["captions"], flip)):
                latent_shape = latent_shape or list(arrays["mean.npy"].shape)
                record = {"__key__": key, "json": json.dumps(arrays.pop("json")).encode()}
                record.update({name: npy_bytes(a) for name, a in arrays.items()})
                sink.write(record)
                if sink.count == samples_per_shard:
                    sink.finish()
            bar.update(len(batch["key"]))
    if not shards:
        raise ValueError(f"{image_shards}: no sample could be encoded")
    empty = text_encoder.encode([""]).half().cpu().numpy()  # (1, L, D)
    np.save(out / EMPTY, empty, allow_pickle=False)
    meta = {
        "resolution": resolution,
        "latent_shape": latent_shape,
        "text_shape": list(empty.shape[1:]),
        "flip": flip,
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": vae.config.shift_factor,
        "source": {"image_shards": str(image_shards), **(source or {})},
        "skipped": health.totals().get("skipped", 0),
    }
    (out / META).write_text(json.dumps(meta, indent=1))
    manifest = {"shards": shards, "total": sum(s["count"] for s in shards), "image_format": "latents"}
    write_manifest_file(out, manifest)
    return manifest


# --- reading -----------------------------------------------------------------------------------
def is_latent_file(name: str) -> bool:
    return name.endswith((".npy", ".json"))


class ToLatentSample:
    """Raw latent-shard sample -> {"latent_mean", "latent_std", "text_hidden", "caption", "key"};
    raises SampleError naming shard and key. Flip and caption choice from an RNG seeded by
    (seed, pass, shard, key), as ToTrainingSample does for images (exact resume)."""

    def __init__(self, random_flip: bool = True, seed: int = 0):
        self.random_flip, self.seed = random_flip, seed

    def rng(self, sample: dict) -> random.Random:
        return random.Random(f"latents-{self.seed}-{sample.get('__pass__', 0)}-{sample.get('__url__')}-"
                             f"{sample.get('__key__')}")  # fmt: skip

    def __call__(self, sample: dict) -> dict:
        url, key = sample.get("__url__"), sample.get("__key__")
        try:
            rng = self.rng(sample)
            prefix = "flip_" if self.random_flip and "flip_mean.npy" in sample and rng.random() < 0.5 else ""
            captions = decode_texts(sample)["json"]  # the list of every caption, as written
            text = load_npy(sample["text.npy"])  # (K, L, D)
            if text.shape[0] != len(captions):
                raise ValueError(f"{len(captions)} captions but {text.shape[0]} encodings")
            i = rng.randrange(len(captions))
            return {
                "latent_mean": torch.from_numpy(load_npy(sample[prefix + "mean.npy"])),  # (C, h, w) fp16
                "latent_std": torch.from_numpy(load_npy(sample[prefix + "std.npy"])),
                "text_hidden": torch.from_numpy(np.ascontiguousarray(text[i])),  # (L, D) fp16
                "caption": captions[i],
                "key": key,
            }
        except Exception as error:
            raise SampleError(url, key, repr(error)) from error


def make_latent_dataset(urls, random_flip: bool = True, shuffle_buffer: int = 1000, seed: int = 0,
                        resampled: bool = False, health: DataHealth | None = None, rank: int = 0,
                        world_size: int = 1, shardshuffle: bool = True) -> wds.DataPipeline:  # fmt: skip
    """Latent shards -> samples, split over ranks and workers exactly as image shards are."""
    urls = expand_urls(urls)
    health = health if health is not None else DataHealth()
    stages = [
        ShardList(urls, rank, world_size, shuffle=shardshuffle, seed=seed, resampled=resampled),
        ReadShards(health, expected_counts=shard_counts(urls), select=is_latent_file),
    ]
    if shuffle_buffer > 0:
        stages.append(wds.detshuffle(shuffle_buffer, initial=min(100, shuffle_buffer), seed=seed))
    stages.append(ToTrainingSamples(ToLatentSample(random_flip, seed), health))
    dataset = wds.DataPipeline(*stages)
    dataset.health = health
    return dataset


def collate_latents(samples: list[dict]) -> dict:
    return {name: torch.stack([s[name] for s in samples]) if torch.is_tensor(first) else [s[name] for s in samples]
            for name, first in samples[0].items()}  # fmt: skip


class LatentShardDataModule(ShardDataModule):
    """Batches {"latent_mean", "latent_std": (B, C, h, w), "text_hidden": (B, L, D), "caption", "key"}
    from latent shards; `empty_hidden` (1, L, D) is the cached empty caption. `val_shards` are image
    shards (FID reference images and captions), as with `ShardDataModule`."""

    def __init__(self, train_shards: str, val_shards: str | None, batch_size: int, num_workers: int | None = 2,
                 random_flip: bool = True, shuffle_buffer: int = 1000, seed: int = 0,
                 samples_per_epoch: int | None = None, max_bad_fraction: float = 0.0,
                 resolution: int | None = None):  # fmt: skip
        self.meta = read_meta(train_shards)
        if resolution is not None and resolution != self.meta["resolution"]:
            raise ValueError(f"data.resolution={resolution} but the latent shards {train_shards} were encoded at "
                             f"{self.meta['resolution']}: precompute them again or drop the override")  # fmt: skip
        super().__init__(train_shards, val_shards, self.meta["resolution"], batch_size, num_workers=num_workers,
                         random_flip=random_flip, shuffle_buffer=shuffle_buffer, seed=seed,
                         samples_per_epoch=samples_per_epoch, max_bad_fraction=max_bad_fraction)  # fmt: skip
        self.empty_hidden = torch.from_numpy(np.load(shard_folder(train_shards) / EMPTY, allow_pickle=False))

    collate = staticmethod(collate_latents)
    cached_encodings = True  # batches hold VAE latents and text encodings: the frozen encoders are not needed

    def train_dataset(self, urls: list[str], resampled: bool, rank: int, world_size: int):
        return make_latent_dataset(urls, self.random_flip, self.shuffle_buffer, self.seed, resampled,
                                   self.train_health, rank, world_size)  # fmt: skip
