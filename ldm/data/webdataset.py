"""Read image-caption shards into training samples.

    >>> from ldm.data.webdataset import make_shard_dataset, collate
    >>> dataset = make_shard_dataset("data/shapes/train/{000000..000009}.tar", resolution=32)  # doctest: +SKIP
    >>> batch = collate([next(iter(dataset))])  # doctest: +SKIP
    >>> batch["pixel_values"].shape  # doctest: +SKIP
    torch.Size([1, 3, 32, 32])

Each sample is `{"pixel_values": (3, R, R) float in [-1, 1], "caption": str, "key": str}` plus its geometry
(`original_size`, `crop_top_left`, `target_size`: what SDXL conditions on) and, when the shard has one, its loss
`mask`. Aspect-ratio buckets are read by `ldm.data.bucketed` instead (a planned order, by key).

Shards: a brace pattern, glob, folder, list file (`shards.txt`, one url per line), or a
list of these; local paths, `pipe:` and http(s) urls through webdataset, any other
`scheme://` (s3, gs, memory, ...) through fsspec.

Splitting: shard i goes to DDP rank i % world_size, and a rank's shards are dealt to its
dataloader workers; so one pass reads every sample exactly once across all ranks and
workers. A worker left without a shard (fewer shards than ranks x workers) warns and yields
nothing; `ShardDataModule` lowers num_workers instead. `resampled=True` draws shards with
replacement forever, seeded per (seed, rank, worker): for large corpora, cut into epochs
by the loader.

Bad input never stops a worker: a corrupt image, unreadable caption, truncated tar or
empty shard is skipped with a warning naming shard and key, and counted in `DataHealth`. A key that
names two samples (twice in a shard, or in two shards) is trained once per pass (`DropDuplicates`).

What comes from webdataset and what does not: shard urls are expanded by webdataset's brace expansion
(`ldm.data.format.expand_urls`), streams are opened by `wds.gopen`, the pipeline is a `wds.DataPipeline`,
shuffling is `wds.detshuffle` and batching `wds.batched` / `wds.WebLoader`. Two stages are our own. `ShardList`
replaces `wds.SimpleShardList` + `split_by_node` / `split_by_worker` because exact epochs need every rank's shard
set and pass number under our control (seeded per (seed, pass, rank), restartable mid-epoch by `set_pass`).
`ReadShards` replaces `wds.tarfile_to_samples` because webdataset's handler sees an exception without the
shard's sample count: it cannot tell how many samples a truncated shard lost (it compares with manifest.json),
count a shard that was empty, or keep the samples read before the damage while naming the last key.
"""

import io
import os
import random
import tarfile
import warnings
from urllib.parse import urlparse

import torch
import webdataset as wds
from PIL import Image

from ldm.data.format import (
    CAPTION_EXTENSIONS,
    IMAGE_EXTENSIONS,
    caption_choices,
    decode_texts,
    duplicate_keys,
    expand_urls,
    has_extension,
    image_bytes,
    mask_bytes,
    shard_counts,
    split_name,
)
from ldm.data.captions import CaptionProcessor
from ldm.data.health import DataHealth
from ldm.data.transforms import ImageTooSmall, ImageTransform

_READ_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + CAPTION_EXTENSIONS)
_WDS_SCHEMES = {"pipe", "file", "http", "https"}  # what wds.gopen opens itself; fsspec opens the rest


class DataWarning(UserWarning):
    """A sample or shard skipped by the reader."""


class SampleError(Exception):
    """A sample that cannot be turned into a training example."""

    def __init__(self, url, key, reason):
        super().__init__(f"shard {url}, key {key}: {reason}")
        self.url, self.key = url, key


def warn_and_skip(error: Exception) -> bool:
    """Exception handler: warn naming shard and key, then go on."""
    url, key = getattr(error, "url", None), getattr(error, "key", None)
    if url is not None or key is not None:
        cause = error.__cause__ if error.__cause__ is not None else error
        message = f"skipping sample {key!r} of shard {url}: {cause!r}"
    else:  # errors while opening or reading a tar carry the shard in their args
        message = f"skipping unreadable shard data: {error!r}"
    warnings.warn(message, DataWarning, stacklevel=2)
    return True


def is_read_file(name: str) -> bool:
    """Members the image reader reads: images and captions (not masks, latents, or anything else)."""
    return has_extension(name, _READ_EXTENSIONS)


def is_caption_file(name: str) -> bool:
    return has_extension(name, CAPTION_EXTENSIONS)


def rank_and_world_size() -> tuple[int, int]:
    """DDP rank and world size: env RANK/WORLD_SIZE, else torch.distributed, else (0, 1)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def worker_and_count() -> tuple[int, int]:
    """(this dataloader worker's id, the number of workers); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class ShardList(torch.utils.data.IterableDataset):
    """The shard urls one dataloader worker of one rank reads, as {"url": ...} dicts.

    Exact mode: shard i belongs to rank i % world_size; a rank's shards are shuffled per pass
    (seeded by seed, pass, rank: the same order in all its workers) and dealt to its workers.
    Resampled mode: shards drawn with replacement forever, seeded by (seed, pass, rank, worker).
    """

    def __init__(self, urls: list[str], rank: int, world_size: int, shuffle: bool, seed: int, resampled: bool):
        super().__init__()
        self.urls, self.rank, self.world_size = list(urls), rank, world_size
        self.shuffle, self.seed, self.resampled = shuffle, seed, resampled
        self.passes = 0  # per worker copy; workers of a rank start and end passes together

    def __iter__(self):
        worker, num_workers = worker_and_count()
        epoch, self.passes = self.passes, self.passes + 1
        if self.resampled:
            rng = random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}")
            while True:
                yield {"url": rng.choice(self.urls), "__pass__": epoch}
        urls = self.urls[self.rank :: self.world_size]
        if self.shuffle:
            random.Random(f"{self.seed}-{epoch}-{self.rank}").shuffle(urls)
        mine = urls[worker::num_workers]
        if not mine:
            warnings.warn(
                f"rank {self.rank} worker {worker} has no shard ({len(self.urls)} shards for {self.world_size} "
                f"ranks x {num_workers} workers): it stays idle; write more shards or use fewer workers",
                DataWarning, stacklevel=2,
            )  # fmt: skip
        for url in mine:
            yield {"url": url, "__pass__": epoch}


def open_url(url: str):
    """A binary stream for a local path, a wds url (pipe:, http) or any fsspec url."""
    scheme = urlparse(url).scheme if "://" in url else ""
    if url.startswith("pipe:") or scheme in ("", *_WDS_SCHEMES):
        return wds.gopen(url)
    import fsspec

    return fsspec.open(url, "rb").open()


class MemberError(Exception):
    """A tar member that could not be read (truncated data)."""

    def __init__(self, name: str, error: Exception):
        super().__init__(f"member {name}: {error!r}")
        self.name = name


def _tar_members(stream, select):
    """(member name, bytes) of a tar stream, in order, regular files only."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if member.isreg() and select(member.name):
                try:
                    data = tar.extractfile(member).read()
                except Exception as error:
                    raise MemberError(member.name, error) from error
                yield member.name, data


class ReadShards:
    """Pipeline stage: {"url"} dicts -> raw samples {"__key__", "__url__", ext: bytes, ...}.

    A shard that cannot be opened, is truncated, or holds no sample is warned about (naming
    shard and the last key read) and counted; its good samples before the damage are kept.
    With a manifest, a shard that ends early (truncated on a member boundary) is caught too.
    """

    def __init__(self, health: DataHealth, expected_counts: dict[str, int] | None = None, select=is_read_file):
        self.health, self.expected_counts, self.select = health, expected_counts or {}, select

    def __call__(self, sources):
        for reading, source in enumerate(sources):
            for sample in self.read(source["url"]):
                sample["__pass__"] = source.get("__pass__", 0)
                sample["__reading__"] = reading  # which reading of a shard the sample came from (DropDuplicates)
                yield sample

    def read(self, url: str):
        n, current = 0, None
        try:
            stream = open_url(url)
            try:
                for name, data in _tar_members(stream, self.select):
                    if split_name(name) is None:
                        continue
                    key, extension = split_name(name)
                    # a new key, or a member the sample already has (the same key twice in a row), starts a sample
                    if current is None or key != current["__key__"] or extension.lower() in current:
                        if current is not None:
                            n += 1
                            yield current
                        current = {"__key__": key, "__url__": url}
                    current[extension.lower()] = data
            finally:
                stream.close()
        except Exception as error:  # noqa: BLE001: every read error of a shard is handled the same way
            key = current["__key__"] if current is not None else None
            failed = split_name(error.name) if isinstance(error, MemberError) else None
            if failed is not None and failed[0] != key:  # the pending sample was complete
                if current is not None:
                    n += 1
                    yield current
                key = failed[0]
            # the sample being read is lost; with a manifest, so is everything after it
            lost = max(0, self.expected_counts[url] - n) if url in self.expected_counts else int(key is not None)
            self.health.add("shard_errors")
            self.health.add("skipped", lost, shard=url)
            warnings.warn(f"shard {url}: unreadable after {n} samples (at key {key!r}): {error!r}; "
                          f"skipping the rest of the shard", DataWarning, stacklevel=2)  # fmt: skip
            return
        if current is not None:
            n += 1
            yield current
        expected = self.expected_counts.get(url)
        if n == 0:
            self.health.add("shard_errors")
            self.health.add("skipped", expected or 0, shard=url)
            warnings.warn(f"shard {url}: empty, no samples", DataWarning, stacklevel=2)
        elif expected is not None and n < expected:
            self.health.add("shard_errors")
            self.health.add("skipped", expected - n, shard=url)
            warnings.warn(f"shard {url}: {n} of {expected} samples (truncated?), last key {current['__key__']!r}",
                          DataWarning, stacklevel=2)  # fmt: skip


class DropDuplicates:
    """Pipeline stage (right after ReadShards): a key seen twice in one pass is trained once, and each extra copy is
    warned about naming key and shards, and counted as `duplicates`.

    Within a shard, the first copy is kept. Across shards, ``owners`` (key -> (url, n): the n-th sample of that key in
    that shard; from `ldm.data.format.duplicate_keys`, the first copy in url order) says which copy is trained, so
    every rank and worker agrees without talking to the others. Memory is one shard's keys, not a pass's.
    """

    def __init__(self, health: DataHealth, duplicates: dict[str, list[str]] | None = None):
        self.health = health
        self.owners = {key: (urls[0], 0) for key, urls in (duplicates or {}).items()}
        self.first = {key: urls[0] for key, urls in (duplicates or {}).items()}

    def __call__(self, samples):
        reading, copies = None, {}
        for sample in samples:
            if sample.get("__reading__") != reading:  # the next shard: a fresh count of its keys
                reading, copies = sample.get("__reading__"), {}
            key, url = sample["__key__"], sample["__url__"]
            n = copies.get(key, 0)
            copies[key] = n + 1
            if key in self.owners:
                keep, first = (url, n) == self.owners[key], self.first[key]
            else:
                keep, first = n == 0, url
            if keep:
                yield sample
                continue
            self.health.add("duplicates")
            where = f"in shard {url}" if first == url else f"in shards {first} and {url}"
            warnings.warn(f"duplicate key {key!r} {where}: trained once (the first copy, in {first}), this copy "
                          f"skipped", DataWarning, stacklevel=2)  # fmt: skip


class ToTrainingSample:
    """Raw sample (bytes) -> training sample; raises SampleError naming shard and key.

    The training sample: {"pixel_values", "caption", "key", "original_size", "crop_top_left", "target_size"}
    (the geometry, see `ldm.data.transforms`), plus "mask" (1, H, W) uint8 when the shard holds `<key>.mask.png`
    and "loss_weight" when the planner set one (`__weight__`). The target size is `__size__` (width, height), set
    by the bucket planner, else the transform's square resolution. Random choices (a caption of a JSON caption
    list, tag shuffling and dropout, random crop and flip) come from an RNG seeded by (seed, pass, shard, key):
    they change every pass, yet do not depend on ranks, workers, the global RNG or where a resumed run restarts
    (exact resume). Captions of class samples (`__kind__` "class", DreamBooth) are not tag-processed.
    `jpeg_draft` lets libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale when that still covers the target.
    """

    def __init__(self, transform: ImageTransform, seed: int = 0, jpeg_draft: bool = False,
                 captions: CaptionProcessor | None = None):  # fmt: skip
        self.transform = transform
        self.seed = seed
        self.jpeg_draft = jpeg_draft
        self.captions = captions
        self.converted: set[str] = set()  # image modes already reported as converted (`image`)

    def rng(self, sample: dict) -> random.Random:
        """The randomness of one visit of one sample."""
        return random.Random(f"{self.seed}-{sample.get('__pass__', 0)}-{sample.get('__url__')}-{sample.get('__key__')}")

    def image(self, data: bytes, target: tuple[int, int] | None = None,
              where: str = "") -> tuple[Image.Image, tuple[int, int]]:  # fmt: skip
        """(decoded image, its (width, height) as displayed before any reduced decode)."""
        image = Image.open(io.BytesIO(data))
        swapped = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF rotation by 90 degrees
        original = image.size[::-1] if swapped else image.size
        if self.jpeg_draft and image.format == "JPEG":
            w, h = target or (self.transform.resolution, self.transform.resolution)
            image.draft("RGB", (h, w) if swapped else (w, h))  # keeps the image covering the target
        image.load()  # raises now on truncated files, not later inside a transform
        if image.mode != "RGB" and image.mode not in self.converted:  # once per mode and process
            self.converted.add(image.mode)
            warnings.warn(f"images in mode {image.mode} are converted to RGB (the first: {where})", DataWarning,
                          stacklevel=2)  # fmt: skip
        return image, original

    @staticmethod
    def mask(data: bytes) -> Image.Image:
        try:
            mask = Image.open(io.BytesIO(data))
            mask.load()
            return mask.convert("L")
        except Exception as error:
            raise ValueError(f"unreadable mask ({error!r})") from error

    def __call__(self, sample: dict) -> dict:
        url, key = sample.get("__url__"), sample.get("__key__")
        try:
            data = image_bytes(sample)
            if data is None:
                raise ValueError(f"no image ({', '.join(IMAGE_EXTENSIONS)})")
            captions = caption_choices(decode_texts(sample))
            rng = self.rng(sample)
            caption = rng.choice(captions)
            if self.captions is not None and sample.get("__kind__") != "class":
                caption = self.captions(caption, rng)
            target = sample.get("__size__")
            mask_data = mask_bytes(sample)
            mask = self.mask(mask_data) if mask_data is not None else None
            image, original = self.image(data, target, f"key {key!r} of shard {url}")
            with torch.random.fork_rng(devices=[]):  # crop and flip draw from torch's CPU RNG
                # the CPU generator only: torch.manual_seed would also queue a seed, with a formatted stack trace,
                # for every accelerator not started in this process (0.3 ms a sample, most of a small batch's cost)
                torch.default_generator.manual_seed(rng.getrandbits(63))
                pixel_values, geometry, mask = self.transform.apply(image, target, mask, original)
            out = {"pixel_values": pixel_values, "caption": caption, "key": key, **geometry}
            if mask is not None:
                out["mask"] = mask
            if "__weight__" in sample:
                out["loss_weight"] = sample["__weight__"]
            return out
        except ImageTooSmall:
            raise
        except Exception as error:
            raise SampleError(url, key, repr(error)) from error


class ToTrainingSamples:
    """Pipeline stage around ToTrainingSample: skips and counts bad or too-small samples."""

    def __init__(self, convert: ToTrainingSample, health: DataHealth):
        self.convert, self.health = convert, health

    def __call__(self, samples):
        for sample in samples:
            try:
                out = self.convert(sample)
            except ImageTooSmall:
                self.health.add("too_small")  # a policy, not damage: counted, no warning
                continue
            except SampleError as error:
                self.health.add("skipped", shard=error.url)
                warn_and_skip(error)
                continue
            self.health.add("ok")
            yield out


def make_shard_dataset(
    urls,
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = True,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    shardshuffle: bool = True,
    split_by_node: bool = True,
    resampled: bool = False,
    upscale: bool = True,
    jpeg_draft: bool = False,
    uint8: bool = False,
    health: DataHealth | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    captions: CaptionProcessor | None = None,
) -> wds.DataPipeline:
    """A pipeline yielding {"pixel_values": (3, R, R), "caption", "key", geometry[, "mask"]} dicts.

    One pass reads every sample once, split over DDP ranks (`split_by_node`; rank and world
    size from env RANK/WORLD_SIZE or torch.distributed, read now, unless given) and dataloader
    workers. `resampled=True` streams forever instead. `shuffle_buffer=0` keeps the order
    within shards; shuffles are seeded by `seed` and change every pass. Skips are counted in
    `health` (a new DataHealth if None, as `.health` of the result). `uint8=True` yields pixels as
    uint8 in [0, 255] (see `transforms.to_model_range`) instead of float in [-1, 1]. `upscale=False` leaves
    images smaller than the resolution out (counted as too small). `captions` processes tag captions.
    """
    shard_urls = expand_urls(urls)
    if rank is None or world_size is None:
        rank, world_size = rank_and_world_size() if split_by_node else (0, 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if not resampled and len(shard_urls) < world_size:
        raise ValueError(f"{len(shard_urls)} shards cannot feed {world_size} ranks; write more (smaller) shards")
    health = health if health is not None else DataHealth()
    health.track_shards(shard_urls)  # bad samples per shard, for the error that names the worst
    transform = ImageTransform(resolution, center_crop=center_crop, random_flip=random_flip, upscale=upscale,
                               uint8=uint8)  # fmt: skip
    stages = [
        ShardList(shard_urls, rank, world_size, shuffle=shardshuffle, seed=seed, resampled=resampled),
        ReadShards(health, expected_counts=shard_counts(shard_urls)),
        # a key twice in one pass is trained once; across shards that takes knowing them all (not when resampling)
        DropDuplicates(health, None if resampled else duplicate_keys(shard_urls, _READ_EXTENSIONS)),
    ]
    if shuffle_buffer > 0:
        stages.append(wds.detshuffle(shuffle_buffer, initial=min(100, shuffle_buffer), seed=seed))
    stages.append(ToTrainingSamples(ToTrainingSample(transform, seed=seed, jpeg_draft=jpeg_draft, captions=captions),
                                    health))  # fmt: skip
    dataset = wds.DataPipeline(*stages)
    dataset.health = health
    return dataset


def set_pass(dataset, index: int) -> None:
    """Make the next pass of ``dataset`` (a pipeline, or a loader around one) pass number ``index`` (shard
    order and shuffle seeds), as a fresh process resuming mid-run needs. Call it before dataloader
    workers start: they copy the dataset."""
    if isinstance(dataset, ShardList):
        dataset.passes = index
    elif isinstance(dataset, wds.detshuffle):
        dataset.epoch = index - 1  # detshuffle counts up before each pass
    elif isinstance(dataset, torch.utils.data.DataLoader):
        set_pass(dataset.dataset, index)
    for stage in getattr(dataset, "pipeline", ()):
        set_pass(stage, index)


def read_captions(urls, n: int) -> list[str]:
    """The first n captions of the shards, in shard order (first caption of a JSON list)."""
    captions = []
    reader = ReadShards(DataHealth(), select=is_caption_file)
    for sample in reader({"url": url} for url in expand_urls(urls)):
        if len(captions) >= n:
            break
        try:
            captions.append(caption_choices(decode_texts(sample))[0])
        except (ValueError, UnicodeDecodeError) as error:
            warn_and_skip(SampleError(sample.get("__url__"), sample.get("__key__"), error))
    return captions


GEOMETRY = ("original_size", "crop_top_left", "target_size")  # (B, 2) int64, (height, width) each (SDXL's order)


def collate(batch: list[dict]) -> dict:
    """List of samples -> {"pixel_values": (B, 3, H, W), "caption": list[str], "key": list[str], "original_size",
    "crop_top_left", "target_size": (B, 2) int64}, plus "mask" (B, 1, H, W) uint8 when a sample has one (255,
    learn everywhere, for the others) and "loss_weight" (B,) float when samples carry one."""
    out = {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in batch]),
        "caption": [sample["caption"] for sample in batch],
        "key": [sample["key"] for sample in batch],
    }
    for name in GEOMETRY:
        if name in batch[0]:
            out[name] = torch.tensor([sample[name] for sample in batch], dtype=torch.int64)  # (B, 2)
    if any("mask" in sample for sample in batch):
        full = torch.full((1, *out["pixel_values"].shape[-2:]), 255, dtype=torch.uint8)
        out["mask"] = torch.stack([sample.get("mask", full) for sample in batch])  # (B, 1, H, W)
    if any("loss_weight" in sample for sample in batch):
        out["loss_weight"] = torch.tensor([float(sample.get("loss_weight", 1.0)) for sample in batch])  # (B,)
    return out
