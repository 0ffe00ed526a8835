"""Freeze a module visibly: eval mode, no gradients, and it stays in eval mode.

Lightning calls `.train()` on the whole LightningModule at the start of every training epoch, and
`nn.Module.train` recurses into every child, which would switch a frozen text encoder or VAE back to
training mode (dropout on, batch-norm statistics updating). `freeze` shadows `train` on that one instance
so it always passes mode=False down its own subtree; the class and other instances are untouched.

    text_encoder = freeze(text_encoder)
    lightning_module.train()          # text_encoder.training stays False
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


class _EvalOnlyTrain:
    """Stand-in for `module.train` on a frozen instance: any requested mode becomes eval.

    A small class rather than a bound method so that frozen modules survive `copy.deepcopy` and pickling.
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.module, False)


def freeze(module: M) -> M:
    """Put `module` in eval mode, turn off its gradients, make it ignore `train(True)`; return it."""
    module.requires_grad_(False)
    module.train = _EvalOnlyTrain(module)  # an instance attribute shadows the class's method
    module.eval()
    return module


def is_frozen(module: nn.Module) -> bool:
    """True when `module` was frozen with `freeze` (its `train` is the eval-only stand-in)."""
    return isinstance(module.__dict__.get("train"), _EvalOnlyTrain)

