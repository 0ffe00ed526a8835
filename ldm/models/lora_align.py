"""LoRA matrix products on aligned shapes: a rank-r adapter computed as if its rank were r rounded up to a multiple
of `multiple` (`model.adapter.align_rank`, 8 by default), the extra rows of `down` and columns of `up` zeros (the
same result: each added term is 0 * 0).

    align_ranks(unet, multiple=8)     # after peft added the adapters; parameters, names and state dicts unchanged

Why: at rank 4 the products x @ down.T (n, 4) and h @ up.T, and their gradients, have a 4-wide side, which in bf16
is 8 bytes: cuBLAS cannot run them on Hopper's TMA kernels (16-byte alignment) and falls back to Ampere-era CUTLASS
kernels (`cutlass_80_..._align2`) and split-K reductions. On one H200, SD-1.5-shaped U-Net, 512 px, batch 16, rank 4
(session 26 profile) those took ~10 ms of the step's ~101 ms of kernels. Padded to 8 the same products are aligned.

Only the adapters' forward changes: `down` (peft's lora_A, an nn.Linear (rank, in)) returns `multiple`-padded
columns, `up` (lora_B, (out, rank)) takes them (peft's LoRA forward is `lora_B(lora_A(dropout(x)))`). The padding
is made from the parameters in each forward (a copy of a few KB), so gradients, optimizer state, EMA, checkpoints
and exports see the parameters' own shapes. Convolution adapters (LoCon) are left as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn


class PaddedDown(nn.Linear):
    """peft's lora_A (rank, in; no bias) whose output is zero-padded to `padded` features."""

    padded: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.pad(self.weight, (0, 0, 0, self.padded - self.out_features)))


class PaddedUp(nn.Linear):
    """peft's lora_B (out, rank) taking PaddedDown's output, zero-padded to `padded` features."""

    padded: int

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, F.pad(self.weight, (0, self.padded - self.in_features)), self.bias)


def align_ranks(model: nn.Module, multiple: int) -> None:
    """Pad every linear LoRA adapter of ``model`` whose rank is not a multiple of ``multiple`` (1: none). In place:
    the modules keep their parameters (they change class)."""
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        for name, down in layer.lora_A.items():
            up = layer.lora_B[name]
            if type(down) is not nn.Linear or type(up) is not nn.Linear or down.bias is not None:
                continue  # convolutions (LoCon), already padded, or not peft's bias-free lora_A
            if down.out_features % multiple:
                down.__class__, up.__class__ = PaddedDown, PaddedUp
                down.padded = up.padded = -(-down.out_features // multiple) * multiple
