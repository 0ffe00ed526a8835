"""Small single-purpose callbacks: throughput, sample grids, exports, config-in-checkpoint.

Each is a few dozen lines and knows one thing; the train entry point lists them from `conf/callbacks/`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from ldm.utils.images import captioned_grid


def _batch_size(batch) -> int:
    return len(batch["caption"]) if isinstance(batch, dict) and "caption" in batch else len(batch)


class Throughput(pl.Callback):
    """Logs `train/images_per_sec` (all ranks together), `train/images_seen` and `train/lr`
    (Lightning's LearningRateMonitor refuses to run without a logger; this works with `logger=none`)."""

    def __init__(self, log_every_n_steps: int = 10):
        self.every = log_every_n_steps
        self.images_seen = 0
        self._t0: float | None = None
        self._images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n = _batch_size(batch) * trainer.world_size
        self.images_seen += n
        self._images += n
        if trainer.global_step % self.every == 0 and self._t0 is not None:
            elapsed = time.perf_counter() - self._t0
            pl_module.log("train/images_per_sec", self._images / max(elapsed, 1e-9), batch_size=1)
            self._t0, self._images = time.perf_counter(), 0
        pl_module.log("train/images_seen", float(self.images_seen), batch_size=1)
        if trainer.optimizers:
            pl_module.log("train/lr", trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)

    def state_dict(self):
        return {"images_seen": self.images_seen}

    def load_state_dict(self, state_dict):
        self.images_seen = state_dict["images_seen"]


class StepTimer(pl.Callback):
    """Times training steps after `warmup` of them (compilation, autotuning, loader start-up): writes
    {"images_per_sec", "step_seconds", "steps", "batch_size", "peak_memory_gib", "world_size"} as JSON to `out`
    (rank 0) and logs `bench/images_per_sec`. GPU work is synchronised only at the window's two ends."""

    def __init__(self, warmup: int = 10, out: str | None = None):
        self.warmup, self.out = warmup, out
        self._t0 = None
        self._steps = self._images = 0

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self._t0 is None:
            self._sync(pl_module)
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            self._t0 = time.perf_counter()
            rank_zero_info(f"StepTimer: {self.warmup} warm-up steps done; timing from here")
        if self._t0 is not None:
            self._steps += 1
            self._images += _batch_size(batch) * trainer.world_size

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # the window closes at the last step, before end-of-fit work (a final checkpoint can take many seconds)
        if self._t0 is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            self._sync(pl_module)
            self._elapsed = time.perf_counter() - self._t0

    def on_train_end(self, trainer, pl_module):
        if self._t0 is None or not self._steps:
            raise RuntimeError(f"StepTimer: no step after the {self.warmup} warm-up steps; raise trainer.max_steps")
        self._sync(pl_module)
        elapsed = getattr(self, "_elapsed", None) or time.perf_counter() - self._t0
        result = {
            "images_per_sec": self._images / elapsed,
            "step_seconds": elapsed / self._steps,
            "steps": self._steps,
            "batch_size": self._images // (self._steps * trainer.world_size),
            "world_size": trainer.world_size,
            "peak_memory_gib": torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            if pl_module.device.type == "cuda" else None,
        }  # fmt: skip
        rank_zero_info(f"StepTimer: {result}")
        if self.out and trainer.is_global_zero:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out).write_text(json.dumps(result))


class SampleGrid(pl.Callback):
    """Every `every_n_steps` and at the end: images for fixed prompts and seed, saved as PNG and logged."""

    def __init__(self, prompts: Sequence[str], every_n_steps: int = 500, seed: int = 0, dirname: str = "samples",
                 columns: int = 4, **generate_kwargs):
        self.prompts = list(prompts)
        self.every = every_n_steps
        self.seed = seed
        self.dirname = dirname
        self.columns = columns
        self.generate_kwargs = generate_kwargs

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every and trainer.global_step % self.every == 0:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.sample(trainer, pl_module)

    @rank_zero_only
    def sample(self, trainer, pl_module) -> Path:
        images = pl_module.generate(self.prompts, seed=self.seed, **self.generate_kwargs)  # (B, 3, H, W)
        out = Path(trainer.default_root_dir) / self.dirname / f"step_{trainer.global_step:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        captioned_grid(images, self.prompts, columns=self.columns).save(out)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=list(images.cpu()), caption=self.prompts,
                                 step=trainer.global_step)
        rank_zero_info(f"samples for {len(self.prompts)} prompts -> {out}")
        return out


class ExportPipeline(pl.Callback):
    """At the end of fit, write a diffusers `StableDiffusionPipeline` directory (EMA weights when on)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module):
        from ldm.models.export import export_pipeline

        export_pipeline(pl_module, self.out_dir)
        rank_zero_info(f"exported diffusers pipeline -> {self.out_dir}")


class ExportVAE(pl.Callback):
    """At the end of fit, save the VAE with `save_pretrained` and its measured latent scaling factor."""

    def __init__(self, out_dir: str, max_batches: int = 20):
        self.out_dir = out_dir
        self.max_batches = max_batches

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module):
        pl_module.export(self.out_dir, trainer.datamodule.train_dataloader(), self.max_batches)
        rank_zero_info(f"exported VAE (scaling_factor={pl_module.vae.config.scaling_factor:.4f}) -> {self.out_dir}")


class ExportOpenCLIP(pl.Callback):
    """At the end of fit, write the CLIP as an open_clip directory (`open_clip_config.json` + safetensors)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module):
        pl_module.export(self.out_dir)
        rank_zero_info(f"exported open_clip model -> {self.out_dir} (open_clip: 'local-dir:{self.out_dir}')")
