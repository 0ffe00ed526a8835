"""Diffusion math as small pure tensor functions: schedules, parameterisations, loss, sampling.

    schedules         betas, alpha_bar, snr (as diffusers' DDPMScheduler), zero terminal SNR; scheduler_config: the
                      training noise schedule as a diffusers config, its one home
    parameterization  add_noise (q(x_t | x_0)) and the eps / v / x0 regression targets
    loss              timestep sampling, offset noise, Min-SNR weights, the weighted (masked) MSE
    sampling          sample_latents: classifier-free guided text-to-latent (and img2img) with diffusers' schedulers

May import: ldm.utils. Not ldm.data (a sibling: the math knows no shard format), nor anything above.
"""

from ldm.diffusion.loss import diffusion_loss, loss_mask, min_snr_weight, offset_noise, sample_timesteps
from ldm.diffusion.parameterization import add_noise, target, velocity
from ldm.diffusion.sampling import (
    SCHEDULERS,
    as_condition,
    guided,
    make_scheduler,
    sample_latents,
    timestep_sigmas,
    unet_inputs,
)
from ldm.diffusion.schedules import (
    alpha_bar,
    betas,
    config_alpha_bar,
    rescale_zero_terminal_snr,
    scheduler_config,
    snr,
)

__all__ = [
    "SCHEDULERS",
    "add_noise",
    "alpha_bar",
    "as_condition",
    "betas",
    "config_alpha_bar",
    "diffusion_loss",
    "guided",
    "loss_mask",
    "make_scheduler",
    "min_snr_weight",
    "offset_noise",
    "rescale_zero_terminal_snr",
    "sample_latents",
    "sample_timesteps",
    "scheduler_config",
    "snr",
    "target",
    "timestep_sigmas",
    "unet_inputs",
    "velocity",
]
