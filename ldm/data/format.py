"""The shard format, in one place: what a shard set is, what a sample holds, how it is counted and captioned.

A shard set is a folder of tars in the img2dataset layout: `000000.tar, 000001.tar, ...`, each holding
`<key>.<ext>` members, one sample per key (`<key>.jpg` + `<key>.txt`, or `<key>.json` with a "caption" or
"text" that is a string or a list of strings). Beside the tars, `manifest.json` lists every shard's name,
sample count, size in bytes and sha256, and the keys that name more than one sample (`write_manifest`), and
`sizes.json` each image's (width, height) per shard (`read_sizes_file`; the writer records them, `ldm.data.sizes`
reads image headers once for shards written elsewhere): aspect-ratio buckets are planned from them without
decoding an image. The reader (`ldm.data.webdataset`), the writer
(`ldm.data.shards`), the latent shards (`ldm.data.latents`), the data module, FID reference statistics and the
config checks all go through these functions.

    >>> expand_urls("data/shapes/train")                 # doctest: +SKIP
    ['data/shapes/train/000000.tar', ...]
    >>> sample_counts(expand_urls("data/shapes/train"))  # manifest.json, else tar headers  # doctest: +SKIP
    {'data/shapes/train/000000.tar': 1000, ...}
    >>> caption_choices(decode_texts({"txt": b"a red circle"}))
    ['a red circle']
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tarfile
from pathlib import Path

import braceexpand

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
MANIFEST = "manifest.json"
SIZES = "sizes.json"
MASK_EXTENSIONS = tuple(f"mask.{ext}" for ext in IMAGE_EXTENSIONS)  # `<key>.mask.png`: a loss mask, white = learn
SHARD_NAME = re.compile(r"^(\d{6})\.tar$")


# --- shard specs -> urls ---------------------------------------------------------------------------------
def _wds_expand(pattern: str) -> list[str]:
    """What `webdataset.shardlists.expand_urls` makes of a string: `::`-joined specs, `${VAR}` read from the
    environment variable `WDS_VAR`, then brace expansion. Here because importing webdataset imports torch (2 s):
    config checks expand shard specs before anything heavy is imported (tests compare the two)."""
    urls = []
    for url in pattern.split("::"):
        for _ in range(10):  # webdataset substitutes up to 10 times (a value may name another variable)
            last, url = url, re.sub(r"\$\{(\w+)\}", _wds_variable, url)
            if url == last:
                break
        urls.extend(braceexpand.braceexpand(url))
    return urls


def _wds_variable(match: re.Match) -> str:
    name = "WDS_" + match.group(1)
    if name not in os.environ:
        raise FileNotFoundError(f"shard spec names ${{{match.group(1)}}} but the environment variable {name} is not set")
    return os.environ[name]


def is_remote(url: str) -> bool:
    """A url that is not a local path (`pipe:`, `s3://`, `https://`, ...): read through a stream, never stat'ed."""
    return "://" in url or url.startswith("pipe:")


def _read_list_file(path: str) -> list[str]:
    """Urls of a list file, one per line; `#` comments; relative paths are relative to the file."""
    folder = os.path.dirname(path)
    urls = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if line:
                urls.append(line if is_remote(line) or os.path.isabs(line) else os.path.join(folder, line))
    return urls


def expand_urls(urls) -> list[str]:
    """Expand shard specs to a list of urls.

    Accepts a brace pattern (`dir/{000000..000009}.tar`), a glob (`dir/*.tar`), a folder
    (all `*.tar` inside, sorted), a list file (`*.txt`, one spec per line), `::`-joined
    specs, or a list of any of these. Local files must exist.
    """
    if isinstance(urls, (list, tuple)):
        return [url for spec in urls for url in expand_urls(spec)]
    pattern = os.fspath(urls)
    expanded = []
    for url in _wds_expand(pattern):
        if is_remote(url):
            expanded.append(url)
        elif os.path.isdir(url):
            expanded.extend(sorted(glob.glob(os.path.join(url, "*.tar"))))
        elif glob.has_magic(url):
            expanded.extend(sorted(glob.glob(url)))
        elif url.endswith(".txt") and os.path.isfile(url):
            listed = _read_list_file(url)
            expanded.extend(expand_urls(listed) if listed else [])
        elif os.path.exists(url):
            expanded.append(url)
        else:
            raise FileNotFoundError(f"shard {url} of {pattern!r} does not exist")
    if not expanded:
        raise FileNotFoundError(f"no shards match {pattern!r}")
    return expanded


def shard_folder(urls) -> Path:
    """The folder of the first shard of a spec (where manifest.json and other sidecars live)."""
    first = expand_urls(urls)[0]
    return Path(first) if os.path.isdir(first) else Path(first).parent


# --- member names -> samples ------------------------------------------------------------------------------
def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name (`dir/000123.jpg` -> ("000123", "jpg")); None without an extension.
    WebDataset splits at the first dot of the base name, so keys hold no dots."""
    base = os.path.basename(name)
    return tuple(base.split(".", 1)) if "." in base else None


def has_extension(name: str, extensions) -> bool:
    return name.rsplit(".", 1)[-1].lower() in extensions


def image_bytes(sample: dict) -> bytes | None:
    """The encoded image of a raw sample (the first of IMAGE_EXTENSIONS it holds), or None."""
    return next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)


def mask_bytes(sample: dict) -> bytes | None:
    """The encoded loss mask of a raw sample (`<key>.mask.png`, ...), or None."""
    return next((sample[ext] for ext in MASK_EXTENSIONS if ext in sample), None)


# --- captions ---------------------------------------------------------------------------------------------
def decode_texts(sample: dict) -> dict:
    """A raw sample's caption members, decoded: {"txt": str, "json": parsed JSON} (those it holds)."""
    texts = {}
    if "txt" in sample:
        texts["txt"] = sample["txt"].decode("utf-8")
    if "json" in sample:
        texts["json"] = json.loads(sample["json"].decode("utf-8"))
    return texts


def caption_choices(texts: dict) -> list[str]:
    """Captions of a decoded sample: .json "caption" (or "text"), a string or list, else .txt."""
    record = texts.get("json")
    captions = record.get("caption", record.get("text")) if isinstance(record, dict) else None
    if captions is None and "txt" in texts:
        captions = texts["txt"]
    if captions is None:
        raise ValueError("no caption (.txt, or .json with 'caption')")
    captions = [captions] if isinstance(captions, str) else captions
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"caption must be a string or a non-empty list of strings, got {captions!r}")
    return [c.strip() for c in captions]


# --- manifest and counts ----------------------------------------------------------------------------------
def read_manifest(shard_dir: str | os.PathLike) -> dict | None:
    """The manifest.json of a shard folder, or None when there is none."""
    path = Path(shard_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def write_manifest_file(out_dir: str | os.PathLike, manifest: dict) -> None:
    """Write manifest.json atomically (readers never see half a file)."""
    tmp = Path(out_dir) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, Path(out_dir) / MANIFEST)


def read_sizes_file(shard_dir: str | os.PathLike) -> dict:
    """sizes.json of a shard folder: {shard name: {"bytes": size of the tar, "sizes": {key: [w, h] or None}}}
    ({} when there is none). An entry whose "bytes" differ from the tar's is stale (the tar was rewritten)."""
    path = Path(shard_dir) / SIZES
    try:
        return json.loads(path.read_text())["shards"] if path.exists() else {}
    except (ValueError, KeyError):  # unreadable: a cache, read again from the images
        return {}


def write_sizes_file(shard_dir: str | os.PathLike, shards: dict) -> None:
    """Write sizes.json atomically (see read_sizes_file for the layout); ranks writing it at once each write their
    own temporary file, and one complete file wins."""
    tmp = Path(shard_dir) / f"{SIZES}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"shards": shards}, separators=(",", ":")))
    os.replace(tmp, Path(shard_dir) / SIZES)


def tar_sample_count(path: str | os.PathLike) -> int:
    """Samples (distinct keys) in a local tar, from its headers only."""
    with tarfile.open(path) as tar:
        return len({split_name(n)[0] for n in tar.getnames() if split_name(n) is not None})


def tar_keys(path: str | os.PathLike, extensions=None) -> list[str]:
    """The keys of a local tar's samples, in order, from its headers only. Members of one sample are consecutive: a
    key that comes back, or repeats an extension, starts another sample (as the reader groups them). With
    ``extensions``, only members with one of them count."""
    keys, current, seen = [], None, set()
    with tarfile.open(path) as tar:
        for member in tar:
            split = split_name(member.name) if member.isreg() else None
            if split is None or (extensions is not None and not has_extension(member.name, extensions)):
                continue
            key, extension = split[0], split[1].lower()
            if key != current or extension in seen:
                keys.append(key)
                current, seen = key, set()
            seen.add(extension)
    return keys


def find_duplicates(keys_by_url: dict[str, list[str]]) -> dict[str, list[str]]:
    """Keys that name more than one sample: key -> the url of each of its samples, in the given order."""
    where: dict[str, list[str]] = {}
    for url, keys in keys_by_url.items():
        for key in keys:
            where.setdefault(key, []).append(url)
    return {key: urls for key, urls in where.items() if len(urls) > 1}


def duplicate_keys(urls: list[str], extensions=None) -> dict[str, list[str]]:
    """Keys that name more than one sample in a shard set: key -> the url of each of its samples, in url order.

    Shards of one folder: from manifest.json's "duplicates" where the manifest records them (make_shards writes it),
    else from the local tars' headers. Shards of several folders (a list of shard sets, a list file): every local
    tar's headers (member names only, no data is read), since a manifest knows only the keys of its own folder.
    Remote shards are not looked into."""
    local = [url for url in urls if not is_remote(url)]
    folders = list(dict.fromkeys(os.path.dirname(url) for url in local))
    manifest = read_manifest(folders[0]) if len(folders) == 1 else None
    if manifest is not None and "duplicates" in manifest:
        order = {url: i for i, url in enumerate(urls)}
        found = {key: sorted((u for u in (os.path.join(folders[0], name) for name in names) if u in order),
                             key=order.__getitem__) for key, names in manifest["duplicates"].items()}  # fmt: skip
        return {key: where for key, where in found.items() if len(where) > 1}
    keys_by_url: dict[str, list[str]] = {}
    for url in local:
        try:
            keys_by_url[url] = tar_keys(url, extensions)
        except (OSError, tarfile.TarError):
            keys_by_url[url] = []  # unreadable: the reader names it when it gets there
    return find_duplicates(keys_by_url)


def shard_record(path: str | os.PathLike) -> dict:
    """{"name", "count", "bytes", "sha256"} of a finished shard (count = distinct keys)."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"name": path.name, "count": tar_sample_count(path), "bytes": path.stat().st_size,
            "sha256": digest.hexdigest()}  # fmt: skip


def write_manifest(shard_dir: str | os.PathLike) -> dict:
    """Write manifest.json for a folder of existing shards (img2dataset output, read as is), with the keys that name
    more than one sample ("duplicates": key -> shard names; the reader trains each once). A tar that cannot be read
    is an error naming it, and nothing is written."""
    shard_dir = Path(shard_dir)
    paths = sorted(shard_dir.glob("*.tar"))
    if not paths:
        raise ValueError(f"{shard_dir}: no .tar shards")
    shards, keys = [], {}
    for path in paths:
        try:
            shards.append(shard_record(path))
            keys[path.name] = tar_keys(path)
        except (OSError, tarfile.TarError) as error:
            reason = str(error).strip().splitlines()[0].rstrip(":") if str(error).strip() else type(error).__name__
            raise ValueError(f"{path}: not a readable tar ({reason}); nothing was written: repair or remove it, then "
                             f"run again") from None  # fmt: skip
    manifest = {"shards": shards, "total": sum(s["count"] for s in shards), "duplicates": find_duplicates(keys)}
    write_manifest_file(shard_dir, manifest)
    return manifest


def shard_counts(urls: list[str]) -> dict[str, int]:
    """Samples per local shard according to its folder's manifest.json (shards not listed are left out)."""
    counts: dict[str, int] = {}
    for folder in {os.path.dirname(url) for url in urls if not is_remote(url)}:
        manifest = read_manifest(folder) or {"shards": []}
        counts.update({os.path.join(folder, s["name"]): s["count"] for s in manifest["shards"]})
    return {url: counts[url] for url in urls if url in counts}


def sample_counts(urls: list[str], strict: bool = False) -> dict[str, int]:
    """Samples per shard: from manifest.json, else from the local tar's headers.

    strict=False: remote shards without a manifest are left out and an unreadable tar counts 0 (the reader names
    it when it gets there). strict=True: both raise (ValueError naming the shard, or the tar error)."""
    counts = shard_counts(urls)
    for url in urls:
        if url in counts:
            continue
        if is_remote(url):
            if strict:
                raise ValueError(f"{url}: no manifest.json gives its sample count")
            continue
        try:
            counts[url] = tar_sample_count(url)
        except (OSError, tarfile.TarError):
            if strict:
                raise
            counts[url] = 0
    return {url: counts[url] for url in urls if url in counts}
