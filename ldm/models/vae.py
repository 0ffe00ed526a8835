"""The VAE: a diffusers `AutoencoderKL`, loaded from where users have it or built from a config.

    vae = load_vae("stabilityai/sd-vae-ft-mse")             # hub id or local dir, same call
    vae = load_vae("runs/vae/export", subfolder=None)        # a directory written by save_pretrained
    vae = build_vae(block_out_channels=[32, 64, 64])         # from scratch (stage 1, tests)

`vae.config.scaling_factor` maps latents to unit variance (Rombach et al. 2022, sec. 4.3); the
diffusion stage multiplies encoder samples by it and divides before decoding, like diffusers does.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusers.utils import is_accelerate_available

from ldm.models.freeze import freeze


def load_vae(path: str, subfolder: str | None = "vae", frozen: bool = True, **kwargs) -> AutoencoderKL:
    """`AutoencoderKL.from_pretrained(path, subfolder=...)`: a hub id and a local directory take the same path."""
    kwargs.setdefault("low_cpu_mem_usage", is_accelerate_available())  # diffusers' notice otherwise asks for it
    vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, **kwargs)
    return freeze(vae) if frozen else vae


def build_vae(
    block_out_channels=(32, 64, 64),
    latent_channels: int = 4,
    layers_per_block: int = 1,
    norm_num_groups: int = 32,
    sample_size: int = 32,
    scaling_factor: float = 1.0,
    mid_block_add_attention: bool = True,
    seed: int | None = 0,
    frozen: bool = False,
) -> AutoencoderKL:
    """A fresh `AutoencoderKL` that downsamples by 2**(len(block_out_channels)-1)."""
    n = len(block_out_channels)
    if seed is not None:
        torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        mid_block_add_attention=mid_block_add_attention,
    )
    return freeze(vae) if frozen else vae


def downsample_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent along one side (8 for Stable Diffusion's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)
