"""Write image-caption pairs as WebDataset shards in the img2dataset layout.

Each shard `000000.tar, 000001.tar, ...` holds `<key>.<jpg|png|webp>` + `<key>.txt` (or `<key>.json` with a
caption list), and `<key>.mask.png` when the sample has a loss mask; `manifest.json` next to them lists every
shard's name, sample count, size in bytes and sha256, and `sizes.json` every image's (width, height). Shards are written as `*.tar.tmp` and renamed when complete, so a crash never
leaves a truncated `.tar`; `resume=True` keeps the complete shards and writes only the
samples they lack.

    >>> import tempfile
    >>> from PIL import Image
    >>> from ldm.data.shards import write_shards
    >>> samples = [(f"{i:09d}", Image.new("RGB", (8, 8), "red"), "a red square") for i in range(3)]
    >>> [p.name for p in write_shards(samples, tempfile.mkdtemp(), samples_per_shard=2, progress=False)]
    ['000000.tar', '000001.tar']

Sources of (key, image, caption[, mask]) samples:
    samples_from_folder          images + sidecar .txt (+ `<name>.mask.png`), or a metadata.jsonl / metadata.csv
    samples_from_class_folders   `<root>/<label>/*.jpg` with a template "a photo of a {label}"
    samples_from_shards          existing shards (img2dataset output), to re-shard or re-encode
    ldm.data.hf.samples_from_hf  a Hugging Face `datasets` directory (parquet, imagefolder, save_to_disk)
An img2dataset folder is also read as is: `write_manifest(folder)` adds the manifest.
"""

import csv
import io
import json
import os
import tarfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ldm.data.format import (
    IMAGE_EXTENSIONS,
    MASK_EXTENSIONS,
    SHARD_NAME,
    caption_choices,
    decode_texts,
    expand_urls,
    image_bytes,
    shard_record,
    split_name,
    write_manifest_file,
    write_sizes_file,
)
from ldm.data.sizes import image_size, sample_sizes
from ldm.data.transforms import to_rgb

IMAGE_FORMATS = ("jpg", "png", "webp", "keep")
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_EXTENSION_OF_PIL_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

ImageLike = str | os.PathLike | Image.Image | bytes


def samples_from_folder(root: str | os.PathLike, caption: str | None = None) -> Iterator[tuple]:
    """Yield (key, image_path, caption) from a folder of images, or (key, image_path, caption, mask_path) for an
    image with a loss mask beside it (`cat.png` + `cat.mask.png`: white = learn).

    Captions come from `metadata.jsonl` or `metadata.csv` (Hugging Face imagefolder: a
    `file_name` and a `text` or `caption` per row) when present, else from a sidecar
    `.txt` next to each image (`cat.png` + `cat.txt`), searched recursively; `caption` captions every image
    alike instead (a DreamBooth instance set: "a photo of sks dog"). Keys are the image paths relative to `root`, without suffix, with `/` and `.` -> `_`.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    for metadata, reader in ((root / "metadata.jsonl", _jsonl_records), (root / "metadata.csv", _csv_records)):
        if metadata.exists() and caption is None:
            for key, image_path, text in _samples_from_metadata(root, metadata, reader(metadata)):
                yield _with_mask(key, image_path, text)
            return
    images = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and not _is_mask(p))
    if not images:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) and no metadata.jsonl or metadata.csv")
    for image_path in images:
        caption_path = image_path.with_suffix(".txt")
        if caption is not None:
            text = caption
        elif caption_path.exists():
            text = caption_path.read_text(encoding="utf-8").strip()
        else:
            raise ValueError(f"{root}: image {image_path.name} has no caption file {caption_path.name} "
                             f"(or give one caption for all)")  # fmt: skip
        yield _with_mask(_key_of(image_path, root), image_path, text)


def _is_mask(path: Path) -> bool:
    return any(path.name.lower().endswith("." + ext) for ext in MASK_EXTENSIONS)


def _with_mask(key: str, image_path: Path, caption: str) -> tuple:
    """(key, image, caption), plus the mask path when `<stem>.mask.<ext>` lies beside the image."""
    mask = next((m for ext in MASK_EXTENSIONS if (m := image_path.with_name(f"{image_path.stem}.{ext}")).exists()), None)
    return (key, image_path, caption) if mask is None else (key, image_path, caption, mask)


def _jsonl_records(metadata: Path) -> Iterator[tuple[str, dict]]:
    with metadata.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield f"{metadata}:{line_number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{metadata}:{line_number}: not valid JSON ({error})") from None


def _csv_records(metadata: Path) -> Iterator[tuple[str, dict]]:
    with metadata.open(encoding="utf-8", newline="") as rows:
        for row_number, row in enumerate(csv.DictReader(rows), start=2):  # row 1 is the header
            yield f"{metadata}:{row_number}", row


def _samples_from_metadata(root: Path, metadata: Path, records) -> Iterator[tuple[str, Path, str]]:
    for where, record in records:
        if "file_name" not in record:
            raise ValueError(f"{where}: missing 'file_name'")
        caption = record.get("text") or record.get("caption")
        if not isinstance(caption, str):
            raise ValueError(f"{where}: image {record['file_name']} has no 'text' or 'caption' string")
        image_path = root / record["file_name"]
        if not image_path.exists():
            raise ValueError(f"{where}: image {image_path} does not exist")
        yield _key_of(image_path, root), image_path, caption.strip()


def samples_from_class_folders(
    root: str | os.PathLike, template: str = "a photo of a {label}"
) -> Iterator[tuple[str, Path, str]]:
    """Yield (key, image_path, caption) from `root/<label>/<image>`, captioned by `template`.

    Underscores in folder names become spaces in the label (`sports_car` -> "sports car").
    Keys are `<label>_<stem>`, sorted by label then file name.
    """
    root = Path(root)
    if "{label}" not in template:
        raise ValueError(f"caption template {template!r} must contain '{{label}}'")
    labels = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not labels:
        raise ValueError(f"{root}: no class sub-folders")
    for label_dir in labels:
        caption = template.format(label=label_dir.name.replace("_", " "))
        for image_path in sorted(label_dir.iterdir()):
            if image_path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
                yield _key_of(image_path, root), image_path, caption


def samples_from_shards(urls) -> Iterator[tuple[str, bytes, str]]:
    """Yield (key, image bytes, caption) from existing shards, e.g. img2dataset output.

    Samples without an image or caption (img2dataset keeps failed downloads out of the
    tars, but other writers may not) are skipped with a warning naming shard and key.
    """
    for url in expand_urls(urls):
        for sample in wds.WebDataset(url, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                     empty_check=False, handler=wds.warn_and_continue):  # fmt: skip
            image = image_bytes(sample)
            try:
                if image is None:
                    raise ValueError("no image")
                caption = caption_choices(decode_texts(sample))[0]
            except (ValueError, UnicodeDecodeError, json.JSONDecodeError) as error:
                warnings.warn(f"shard {url}, key {sample['__key__']}: not copied ({error})", stacklevel=2)
                continue
            yield sample["__key__"].replace(".", "_"), image, caption


def _key_of(image_path: Path, root: Path) -> str:
    # WebDataset splits a member name at its first "." to find the key, so keys must not hold dots.
    return image_path.relative_to(root).with_suffix("").as_posix().replace("/", "_").replace(".", "_")


def _resize_long_side(image: Image.Image, max_size: int | None) -> Image.Image:
    if max_size is None or max(image.size) <= max_size:
        return image
    scale = max_size / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def encode_image(
    image: ImageLike, image_format: str = "jpg", quality: int = 95, max_size: int | None = None
) -> tuple[str, bytes]:
    """Return (extension, encoded bytes) for an image given as a path, PIL image or bytes.

    `image_format="keep"` stores file/bytes content untouched (PIL images become PNG);
    otherwise the image is converted to RGB (see `to_rgb`), its long side shrunk to
    `max_size` if larger, and re-encoded.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if image_format == "keep" and max_size is not None:
        raise ValueError("image_format='keep' stores images untouched: it cannot resize (max_size)")
    if image_format == "keep" and not isinstance(image, Image.Image):
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        with Image.open(io.BytesIO(data)) as probe:
            pil_format = probe.format
        if pil_format not in _EXTENSION_OF_PIL_FORMAT:
            raise ValueError(f"cannot keep image of format {pil_format}; use one of jpg, png, webp")
        return _EXTENSION_OF_PIL_FORMAT[pil_format], data
    if isinstance(image, Image.Image):
        rgb = to_rgb(image)
    else:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
            rgb = to_rgb(opened)
    rgb = _resize_long_side(rgb, max_size)
    extension = "png" if image_format == "keep" else image_format
    buffer = io.BytesIO()
    rgb.save(buffer, format=_PIL_FORMAT[extension], quality=quality)
    return extension, buffer.getvalue()


def _tar_bytes(n: int) -> int:
    """Bytes a member of n bytes takes in a tar: a 512-byte header, data padded to 512."""
    return 512 + -(-n // 512) * 512


def _complete_shards(out_dir: Path) -> list[Path]:
    """The leading run 000000.tar, 000001.tar, ... of a folder (what a previous run finished)."""
    numbered = {int(m.group(1)): p for p in out_dir.glob("*.tar") if (m := SHARD_NAME.match(p.name))}
    done = []
    while len(done) in numbered:
        done.append(numbered[len(done)])
    return done


class ShardSink:
    """Writes samples into tar shards `000000.tar, ...` under `out_dir`, each as `*.tar.tmp` renamed to its
    final name only when `finish()` closes it; `abort()` drops an unfinished one. Published shards' records
    (name, count, bytes, sha256) are appended to `records`, and, when `sizes` is a dict, the (width, height) given
    with each sample go to `sizes[name]` (the sizes.json entry). As a context manager it finishes the last shard,
    or aborts it when an exception (a crash, Ctrl-C) ends the block."""

    def __init__(self, out_dir: Path, records: list[dict], sizes: dict | None = None, first_index: int = 0):
        self.out_dir, self.records, self.sizes, self.first_index = out_dir, records, sizes, first_index
        self.writer, self.tmp_path, self.count = None, None, 0
        self._sizes: dict[str, list[int] | None] = {}

    def write(self, sample: dict, size: tuple[int, int] | None = None) -> None:
        if self.writer is None:
            self.tmp_path = self.out_dir / f"{self.first_index + len(self.records):06d}.tar.tmp"
            # a whole-second mtime: webdataset's default (time.time(), a float) makes tarfile add a PAX header to
            # every member, which readers then parse in Python (~0.1 ms a member, about half of reading a latent)
            self.writer = wds.TarWriter(str(self.tmp_path), encoder=False, mtime=int(time.time()))
        self.writer.write(sample)
        self._sizes[sample["__key__"]] = list(size) if size else None
        self.count += 1

    def finish(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        final = self.tmp_path.with_suffix("")  # 000000.tar.tmp -> 000000.tar
        os.replace(self.tmp_path, final)
        self.records.append(shard_record(final))
        if self.sizes is not None:
            self.sizes[final.name] = {"bytes": final.stat().st_size, "sizes": self._sizes}
        self.writer, self.count, self._sizes = None, 0, {}

    def abort(self) -> None:
        if self.writer is not None:  # never publish a half-written shard
            self.writer.close()
            self.tmp_path.unlink(missing_ok=True)
            self.writer, self.count, self._sizes = None, 0, {}

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # the last shard is published, unless an error ends the writing
        self.abort() if exc_type is not None else self.finish()


def _caption_member(caption: str | list[str]) -> tuple[str, bytes]:
    """("txt", text) for a caption, ("json", {"caption": [...]}) for a list of them."""
    if isinstance(caption, str):
        return "txt", caption.encode("utf-8")
    if isinstance(caption, (list, tuple)) and caption and all(isinstance(c, str) for c in caption):
        return "json", json.dumps({"caption": list(caption)}).encode("utf-8")
    raise ValueError(f"caption must be a string or a non-empty list of strings, got {caption!r}")


def encode_mask(mask: ImageLike) -> bytes:
    """A loss mask (path, PIL image or bytes) as a greyscale PNG (white = learn), at its own size."""
    if isinstance(mask, Image.Image):
        grey = mask.convert("L")
    else:
        with Image.open(io.BytesIO(mask) if isinstance(mask, bytes) else mask) as opened:
            grey = opened.convert("L")
    buffer = io.BytesIO()
    grey.save(buffer, format="PNG")
    return buffer.getvalue()


def _encode_sample(image, caption, mask, image_format: str, quality: int, max_size: int | None):
    """A sample's tar members ({extension: bytes}) and its image's (width, height); OSError, ValueError or
    DecompressionBombError for an image (or mask) that cannot be read or encoded."""
    extension, data = encode_image(image, image_format, quality, max_size)
    members = {extension: data, **dict([_caption_member(caption)])}
    if mask and mask[0] is not None:
        members["mask.png"] = encode_mask(mask[0])
    return members, image_size(data)


_SKIPPABLE = (OSError, ValueError, Image.DecompressionBombError)


def _skip_message(out_dir: Path, key: str, error: Exception) -> str:
    return f"{out_dir}: skipping sample {key} ({error!r})"


def _write_one_shard(out_dir: Path, index: int, samples: list[tuple], image_format: str, quality: int,
                     max_size: int | None) -> tuple[dict | None, dict | None, list[str]]:  # fmt: skip
    """A worker's part of `write_shards(..., workers=N)`: `samples` as shard number `index` (written as `.tar.tmp`,
    renamed when complete); returns its manifest record and sizes.json entry (None when every sample was skipped)
    and a message for each skipped sample (the writing process warns with them)."""
    records: list[dict] = []
    sizes: dict = {}
    skipped: list[str] = []
    with ShardSink(out_dir, records, sizes, first_index=index) as sink:
        for key, image, caption, *mask in samples:
            try:
                members, dimensions = _encode_sample(image, caption, mask, image_format, quality, max_size)
            except _SKIPPABLE as error:
                skipped.append(_skip_message(out_dir, key, error))
                continue
            sink.write({"__key__": key, **members}, size=dimensions)
    if not records:
        return None, None, skipped
    return records[0], sizes[records[0]["name"]], skipped


def refuse_duplicates(samples) -> None:
    """ValueError naming the first key two samples share (nothing is written then): a key names one sample."""
    first: dict[str, object] = {}
    for key, image, *_ in samples:
        if key in first:
            what = (lambda x: str(x) if isinstance(x, (str, os.PathLike)) else type(x).__name__)
            raise ValueError(f"two samples have the key {key!r} ({what(first[key])} and {what(image)}); keys must be "
                             f"unique: nothing was written")  # fmt: skip
        first[key] = image


def write_shards(
    samples: Iterable[tuple],
    out_dir: str | os.PathLike,
    samples_per_shard: int = 1000,
    image_format: str = "jpg",
    quality: int = 95,
    progress: bool = True,
    max_shard_bytes: int | None = None,
    max_size: int | None = None,
    resume: bool = False,
    total: int | None = None,
    workers: int = 1,
) -> list[Path]:
    """Write (key, image, caption) or (key, image, caption, mask) samples as tar shards + manifest.json +
    sizes.json; return shard paths. A caption is a string (`<key>.txt`) or a list of them (`<key>.json`).

    A shard is closed after `samples_per_shard` samples or once it holds `max_shard_bytes`
    (so it may pass that size by one sample). `max_size` shrinks the long side of larger
    images. A sample whose image (or mask) cannot be read or encoded is skipped with a warning and
    counted as "skipped" in the manifest. With `resume=True`, complete shards already in
    `out_dir` are kept and samples whose key they hold are not written again. Two samples with
    one key are refused before anything is written (for a list; a stream stops at the second).

    `workers` > 1 encodes and writes that many shards at once, in worker processes (the samples are read here, in
    order, and sent to them: images as paths, bytes or PIL images). Each shard then takes the next
    `samples_per_shard` samples of the stream, so a skipped sample leaves its shard one short instead of moving the
    next sample in; without skips the shards hold what one process writes. It needs shards closed by count (no
    `max_shard_bytes`) and a fresh folder (no `resume`).
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers > 1 and (max_shard_bytes is not None or resume):
        raise ValueError("write_shards: workers > 1 closes shards by count in a fresh folder: it cannot be combined "
                         "with max_shard_bytes or resume")  # fmt: skip
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if image_format == "keep" and max_size is not None:
        raise ValueError("image_format='keep' stores images untouched: it cannot resize (max_size)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob("*.tar.tmp"):  # a crashed run's unfinished shard
        leftover.unlink()

    shards: list[dict] = []
    done_keys: set[str] = set()
    if resume:
        for path in _complete_shards(out_dir):
            shards.append(shard_record(path))
            with tarfile.open(path) as tar:
                done_keys.update(split_name(name)[0] for name in tar.getnames() if split_name(name))
    kept = [out_dir / shard["name"] for shard in shards]
    sizes = {Path(url).name: {"bytes": Path(url).stat().st_size, "sizes": {k: list(v) if v else None for k, v in s.items()}}
             for url, s in sample_sizes([str(p) for p in kept]).items()} if kept else {}  # fmt: skip
    if hasattr(samples, "__len__"):
        total = len(samples) if total is None else total
        refuse_duplicates(samples)

    seen: set[str] = set()

    def checked(stream):  # each sample's key: unique and usable as a tar member's stem
        for sample in stream:
            key = sample[0]
            if key in seen:
                raise ValueError(f"two samples have the key {key!r}; keys must be unique: stopped, the shard being "
                                 f"written was removed and no manifest written")  # fmt: skip
            if not key or "." in key or key.startswith("_"):
                raise ValueError(f"bad sample key {key!r}: must be non-empty, hold no '.', not start with '_'")
            seen.add(key)
            yield sample

    bar = tqdm(total=total, desc=f"writing {out_dir}", unit="img", disable=not progress)
    with bar:
        if workers > 1:
            skipped = _write_in_workers(checked(samples), out_dir, samples_per_shard, image_format, quality, max_size,
                                        workers, shards, sizes, bar)  # fmt: skip
        else:
            skipped = _write_here(checked(samples), out_dir, samples_per_shard, image_format, quality, max_size,
                                  max_shard_bytes, done_keys, shards, sizes, bar)  # fmt: skip
    if not shards:
        raise ValueError(f"{out_dir}: no samples to write")

    manifest = {"shards": shards, "total": sum(s["count"] for s in shards), "image_format": image_format,
                "skipped": skipped, "duplicates": {}}  # fmt: skip  # keys are unique: checked above
    write_manifest_file(out_dir, manifest)
    write_sizes_file(out_dir, sizes)

    written = {shard["name"] for shard in shards}
    stale = sorted(p.name for p in out_dir.glob("*.tar") if p.name not in written)
    if stale:
        warnings.warn(f"{out_dir}: holds shards not written now (stale?): {', '.join(stale[:5])}")
    return [out_dir / shard["name"] for shard in shards]


def _write_here(samples, out_dir: Path, samples_per_shard: int, image_format: str, quality: int,
                max_size: int | None, max_shard_bytes: int | None, done_keys: set[str], shards: list[dict],
                sizes: dict, bar) -> int:  # fmt: skip
    """`write_shards` in this process: appends to `shards` and `sizes`; returns the count of skipped samples."""
    skipped = 0
    size = 0
    with ShardSink(out_dir, shards, sizes) as sink:
        for key, image, caption, *mask in samples:
            bar.update(1)
            if key in done_keys:
                continue
            try:
                members, dimensions = _encode_sample(image, caption, mask, image_format, quality, max_size)
            except _SKIPPABLE as error:
                warnings.warn(_skip_message(out_dir, key, error), stacklevel=2)
                skipped += 1
                continue
            sink.write({"__key__": key, **members}, size=dimensions)
            size += sum(_tar_bytes(len(member)) for member in members.values())
            if sink.count >= samples_per_shard or (max_shard_bytes is not None and size >= max_shard_bytes):
                sink.finish()
                size = 0
            bar.set_postfix(shards=len(shards), skipped=skipped, refresh=False)
    return skipped


def _write_in_workers(samples, out_dir: Path, samples_per_shard: int, image_format: str, quality: int,
                      max_size: int | None, workers: int, shards: list[dict], sizes: dict, bar) -> int:  # fmt: skip
    """`write_shards` with `workers` processes, a shard each at a time (at most two waiting per worker, so a long
    stream is not held in memory): appends to `shards` and `sizes` in shard order; returns the skipped count."""
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from itertools import count, islice

    skipped = 0

    def collect(future) -> None:
        nonlocal skipped
        record, entry, messages = future.result()
        for message in messages:
            warnings.warn(message, stacklevel=4)
        skipped += len(messages)
        if record is not None:
            shards.append(record)
            sizes[record["name"]] = entry
        bar.set_postfix(shards=len(shards), skipped=skipped, refresh=False)

    samples = iter(samples)
    pending: deque = deque()
    with ProcessPoolExecutor(workers) as pool:
        try:
            for index in count():  # shard 0, 1, 2, ... while samples last
                chunk = list(islice(samples, samples_per_shard))
                if not chunk:
                    break
                bar.update(len(chunk))
                pending.append(pool.submit(_write_one_shard, out_dir, index, chunk, image_format, quality, max_size))
                while len(pending) > 2 * workers:
                    collect(pending.popleft())
            while pending:
                collect(pending.popleft())
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return skipped
