"""The optimizer (and optional per-step LR schedule) of a module's trainable parameters, shared by all stages.

    def configure_optimizers(self):
        return configure_optimizers(self.unet.parameters(), self.optimizer_factory, self.lr_scheduler_factory)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def configure_optimizers(
    params: Iterable[torch.nn.Parameter],
    optimizer: Callable[..., torch.optim.Optimizer],
    lr_scheduler: Callable[..., Any] | None = None,
):
    """What Lightning's `configure_optimizers` returns: the optimizer, with its scheduler stepped every step."""
    opt = optimizer(params)
    if lr_scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(optimizer=opt), "interval": "step"}}
