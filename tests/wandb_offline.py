"""Read what a W&B run logged from its local `run-*.wandb` file (works offline, before `wandb sync`).

    rows = history("runs/x/wandb/offline-run-*/run-*.wandb")    # [{"_step": 10, "train/loss": 0.1, ...}]
    cfg = config(path)                                          # the logged config, as a nested dict

The file is W&B's leveldb-style log of `wandb_internal_pb2.Record` protobufs: a 7-byte header
(":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header (crc32c,
length, type FULL/FIRST/MIDDLE/LAST). wandb >= 0.2x reads it in Go only, so it is parsed here.
"""

from __future__ import annotations

import glob
import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32c (unchecked), length, type
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def run_files(root: str | Path) -> list[Path]:
    """Every `run-*.wandb` under ``root`` (a run directory, or a folder of runs), oldest first."""
    paths = glob.glob(str(Path(root) / "**" / "run-*.wandb"), recursive=True)
    return sorted(Path(p) for p in paths if "latest-run" not in Path(p).parts)  # a symlink to the newest


def _payloads(data: bytes):
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError("not a W&B run file (bad header)")
    pos, parts = _FILE_HEADER.size, []
    while pos + _CHUNK_HEADER.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK_HEADER.size:  # block tail padding
            pos += left_in_block
            continue
        _, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding / not yet written
            pos += left_in_block
            continue
        start = pos + _CHUNK_HEADER.size
        chunk = data[start:start + length]
        if len(chunk) < length:  # a record still being written
            break
        pos = start + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            parts = [chunk]
        elif kind == _MIDDLE:
            parts.append(chunk)
        elif kind == _LAST:
            parts.append(chunk)
            yield b"".join(parts)
            parts = []


def records(path: str | Path, timeout: float = 30.0) -> list:
    """Every `Record` in the file, in order, once the run's `exit` record is there: W&B's service process may still
    be writing the file when `finish()` has returned, so it is read again until the run has ended (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        out = []
        for payload in _payloads(Path(path).read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            out.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in out) or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _items(items) -> dict:
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        out[key] = json.loads(item.value_json)
    return out


def history(path: str | Path) -> list[dict]:
    """Every `wandb.log` row, in order (of an ended run: `records`)."""
    return [_items(r.history.item) for r in records(path) if r.WhichOneof("record_type") == "history"]


def config(path: str | Path) -> dict:
    """The run's config (latest value of each key), without W&B's own `_wandb` entry."""
    out: dict = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "config":
            for item in r.config.update:
                key = item.key or "/".join(item.nested_key)
                out[key] = json.loads(item.value_json)
    out.pop("_wandb", None)
    return {k: v.get("value", v) if isinstance(v, dict) and set(v) <= {"value", "desc"} else v for k, v in out.items()}


def summary(path: str | Path) -> dict:
    out: dict = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "summary":
            out.update(_items(r.summary.update))
    return out


def run_info(path: str | Path) -> dict:
    """Name, group and id of the run."""
    for r in records(path):
        if r.WhichOneof("record_type") == "run":
            return {"name": r.run.display_name, "group": r.run.run_group, "id": r.run.run_id,
                    "project": r.run.project}
    return {}
