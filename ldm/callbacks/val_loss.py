"""`val/loss`: the stage's training loss on fixed held-out batches, with every random draw fixed, every K steps.

    ValidationLoss(every_n_steps=250, num_samples=256, batch_size=64)   # conf/callbacks/val_loss.yaml

The first ``num_samples`` validation samples (shard order, centre crop, no flip) are read once, at the start of
fit, and kept. Each evaluation asks the stage for its loss on each of those batches (`validation_loss(batch,
generator)`), with a CPU generator seeded by (seed, batch index): the latent-diffusion stage draws its posterior
samples and noise from it and uses timesteps evenly spaced over the schedule, the VAE stage its posterior
samples, the CLIP stage needs none. The same images, noise and timesteps every time: the curve moves only with
the weights, a low-variance signal that costs seconds (forward passes only). The stage runs in eval mode, under
the trainer's precision, eagerly (a compiled U-Net would compile a second graph for it). Every rank computes the same value on the same batches (a sharded U-Net's forward is a
collective, so all ranks must run it). Logs `val/loss` every ``every_n_steps`` steps and at the end of training;
a run without validation shards is warned once and logs none.
"""

from __future__ import annotations

import itertools
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from ldm.data.webdataset import collate, make_shard_dataset


def held_out_batches(shards, resolution: int, num_samples: int, batch_size: int) -> list[dict]:
    """The first ``num_samples`` samples of ``shards`` in shard order as batches (uint8 pixels, captions)."""
    dataset = make_shard_dataset(shards, resolution, center_crop=True, random_flip=False, shuffle_buffer=0,
                                 shardshuffle=False, split_by_node=False, uint8=True)  # fmt: skip
    samples = list(itertools.islice(iter(dataset), num_samples))
    if not samples:
        raise ValueError(f"ValidationLoss: no samples in {shards}")
    return [collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class ValidationLoss(pl.Callback):
    def __init__(self, every_n_steps: int = 250, num_samples: int = 256, batch_size: int = 64,
                 shards: str | None = None, seed: int = 0, at_end: bool = True):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"callbacks.val_loss.every_n_steps must be >= 1 or null, got {every_n_steps}")
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"callbacks.val_loss: num_samples and batch_size must be >= 1, got {num_samples}, "
                             f"{batch_size}")  # fmt: skip
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shards = shards
        self.seed = seed
        self.at_end = at_end
        self.batches: list[dict] | None = None
        self._last_step = -1

    def on_fit_start(self, trainer, pl_module):
        if not hasattr(pl_module, "validation_loss"):
            raise TypeError(f"callbacks.val_loss: {type(pl_module).__name__} has no validation_loss(batch, generator)")
        shards = self.shards or getattr(trainer.datamodule, "val_shards", None)
        if shards is None:
            rank_zero_warn("callbacks.val_loss: no validation shards (data.val_shards, callbacks.val_loss.shards): "
                           "val/loss is not logged")  # fmt: skip
            self.batches = None
            return
        resolution = getattr(trainer.datamodule, "resolution", None) or pl_module.resolution
        self.batches = held_out_batches(shards, resolution, self.num_samples, self.batch_size)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.batches and self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.batches and self.at_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> float:
        """Mean loss over the held-out samples (each batch weighted by its size); logged as `val/loss`."""
        t0 = time.perf_counter()
        self._last_step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        total = torch.zeros((), dtype=torch.float64, device=pl_module.device)
        count = 0
        # eager even where the U-Net is compiled: a no-grad eval pass would compile (and capture) a second graph
        with trainer.precision_plugin.forward_context(), torch.compiler.set_stance("force_eager"):
            for i, batch in enumerate(self.batches):
                generator = torch.Generator("cpu").manual_seed(self.seed * 1_000_003 + i)
                n = len(batch["caption"])
                total += pl_module.validation_loss(to_device(batch, pl_module.device), generator).double() * n
                count += n
        pl_module.train(was_training)
        loss = float(total / count)  # one host sync per evaluation
        trainer.callback_metrics["val/loss"] = torch.tensor(loss)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"val/loss": loss}, step=trainer.global_step)
            rank_zero_info(f"step {trainer.global_step}: val/loss {loss:.5f} on {count} held-out samples "
                           f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
        return loss
