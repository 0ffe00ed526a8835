"""The LoRA data-parallel check's pieces (tests/test_lora.py), in a module of their own so that the spawned ranks
import only these: the data-parallel checks' U-Net with adapters, one step on rows of their fixed batch, one rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from data_parallel import BATCH, UNET, fixed_batch

from ldm.models.adapters import LoRA
from ldm.models.unet import build_unet
from ldm.stages.latent_diffusion import LatentDiffusion

__all__ = ["BATCH", "lora_module", "lora_rank", "lora_step"]


def lora_module(device) -> LatentDiffusion:
    """The data-parallel checks' U-Net with rank-4 adapters, all set to seeded random values (lora_B starts at zero,
    which would leave lora_A without gradient)."""
    torch.manual_seed(0)
    module = LatentDiffusion(build_unet(**UNET), vae=lambda: None, text_encoder=lambda: None,
                             diffusion=dict(min_snr_gamma=5.0), ema_decay=None, adapter=LoRA(rank=4, alpha=8))  # fmt: skip
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.normal_(0, 0.1)
    return module.to(device)


def lora_step(module, unet, rows):
    """Loss on the fixed batch's ``rows``, backward, one AdamW step: (adapter gradients, adapters after the step)."""
    latents, cond, noise, t = (x[rows] for x in fixed_batch())
    module.unet = unet
    module.diffusion_step(latents, cond, noise, t).backward()
    params = module.trainable_parameters()
    grads = [p.grad.detach().clone() for p in params]
    torch.optim.AdamW(params, lr=1e-3).step()
    return grads, [p.detach().clone() for p in params]


def lora_rank(rank, world_size, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        module = lora_module("cpu")
        ddp = torch.nn.parallel.DistributedDataParallel(module.unet)
        half = BATCH // world_size
        torch.save(lora_step(module, ddp, slice(rank * half, (rank + 1) * half)), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
