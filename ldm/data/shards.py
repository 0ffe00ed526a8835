"""Write image-caption pairs as WebDataset shards in the img2dataset layout.

Each shard `000000.tar, 000001.tar, ...` holds `<key>.<jpg|png|webp>` + `<key>.txt`;
`manifest.json` next to them lists shard names and sample counts. Shards are written
as `*.tar.tmp` and renamed when complete, so a crash never leaves a truncated `.tar`.

    >>> import tempfile
    >>> from PIL import Image
    >>> from ldm.data.shards import write_shards
    >>> samples = [(f"{i:09d}", Image.new("RGB", (8, 8), "red"), "a red square") for i in range(3)]
    >>> [p.name for p in write_shards(samples, tempfile.mkdtemp(), samples_per_shard=2, progress=False)]
    ['000000.tar', '000001.tar']
"""

import io
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ldm.data.transforms import to_rgb

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGE_FORMATS = ("jpg", "png", "webp", "keep")
MANIFEST = "manifest.json"
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_EXTENSION_OF_PIL_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

ImageLike = str | os.PathLike | Image.Image | bytes


def samples_from_folder(root: str | os.PathLike) -> Iterator[tuple[str, Path, str]]:
    """Yield (key, image_path, caption) from a folder of images.

    Captions come from `metadata.jsonl` (Hugging Face imagefolder: one
    `{"file_name": ..., "text"|"caption": ...}` per line) when present, else from a
    sidecar `.txt` next to each image (`cat.png` + `cat.txt`), searched recursively.
    Keys are the image paths relative to `root`, without suffix, with `/` and `.` -> `_`.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    metadata = root / "metadata.jsonl"
    if metadata.exists():
        yield from _samples_from_metadata(root, metadata)
        return
    images = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) and no metadata.jsonl")
    for image_path in images:
        caption_path = image_path.with_suffix(".txt")
        if not caption_path.exists():
            raise ValueError(f"{root}: image {image_path.name} has no caption file {caption_path.name}")
        yield _key_of(image_path, root), image_path, caption_path.read_text(encoding="utf-8").strip()


def _samples_from_metadata(root: Path, metadata: Path) -> Iterator[tuple[str, Path, str]]:
    with metadata.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{metadata}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error})") from None
            if "file_name" not in record:
                raise ValueError(f"{where}: missing 'file_name'")
            caption = record.get("text", record.get("caption"))
            if not isinstance(caption, str):
                raise ValueError(f"{where}: image {record['file_name']} has no 'text' or 'caption' string")
            image_path = root / record["file_name"]
            if not image_path.exists():
                raise ValueError(f"{where}: image {image_path} does not exist")
            yield _key_of(image_path, root), image_path, caption.strip()


def _key_of(image_path: Path, root: Path) -> str:
    # WebDataset splits a member name at its first "." to find the key, so keys must not hold dots.
    return image_path.relative_to(root).with_suffix("").as_posix().replace("/", "_").replace(".", "_")


def encode_image(image: ImageLike, image_format: str = "jpg", quality: int = 95) -> tuple[str, bytes]:
    """Return (extension, encoded bytes) for an image given as a path, PIL image or bytes.

    `image_format="keep"` stores file/bytes content untouched (PIL images become PNG);
    otherwise the image is converted to RGB (see `to_rgb`) and re-encoded.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
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
    extension = "png" if image_format == "keep" else image_format
    buffer = io.BytesIO()
    rgb.save(buffer, format=_PIL_FORMAT[extension], quality=quality)
    return extension, buffer.getvalue()


def write_shards(
    samples: Iterable[tuple[str, ImageLike, str]],
    out_dir: str | os.PathLike,
    samples_per_shard: int = 1000,
    image_format: str = "jpg",
    quality: int = 95,
    progress: bool = True,
) -> list[Path]:
    """Write (key, image, caption) samples as tar shards + manifest.json; return shard paths."""
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []

    def finish_shard(tmp_name: str) -> None:
        if writer.count == 0:  # ShardWriter opens its first shard before any sample arrives
            os.remove(tmp_name)
            return
        final = Path(tmp_name).with_suffix("")  # 000000.tar.tmp -> 000000.tar
        os.replace(tmp_name, final)
        shards.append({"name": final.name, "count": writer.count})

    # maxsize=inf: shards are cut by sample count only, so counts are predictable.
    writer = wds.ShardWriter(
        str(out_dir / "%06d.tar.tmp"), maxcount=samples_per_shard, maxsize=float("inf"), verbose=0
    )
    writer.post = finish_shard
    seen: set[str] = set()
    try:
        for key, image, caption in tqdm(samples, desc=f"writing {out_dir}", unit="img", disable=not progress):
            if not key or "." in key or key.startswith("_") or key in seen:
                raise ValueError(f"bad sample key {key!r}: must be unique, non-empty, no '.', not start with '_'")
            seen.add(key)
            extension, data = encode_image(image, image_format, quality)
            writer.write({"__key__": key, extension: data, "txt": caption})
    except BaseException:
        writer.post = None  # don't publish the half-written shard
        writer.close()
        Path(writer.fname).unlink(missing_ok=True)
        raise
    writer.close()
    if not seen:
        raise ValueError(f"{out_dir}: no samples to write")

    manifest = {"shards": shards, "total": len(seen), "image_format": image_format}
    tmp_manifest = out_dir / (MANIFEST + ".tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_manifest, out_dir / MANIFEST)

    written = {shard["name"] for shard in shards}
    stale = sorted(p.name for p in out_dir.glob("*.tar") if p.name not in written)
    if stale:
        warnings.warn(f"{out_dir}: holds shards not written now (stale?): {', '.join(stale[:5])}")
    return [out_dir / shard["name"] for shard in shards]


def read_manifest(shard_dir: str | os.PathLike) -> dict | None:
    """The manifest.json of a shard folder, or None when there is none."""
    path = Path(shard_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None
