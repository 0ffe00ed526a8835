"""The optimizer (and optional per-step LR schedule) of a module's trainable parameters, shared by all stages.

    def configure_optimizers(self):
        return configure_optimizers(self.unet.parameters(), self.optimizer_factory, self.lr_scheduler_factory)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch


def configure_optimizers(
    params: Iterable[torch.nn.Parameter],
    optimizer: Callable[..., torch.optim.Optimizer],
    lr_scheduler: Callable[..., Any] | None = None,
):
    """What Lightning's `configure_optimizers` returns: the optimizer, with its scheduler stepped every step.

    An optimizer that takes `fused` (AdamW, Adam, SGD) and was given `fused=None` gets the fused kernel
    when all parameters are on a GPU, and PyTorch's default (foreach) elsewhere."""
    params = list(params)
    opt = _with_fused_default(optimizer, params)(params)
    if lr_scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(optimizer=opt), "interval": "step"}}


def _with_fused_default(optimizer: Callable[..., Any], params: list) -> Callable[..., Any]:
    if not isinstance(optimizer, functools.partial) or optimizer.keywords.get("fused", False) is not None:
        return optimizer
    keywords = dict(optimizer.keywords)
    del keywords["fused"]
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]  # params or param groups
    if tensors and all(t.is_cuda for t in tensors) and "fused" in inspect.signature(optimizer.func).parameters:
        keywords["fused"] = True
    return functools.partial(optimizer.func, *optimizer.args, **keywords)


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter group runs a fused kernel, which honours `found_inf` and `grad_scale` on the device
    (torch's protocol with its GradScaler: attributes of the optimizer that its fused step reads)."""
    return bool(optimizer.param_groups) and all(g.get("fused") for g in optimizer.param_groups)


def clipping_grad_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The fused optimizer's `grad_scale` that clips gradients of global norm ``norm`` to ``max_norm``: 1 / c with
    c = min(1, max_norm / (norm + 1e-6)), `torch.nn.utils.clip_grads_with_norm_`'s factor, on the device."""
    return 1.0 / torch.clamp(max_norm / (norm.float() + 1e-6), max=1.0)


def nonfinite_kind(loss_bad: torch.Tensor, grad_bad: torch.Tensor) -> torch.Tensor:
    """The non-finite guard's verdict on a step, from two 0-dim bools on the device: 0.0 finite, 1.0 a non-finite
    loss, 2.0 a finite loss with a non-finite gradient."""
    return torch.where(loss_bad, 1, torch.where(grad_bad, 2, 0)).float()
