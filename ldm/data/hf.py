"""Samples from a Hugging Face `datasets` directory, read through the `datasets` library.

    python scripts/make_shards.py path/to/hf_dataset data/mine --source hf [--image-column image --caption-column text]

Three layouts are read: parquet files with an image column and a text column (what `push_to_hub` writes, with
the image as an `Image` feature or a {"bytes", "path"} struct), an `imagefolder` (images + `metadata.jsonl` /
`metadata.csv` with `file_name` and a caption column), both streamed by `datasets.load_dataset` (no arrow cache
is written), and a `save_to_disk` directory (`datasets.load_from_disk`). Images are taken as their encoded bytes
(`Image(decode=False)`): `--format keep` stores them untouched. Keys are the row numbers, `000000000`, ....
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

# `datasets` (and pyarrow behind it) is imported by the functions that read one: ~2 s that `make_shards.py` with any
# other --source, and a machine without the package, do without.

CAPTION_COLUMNS = ("text", "caption", "captions", "prompt", "tags")


def load_hf(path: str | Path, split: str = "train"):
    """The `split` of a datasets directory: load_from_disk for a save_to_disk directory, else a streamed
    load_dataset (parquet, imagefolder, csv/json + images)."""
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory")
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path}: no split {split!r}; it holds {sorted(loaded)}")
            loaded = loaded[split]
        return loaded
    try:
        return datasets.load_dataset(str(path), split=split, streaming=True)
    except ValueError as error:  # an unknown split names the ones there are
        raise ValueError(f"{path}: {error}") from None


def _pick(columns: dict, wanted: str | None, candidates, what: str, path) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{path}: no {what} column {wanted!r}; columns are {sorted(columns)}")
        return wanted
    found = next((name for name in candidates if name in columns), None)
    if found is None:
        raise ValueError(f"{path}: no {what} column found among {sorted(columns)}; name it with --{what}-column")
    return found


def samples_from_hf(path: str | Path, split: str = "train", image_column: str | None = None,
                    caption_column: str | None = None) -> Iterator[tuple[str, bytes, str | list[str]]]:  # fmt: skip
    """Yield (key, encoded image bytes, caption or caption list) from a datasets directory (see the module
    docstring). The image column defaults to the first `Image` feature (else a column named image/img/...), the
    caption column to the first of text, caption, captions, prompt, tags."""
    import datasets

    dataset = load_hf(path, split)
    features = dataset.features or {}  # None for a streamed dataset whose columns show only in its rows
    columns = features or next(iter(dataset), {})
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    image_column = _pick(columns, image_column, images + ["image", "img", "jpg", "png", "pixels"], "image", path)
    caption_column = _pick(columns, caption_column, CAPTION_COLUMNS, "caption", path)
    if isinstance(features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    for i, row in enumerate(dataset):
        image, caption = row[image_column], row[caption_column]
        if isinstance(image, dict):  # {"bytes": ..., "path": ...}: bytes, or a file beside the data
            image = image.get("bytes") or (Path(path) / image["path"] if image.get("path") else None)
        if image is None:
            raise ValueError(f"{path}: row {i} has no image in column {image_column!r}")
        if not isinstance(caption, (str, list)):
            raise ValueError(f"{path}: row {i}: caption column {caption_column!r} holds {type(caption).__name__}, "
                             f"not text")  # fmt: skip
        yield f"{i:09d}", image, caption.strip() if isinstance(caption, str) else caption
