"""Stage 1: train the VAE (`AutoencoderKL`) with reconstruction + KL loss (+ an optional patch GAN), then export it.

Rombach et al. 2022 train the first stage with L1 + perceptual + patch-GAN losses and a small KL
weight; the perceptual term is left out here, and the GAN term is optional (off in the built-in default,
whose small flat-coloured data needs neither): `discriminator=PatchDiscriminator()` switches on a hinge-loss
patch discriminator (Isola et al. 2017) after `disc_start` warm-up steps, weighted adaptively against the
reconstruction term at the decoder's last layer (Esser et al. 2021, eq. 7).

    module = AutoencoderModule(build_vae(), kl_weight=1e-6)
    trainer.fit(module, datamodule)
    module.export("data/models/vae", datamodule.train_dataloader())   # save_pretrained + scaling factor
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor, nn
from torch.func import functional_call

from ldm.data.transforms import to_model_range
from ldm.stages.base import Stage
from ldm.training.compile import compile_options
from ldm.training.optim import configure_optimizers

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


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): a logit per overlapping patch, (B, 1, H', W'). GroupNorm, not BatchNorm:
    no running statistics, so the generator's pass through the frozen copy changes nothing."""

    def __init__(self, channels: int = 64, num_layers: int = 3, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(width, out, 4, stride, 1), nn.GroupNorm(min(32, out // 4), out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """The discriminator's hinge loss (Lim & Ye 2017), as in taming-transformers."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


class AutoencoderModule(Stage):
    def __init__(
        self,
        vae: AutoencoderKL,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        kl_weight: float = 1e-6,
        reconstruction_loss: str = "l1",
        discriminator: nn.Module | None = None,
        disc_start: int = 0,
        disc_weight: float = 0.5,
        compile: bool | Mapping[str, Any] = False,
    ):
        """compile: torch.compile of the encoder and decoder (true, or torch.compile's options; see
        `ldm.training.compile`), in `configure_model`."""
        super().__init__()
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"model.reconstruction_loss={reconstruction_loss!r}: expected one of {sorted(RECONSTRUCTION_LOSSES)}"
            )
        self.vae = vae
        self.kl_weight = kl_weight
        self.reconstruction = RECONSTRUCTION_LOSSES[reconstruction_loss]
        self.discriminator = discriminator
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.optimizer_factory = optimizer or torch.optim.AdamW
        self.lr_scheduler_factory = lr_scheduler
        self.compile_options = compile_options(compile)

    def configure_model(self) -> None:
        # the posterior's sample and the losses stay outside the compiled parts
        self.compile_parts([self.vae.encoder, self.vae.decoder], self.compile_options)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Any]:
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample(generator)).sample, posterior  # (B, 3, H, W)

    def reconstruction_kl_loss(self, x: Tensor, generator: torch.Generator | None = None):
        """(loss, reconstruction, its reconstruction term, KL per pixel) for images x (B, 3, H, W) in [-1, 1]."""
        reconstruction, posterior = self(x, generator)
        rec = self.reconstruction(reconstruction.float(), x.float())
        kl = posterior.kl().mean() / x[0].numel()  # per pixel, like the reconstruction term
        return rec + self.kl_weight * kl, reconstruction, rec, kl

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x = to_model_range(batch["pixel_values"])  # (B, 3, H, W) in [-1, 1]
        loss, reconstruction, rec, kl = self.reconstruction_kl_loss(x)
        b = x.shape[0]
        if self.discriminator is not None and self.global_step >= self.disc_start:
            loss = loss + self.adversarial_loss(x, reconstruction, rec)
        self.log("train/loss", loss, prog_bar=self.progress_bar, batch_size=b)
        self.log("train/rec_loss", rec, batch_size=b)
        self.log("train/kl", kl, batch_size=b)
        self.log("train/psnr", psnr(reconstruction, x), prog_bar=self.progress_bar, batch_size=b)
        return loss

    def adversarial_loss(self, x: Tensor, reconstruction: Tensor, rec_loss: Tensor) -> Tensor:
        """Generator + discriminator terms in one loss for one optimizer: the generator term sees a detached copy
        of the discriminator's weights and the discriminator term a detached reconstruction, so each gradient
        reaches only its own network."""
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        g_loss = -functional_call(self.discriminator, frozen, (reconstruction,)).mean()
        # adaptive weight: balance the two gradients at the decoder's last layer (Esser et al. 2021, eq. 7)
        last = self.vae.decoder.conv_out.weight
        rec_grad = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        weight = (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).detach() * self.disc_weight
        d_loss = hinge_d_loss(self.discriminator(x), self.discriminator(reconstruction.detach()))
        b = x.shape[0]
        self.log("train/g_loss", g_loss, batch_size=b)
        self.log("train/d_loss", d_loss, batch_size=b)
        self.log("train/d_weight", weight, batch_size=b)
        return weight * g_loss + d_loss

    @torch.no_grad()
    def validation_loss(self, batch: dict, generator: torch.Generator) -> Tensor:
        """Reconstruction + KL on a held-out batch, the posterior sample drawn from ``generator``
        (`ldm.callbacks.val_loss`); the GAN term, a moving target, is left out."""
        return self.reconstruction_kl_loss(to_model_range(batch["pixel_values"]), generator)[0]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = to_model_range(batch["pixel_values"])
        reconstruction, _ = self(x)
        self.log("val/psnr", psnr(reconstruction, x), batch_size=x.shape[0], sync_dist=True)

    def configure_optimizers(self):
        params = list(self.vae.parameters())
        if self.discriminator is not None:
            params += list(self.discriminator.parameters())
        return configure_optimizers(params, self.optimizer_factory, self.lr_scheduler_factory)

    @torch.no_grad()
    def export(self, out_dir: str | Path, batches: Iterable[dict], max_batches: int = 20) -> Path:
        """Write a diffusers `AutoencoderKL` directory whose config carries the measured scaling factor."""
        self.vae.eval()
        scale = latent_scaling_factor(self.vae, batches, max_batches)
        self.vae.register_to_config(scaling_factor=scale)
        self.vae.save_pretrained(out_dir, safe_serialization=True)
        return Path(out_dir)
