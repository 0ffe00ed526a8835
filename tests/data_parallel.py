"""What the data-parallel checks (tests/test_ddp.py, tests/test_fsdp.py, tests/test_sdxl_parallel.py) share: a small
U-Net config and one fixed batch, whose halves two ranks take while one process takes it whole; a callback that
writes each rank's trained parameters in a real run."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32], layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            norm_num_groups=8, attention_head_dim=4, cross_attention_dim=32)  # fmt: skip
BATCH = 8  # the whole batch; each of the 2 ranks takes 4


def fixed_batch():
    """(latents, text states, noise, timesteps) for BATCH samples, the same in every process."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(BATCH, 4, 8, 8, generator=g)
    cond = torch.randn(BATCH, 7, 32, generator=g)
    noise = torch.randn(BATCH, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (BATCH,), generator=g)
    return latents, cond, noise, t


class SaveTrainable(pl.Callback):
    """Each rank writes the parameters it trains to `{path}.{rank}` at the end of a fit (added to real runs through
    Hydra overrides): ranks that averaged their gradients hold the same ones."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        torch.save({n: p.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad},
                   f"{self.path}.{trainer.global_rank}")  # fmt: skip
