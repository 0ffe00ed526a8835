"""A trained stage back from its checkpoint: built from the config saved in it, with its trained weights.

    module = load_module("runs/x/checkpoints/last.ckpt")   # frozen parts come from their sources
    images = module.generate(["a red circle"], seed=0)

Serves `ldm.sample`, `ldm.export` and `ldm.evaluate`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.training.checkpoint import load_checkpoint


def load_module(path: str | Path, map_location: str | torch.device = "cpu"):
    """The LightningModule a checkpoint was trained as, with its trained weights, in eval mode."""
    checkpoint = load_checkpoint(path, map_location)
    cfg = OmegaConf.create(checkpoint["config"])
    module = instantiate(cfg.model, _convert_="all")
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    module.run_config = checkpoint["config"]
    return module.eval()
