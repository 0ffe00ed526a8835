"""Data-parallel training computes what one device computes on the doubled batch: two DDP ranks (gloo on CPU,
NCCL on two GPUs) each take half of a batch; their averaged gradients and the weights after a fused-or-not
AdamW step equal one process's on the whole batch (same latents, captions, noise and timesteps)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from data_parallel import BATCH, UNET, assert_adam_weights_close, fixed_batch, rank_device

from ldm.models.unet import build_unet
from ldm.stages.latent_diffusion import LatentDiffusion


def _module(device) -> LatentDiffusion:
    torch.manual_seed(0)
    module = LatentDiffusion(build_unet(**UNET), vae=lambda: None, text_encoder=lambda: None,
                             diffusion=dict(min_snr_gamma=5.0), ema_decay=None)  # frozen parts never built
    return module.to(device)


def _step(module, unet, batch, rows, device, fused):
    """Loss on the given rows, backward, one AdamW step; returns (gradients, weights after the step)."""
    latents, cond, noise, t = (x[rows].to(device) for x in batch)
    module.unet = unet  # (the DDP wrapper on the ranks)
    module.diffusion_step(latents, cond, noise, t).backward()
    params = list(module.unet.parameters())
    grads = [p.grad.detach().cpu().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=fused)
    optimizer.step()
    return grads, [p.detach().cpu().clone() for p in params]


def _rank(rank, world_size, init_file, backend, fused, out):
    with rank_device(rank, world_size, init_file, backend) as device:
        module = _module(device)
        ddp = torch.nn.parallel.DistributedDataParallel(module.unet, device_ids=[rank] if device.type == "cuda" else None)
        half = BATCH // world_size
        result = _step(module, ddp, fixed_batch(), slice(rank * half, (rank + 1) * half), device, fused)
        torch.save(result, f"{out}.{rank}")


def _check(tmp_path, backend, fused, device):
    reference = _module(device)
    expected = _step(reference, reference.unet, fixed_batch(), slice(0, BATCH), device, fused)
    out = str(tmp_path / "result")
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), backend, fused, out), nprocs=2, join=True)
    for rank in range(2):
        grads, weights = torch.load(f"{out}.{rank}")
        for i, (a, b) in enumerate(zip(grads, expected[0])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, b.abs().max().item()),
                                       msg=lambda m: f"rank {rank} gradient {i}: {m}")  # fmt: skip
        for i, (a, b, g) in enumerate(zip(weights, expected[1], expected[0])):
            assert_adam_weights_close(a, b, g, lr=1e-3, msg=f"rank {rank} weight {i}")


def test_two_gloo_ranks_equal_one_process_on_the_doubled_batch(tmp_path):
    _check(tmp_path, "gloo", False, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_equal_one_gpu_on_the_doubled_batch(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    _check(tmp_path, "nccl", True, "cuda:0")


def test_the_ddp_strategy_config_builds_lightnings_ddp_and_is_launched_with_torchrun():
    """`+trainer/strategy=ddp`: Lightning's DDPStrategy with bucket views and a static graph, whose ranks
    ldm.run.launch starts (a dict strategy, not one of Lightning's in-process launchers)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from pytorch_lightning.strategies import DDPStrategy

    from ldm.run.launch import ranks_to_launch

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+trainer/strategy=ddp", "trainer.devices=2",
                                                      "trainer.accelerator=cpu"])  # fmt: skip
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs == {"gradient_as_bucket_view": True, "static_graph": True}
    assert ranks_to_launch(cfg.trainer) == 2
