"""Stage 1 quality: reconstructions of held-out images, their PSNR and rFID, logged every K steps and at the end.

    ReconstructionQuality(num_images=256, every_n_steps=None, cache_dir="data/fid_cache")  # conf/callbacks/vae.yaml

rFID is the standard FID (ldm.metrics.fid, the TF Inception) between the first ``num_images`` validation images
and their reconstructions (posterior mode, decoded), as in Rombach et al. 2022, table 8; the real side is the
same cached reference statistics the diffusion stage's FID uses. Logs `val/rfid`, `val/rec_psnr` and a grid of
originals above reconstructions (`reconstructions/step_*.png`, W&B `val/reconstructions`). Rank 0 only.
`eval_seconds` adds up the time spent (reference statistics included), which `callbacks.clock` can leave out of
`trainer.max_time` (ldm/callbacks/clock.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from ldm.metrics.fid import make_fid, set_real_states
from ldm.metrics.reconstruction import reconstruction_quality
from ldm.metrics.reference import reference_states
from ldm.training.compile import eager_stance
from ldm.utils.images import captioned_grid


class ReconstructionQuality(pl.Callback):
    def __init__(self, num_images: int = 256, every_n_steps: int | None = None, shards: str | None = None,
                 cache_dir: str = "data/fid_cache", network: str | None = None, batch_size: int = 50,
                 grid_images: int = 8, dirname: str = "reconstructions"):
        self.num_images = num_images
        self.every_n_steps = every_n_steps
        self.shards = shards
        self.cache_dir = cache_dir
        self.network = network
        self.batch_size = batch_size
        self.grid_images = grid_images
        self.dirname = dirname
        self.fid = None
        self._last_step = -1
        self.eval_seconds = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self._last_step != trainer.global_step:
            self.evaluate(trainer, pl_module)

    @rank_zero_only
    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> dict:
        start = time.perf_counter()
        try:
            return self._evaluate(trainer, pl_module)
        finally:
            self.eval_seconds += time.perf_counter() - start

    def _evaluate(self, trainer, pl_module) -> dict:
        self._last_step = trainer.global_step
        shards = self.shards or trainer.datamodule.val_shards
        if shards is None:
            raise ValueError("ReconstructionQuality needs validation shards (data.val_shards) or callbacks.reconstructions.shards")
        vae, resolution = pl_module.vae, trainer.datamodule.resolution
        if self.fid is None:
            self.fid = make_fid(self.network).to(pl_module.device)  # the Inception where the VAE runs, as FIDCallback's
            set_real_states(self.fid, reference_states(self.fid, shards, resolution, self.num_images, self.cache_dir,
                                                       self.network, self.batch_size))
        with eager_stance():  # a compiled VAE: no graphs compiled and captured for a few evaluation batches
            row, originals, reconstructions = reconstruction_quality(
                vae, self.fid, shards, resolution, self.num_images, self.batch_size, self.grid_images, pl_module.device)
        n = int(self.fid.fake_features_num_samples)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in row.items()})
        for logger in trainer.loggers:
            logger.log_metrics(row, step=trainer.global_step)
        self._save_grid(trainer, originals, reconstructions)
        rank_zero_info(f"step {trainer.global_step}: rFID {row['val/rfid']:.3f}, PSNR {row['val/rec_psnr']:.2f} dB "
                       f"on {n} held-out images")
        return row

    def _save_grid(self, trainer, originals, reconstructions):
        k = len(originals)
        images = (torch.cat([originals, reconstructions]) + 1) / 2  # row(s) of originals, then reconstructions
        out = Path(trainer.default_root_dir) / self.dirname / f"step_{trainer.global_step:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        captioned_grid(images, ["original"] * k + ["reconstruction"] * k, columns=k, caption_lines=1).save(out)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/reconstructions", images=[str(out)], caption=[f"step {trainer.global_step}"],
                                 step=trainer.global_step)
