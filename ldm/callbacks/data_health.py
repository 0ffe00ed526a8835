"""Logs the train data's skip counts (`ldm.data.health.DataHealth`, filled by the loader workers).

    Trainer(callbacks=[DataHealthMonitor(log_every_n_steps=50)])   # conf/callbacks/data_health.yaml

Logs `data/skipped`, `data/too_small`, `data/shard_errors`, `data/duplicates` (all ranks summed) and `data/bad_fraction` every
`log_every_n_steps` steps; the check that stops training on too much bad data runs in the loader itself.
"""

from __future__ import annotations

import pytorch_lightning as pl


class DataHealthMonitor(pl.Callback):
    """Logs the train data's skip counts every `log_every_n_steps` (the check itself runs in the loader)."""

    def __init__(self, log_every_n_steps: int = 50):
        self.every = log_every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        health = getattr(trainer.datamodule, "train_health", None) if trainer.datamodule is not None else None
        if health is None or trainer.global_step % self.every != 0:
            return
        totals = health.totals()
        for field in ("skipped", "too_small", "shard_errors", "duplicates"):
            pl_module.log(f"data/{field}", float(totals[field]), reduce_fx="sum", sync_dist=True, batch_size=1)
        pl_module.log("data/bad_fraction", health.bad_fraction(), sync_dist=True, batch_size=1)
