"""Cached latents: image shards encoded once by the frozen VAE and text encoder.

Training on them (`data=latents`) runs only the U-Net: the frozen encoders are not even loaded
until something needs to decode or encode (sample grids, FID, export).

    python scripts/precompute_latents.py data/laion-latents data=shards data.train_shards=data/laion \
        data.resolution=512 [data.buckets='{max_aspect: 2.0}'] --device cuda
    python -m ldm.train data=latents data.train_shards=data/laion-latents data.val_shards=data/laion-val

A latent shard holds, per sample `<key>`:
    mean.npy, std.npy            (C, h, w) float16: the VAE posterior's mean and std, already scaled,
                                 ((mean - shift) * scaling_factor, std * scaling_factor): mean + std * eps
                                 is a training latent, drawn afresh at every visit as on the fly
    flip_mean.npy, flip_std.npy  the same for the horizontally flipped image (written unless flips are off;
                                 `random_flip` then picks one of the two per visit, like the image pipeline)
    text.npy                     (K, L, D) float16: the text encoder's hidden states of the sample's K captions
    pooled.npy                   (K, P) float16: their pooled embeddings, for a family that has one (SDXL)
    json                         {"caption": the K captions (one is chosen per visit, as for image shards),
                                 "original_size", "crop_top_left", "target_size": the geometry, (height, width)}
    mask.npy, flip_mask.npy      (1, h, w) float16 in [0, 1]: the loss mask at latent size (images with a mask)
With buckets, each image is encoded at the bucket of its aspect ratio (h, w differ between samples; a VAE batch
holds one bucket) and training reads planned batches, one bucket each. Beside the shards: `latents.json` (what
wrote them: VAE, text encoder, resolution, buckets, scaling), `sizes.json` (each sample's bucket) and
`empty_text.npy`, the unconditional hidden states (1, L, D) that caption dropout substitutes (the empty caption's;
SDXL's zeros), and for SDXL `empty_pooled.npy` (1, P).
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from pytorch_lightning.utilities import rank_zero_info
from tqdm import tqdm

from ldm.data.buckets import assign_bucket, parse_buckets
from ldm.data.captions import CaptionProcessor
from ldm.data.datamodule import ShardDataModule
from ldm.data.format import (
    caption_choices,
    decode_texts,
    expand_urls,
    shard_counts,
    shard_folder,
    write_manifest_file,
    write_sizes_file,
)
from ldm.data.health import DataHealth
from ldm.data.shards import ShardSink
from ldm.data.sizes import plan_records
from ldm.data.transforms import ImageTooSmall, ImageTransform, to_model_range
from ldm.data.webdataset import (
    GEOMETRY,
    ReadShards,
    SampleError,
    ShardList,
    ToTrainingSample,
    ToTrainingSamples,
    warn_and_skip,
)

META = "latents.json"
DISTINCT_CAPTIONS_KEPT = 65536  # latents.json counts distinct captions up to this many (null: more, or not counted)
EMPTY = "empty_text.npy"
EMPTY_POOLED = "empty_pooled.npy"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """(dtype, shape, Fortran order) of an .npy file's header bytes, parsed (and checked) by numpy once per distinct
    header: numpy parses it with `ast.literal_eval` on every load, a sixth of the loader's time per cached latent,
    and the headers of a latent set repeat."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    if dtype.hasobject:
        raise ValueError("an .npy array of Python objects (pickled) is not loaded")
    return dtype, shape, fortran


def load_npy(data: bytes) -> np.ndarray:
    """`np.load(io.BytesIO(data), allow_pickle=False)`, with the header parsed once per distinct header."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        return np.load(io.BytesIO(data), allow_pickle=False)  # numpy's own error
    size = 2 if data[6] == 1 else 4  # the header length's bytes: 2 in format 1.0, 4 in 2.0 and 3.0
    offset = 8 + size + int.from_bytes(data[8 : 8 + size], "little")
    dtype, shape, fortran = _npy_header(bytes(data[:offset]))
    count = math.prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"an .npy array of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} bytes of "
                         f"data, got {len(data) - offset}")  # fmt: skip
    array = np.frombuffer(data, dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C").copy(order="K")  # writable, as np.load's


def read_meta(urls) -> dict:
    path = shard_folder(urls) / META
    if not path.exists():
        raise FileNotFoundError(f"data.train_shards={urls}: no {META} beside the shards; these are not latent "
                                f"shards (write them with scripts/precompute_latents.py)")  # fmt: skip
    return json.loads(path.read_text())


# --- writing -----------------------------------------------------------------------------------
class _SourceSamples:
    """Pipeline stage: raw image-shard samples -> {"key", "pixels" (3, H, W) uint8, "captions": [str], "geometry",
    "mask" (1, H, W) uint8 or None}, each centre-cropped at its target: its bucket (`targets`, by (url, key);
    samples without one are too small and left out, counted), else (resolution, resolution)."""

    def __init__(self, resolution: int, health: DataHealth, targets: dict | None = None, upscale: bool = True):
        transform = ImageTransform(resolution, center_crop=True, random_flip=False, upscale=upscale, uint8=True)
        self.decode, self.health, self.targets = ToTrainingSample(transform, jpeg_draft=True), health, targets

    def __call__(self, samples):
        for sample in samples:
            if self.targets is not None and (sample.get("__url__"), sample.get("__key__")) not in self.targets:
                self.health.add("too_small")  # too small for every bucket (the planner's verdict), or unreadable
                continue
            if self.targets is not None:
                sample["__size__"] = self.targets[(sample["__url__"], sample["__key__"])]
            try:
                out = self.decode(sample)
                out["captions"] = caption_choices(decode_texts(sample))
            except ImageTooSmall:
                self.health.add("too_small")
                continue
            except SampleError as error:  # counted and named, never fatal: same policy as training reads
                self.health.add("skipped")
                warn_and_skip(error)
                continue
            self.health.add("ok")
            yield {"key": out["key"], "pixels": out["pixel_values"], "captions": out["captions"],
                   "geometry": {name: list(out[name]) for name in GEOMETRY}, "mask": out.get("mask")}  # fmt: skip


def _area(mask: torch.Tensor, size) -> np.ndarray:
    """(1, H, W) uint8 mask -> (1, h, w) float16 weights in [0, 1]: the share of each latent pixel's pixels to learn."""
    weights = torch.nn.functional.interpolate(mask[None].float() / 255.0, size=tuple(size), mode="area")[0]
    return weights.half().numpy()


@torch.no_grad()
def encode_batch(vae, text_encoder, pixels: torch.Tensor, captions: list[list[str]], flip: bool,
                 masks: list | None = None, geometry: list[dict] | None = None) -> list[dict]:  # fmt: skip
    """One batch of images (B, 3, H, W) uint8 (one size) and their captions -> per-sample arrays of a latent shard
    (masks (1, H, W) uint8 or None per sample become `mask.npy` at latent size; geometry goes into the json)."""
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    x = to_model_range(pixels.to(vae.device)).to(vae.dtype)  # (B, 3, H, W) in [-1, 1]
    views = {"": x, "flip_": x.flip(-1)} if flip else {"": x}
    arrays: dict[str, np.ndarray] = {}
    for prefix, view in views.items():
        posterior = vae.encode(view).latent_dist  # mean, std: (B, C, H/f, W/f)
        arrays[prefix + "mean.npy"] = ((posterior.mean.float() - shift) * scale).half().cpu().numpy()
        arrays[prefix + "std.npy"] = (posterior.std.float() * scale).half().cpu().numpy()
    distinct = list(dict.fromkeys(c for cs in captions for c in cs))
    encoded = text_encoder.condition(distinct)
    hidden = dict(zip(distinct, encoded["encoder_hidden_states"].half().cpu().numpy()))  # caption -> (L, D)
    pooled = (dict(zip(distinct, encoded["text_embeds"].half().cpu().numpy()))  # caption -> (P,), SDXL
              if "text_embeds" in encoded else None)  # fmt: skip
    latent_size = arrays["mean.npy"].shape[-2:]
    out = []
    for i in range(len(captions)):
        sample = {name: a[i] for name, a in arrays.items()}
        sample["text.npy"] = np.stack([hidden[c] for c in captions[i]])
        if pooled is not None:
            sample["pooled.npy"] = np.stack([pooled[c] for c in captions[i]])
        sample["json"] = {"caption": captions[i], **((geometry or [{}] * len(captions))[i])}
        if masks is not None and masks[i] is not None:
            sample["mask.npy"] = _area(masks[i], latent_size)
            if flip:
                sample["flip_mask.npy"] = np.ascontiguousarray(sample["mask.npy"][..., ::-1])
        out.append(sample)
    return out


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
    buckets=None,
    upscale: bool = False,
) -> dict:
    """Encode every sample of ``image_shards`` into latent shards under ``out_dir``; returns the manifest.

    Each image is centre-cropped at ``resolution`` or, with ``buckets`` (as `data.buckets`), at the bucket of
    its aspect ratio (images too small for every bucket are left out unless ``upscale``); a VAE batch holds one
    size. Shards are written as `*.tar.tmp` and renamed when complete; ``source`` (what the VAE and text encoder
    are) goes into latents.json, with the buckets; sizes.json records each sample's bucket (width, height)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    urls = expand_urls(image_shards)
    health = DataHealth()
    bucket_sizes = parse_buckets(buckets, resolution)
    targets = None
    if bucket_sizes is not None:
        targets = {}
        for record in plan_records(urls):
            bucket = assign_bucket(record.size, bucket_sizes, upscale) if record.size else None
            if bucket is not None:
                targets[(record.url, record.key)] = bucket_sizes[bucket]
    pipeline = wds.DataPipeline(
        ShardList(urls, 0, 1, shuffle=False, seed=0, resampled=False),
        ReadShards(health, expected_counts=shard_counts(urls)),
        _SourceSamples(resolution, health, targets, upscale=upscale),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=min(num_workers, len(urls)))
    shards: list[dict] = []
    sizes: dict = {}
    latent_shape = factor = None
    total = sum(shard_counts(urls).values()) or None
    pending: dict[tuple[int, int], list[dict]] = {}
    distinct: set[str] | None = set()  # the captions written, counted up to DISTINCT_CAPTIONS_KEPT (None: more)

    def encode(group: list[dict], sink: ShardSink) -> None:
        nonlocal latent_shape, factor, distinct
        if distinct is not None:
            distinct.update(c for s in group for c in s["captions"])
            distinct = distinct if len(distinct) <= DISTINCT_CAPTIONS_KEPT else None
        pixels = torch.stack([s["pixels"] for s in group])
        arrays = encode_batch(vae, text_encoder, pixels, [s["captions"] for s in group], flip,
                              [s["mask"] for s in group], [s["geometry"] for s in group])  # fmt: skip
        for sample, array in zip(group, arrays):
            latent_shape = latent_shape or list(array["mean.npy"].shape)
            factor = factor or sample["pixels"].shape[-1] // array["mean.npy"].shape[-1]
            record = {"__key__": sample["key"], "json": json.dumps(array.pop("json")).encode()}
            record.update({name: npy_bytes(a) for name, a in array.items()})
            h, w = sample["pixels"].shape[-2:]
            sink.write(record, size=(w, h))
            if sink.count == samples_per_shard:
                sink.finish()

    with ShardSink(out, shards, sizes) as sink, tqdm(total=total, desc=f"encoding -> {out}", unit="img",
                                                     disable=not progress) as bar:  # fmt: skip
        for sample in loader:
            group = pending.setdefault(tuple(sample["pixels"].shape[-2:]), [])
            group.append(sample)
            if len(group) == batch_size:
                encode(group, sink)
                group.clear()
            bar.update(1)
        for group in pending.values():
            if group:
                encode(group, sink)
    if not shards:
        raise ValueError(f"{image_shards}: no sample could be encoded")
    unconditional = text_encoder.empty_condition()
    empty = unconditional["encoder_hidden_states"].half().cpu().numpy()  # (1, L, D)
    np.save(out / EMPTY, empty, allow_pickle=False)
    if "text_embeds" in unconditional:  # SDXL: (1, P)
        np.save(out / EMPTY_POOLED, unconditional["text_embeds"].half().cpu().numpy(), allow_pickle=False)
    totals = health.totals()
    meta = {
        "resolution": resolution,
        "latent_shape": latent_shape,
        "factor": factor,
        "buckets": [list(b) for b in bucket_sizes] if bucket_sizes is not None else None,
        "text_shape": list(empty.shape[1:]),
        "flip": flip,
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": vae.config.shift_factor,
        "source": {"image_shards": str(image_shards), **(source or {})},
        "skipped": totals.get("skipped", 0),
        "too_small": totals.get("too_small", 0),
        "distinct_captions": len(distinct) if distinct is not None else None,  # for data.text_states: auto
    }
    (out / META).write_text(json.dumps(meta, indent=1))
    manifest = {"shards": shards, "total": sum(s["count"] for s in shards), "image_format": "latents"}
    write_manifest_file(out, manifest)
    write_sizes_file(out, sizes)
    return manifest


# --- reading -----------------------------------------------------------------------------------
def is_latent_file(name: str) -> bool:
    return name.endswith((".npy", ".json"))


class ToLatentSample:
    """Raw latent-shard sample -> {"latent_mean", "latent_std", "text_hidden", "caption", "key", "original_size",
    "crop_top_left", "target_size"} (+ "mask" (1, h, w) float16 when written with one); raises SampleError naming
    shard and key. Flip and caption choice from an RNG seeded by (seed, pass, shard, key), as ToTrainingSample
    does for images (exact resume). With tag `captions` the caption changes per visit, and with ``text_states`` false
    the cached states are unwanted: the sample then carries no "text_hidden" (the stage encodes the caption), and
    the cached states are not even decoded. Shards written before the geometry was recorded give the target size
    (latent size x `factor`) as the original size and (0, 0) as the crop (what SDXL assumes at inference)."""

    def __init__(self, random_flip: bool = True, seed: int = 0, captions: CaptionProcessor | None = None,
                 factor: int = 8, text_states: bool = True):  # fmt: skip
        self.random_flip, self.seed, self.captions, self.factor = random_flip, seed, captions, factor
        self.text_states = text_states

    def rng(self, sample: dict) -> random.Random:
        return random.Random(f"latents-{self.seed}-{sample.get('__pass__', 0)}-{sample.get('__url__')}-"
                             f"{sample.get('__key__')}")  # fmt: skip

    def __call__(self, sample: dict) -> dict:
        url, key = sample.get("__url__"), sample.get("__key__")
        try:
            rng = self.rng(sample)
            prefix = "flip_" if self.random_flip and "flip_mean.npy" in sample and rng.random() < 0.5 else ""
            record = decode_texts(sample)["json"]  # {"caption": [...], geometry} (a bare caption list: older shards)
            record = {"caption": record} if isinstance(record, list) else record
            captions = record["caption"]
            keep_text = self.text_states and self.captions is None  # tag captions change per visit: encoded later
            text = load_npy(sample["text.npy"]) if keep_text else None  # (K, L, D)
            if text is not None and text.shape[0] != len(captions):
                raise ValueError(f"{len(captions)} captions but {text.shape[0]} encodings")
            i = rng.randrange(len(captions))
            mean = torch.from_numpy(load_npy(sample[prefix + "mean.npy"]))  # (C, h, w) fp16
            target = [mean.shape[-2] * self.factor, mean.shape[-1] * self.factor]
            out = {
                "latent_mean": mean,
                "latent_std": torch.from_numpy(load_npy(sample[prefix + "std.npy"])),
                "caption": captions[i],
                "key": key,
                "original_size": torch.tensor(record.get("original_size", target)),
                "crop_top_left": torch.tensor(record.get("crop_top_left", [0, 0])),
                "target_size": torch.tensor(record.get("target_size", target)),
            }
            if text is not None:  # else the stage encodes the caption (memoised by model.text_cache_size)
                out["text_hidden"] = torch.from_numpy(np.ascontiguousarray(text[i]))  # (L, D) fp16
                if "pooled.npy" in sample:  # SDXL
                    out["text_pooled"] = torch.from_numpy(np.ascontiguousarray(load_npy(sample["pooled.npy"])[i]))
            if prefix + "mask.npy" in sample:
                out["mask"] = torch.from_numpy(load_npy(sample[prefix + "mask.npy"]))  # (1, h, w) fp16 in [0, 1]
            if self.captions is not None:  # tags shuffled or dropped per visit: no cached encoding fits
                out["caption"] = self.captions(captions[i], rng)
            return out
        except Exception as error:
            raise SampleError(url, key, repr(error)) from error


def make_latent_dataset(urls, random_flip: bool = True, shuffle_buffer: int = 1000, seed: int = 0,
                        resampled: bool = False, health: DataHealth | None = None, rank: int = 0,
                        world_size: int = 1, shardshuffle: bool = True,
                        converter: ToLatentSample | None = None) -> wds.DataPipeline:  # fmt: skip
    """Latent shards -> samples, split over ranks and workers exactly as image shards are."""
    urls = expand_urls(urls)
    health = health if health is not None else DataHealth()
    stages = [
        ShardList(urls, rank, world_size, shuffle=shardshuffle, seed=seed, resampled=resampled),
        ReadShards(health, expected_counts=shard_counts(urls), select=is_latent_file),
    ]
    if shuffle_buffer > 0:
        stages.append(wds.detshuffle(shuffle_buffer, initial=min(100, shuffle_buffer), seed=seed))
    stages.append(ToTrainingSamples(converter or ToLatentSample(random_flip, seed), health))
    dataset = wds.DataPipeline(*stages)
    dataset.health = health
    return dataset


def collate_latents(samples: list[dict]) -> dict:
    """Samples -> a batch: tensors stacked, the rest listed; "mask" (B, 1, h, w) when a sample has one (ones for
    the others)."""
    batch = {name: torch.stack([s[name] for s in samples]) if torch.is_tensor(first) else [s[name] for s in samples]
             for name, first in samples[0].items() if name != "mask"}  # fmt: skip
    if any("mask" in s for s in samples):
        ones = torch.ones(1, *samples[0]["latent_mean"].shape[-2:], dtype=torch.float16)
        batch["mask"] = torch.stack([s.get("mask", ones) for s in samples])
    return batch


class LatentShardDataModule(ShardDataModule):
    """Batches {"latent_mean", "latent_std": (B, C, h, w), "text_hidden": (B, L, D), "caption", "key", geometry}
    (+ "text_pooled" (B, P) for SDXL) from latent shards; `empty_condition` is the cached unconditional input
    ({"encoder_hidden_states": (1, L, D)} + SDXL's "text_embeds" (1, P)). `val_shards` are image
    shards (FID reference images and captions), as with `ShardDataModule`. Latents written with buckets
    (latents.json "buckets") are read as planned batches, one bucket each, as image buckets are. `text_states`
    false: batches carry no text states and the stage encodes the captions itself, memoised by
    `model.text_cache_size` (sets of few distinct captions: a sample's states, 118 KB at CLIP-L's shape, cost the
    loader more than looking ten captions up: 14,682 against 25,488 img/s for CIFAR-10's ten on one H200).
    `text_states: auto` (the default) decides at `setup`: off when the shards' distinct captions (latents.json
    "distinct_captions") and the empty one all fit the stage's `text_cache_size`, else on (also for shards written
    before the count was recorded, and outside a trainer)."""

    def __init__(self, train_shards: str, val_shards: str | None, batch_size: int, num_workers: int | None = 2,
                 random_flip: bool = True, shuffle_buffer: int = 1000, seed: int = 0,
                 samples_per_epoch: int | None = None, max_bad_fraction: float = 0.0,
                 resolution: int | None = None, captions: dict | None = None, text_states: bool | str = "auto"):  # fmt: skip
        self.meta = read_meta(train_shards)
        if text_states not in (True, False, "auto"):
            raise ValueError(f"data.text_states={text_states!r}: expected true, false or auto")
        self.text_states = text_states
        if resolution is not None and resolution != self.meta["resolution"]:
            raise ValueError(f"data.resolution={resolution} but the latent shards {train_shards} were encoded at "
                             f"{self.meta['resolution']}: precompute them again or drop the override")  # fmt: skip
        super().__init__(train_shards, val_shards, self.meta["resolution"], batch_size, num_workers=num_workers,
                         random_flip=random_flip, shuffle_buffer=shuffle_buffer, seed=seed,
                         samples_per_epoch=samples_per_epoch, max_bad_fraction=max_bad_fraction,
                         buckets=self.meta.get("buckets"), captions=captions)  # fmt: skip
        folder = shard_folder(train_shards)
        self.empty_condition = {"encoder_hidden_states": torch.from_numpy(np.load(folder / EMPTY, allow_pickle=False))}
        if (folder / EMPTY_POOLED).is_file():  # SDXL
            self.empty_condition["text_embeds"] = torch.from_numpy(np.load(folder / EMPTY_POOLED, allow_pickle=False))
        self.factor = self.meta.get("factor") or self.meta["resolution"] // self.meta["latent_shape"][-1]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.text_states == "auto":
            module = self.trainer.lightning_module if self.trainer is not None else None
            cache_size = getattr(module, "text_cache_size", 0)
            self.text_states = self.states_needed(cache_size)
            rank_zero_info(f"data.text_states=auto: {self.text_states} ({self.meta.get('distinct_captions')} distinct "
                           f"captions in the shards, model.text_cache_size={cache_size})")

    def states_needed(self, text_cache_size: int) -> bool:
        """`text_states: auto`'s choice: read the cached states unless every distinct caption of the shards and the
        empty one fit the stage's memo of encodings (then it encodes each once)."""
        distinct = self.meta.get("distinct_captions")
        return distinct is None or distinct + 1 > text_cache_size

    @property
    def carries_text_states(self) -> bool:
        """Whether batches hold the cached text states: not with `text_states` off, nor with tag captions that change
        per visit (the stage encodes those captions, and its unconditional input with the same encoder)."""
        return self.text_states is not False and self.captions is None

    collate = staticmethod(collate_latents)
    cached_encodings = True  # batches hold VAE latents (and text encodings): the frozen encoders are not needed
    read_select = staticmethod(is_latent_file)

    def sample_converter(self) -> ToLatentSample:
        return ToLatentSample(self.random_flip, self.seed, self.captions, self.factor, self.text_states is not False)

    def train_dataset(self, urls: list[str], resampled: bool, rank: int, world_size: int):
        return make_latent_dataset(urls, self.random_flip, self.shuffle_buffer, self.seed, resampled,
                                   self.train_health, rank, world_size, converter=self.sample_converter())  # fmt: skip
