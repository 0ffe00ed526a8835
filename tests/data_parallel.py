"""What the data-parallel checks (tests/test_ddp.py, tests/test_fsdp.py, tests/test_sdxl_parallel.py) share: small
U-Net configs (SD's, and SDXL's with its added embedding) and one fixed batch, whose halves two ranks take while one
process takes it whole; joining a rank's process group; a callback that writes each rank's trained parameters in a
real run."""

from __future__ import annotations

from contextlib import contextmanager

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from ldm.models.sdxl import TINY_SDXL_UNET

UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32], layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            norm_num_groups=8, attention_head_dim=4, cross_attention_dim=32)  # fmt: skip
SDXL_UNET = TINY_SDXL_UNET  # text states 64 wide; a pooled embedding (32) and 6 time ids into its added embedding
BATCH = 8  # the whole batch; each of the 2 ranks takes 4


def fixed_batch(sdxl: bool = False):
    """(latents, conditioning, noise, timesteps) for BATCH samples, the same in every process. The conditioning: text
    states (B, 7, 32), or for SDXL_UNET a dict of text states (B, 7, 64), pooled embedding (B, 32) and time ids."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(BATCH, 4, 8, 8, generator=g)
    cond = torch.randn(BATCH, 7, 64 if sdxl else 32, generator=g)
    noise = torch.randn(BATCH, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (BATCH,), generator=g)
    if sdxl:
        cond = {"encoder_hidden_states": cond, "text_embeds": torch.randn(BATCH, 32, generator=g),
                "time_ids": torch.randint(16, 64, (BATCH, 6), generator=g).float()}  # fmt: skip
    return latents, cond, noise, t


@contextmanager
def rank_device(rank: int, world_size: int, init_file: str, backend: str):
    """This rank's device inside a process group joined through ``init_file``, left on exit. On NCCL the rank's GPU,
    TF32 off: the ranks are compared with a single-process reference to float32 rounding."""
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def take(batch, rows, device) -> tuple:
    """The ``rows`` of each of ``batch``'s tensors (of a conditioning dict's too), on ``device``."""
    return tuple({k: v[rows].to(device) for k, v in x.items()} if isinstance(x, dict) else x[rows].to(device)
                 for x in batch)  # fmt: skip


def assert_adam_weights_close(got, want, grad, lr: float, msg: str, eps: float = 1e-8) -> None:
    """Weights after AdamW steps agree to 1 % of a step (1e-5 for lr 1e-3), except where the step is ill-conditioned.
    Adam's first step moves a weight by lr * g / (|g| + eps) whatever the gradient's size, so a gradient that cancels
    to within rounding of zero (measured: 2.5e-10 on one CPU thread, 1.0e-9 on two, for the same element) moves it
    anywhere in [-lr, lr]. The tolerance is the step's sensitivity to the gradient's rounding (the bound the gradient
    checks allow: 1e-4 of it plus 1e-6 of the largest), lr * eps * delta / (|g| + eps)^2, capped at two whole steps."""
    delta = 1e-4 * grad.abs() + 1e-6 * max(1.0, grad.abs().max().item())
    atol = (1e-2 * lr + lr * eps * delta / (grad.abs() + eps) ** 2).clamp(max=2 * lr)
    excess = (got - want).abs() - atol
    if excess.max() > 0:
        i = int(excess.argmax())
        raise AssertionError(f"{msg}: {int((excess > 0).sum())} of {got.numel()} elements differ beyond the step's "
                             f"sensitivity; the worst, flat index {i}: {got.flatten()[i].item()} against "
                             f"{want.flatten()[i].item()} (gradient {grad.flatten()[i].item():.3g}, "
                             f"allowed {atol.flatten()[i].item():.3g})")  # fmt: skip


class SaveTrainable(pl.Callback):
    """Each rank writes the parameters it trains to `{path}.{rank}` at the end of a fit (added to real runs through
    Hydra overrides): ranks that averaged their gradients hold the same ones."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        torch.save({n: p.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad},
                   f"{self.path}.{trainer.global_rank}")  # fmt: skip
