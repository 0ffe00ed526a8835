"""What the fault-injection tests (test_faults.py, test_stops.py) share: callbacks they add to real runs (through
Hydra overrides, also in subprocesses) that record per-step losses, poison chosen batches with NaN or fill the disk;
a file that fails like a full disk; the overrides that leave out slow callbacks; the tiny data set fixture."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from tiny import make_tiny_root

FAST = ["logger=none", "callbacks.fid=null", "callbacks.export=null", "callbacks.sample_grid=null"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """The tiny data set of tests/tiny.py: 48 train samples in 3 shards of 16."""
    return make_tiny_root(tmp_path_factory.mktemp("tiny"))


class RecordLoss(pl.Callback):
    """Appends {"step", "loss", "epoch", "batch_idx"} per training batch to a JSON-lines file, flushed at once
    (a SIGKILL loses nothing that was written)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row = {"step": trainer.global_step, "loss": float(loss.detach()), "epoch": trainer.current_epoch,
               "batch_idx": batch_idx, "keys": list(batch.get("key", []))}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


class PoisonBatches(pl.Callback):
    """Replaces the pixels of the batches at the given global steps by NaN (a batch that makes the loss NaN;
    float pixels are taken as already in [-1, 1], uint8 ones cannot hold NaN)."""

    def __init__(self, steps: list[int]):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            batch["pixel_values"] = torch.full(batch["pixel_values"].shape, float("nan"))


def read_losses(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def by_step(rows: list[dict]) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in rows}


def unet_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.unet.state_dict().items()}


class FullDiskFrom(pl.Callback):
    """From the given global step on, checkpoint writes fail like a full disk after 4 KiB (what `_open_tmp` returns
    is swapped, in whatever process runs the Trainer: also a subprocess started through Hydra overrides)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import ldm.training.checkpoint as checkpoint

        if trainer.global_step == self.step:
            checkpoint._open_tmp = lambda path: FullDisk(path, 4096)


class FullDisk:
    """A file that accepts `limit` bytes, then fails like a full disk."""

    def __init__(self, path, limit):
        self.f, self.left = open(path, "wb"), limit

    def write(self, data):
        if len(data) > self.left:
            self.f.write(bytes(data[: self.left]))
            self.left = 0
            raise OSError(28, "No space left on device")
        self.left -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class SecretProbe:
    """A Hydra callback (`+hydra.callbacks.probe._target_=fault_helpers.SecretProbe`) that looks into every file under
    the sweep directory whenever anything is logged, and when each job starts and ends, for the words of the
    environment variable LDM_PROBE_WORDS (comma-separated); each find is appended to the file LDM_PROBE_OUT as
    "moment: file". The sweeper writes multirun.yaml and the launcher logs each job's overrides before the first job
    starts, and Hydra writes a job's `.hydra/` before calling its callbacks' on_job_start (this one runs after the
    project's own), so a secret written in clear and redacted later is caught."""

    def __init__(self):
        import os

        self.words = [w for w in os.environ.get("LDM_PROBE_WORDS", "").split(",") if w]
        self.out = os.environ["LDM_PROBE_OUT"]
        self.sweep_dir, self.seen = None, {}

    def look(self, moment: str) -> None:
        from pathlib import Path

        if self.sweep_dir is None or not self.sweep_dir.is_dir():
            return
        for path in self.sweep_dir.rglob("*"):
            try:
                stat = path.stat()
                if not path.is_file() or self.seen.get(path) == (stat.st_mtime_ns, stat.st_size):
                    continue
                self.seen[path] = (stat.st_mtime_ns, stat.st_size)
                text = path.read_bytes().decode(errors="replace")
            except OSError:  # removed meanwhile
                continue
            if any(word in text for word in self.words):
                with Path(self.out).open("a") as found:
                    found.write(f"{moment}: {path}\n")

    def on_multirun_start(self, config, **kwargs) -> None:
        import logging
        from pathlib import Path

        self.sweep_dir = Path(config.hydra.sweep.dir)
        make = logging.getLogRecordFactory()

        def factory(*args, **kw):
            record = make(*args, **kw)
            self.look(f"log record {record.getMessage()[:60]!r}")
            return record

        logging.setLogRecordFactory(factory)

    def on_job_start(self, config, **kwargs) -> None:
        self.look(f"job {config.hydra.job.num} start")

    def on_job_end(self, config, job_return, **kwargs) -> None:
        self.look(f"job {config.hydra.job.num} end")

    def on_multirun_end(self, config, **kwargs) -> None:
        self.look("sweep end")
