"""Training-loss pieces: timestep sampling, offset noise, Min-SNR weighting and the weighted (masked) MSE.

    >>> t = sample_timesteps(B, 1000, device=latents.device)                   # (B,)
    >>> noise = offset_noise(torch.randn_like(latents), strength=0.05)
    >>> w = min_snr_weight(snr(alpha_bar)[t], gamma=5.0, prediction_type="epsilon")
    >>> loss = diffusion_loss(unet_output, target("epsilon", latents, noise, alpha_bar[t]), w)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """t ~ U{0, ..., T-1}, int64 of shape (B,). Drawn on the generator's device, then moved to ``device``."""
    draw_on = generator.device if generator is not None else device
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=draw_on)
    return t.to(device)


def offset_noise(noise: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """eps + strength * N(0, 1) of shape (B, C, 1, 1): a per-image, per-channel constant shift of the noise.

    Guttenberg 2023, "Diffusion with Offset Noise" (crosslabs.org): lets the model change an image's
    mean brightness, which plain i.i.d. noise almost never asks it to do. strength 0 returns ``noise``.
    """
    if strength == 0:
        return noise
    shape = (*noise.shape[:2], *([1] * (noise.ndim - 2)))  # (B, C, 1, 1)
    draw_on = generator.device if generator is not None else noise.device
    offset = torch.randn(shape, generator=generator, device=draw_on, dtype=noise.dtype).to(noise.device)
    return noise + strength * offset


# Min-SNR-gamma weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
# Strategy", sec. 3.4). The x0-space weight is min(snr, gamma); a target whose MSE is k(snr) times
# the x0 MSE gets min(snr, gamma) / k(snr): k = snr for eps, snr + 1 for v, 1 for x0.
# min(snr, gamma) / snr is written as min(1, gamma / snr) so that snr = 0 (zero terminal SNR) gives 1.
_MIN_SNR: dict[str, Callable[[Tensor, float], Tensor]] = {
    "epsilon": lambda snr_t, gamma: (gamma / snr_t).clamp(max=1.0),
    "v_prediction": lambda snr_t, gamma: snr_t.clamp(max=gamma) / (snr_t + 1),
    "sample": lambda snr_t, gamma: snr_t.clamp(max=gamma),
}


def min_snr_weight(snr_t: Tensor, gamma: float | None, prediction_type: str) -> Tensor:
    """Per-sample loss weight of Min-SNR-gamma, float32 of shape snr_t.shape; ``gamma=None`` gives ones.

    epsilon: min(snr, gamma) / snr;  v_prediction: min(snr, gamma) / (snr + 1);  sample: min(snr, gamma).
    """
    try:
        weight = _MIN_SNR[prediction_type]
    except KeyError:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; expected one of {sorted(_MIN_SNR)}"
        ) from None
    snr_t = snr_t.float()
    if gamma is None:
        return torch.ones_like(snr_t)
    return weight(snr_t, gamma)


def diffusion_loss(model_output: Tensor, target: Tensor, weight: Tensor | None = None,
                   mask: Tensor | None = None) -> Tensor:  # fmt: skip
    """mean_b [ weight_b * mean_{c,h,w} (model_output - target)^2 ], a float32 scalar.

    Computed in float32 even when the U-Net ran in bf16/fp16; ``weight`` has shape (B,). With a ``mask``
    (B, 1, h, w) of weights in [0, 1] (a loss mask in latent space, see `loss_mask`), each sample's mean is the
    mask-weighted mean sum_{c,h,w} m (out - target)^2 / (C sum_{h,w} m); a sample whose mask is all zero adds 0.
    """
    error = (model_output.float() - target.float()).pow(2)  # (B, C, h, w)
    if mask is None:
        per_sample = error.flatten(1).mean(dim=1)  # (B,)
    else:
        m = mask.float().to(error.device).expand_as(error)
        per_sample = (error * m).flatten(1).sum(dim=1) / m.flatten(1).sum(dim=1).clamp_min(1e-8)
    if weight is not None:
        per_sample = per_sample * weight.float().to(per_sample.device)
    return per_sample.mean()


def loss_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A loss mask as data delivers it -> (B, 1, h, w) float weights in [0, 1] at the latents' size: uint8 in
    [0, 255] (white = learn) is scaled; a mask of another size is area-averaged (a latent pixel's weight is the
    share of its image pixels to learn)."""
    mask = mask.float() / 255.0 if mask.dtype == torch.uint8 else mask.float()
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = torch.nn.functional.interpolate(mask, size=size, mode="area")
    return mask
