"""Each image's (width, height), per shard, without decoding pixels: what aspect-ratio buckets are planned from.

    >>> sizes = sample_sizes(expand_urls("data/mine"))       # doctest: +SKIP
    >>> sizes["data/mine/000000.tar"]["000000001"]             # doctest: +SKIP
    (1200, 800)

`scripts/make_shards.py` (`write_shards`) records the sizes as it writes (`sizes.json` beside the shards, see
`ldm.data.format`). For shards written elsewhere (img2dataset), the first run reads every image's header once
(PIL reads sizes and the EXIF orientation from the first bytes) and writes sizes.json for the next runs; a folder
it cannot write to is scanned again each time. An entry whose shard was rewritten since (its byte size differs)
is scanned again. A sample without a readable image gets None: the planner leaves it out and counts it as bad.
"""

from __future__ import annotations

import io
import os
import tarfile
import warnings

from PIL import Image

from ldm.data.buckets import Size
from ldm.data.format import IMAGE_EXTENSIONS, image_bytes, is_remote, read_sizes_file, split_name, write_sizes_file
from ldm.data.plan import Record

_ORIENTATION = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def image_size(data: bytes) -> Size:
    """(width, height) of an encoded image as displayed (after EXIF rotation), from its header."""
    with Image.open(io.BytesIO(data)) as image:
        w, h = image.size
        return (h, w) if image.getexif().get(_ORIENTATION, 1) in _TRANSPOSED else (w, h)


def scan_shard(path: str) -> dict[str, Size | None]:
    """{key: (w, h) or None} of a local tar, in member order, from each image's header."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            parts = split_name(member.name) if member.isreg() else None
            if parts is None:
                continue
            key, extension = parts
            entry = samples.setdefault(key, {})
            if extension.lower() in IMAGE_EXTENSIONS and not entry:
                entry[extension.lower()] = tar.extractfile(member).read()
    sizes: dict[str, Size | None] = {}
    for key, members in samples.items():
        data = image_bytes(members)
        try:
            sizes[key] = image_size(data) if data is not None else None
        except Exception:  # noqa: BLE001: the planner counts and names it; the reader would skip it too
            sizes[key] = None
    return sizes


def sample_sizes(urls: list[str]) -> dict[str, dict[str, Size | None]]:
    """{url: {key: (w, h) or None}} for local shards: from sizes.json where it is current, else read from the
    image headers (and cached in sizes.json when the folder is writable). ValueError for a remote url."""
    remote = [url for url in urls if is_remote(url)]
    if remote:
        raise ValueError(f"{remote[0]}: aspect-ratio buckets read samples by key and need local shards (a path); "
                         f"copy the shards to a local or mounted disk")  # fmt: skip
    by_folder: dict[str, list[str]] = {}
    for url in urls:
        by_folder.setdefault(os.path.dirname(url), []).append(url)
    result: dict[str, dict[str, Size | None]] = {}
    for folder, folder_urls in by_folder.items():
        recorded = read_sizes_file(folder)
        changed = False
        for url in folder_urls:
            name, nbytes = os.path.basename(url), os.path.getsize(url)
            entry = recorded.get(name)
            if entry is None or entry.get("bytes") != nbytes:
                try:
                    sizes = scan_shard(url)
                except (OSError, tarfile.TarError) as error:
                    warnings.warn(f"shard {url}: cannot read image sizes ({error!r}); its samples are left out",
                                  stacklevel=2)  # fmt: skip
                    result[url] = {}
                    continue
                entry = recorded[name] = {"bytes": nbytes, "sizes": {k: list(v) if v else None for k, v in sizes.items()}}
                changed = True
            result[url] = {key: tuple(size) if size else None for key, size in entry["sizes"].items()}
        if changed:
            try:
                write_sizes_file(folder, recorded)
            except OSError:  # a read-only folder: scanned again next time
                pass
    return result


def plan_records(urls: list[str]) -> list[Record]:
    """Every sample of local shards as a planner record (url, key, image size), in shard and member order; a key
    that names samples in several shards is planned once (its first), as the streaming reader trains it once."""
    records, first = [], {}
    twice: list[tuple[str, str, str]] = []
    for url, sizes in sample_sizes(urls).items():
        for key, size in sizes.items():
            if key in first:
                twice.append((key, first[key], url))
                continue
            first[key] = url
            records.append(Record(url, key, size))
    if twice:
        key, a, b = twice[0]
        warnings.warn(f"{len(twice)} keys name samples in several shards, e.g. {key!r} in {a} and {b}: each is "
                      f"trained once per pass (its first)", stacklevel=2)  # fmt: skip
    return records
