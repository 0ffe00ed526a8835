"""Seed every training batch from (seed, epoch, batch index, rank): a resumed run draws what the
uninterrupted run drew.

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


def step_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """A 63-bit seed that differs for every (seed, epoch, batch, rank)."""
    digest = hashlib.sha256(f"{seed}-{epoch}-{batch_idx}-{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class StepSeed(pl.Callback):
    def __init__(self, seed: int = 0):
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        s = step_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)  # CPU and every CUDA device
