"""Sample grids for fixed prompts and seed while training: PNGs under the run directory and W&B images.

    Trainer(callbacks=[SampleGrid(["a red circle"], every_n_steps=500)])   # conf/callbacks/sample_grid.yaml
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from ldm.utils.images import captioned_grid


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
