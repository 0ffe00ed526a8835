"""Callbacks that the fault-injection tests add to real runs (through Hydra overrides, also in subprocesses):
record per-step losses, poison chosen batches with NaN."""

from __future__ import annotations

import json

import pytorch_lightning as pl
import torch


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
