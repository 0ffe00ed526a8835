"""Stage 1: train the VAE (`AutoencoderKL`) with reconstruction + KL loss, then export it.

Rombach et al. 2022 train the first stage with L1 + perceptual + patch-GAN losses and a small KL
weight; here the perceptual and GAN terms are left out, which is enough for the small built-in data.

    module = AutoencoderModule(build_vae(), kl_weight=1e-6)
    trainer.fit(module, datamodule)
    module.export("data/models/vae", datamodule.train_dataloader())   # save_pretrained + scaling factor
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor

from ldm.data.transforms import to_model_range
from ldm.lightning.optim import configure_optimizers

RECONSTRUCTION_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"l1": F.l1_loss, "l2": F.mse_loss}


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak range 2)."""
    mse = F.mse_loss(x.float(), y.float())
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, batches: Iterable[dict], max_batches: int = 20) -> float:
    """1 / std of posterior samples over some data, so that scaled latents have unit variance
    (Rombach et al. 2022, sec. 4.3.2 and appendix G)."""
    samples = []
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        x = to_model_range(batch["pixel_values"].to(vae.device)).to(vae.dtype)
        samples.append(vae.encode(x).latent_dist.sample().float().flatten())
    if not samples:
        raise ValueError("latent_scaling_factor: the data loader yielded no batches")
    return float(1.0 / torch.cat(samples).std())


class AutoencoderModule(pl.LightningModule):
    def __init__(
        self,
        vae: AutoencoderKL,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        kl_weight: float = 1e-6,
        reconstruction_loss: str = "l1",
    ):
        super().__init__()
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"model.reconstruction_loss={reconstruction_loss!r}: expected one of {sorted(RECONSTRUCTION_LOSSES)}"
            )
        self.vae = vae
        self.kl_weight = kl_weight
        self.reconstruction = RECONSTRUCTION_LOSSES[reconstruction_loss]
        self.optimizer_factory = optimizer or torch.optim.AdamW
        self.lr_scheduler_factory = lr_scheduler
        self.run_config: dict | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, Any]:
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior  # (B, 3, H, W)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x = to_model_range(batch["pixel_values"])  # (B, 3, H, W) in [-1, 1]
        reconstruction, posterior = self(x)
        rec = self.reconstruction(reconstruction.float(), x.float())
        kl = posterior.kl().mean() / x[0].numel()  # per pixel, like the reconstruction term
        loss = rec + self.kl_weight * kl
        b = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/rec_loss", rec, batch_size=b)
        self.log("train/kl", kl, batch_size=b)
        self.log("train/psnr", psnr(reconstruction, x), prog_bar=True, batch_size=b)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = to_model_range(batch["pixel_values"])
        reconstruction, _ = self(x)
        self.log("val/psnr", psnr(reconstruction, x), batch_size=x.shape[0], sync_dist=True)

    def configure_optimizers(self):
        return configure_optimizers(self.vae.parameters(), self.optimizer_factory, self.lr_scheduler_factory)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["config"] = self.run_config

    @torch.no_grad()
    def export(self, out_dir: str | Path, batches: Iterable[dict], max_batches: int = 20) -> Path:
        """Write a diffusers `AutoencoderKL` directory whose config carries the measured scaling factor."""
        self.vae.eval()
        scale = latent_scaling_factor(self.vae, batches, max_batches)
        self.vae.register_to_config(scaling_factor=scale)
        self.vae.save_pretrained(out_dir, safe_serialization=True)
        return Path(out_dir)
