"""Discrete noise schedules of DDPM-style diffusion, in the papers' notation.

    beta_t         per-step noise variance, t = 0 .. T-1
    alpha_bar_t    prod_{s<=t} (1 - beta_s), the signal variance of x_t given x_0
    snr_t          alpha_bar_t / (1 - alpha_bar_t)

Everything is float32, element for element the same as diffusers' ``DDPMScheduler`` so that the
training forward process and the diffusers samplers agree on every timestep.

    >>> ab = alpha_bar(betas("scaled_linear"))   # Stable Diffusion's schedule, shape (1000,)

The training schedule of a run is one diffusers scheduler config (`scheduler_config`): the samplers and the
exported pipeline are built from it, and the training forward process reads its alpha_bar from it
(`config_alpha_bar`), so the two cannot disagree.

    >>> config = scheduler_config(schedule="scaled_linear", prediction_type="v_prediction")
    >>> config_alpha_bar(config).shape
    torch.Size([1000])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor


def _linear(num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Linear betas of Ho et al. 2020, "Denoising Diffusion Probabilistic Models"."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def _scaled_linear(num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Latent diffusion's schedule (Rombach et al. 2022): linear in sqrt(beta), then squared."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def _squaredcos_cap_v2(num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021, "Improved DDPM" (eq. 17), betas capped at 0.999.

    alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2) with s = 0.008; beta_t = 1 - alpha_bar(t+1)/alpha_bar(t).
    beta_start and beta_end are unused (the schedule has no such parameters).
    """
    s, max_beta = 0.008, 0.999
    t = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta).to(torch.float32)


SCHEDULES: dict[str, Callable[[int, float, float], Tensor]] = {
    "linear": _linear,
    "scaled_linear": _scaled_linear,
    "squaredcos_cap_v2": _squaredcos_cap_v2,
}


def betas(
    schedule: str,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> Tensor:
    """beta_t for t = 0 .. T-1, float32 of shape (T,); ``schedule`` is a diffusers ``beta_schedule`` name."""
    try:
        make = SCHEDULES[schedule]
    except KeyError:
        raise ValueError(f"unknown beta schedule {schedule!r}; expected one of {sorted(SCHEDULES)}") from None
    return make(num_train_timesteps, beta_start, beta_end)


def alpha_bar(betas: Tensor) -> Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4), in float32."""
    return torch.cumprod(1.0 - betas.float(), dim=0)


def snr(alpha_bar: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) (Kingma et al. 2021, "Variational Diffusion Models").

    It is +inf where alpha_bar == 1 and 0 where alpha_bar == 0 (zero terminal SNR).
    """
    alpha_bar = alpha_bar.float()
    return alpha_bar / (1.0 - alpha_bar)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so that alpha_bar_{T-1} = 0 (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged; the
    last beta becomes 1. Train with v-prediction (eps is undefined at t = T-1) and sample with
    ``timestep_spacing="trailing"``.
    """
    sqrt_ab = alpha_bar(betas).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])  # undo the cumprod
    return 1.0 - alphas


def scheduler_config(
    schedule: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    prediction_type: str = "epsilon",
    zero_terminal_snr: bool = False,
    **_: Any,
) -> dict[str, Any]:
    """The training noise schedule as a diffusers scheduler config (what training, samplers and exports share).
    Takes the `diffusion` config section; keys that are not about the schedule (cfg_dropout, ...) are ignored."""
    return {
        "num_train_timesteps": num_train_timesteps,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "beta_schedule": schedule,
        "prediction_type": prediction_type,
        "rescale_betas_zero_snr": zero_terminal_snr,
        # Stable Diffusion's sampler settings: no x0 clipping, "leading" spacing with offset 1,
        # unless zero terminal SNR asks for "trailing" (Lin et al. 2023, sec. 3.3).
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "trailing" if zero_terminal_snr else "leading",
    }


def config_alpha_bar(config: Mapping[str, Any]) -> Tensor:
    """alpha_bar_t (T,) float32 of a scheduler config, as diffusers' schedulers compute it from the same config."""
    b = betas(config["beta_schedule"], config["num_train_timesteps"], config["beta_start"], config["beta_end"])
    if config.get("rescale_betas_zero_snr"):
        b = rescale_zero_terminal_snr(b)
    return alpha_bar(b).float()
