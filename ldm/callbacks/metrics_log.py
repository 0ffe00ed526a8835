"""Every run's metrics as JSON lines in its own directory, whatever the logger (W&B, CSV or none).

    MetricsLog("runs/x/metrics.jsonl")        # rows {"step": 10, "train/loss": 0.12, "val/fid": 80.1, ...}
    rows = read_metrics("runs/x/metrics.jsonl")

A row holds every scalar in `trainer.callback_metrics`, the latest value of each key, with `val/` keys only in
the row of the step they were measured at (an evaluation at the end of training adds a row of its own). Rank 0
writes one every `trainer.log_every_n_steps` steps, after every evaluation (an FID, Lightning's validation loop)
and at the end, flushed
line by line so a run that dies keeps what it logged. Every stage lists it (conf/callbacks/metrics_log.yaml, at
`<run dir>/metrics.jsonl`): a sweep's report and the value an Optuna sweeper minimises read it, offline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytorch_lightning as pl
import torch

from ldm.utils.metrics_file import FILENAME, read_metrics

__all__ = ["FILENAME", "MetricsLog", "read_metrics"]


def _scalars(metrics: dict) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _val_entries(trainer) -> dict[str, int]:
    """Which `val/` values the trainer holds now, by object identity: an evaluation stores new ones. Read without
    `trainer.callback_metrics`, which recomputes every logged metric and turns the progress-bar ones into Python
    numbers (a host sync per step on a GPU); falls back to it where Lightning keeps them elsewhere."""
    stored = getattr(getattr(trainer, "_logger_connector", None), "_callback_metrics", None)
    if not isinstance(stored, dict):
        stored = trainer.callback_metrics
    return {k: id(v) for k, v in stored.items() if k.startswith("val/")}


class MetricsLog(pl.Callback):
    def __init__(self, path: str):
        self.path = Path(path)
        self._file = None
        self._last_entries: dict[str, int] = {}
        self._last_step = -1

    def on_fit_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")

    def _write(self, trainer, only_val: bool = False):
        row = _scalars(trainer.callback_metrics)  # first: it moves freshly logged values into the trainer's store
        entries = _val_entries(trainer)
        # a val/ value goes in the row of the evaluation that stored it, and in no later row: only the ones
        # stored since the last row (an FID at step 2 is not repeated by the val/loss evaluated after it)
        fresh = {k for k, ident in entries.items() if self._last_entries.get(k) != ident}
        row = {k: v for k, v in row.items() if (k in fresh if k.startswith("val/") else not only_val)}
        self._last_entries = entries
        self._last_step = trainer.global_step
        # JSON has no NaN/inf: a diverged loss is written as null rather than breaking the file
        row = {k: (v if math.isfinite(v) else None) for k, v in row.items()}
        self._file.write(json.dumps({"step": trainer.global_step, **row}) + "\n")
        self._file.flush()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._file is None:
            return
        evaluated = _val_entries(trainer) != self._last_entries
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0 or evaluated:
            self._write(trainer)

    def on_validation_end(self, trainer, pl_module):
        # Lightning's validation loop runs after the step's on_train_batch_end: its row is written here, not a step late
        if self._file is None or trainer.sanity_checking or _val_entries(trainer) == self._last_entries:
            return
        self._write(trainer, only_val=trainer.global_step == self._last_step)

    def on_train_end(self, trainer, pl_module):
        if self._file is None:
            return
        trainer.callback_metrics  # noqa: B018 - moves values logged since into the store that _val_entries reads
        if trainer.global_step != self._last_step:
            self._write(trainer)
        elif _val_entries(trainer) != self._last_entries:  # an evaluation at the end of training, after this step's row
            self._write(trainer, only_val=True)

    def teardown(self, trainer, pl_module, stage):
        if self._file is not None:
            self._file.close()
            self._file = None

