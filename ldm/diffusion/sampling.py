"""Text-to-latent sampling with classifier-free guidance, using diffusers' schedulers as they are.

``sample_latents`` follows ``StableDiffusionPipeline.__call__`` step for step (same noise draw, same
timesteps, one batched U-Net call per step with the unconditional half first), so the same seed gives
the same latents as the pipeline. Given ``init_latents`` and a ``strength`` it follows
``StableDiffusionImg2ImgPipeline`` instead: the last ``strength`` of the timesteps, starting from the
init latents noised to the first of them.

    >>> scheduler = make_scheduler("dpm++", ddpm.config)   # ddpm: the training DDPMScheduler
    >>> latents = sample_latents(unet, scheduler, cond, uncond, guidance_scale=7.5,
    ...                          num_inference_steps=25, latent_shape=(4, 64, 64),
    ...                          generator=torch.Generator().manual_seed(0))   # (B, 4, 64, 64)
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

# name -> (scheduler class, config overrides applied on top of the training config)
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    # Automatic1111's and ComfyUI's "DPM++ 2M Karras" and "DPM++ 2M SDE Karras": the same solvers on Karras et al.
    # 2022's noise levels (rho = 7 between the schedule's smallest and largest sigma), as diffusers maps those names
    "dpm++_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++_sde_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),  # linear multistep (Karras et al. 2022's "LMS"), order 4
    # PLMS only, as Stable Diffusion ships it: the Runge-Kutta warm-up would cost 3 extra U-Net calls per step.
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}


def make_scheduler(name: str, train_config: Mapping[str, Any], **overrides: Any) -> SchedulerMixin:
    """A diffusers sampler sharing the training schedule (betas, prediction_type, ...).

    ``train_config`` is the training ``DDPMScheduler``'s ``config``; ``overrides`` win over both it and
    the registry defaults (e.g. ``timestep_spacing="trailing"`` for a zero-terminal-SNR model).
    """
    try:
        cls, defaults = SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SCHEDULERS)}") from None
    return cls.from_config(dict(train_config), **{**defaults, **overrides})


def guided(eps_uncond: Tensor, eps_cond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance, eps_uncond + w (eps_cond - eps_uncond) (Ho & Salimans 2022,
    "Classifier-Free Diffusion Guidance", eq. 6 with w = 1 + their w). Works for v-predictions too."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def timestep_sigmas(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """The noise levels sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t) (N,) float64 of ``timesteps`` (N,) on the
    training schedule (``alphas_cumprod`` (T,)), linear in t between integer steps: the Karras and Euler samplers step
    at fractional timesteps."""
    table = ((1 - alphas_cumprod.double().cpu()) / alphas_cumprod.double().cpu()).sqrt()  # (T,)
    t = timesteps.detach().double().cpu().clamp(0, len(table) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(table) - 1)
    return table[lo] + (t - lo) * (table[hi] - table[lo])


def guides_at(sigma: float, interval: Sequence[float] | None) -> bool:
    """Whether classifier-free guidance applies at noise level ``sigma``: everywhere without an ``interval``, else
    for sigma in (low, high] (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
    Distribution Quality in Diffusion Models": guidance at high noise costs diversity, at low noise it does little;
    the steps outside use the conditional prediction alone, one U-Net pass on half the batch)."""
    return interval is None or interval[0] < sigma <= interval[1]


def img2img_start(scheduler: SchedulerMixin, num_inference_steps: int, strength: float) -> int:
    """Index into ``scheduler.timesteps`` where img2img starts, as StableDiffusionImg2ImgPipeline.get_timesteps:
    the last ``strength`` of ``num_inference_steps`` steps run (``set_timesteps`` must have been called).
    Sets the scheduler's begin index, which the Euler and LMS samplers need to start mid-schedule."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - init_timestep, 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return start


def _step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator | None, eta: float) -> dict[str, Any]:
    # As StableDiffusionPipeline.prepare_extra_step_kwargs: only pass what this scheduler's step accepts.
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def as_condition(cond: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The U-Net's conditioning as a dict keyed by its keyword arguments: a tensor is `encoder_hidden_states`;
    a dict may add `text_embeds` and `time_ids` (SDXL's added conditions)."""
    return {"encoder_hidden_states": cond} if isinstance(cond, Tensor) else dict(cond)


def unet_inputs(cond: Mapping[str, Tensor]) -> dict[str, Any]:
    """The keyword arguments of `UNet2DConditionModel.forward` for a conditioning dict: the hidden states, and the
    rest as `added_cond_kwargs` (SDXL's pooled text embedding and time ids)."""
    added = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
    return {"encoder_hidden_states": cond["encoder_hidden_states"], **({"added_cond_kwargs": added} if added else {})}


def _batched(cond: dict[str, Tensor], batch_size: int) -> dict[str, Tensor]:
    return {k: v.expand(batch_size, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in cond.items()}


@torch.no_grad()
def sample_latents(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    cond: Tensor | Mapping[str, Tensor],
    uncond: Tensor | Mapping[str, Tensor] | None,
    *,
    guidance_scale: float,
    num_inference_steps: int,
    latent_shape: tuple[int, int, int],
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: Tensor | None = None,
    eta: float = 0.0,
    init_latents: Tensor | None = None,
    strength: float = 1.0,
    guidance_interval: Sequence[float] | None = None,
) -> Tensor:
    """Denoise from noise to latents (B, C, H, W), B = the conditioning's batch, guided by the text.

    cond: text hidden states (B, L, D), or a dict of the U-Net's conditioning inputs (`encoder_hidden_states`
    (B, L, D) and, for SDXL, `text_embeds` (B, P) and `time_ids` (B, 6)); uncond: the same with batch B or 1 (the
    negative prompt's encoding when given), unused (may be None) when guidance_scale <= 1, in which case only the
    conditional pass runs. ``eta`` is DDIM's and ignored by the other schedulers. ``scheduler`` is stateful:
    ``set_timesteps`` is called on it here.
    img2img: ``init_latents`` (B, C, H, W), the scaled latents of the init images, are noised to the first of
    the last ``strength`` of the timesteps (the noise drawn from ``generator``), then denoised from there.
    ``guidance_interval`` (low, high): guidance only at steps whose noise level sigma (`timestep_sigmas`) is in
    (low, high]; the others take the conditional prediction alone (`guides_at`). None: every step, as the pipelines.
    """
    cond = as_condition(cond)
    hidden = cond["encoder_hidden_states"]
    device, batch_size = hidden.device, hidden.shape[0]
    do_cfg = guidance_scale > 1
    if do_cfg:
        # Unconditional half first, as the pipelines concatenate [negative_prompt_embeds, prompt_embeds].
        uncond = _batched(as_condition(uncond), batch_size)
        inputs = unet_inputs({k: torch.cat([uncond[k], cond[k]]) for k in cond})  # (2B, ...)
    cond_inputs = unet_inputs(cond)  # (B, ...): without guidance, and at steps outside guidance_interval
    if guidance_interval is not None and not guidance_interval[0] < guidance_interval[1]:
        raise ValueError(f"guidance_interval: expected (low, high) noise levels with low < high, got {guidance_interval}")

    # Timesteps before the noise: init_noise_sigma of the Euler schedulers depends on them.
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    if init_latents is not None:  # img2img: noise the init latents to the first timestep that runs
        timesteps = timesteps[img2img_start(scheduler, num_inference_steps, strength):]
        init_latents = init_latents.to(device, hidden.dtype)
        noise = randn_tensor(init_latents.shape, generator=generator, device=device, dtype=hidden.dtype)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(batch_size))  # (B, C, H, W)
    elif latents is None:
        # randn_tensor draws on a CPU generator's device and moves, exactly as the pipeline does.
        latents = randn_tensor((batch_size, *latent_shape), generator=generator, device=device, dtype=hidden.dtype)
        latents = latents * scheduler.init_noise_sigma  # (B, C, H, W)
    else:
        latents = latents.to(device) * scheduler.init_noise_sigma
    step_kwargs = _step_kwargs(scheduler, generator, eta)
    guide = [do_cfg] * len(timesteps)  # per step, decided once
    if do_cfg and guidance_interval is not None:
        guide = [guides_at(float(s), guidance_interval) for s in timestep_sigmas(scheduler.alphas_cumprod, timesteps)]

    for t, cfg in zip(timesteps, guide):
        x_in = torch.cat([latents] * 2) if cfg else latents  # (2B or B, C, H, W)
        x_in = scheduler.scale_model_input(x_in, t)
        out = unet(x_in, t, **(inputs if cfg else cond_inputs)).sample
        if cfg:
            out_uncond, out_cond = out.chunk(2)
            out = guided(out_uncond, out_cond, guidance_scale)
        latents = scheduler.step(out, t, latents, **step_kwargs).prev_sample
    return latents
