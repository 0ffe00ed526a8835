"""Diffusion math against closed forms and against diffusers (schedulers, training utils, the SD pipeline)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale_zero_terminal_snr
from diffusers.training_utils import compute_snr
from torch.testing import assert_close

from ldm.diffusion import (
    SCHEDULERS,
    timestep_sigmas,
    add_noise,
    alpha_bar,
    betas,
    diffusion_loss,
    guided,
    make_scheduler,
    min_snr_weight,
    offset_noise,
    rescale_zero_terminal_snr,
    sample_latents,
    sample_timesteps,
    snr,
    target,
    velocity,
)

SCHEDULE_NAMES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(seed: int = 0, shape=(6, 4, 8, 8), schedule: str = "scaled_linear"):
    """x0, eps, t and alpha_bar_t for a random batch."""
    g = gen(seed)
    x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    return x0, eps, t, alpha_bar(betas(schedule, **SD))[t]


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
@pytest.mark.parametrize("beta_range", [(0.00085, 0.012), (0.0001, 0.02)])
def test_schedule_matches_diffusers(schedule, beta_range):
    ours = betas(schedule, 1000, *beta_range)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=beta_range[0], beta_end=beta_range[1],
                        beta_schedule=schedule)
    assert ours.dtype == torch.float32 and ours.shape == (1000,)
    assert_close(ours, ref.betas)
    assert_close(alpha_bar(ours), ref.alphas_cumprod)


def test_scaled_linear_is_linear_in_sqrt_beta():
    sqrt_b = betas("scaled_linear", **SD).sqrt()
    assert_close(sqrt_b[0].item(), math.sqrt(SD["beta_start"]))
    assert_close(sqrt_b[-1].item(), math.sqrt(SD["beta_end"]))
    assert_close(sqrt_b.diff(), torch.full((999,), sqrt_b.diff().mean().item()), atol=1e-7, rtol=1e-4)


def test_cosine_schedule_closed_form():
    # Nichol & Dhariwal eq. 17: alpha_bar(t) = f(t) / f(0) wherever no beta hit the 0.999 cap.
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    ab = alpha_bar(betas("squaredcos_cap_v2", T))
    for t in [0, 10, 500, 900]:
        assert_close(ab[t].item(), f(t + 1) / f(0), rtol=1e-4, atol=1e-7)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="'cosine'.*squaredcos_cap_v2"):
        betas("cosine")


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_zero_terminal_snr_matches_diffusers(schedule):
    b = betas(schedule, **SD)
    rescaled = rescale_zero_terminal_snr(b)
    ab = alpha_bar(rescaled)
    assert ab[-1].item() == 0.0 and snr(ab)[-1].item() == 0.0
    assert_close(ab[0], alpha_bar(b)[0])  # Lin et al.: the first step is left where it was
    assert_close(rescaled, diffusers_rescale_zero_terminal_snr(b))
    ref = DDPMScheduler(**SD, beta_schedule=schedule, rescale_betas_zero_snr=True)
    assert_close(ab, ref.alphas_cumprod)


def test_snr_matches_diffusers_compute_snr():
    ref = DDPMScheduler(**SD, beta_schedule="scaled_linear")
    t = torch.randint(0, 1000, (64,), generator=gen())
    assert_close(snr(alpha_bar(betas("scaled_linear", **SD)))[t], compute_snr(ref, t))


# ---------------------------------------------------------------- forward process and targets


def test_add_noise_and_velocity_match_diffusers():
    x0, eps, t, ab = batch()
    ref = DDPMScheduler(**SD, beta_schedule="scaled_linear")
    assert_close(add_noise(x0, eps, ab), ref.add_noise(x0, eps, t))
    assert_close(velocity(x0, eps, ab), ref.get_velocity(x0, eps, t))


def test_low_precision_inputs_are_computed_in_float32():
    x0, eps, _, ab = batch()
    x0, eps = x0.bfloat16(), eps.bfloat16()
    for fn in (add_noise, velocity):
        out = fn(x0, eps, ab.half())
        assert out.dtype == torch.float32
        assert_close(out, fn(x0.float(), eps.float(), ab.half().float()))


def test_velocity_identities():
    x0, eps, _, ab = batch()
    x_t, v = add_noise(x0, eps, ab), velocity(x0, eps, ab)
    a = ab.view(-1, 1, 1, 1)
    assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)
    # (x_t, v) is (x0, eps) rotated by phi = atan(sqrt((1 - ab) / ab)): the squared norm is preserved ...
    assert_close(x_t**2 + v**2, x0**2 + eps**2, rtol=1e-5, atol=1e-5)
    # ... and v = (sqrt(ab) x_t - x0) / sqrt(1 - ab).
    assert_close(v, (a.sqrt() * x_t - x0) / (1 - a).sqrt(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("t", [0, 637, 999])
def test_target_inverts_in_diffusers_step(prediction_type, t):
    """Each target is what diffusers' scheduler reads it as: its x_0 estimate from (target, x_t) is x_0 itself."""
    ref = DDPMScheduler(**SD, beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False)
    x0, eps, _, _ = batch(1)
    ab = ref.alphas_cumprod[t]
    x_t = add_noise(x0, eps, ab)
    y = target(prediction_type, x0, eps, ab)
    assert y.dtype == torch.float32
    assert_close(ref.step(y, t, x_t, generator=gen(1)).pred_original_sample, x0, rtol=1e-4, atol=1e-4)


def test_targets_closed_form():
    x0, eps, _, ab = batch()
    assert_close(target("epsilon", x0, eps, ab), eps)
    assert_close(target("sample", x0, eps, ab), x0)
    assert_close(target("v_prediction", x0, eps, ab), velocity(x0, eps, ab))


def test_unknown_prediction_type_is_named():
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="'flow'.*v_prediction"):
        target("flow", x, x, torch.ones(2))


# ---------------------------------------------------------------- loss pieces


def test_min_snr_weight_closed_forms():
    gamma = 5.0
    s = torch.tensor([0.0, 0.5, 5.0, 20.0])
    assert_close(min_snr_weight(s, gamma, "epsilon"), torch.tensor([1.0, 1.0, 1.0, 0.25]))
    assert_close(min_snr_weight(s, gamma, "v_prediction"), torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 21]))
    assert_close(min_snr_weight(s, gamma, "sample"), torch.tensor([0.0, 0.5, 5.0, 5.0]))
    for p in PREDICTION_TYPES:
        assert_close(min_snr_weight(s, None, p), torch.ones(4))
    with pytest.raises(ValueError, match="'flow'"):
        min_snr_weight(s, gamma, "flow")


def test_min_snr_weight_matches_hang_et_al_formula():
    # As diffusers' train_text_to_image.py writes it: min(snr, gamma) / snr, then / (snr + 1) for v.
    s = snr(alpha_bar(betas("scaled_linear", **SD)))[torch.randint(0, 1000, (32,), generator=gen())]
    clipped = torch.stack([s, torch.full_like(s, 5.0)]).min(dim=0).values
    assert_close(min_snr_weight(s, 5.0, "epsilon"), clipped / s)
    assert_close(min_snr_weight(s, 5.0, "v_prediction"), clipped / (s + 1))


def test_diffusion_loss():
    x0, eps, _, _ = batch()
    assert_close(diffusion_loss(x0, eps), F.mse_loss(x0, eps))
    w = torch.rand(6, generator=gen(2))
    per_sample = [F.mse_loss(x0[i], eps[i]) for i in range(6)]
    assert_close(diffusion_loss(x0, eps, w), sum(w[i] * per_sample[i] for i in range(6)) / 6)
    low = diffusion_loss(x0.bfloat16(), eps.bfloat16(), w)
    assert low.dtype == torch.float32 and low.ndim == 0
    assert_close(low, diffusion_loss(x0.bfloat16().float(), eps.bfloat16().float(), w))


def test_sample_timesteps():
    t = sample_timesteps(20_000, 10, generator=gen())
    assert t.shape == (20_000,) and t.dtype == torch.int64
    assert t.min().item() == 0 and t.max().item() == 9
    counts = torch.bincount(t, minlength=10).float()
    assert_close(counts / 20_000, torch.full((10,), 0.1), atol=0.01, rtol=0)
    assert torch.equal(sample_timesteps(8, 1000, generator=gen(3)), sample_timesteps(8, 1000, generator=gen(3)))


def test_offset_noise_strength_zero_is_identity():
    eps = torch.randn(2, 4, 8, 8, generator=gen())
    assert torch.equal(offset_noise(eps, 0.0, generator=gen(1)), eps)


def test_offset_noise_is_a_per_channel_shift_with_the_right_std():
    B, C, H, W, strength = 4000, 4, 8, 8, 0.1
    eps = torch.randn(B, C, H, W, generator=gen())
    shift = offset_noise(eps, strength, generator=gen(1)) - eps
    # Constant over the image plane, different per sample and channel ...
    assert_close(shift, shift[..., :1, :1].expand_as(shift))
    per_channel = shift[:, :, 0, 0]  # (B, C)
    assert_close(per_channel.mean(0), torch.zeros(C), atol=4 * strength / B**0.5, rtol=0)
    assert_close(per_channel.std(0), torch.full((C,), strength), rtol=0.05, atol=0)
    # ... so the spatial mean of the noise now varies with std sqrt(strength^2 + 1/(H W)).
    channel_mean = (eps + shift).mean(dim=(2, 3))
    assert_close(channel_mean.std(0), torch.full((C,), math.sqrt(strength**2 + 1 / (H * W))), rtol=0.05, atol=0)
    assert torch.equal(offset_noise(eps[:2], strength, gen(7)), offset_noise(eps[:2], strength, gen(7)))


# ---------------------------------------------------------------- samplers


@pytest.fixture(scope="module")
def train_config():
    # Stable Diffusion 2's training scheduler.
    return DDPMScheduler(**SD, beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False,
                         steps_offset=1).config


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_make_scheduler_keeps_the_training_schedule(name, train_config):
    scheduler = make_scheduler(name, train_config)
    assert isinstance(scheduler, SCHEDULERS[name][0])
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert scheduler.config[key] == train_config[key], key
    assert_close(scheduler.alphas_cumprod, alpha_bar(betas("scaled_linear", **SD)))
    if name in ("dpm++", "dpmsolver++"):
        assert scheduler.config.algorithm_type == "dpmsolver++"
    # Karras et al.'s noise levels: rho = 7 from the schedule's largest sigma down to its smallest
    assert scheduler.config.get("use_karras_sigmas", False) == name.endswith("_karras")


def test_make_scheduler_overrides_and_unknown_name(train_config):
    assert make_scheduler("ddim", train_config, timestep_spacing="trailing").config.timestep_spacing == "trailing"
    with pytest.raises(ValueError, match="'heun'.*ddim.*euler_a.*lms"):
        make_scheduler("heun", train_config)


def test_guided_closed_forms():
    u, c = torch.randn(2, 3, generator=gen()), torch.randn(2, 3, generator=gen(1))
    assert torch.equal(guided(u, c, 0.0), u)
    assert_close(guided(u, c, 1.0), c)
    assert_close(guided(u, c, 3.0), 3 * c - 2 * u)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, layers_per_block=1, attention_head_dim=2, norm_num_groups=4,
    )
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def text():
    """cond (B, L, D) and uncond (1, L, D) hidden states for B = 2."""
    g = gen(5)
    return torch.randn(2, 6, 16, generator=g), torch.randn(1, 6, 16, generator=g)


class Spy(torch.nn.Module):
    """Wraps the U-Net and records the batch size of every call."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.batch_sizes = unet, []

    def forward(self, x, t, encoder_hidden_states):
        self.batch_sizes.append(x.shape[0])
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states)


def reference_loop(unet, scheduler, latents, step, eps_fn):
    """A plain sampling loop from explicit initial latents; eps_fn(x_in, t) gives the guided model output."""
    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(eps_fn(scheduler.scale_model_input(x, t), t), t, x, **step).prev_sample
    return x


STEPS = 4
SHAPE = (4, 8, 8)


def test_guidance_scale_one_is_the_plain_conditional_path(unet, train_config, text):
    cond, uncond = text
    scheduler = make_scheduler("ddim", train_config)
    spy = Spy(unet)
    out = sample_latents(spy, scheduler, cond, uncond, guidance_scale=1.0, num_inference_steps=STEPS,
                         latent_shape=SHAPE, generator=gen(0))
    assert spy.batch_sizes == [2] * STEPS  # conditional pass only
    latents = torch.randn((2, *SHAPE), generator=gen(0))
    expected = reference_loop(unet, scheduler, latents, {}, lambda x, t: unet(x, t, encoder_hidden_states=cond).sample)
    assert_close(out, expected, rtol=0, atol=0)


def test_cfg_is_one_batched_forward_equal_to_two_separate_ones(unet, train_config, text):
    cond, uncond = text
    scheduler = make_scheduler("ddim", train_config)
    spy = Spy(unet)
    out = sample_latents(spy, scheduler, cond, uncond, guidance_scale=7.5, num_inference_steps=STEPS,
                         latent_shape=SHAPE, generator=gen(0))
    assert spy.batch_sizes == [4] * STEPS  # one (2B, ...) call per step

    def two_forwards(x, t):
        eps_u = unet(x, t, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
        eps_c = unet(x, t, encoder_hidden_states=cond).sample
        return eps_u + 7.5 * (eps_c - eps_u)

    expected = reference_loop(unet, scheduler, torch.randn((2, *SHAPE), generator=gen(0)), {}, two_forwards)
    assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # Guidance must matter for this check to mean anything.
    unguided = sample_latents(unet, scheduler, cond, uncond, guidance_scale=1.0, num_inference_steps=STEPS,
                              latent_shape=SHAPE, generator=gen(0))
    assert not torch.allclose(out, unguided, atol=1e-3)


def test_timestep_sigma_closed_form():
    ab = alpha_bar(betas("linear", 1000, 1e-4, 0.02))
    sigma = lambda i: math.sqrt((1 - float(ab[i])) / float(ab[i]))  # noqa: E731
    got = timestep_sigmas(ab, torch.tensor([0, 999, 500.25]))
    assert got.tolist() == pytest.approx([sigma(0), sigma(999), 0.75 * sigma(500) + 0.25 * sigma(501)], rel=1e-6)


class CountingUNet(torch.nn.Module):
    """A U-Net that records the batch of each call."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.batches = unet, []

    def forward(self, x, t, **kwargs):
        self.batches.append(x.shape[0])
        return self.unet(x, t, **kwargs)


@pytest.mark.parametrize("name", ["dpm++", "euler_karras"])
def test_guidance_interval(name, unet, train_config, text):
    cond, uncond = text
    run = lambda model, **kw: sample_latents(  # noqa: E731
        model, make_scheduler(name, train_config), cond, uncond, num_inference_steps=6, latent_shape=SHAPE,
        generator=gen(0), **{"guidance_scale": 4.0, **kw})
    everywhere, nowhere = run(unet), run(unet, guidance_scale=1.0)
    assert torch.equal(run(unet, guidance_interval=(0.0, 1e9)), everywhere)  # every sigma inside: plain CFG
    assert torch.equal(run(unet, guidance_interval=(1e8, 1e9)), nowhere)  # none: the conditional prediction alone
    # a middle interval: guidance (both halves, batch 2B) exactly at the steps whose sigma is inside it
    scheduler = make_scheduler(name, train_config)
    scheduler.set_timesteps(6)
    sigmas = timestep_sigmas(scheduler.alphas_cumprod, scheduler.timesteps).tolist()
    low, high = sorted(sigmas)[1], sorted(sigmas)[4]
    counting = CountingUNet(unet)
    partial = run(counting, guidance_interval=(low, high))
    assert counting.batches == [4 if low < s <= high else 2 for s in sigmas] and counting.batches.count(4) == 3
    assert not torch.allclose(partial, everywhere) and not torch.allclose(partial, nowhere)
    with pytest.raises(ValueError, match="guidance_interval"):
        run(unet, guidance_interval=(5.0, 1.0))


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_sampler_runs(name, unet, train_config, text):
    cond, uncond = text
    out = sample_latents(unet, make_scheduler(name, train_config), cond, uncond, guidance_scale=4.0,
                         num_inference_steps=3, latent_shape=SHAPE, generator=gen(0))
    assert out.shape == (2, *SHAPE) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["ddpm", "euler_a", "dpm++_sde_karras"])  # stochastic steps: the generator reaches step() too
def test_same_seed_same_latents(name, unet, train_config, text):
    cond, uncond = text
    run = lambda seed: sample_latents(  # noqa: E731
        unet, make_scheduler(name, train_config), cond, uncond, guidance_scale=4.0, num_inference_steps=3,
        latent_shape=SHAPE, generator=gen(seed),
    )
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))
    # Same initial latents, different step noise: the generator is passed to the scheduler's step.
    a = sample_latents(unet, make_scheduler(name, train_config), cond, uncond, guidance_scale=4.0,
                       num_inference_steps=3, latent_shape=SHAPE, generator=gen(0),
                       latents=torch.randn((2, *SHAPE), generator=gen(9)))
    b = sample_latents(unet, make_scheduler(name, train_config), cond, uncond, guidance_scale=4.0,
                       num_inference_steps=3, latent_shape=SHAPE, generator=gen(1),
                       latents=torch.randn((2, *SHAPE), generator=gen(9)))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", ["euler_a", "dpm++", "lms", "dpm++_karras", "dpm++_sde_karras", "euler_karras"])
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_same_latents_as_stable_diffusion_pipeline(name, guidance_scale, unet, train_config, text):
    cond, uncond = text
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=make_scheduler(name, train_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond.expand(2, -1, -1), height=64, width=64,
                    guidance_scale=guidance_scale, num_inference_steps=STEPS, generator=gen(0),
                    output_type="latent").images
    out = sample_latents(unet, make_scheduler(name, train_config), cond, uncond, guidance_scale=guidance_scale,
                         num_inference_steps=STEPS, latent_shape=SHAPE, generator=gen(0))
    assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ddim", "euler", "lms", "dpm++"])
@pytest.mark.parametrize("strength", [0.75, 0.3])
def test_img2img_same_latents_as_the_img2img_pipeline(name, strength, unet, train_config, text):
    # the pipeline takes 4-channel images as latents as they are: its noising and timestep subset, our loop
    from diffusers import StableDiffusionImg2ImgPipeline

    cond, uncond = text
    init = torch.randn((2, *SHAPE), generator=gen(11))
    pipe = StableDiffusionImg2ImgPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=make_scheduler(name, train_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond.expand(2, -1, -1), image=init,
                    strength=strength, guidance_scale=5.0, num_inference_steps=8, generator=gen(0),
                    output_type="latent").images
    spy = Spy(unet)
    out = sample_latents(spy, make_scheduler(name, train_config), cond, uncond, guidance_scale=5.0,
                         num_inference_steps=8, latent_shape=SHAPE, generator=gen(0), init_latents=init,
                         strength=strength)
    assert len(spy.batch_sizes) == int(8 * strength)  # only the last `strength` of the steps run
    assert_close(out, expected, rtol=0, atol=0)
    # the init latents matter: a different init gives different latents
    other = sample_latents(unet, make_scheduler(name, train_config), cond, uncond, guidance_scale=5.0,
                           num_inference_steps=8, latent_shape=SHAPE, generator=gen(0), init_latents=init + 1,
                           strength=strength)
    assert not torch.allclose(out, other, atol=1e-3)


def test_img2img_strength_out_of_range(unet, train_config, text):
    cond, uncond = text
    with pytest.raises(ValueError, match="strength must be in \\[0, 1\\], got 1.5"):
        sample_latents(unet, make_scheduler("ddim", train_config), cond, uncond, guidance_scale=5.0,
                       num_inference_steps=4, latent_shape=SHAPE, init_latents=torch.zeros(2, *SHAPE), strength=1.5)
