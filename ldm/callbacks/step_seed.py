"""Seed every training batch from (seed, optimizer step, micro-batch, rank): a resumed run draws what
the uninterrupted run drew.

The random draws of a training step (noise, timesteps, caption dropout, VAE posterior samples) then
depend only on counters that checkpoints restore, not on everything that touched the global RNGs
before (a fresh process, dataloader iterators, sample-grid and FID callbacks). Data-side randomness
(shard order, shuffle, crops, flips, caption choice) is seeded separately, by (seed, pass, shard, key)
in `ldm.data.webdataset`. Different ranks draw different noise.

    Trainer(callbacks=[StepSeed(seed=0)])
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytorch_lightning as pl
import torch


def step_seed(seed: int, step: int, micro_batch: int, rank: int) -> int:
    """A 63-bit seed that differs for every (seed, optimizer step, micro-batch of the step, rank)."""
    digest = hashlib.sha256(f"{seed}-{step}-{micro_batch}-{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class StepSeed(pl.Callback):
    def __init__(self, seed: int = 0):
        self.seed = seed
        self._step, self._micro = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # micro-batches of one optimizer step (gradient accumulation) are counted here rather than taken
        # from batch_idx: checkpoints sit at step boundaries, while Lightning's batch_idx after a restart
        # at an epoch's end is not the uninterrupted run's
        self._micro = self._micro + 1 if trainer.global_step == self._step else 0
        self._step = trainer.global_step
        s = step_seed(self.seed, trainer.global_step, self._micro, trainer.global_rank)
        random.seed(s)
        np.random.seed(s % 2**32)
        if pl_module.device.type == "cpu":
            # torch.manual_seed also queues a seed for each accelerator not started yet (CUDA, XPU, MTIA), with a
            # formatted stack trace each: milliseconds per step, and a queue that grows for as long as CPU runs last
            torch.default_generator.manual_seed(s)
        else:
            torch.manual_seed(s)  # the CPU and every CUDA device
