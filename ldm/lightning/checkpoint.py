"""Load a trained module back from a training checkpoint (state dict + the resolved config in it).

    module = load_module("runs/x/checkpoints/last.ckpt")   # frozen parts come from their sources

Checkpoints are read with `torch.load(weights_only=True)`: nothing executes code while loading.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if "config" not in checkpoint:
        raise ValueError(f"{path} holds no 'config': it was not written by ldm.train")
    return checkpoint


def load_module(path: str | Path, map_location: str | torch.device = "cpu"):
    """The LightningModule a checkpoint was trained as, with its trained weights, in eval mode."""
    checkpoint = load_checkpoint(path, map_location)
    cfg = OmegaConf.create(checkpoint["config"])
    module = instantiate(cfg.model, _convert_="all")
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    module.run_config = checkpoint["config"]
    return module.eval()
