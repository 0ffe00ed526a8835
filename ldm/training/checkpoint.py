"""Checkpoints: written atomically, read without running code, and loaded back into a module.

    checkpoint = load_checkpoint("runs/x/checkpoints/last.ckpt")   # weights_only; holds the run's config
    Trainer(plugins=[AtomicCheckpointIO()])                         # what conf/trainer/default.yaml sets

(`ldm.stages.load.load_module` builds the trained stage back from such a file.)

Writes go to a temporary name in the same folder, are flushed and fsynced, then renamed over the
target: a crash or a full disk mid-save never leaves a truncated checkpoint under the real name, and
the previous checkpoints stay as they were. A `NAME.sha256` sidecar records the bytes written, so damage
that still unpickles (flipped bytes inside a tensor) is caught too. Reads use `torch.load(weights_only=True)`:
a pickle that would construct arbitrary objects (run code) is refused with `UnsafeCheckpointError`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle holds more than tensors and plain containers: loading it could run code."""


def _open_tmp(path: Path):
    """The temporary file a checkpoint is written to (a seam for tests that fill the disk)."""
    return open(path, "wb")


class _Hashing:
    """A write-only file that hashes what goes through it."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on every platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_failure(error: BaseException) -> OSError | None:
    """The OSError behind a failed write (torch's zip writer may wrap it in a RuntimeError)."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _write_sidecar(path: Path, text: str) -> None:
    """Write a checksum sidecar's temporary file (a seam for tests that fill the disk)."""
    path.write_text(text)


def _reason(cause: OSError) -> str:
    return "disk full (ENOSPC)" if cause.errno == errno.ENOSPC else f"{cause.strerror or cause}"


def atomic_save(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """torch.save to `.NAME.tmp-PID`, flush + fsync, rename over `path`, fsync the folder; then the
    `NAME.sha256` sidecar (removed first, so a stale one never describes the new file), the same way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sidecar = checksum_path(path)
    try:
        with _open_tmp(tmp) as f:
            hashing = _Hashing(f)
            torch.save(checkpoint, hashing)
            f.flush()
            os.fsync(f.fileno())
        sidecar.unlink(missing_ok=True)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        cause = _write_failure(error)
        if cause is None:
            raise
        raise CheckpointError(
            f"could not write checkpoint {path}: {_reason(cause)}; nothing was replaced, the previous checkpoints "
            f"in {path.parent} are intact"
        ) from error
    _fsync_dir(path.parent)
    sidecar_tmp = sidecar.with_name(f".{sidecar.name}.tmp-{os.getpid()}")
    try:
        _write_sidecar(sidecar_tmp, f"{hashing.sha256.hexdigest()}  {path.name}\n")
        os.replace(sidecar_tmp, sidecar)
    except OSError as error:
        sidecar_tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"checkpoint {path} was written and is complete, but its checksum file {sidecar.name} could not be "
            f"written: {_reason(error)}; the checkpoint loads without it (unchecked), the earlier checkpoints in "
            f"{path.parent} are intact"
        ) from error
    _fsync_dir(path.parent)
    return path


def stale_temporaries(folder: str | Path) -> list[Path]:
    """Temporary files that interrupted saves left in a checkpoint folder (`.NAME.tmp-PID`, never a checkpoint)."""
    return sorted(p for p in Path(folder).glob(".*.tmp-*") if p.is_file())


def read_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict:
    """`torch.load(weights_only=True)` with one-line errors: missing, unreadable (truncated, corrupt), unsafe."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    sidecar = checksum_path(path)
    if sidecar.is_file() and sidecar.read_text().split()[0] != file_sha256(path):
        raise CheckpointError(f"checkpoint {path} is corrupt: its bytes do not match {sidecar.name}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise UnsafeCheckpointError(
            f"refusing to load {path}: its pickle asks for objects beyond tensors and plain containers "
            f"(loading it could run code): {detail.strip()}"
        ) from error
    except Exception as error:  # noqa: BLE001: zip/EOF/decode errors all mean the file is damaged
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt): {error!r:.200}") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} holds no 'state_dict': not a training checkpoint")
    return checkpoint


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by ldm.train (it holds the resolved config)."""
    checkpoint = read_checkpoint(path, map_location)
    if "config" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} holds no 'config': it was not written by ldm.train")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, saving atomically (`atomic_save`) and loading with weights_only=True."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        # weights_only is always True here, whatever the caller asks
        return read_checkpoint(path, map_location=map_location if map_location is not None else "cpu")

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        checksum_path(Path(path)).unlink(missing_ok=True)
