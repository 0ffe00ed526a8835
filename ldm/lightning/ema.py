"""The EMA update for torch's AveragedModel, cancellable by a flag that stays on the device.

    ema_fn = GatedEMA(0.999)
    ema = AveragedModel(unet, multi_avg_fn=ema_fn, use_buffers=True)
    ema.update_parameters(unet)                   # ema <- ema + (1 - decay) * (param - ema)
    ema_fn.keep = 1 - optimizer.found_inf         # a step the fused optimizer skipped on the device:
    ema.update_parameters(unet)                   # the EMA skips it too, and the host never waits

With `keep` unset it is torch's `get_ema_multi_avg_fn(decay)`; with `keep` a 0-dim tensor of 0 or 1 the
lerp weight of floating-point tensors is (1 - decay) * keep.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.swa_utils import get_ema_multi_avg_fn


class GatedEMA:
    def __init__(self, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.keep: Tensor | None = None
        self._plain = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def __call__(self, ema: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        if self.keep is None or not torch.is_floating_point(ema[0]):  # (integer buffers: torch's rule)
            self._plain(ema, current, num_averaged)
            return
        weight = (1.0 - self.decay) * self.keep.to(ema[0].device, ema[0].dtype)
        torch._foreach_lerp_(ema, current, [weight] * len(ema))  # a 0-dim weight broadcasts per tensor
