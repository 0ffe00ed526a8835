"""Forward process q(x_t | x_0) and the regression targets of the eps / v / x0 parameterisations.

All functions take alpha_bar_t of shape (B,) (or a scalar) and broadcast it over x's trailing dims;
they compute and return float32 whatever the input dtype, since the backbone may run in bf16 but
the schedule math should not.

    >>> x_t = add_noise(latents, noise, alpha_bar[t])          # (B, 4, H/8, W/8)
    >>> loss_target = target("v_prediction", latents, noise, alpha_bar[t])
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor


def _expand(alpha_bar_t: Tensor, like: Tensor) -> Tensor:
    """(B,) or () -> (B, 1, ..., 1) in float32 on like's device, ready to broadcast against ``like``."""
    return alpha_bar_t.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: Tensor, noise: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4)."""
    x0, noise = x0.float(), noise.float()
    ab = _expand(alpha_bar_t, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def velocity(x0: Tensor, noise: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, "Progressive
    Distillation for Fast Sampling of Diffusion Models", sec. 4)."""
    x0, noise = x0.float(), noise.float()
    ab = _expand(alpha_bar_t, x0)
    return ab.sqrt() * noise - (1 - ab).sqrt() * x0


def _eps_target(x0: Tensor, noise: Tensor, alpha_bar_t: Tensor) -> Tensor:
    return noise.float()


def _x0_target(x0: Tensor, noise: Tensor, alpha_bar_t: Tensor) -> Tensor:
    return x0.float()


# Names follow diffusers' ``prediction_type`` so one config value drives training and sampling.
TARGETS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "epsilon": _eps_target,
    "v_prediction": velocity,
    "sample": _x0_target,
}


def target(prediction_type: str, x0: Tensor, noise: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """What the network regresses onto for ``prediction_type`` in {"epsilon", "v_prediction", "sample"}."""
    return _lookup(TARGETS, prediction_type)(x0, noise, alpha_bar_t)


def _lookup(table: dict[str, Callable], prediction_type: str) -> Callable:
    try:
        return table[prediction_type]
    except KeyError:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; expected one of {sorted(table)}"
        ) from None
