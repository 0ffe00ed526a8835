"""An EMA of a model's weights that updates without host syncs, cancellable by a flag that stays on the device.

    ema = EMA(unet, decay=0.999)          # torch's AveragedModel layout: ema.module, ema.n_averaged
    ema.update(unet)                      # first update: a copy; then ema <- ema + (1 - decay) * (param - ema)
    ema.update(unet, keep=1 - optimizer.found_inf)   # a step the fused optimizer skipped on the device:
                                                     # the EMA skips it too, and the host never waits
    ema = EMA(unet, decay=0.999, warmup=True)   # decay min(decay, (1 + n) / (10 + n)) at the n-th update
    ema = EMA(unet, decay=0.999, every=10)      # updated every 10th step (the caller's cadence) with decay^10

With `warmup` the decay grows with the number n of updates so far, min(decay, (1 + n) / (10 + n)), as in
diffusers' `EMAModel` (its default) and the original latent-diffusion code's `LitEma`: without it the average keeps
decay^n of the first weights (a random initialisation when training from scratch), 0.9995^1888 = 39 % after the
1,888 steps of a 7-minute CIFAR-10 run, whose EMA samples were then noise. With it, 0.9995 is reached at n = 17,991.

Parameters that do not train (`requires_grad` False when the EMA is made: the frozen base of a LoRA-adapted
U-Net) are not copied: the EMA's module shares them with the model, and `update` skips them. So the EMA of an
adapted model holds the adapters' averages only, next to the one frozen base.

With `every` = k > 1 the caller updates every k-th optimizer step (as SimpleTuner's `--ema_update_interval` and
Composer's EMA `update_interval` do: the averaging reads and writes every averaged weight, for SDXL's U-Net 30 GB a
step) and each update weighs in as k per-step updates towards the same weights would: decay^k, the warm-up's decay
taken at the n * k steps the n updates so far stand for. The average's time constant in steps stays the same.

The arithmetic is torch's `get_ema_multi_avg_fn` over parameters and buffers (`use_buffers=True`), but
torch's `AveragedModel.update_parameters` reads `n_averaged` (a tensor on the model's device) on the host
twice per update, which drains the GPU's queue every training step. Here the first-update copy is a lerp of
weight 1 chosen on the device, and `n_averaged` only ever changes there. Integer buffers (a BatchNorm's batch
count; the U-Net has none) are copied, where torch averages them and rounds down.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.optim.swa_utils import AveragedModel

Groups = dict[torch.dtype, tuple[list[Tensor], list[Tensor]]]


class EMA(AveragedModel):
    def __init__(self, model: nn.Module, decay: float, warmup: bool = False, every: int = 1):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must be in [0, 1], got {decay}")
        if every < 1:
            raise ValueError(f"ema update interval must be >= 1 step, got {every}")
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
        super().__init__(model, device=device, use_buffers=True)  # the counter too lives where the model does
        _share_frozen(self.module, model)
        self.decay, self.warmup, self.every = decay, warmup, every
        self.requires_grad_(False)
        self._paired: tuple[nn.Module, list[tuple[Tensor, Tensor]], list[tuple[nn.Module, nn.Module, str]]] | None = None

    @torch.no_grad()
    def update(self, model: nn.Module, keep: Tensor | None = None) -> None:
        """One EMA step towards ``model``'s parameters and buffers; ``keep``: a 0-dim 0/1 tensor (0: skip it)."""
        # 1 (a copy) while nothing is averaged yet, else 1 - decay: 0-dim float32 on the counter's device
        n = self.n_averaged.float()
        steps = n * self.every  # the optimizer steps the updates so far stand for
        decay = torch.clamp((1 + steps) / (10 + steps), max=self.decay) if self.warmup else self.decay
        weight = 1.0 - decay**self.every * (n > 0).float()
        if keep is not None:
            weight = weight * keep
        groups: Groups = defaultdict(lambda: ([], []))
        for averaged, current in self._pairs(model):
            if averaged is current:  # a frozen parameter shared with the model
                continue
            if current.device != averaged.device:
                current = current.to(averaged.device)
            if averaged.is_floating_point():
                groups[averaged.dtype][0].append(averaged)
                groups[averaged.dtype][1].append(current)
            else:  # integer buffers (BatchNorm's batch count) are copied: an average of counts means nothing
                averaged.copy_(current)
        for dtype, (averaged, current) in groups.items():
            # averaged * (1 - w) + current * w: exact copies at w = 1 (the first update) and no change at w = 0.
            # Not _foreach_lerp_: its list-of-weights form has no fused CUDA kernel and launches one lerp per
            # tensor (494 launches a step for the CIFAR-scale U-Net, session 13's profile); these are 3 fused ones.
            w = weight.to(dtype)
            torch._foreach_mul_(averaged, 1 - w)
            torch._foreach_add_(averaged, torch._foreach_mul(current, w))
        self.n_averaged += 1 if keep is None else keep.long()

    def _pairs(self, model: nn.Module) -> list[tuple[Tensor, Tensor]]:
        """(averaged, current) for every parameter and buffer. The parameters are kept as the Parameter objects
        (they follow moves and `.data` swaps); buffers, which `Module.to` replaces, are looked up by name."""
        if isinstance(model, FullyShardedDataParallel):  # other tensors inside and outside summon_full_params
            return list(zip(itertools.chain(self.module.parameters(), self.module.buffers()),
                            itertools.chain(model.parameters(), model.buffers()), strict=True))  # fmt: skip
        if self._paired is None or self._paired[0] is not model:
            params = list(zip(self.module.parameters(), model.parameters(), strict=True))
            names = [name for name, _ in self.module.named_buffers()]
            if names != [name for name, _ in model.named_buffers()]:
                raise ValueError("EMA: the model's buffers are not the averaged copy's")
            buffers = [(self.module.get_submodule(n.rpartition(".")[0]), model.get_submodule(n.rpartition(".")[0]),
                        n.rpartition(".")[2]) for n in names]  # fmt: skip
            self._paired = (model, params, buffers)
        _, params, buffers = self._paired
        return params + [(mine._buffers[name], theirs._buffers[name]) for mine, theirs, name in buffers]


def _share_frozen(copy: nn.Module, model: nn.Module) -> None:
    """Point ``copy``'s parameters at ``model``'s own where these do not train (a structural twin of ``model``)."""
    for (name, mine), (_, theirs) in zip(copy.named_parameters(), model.named_parameters(), strict=True):
        if not theirs.requires_grad:
            owner, _, leaf = name.rpartition(".")
            setattr(copy.get_submodule(owner), leaf, theirs)
