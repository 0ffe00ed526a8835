"""val/loss: each stage's loss on fixed held-out batches, noise and timesteps, logged every K steps by one
callback in real runs of the three stages, and equal to the loss computed here by hand from the saved weights
(diffusers' DDPMScheduler noising, an MSE, the Min-SNR weight; the VAE's reconstruction + KL; open_clip's ClipLoss)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from test_vae_stage import VAE_TINY
from tiny import TINY_OPEN_CLIP, compose_config, make_tiny_root

from ldm.callbacks.metrics_log import read_metrics
from ldm.callbacks.val_loss import ValidationLoss, held_out_batches
from ldm.run.fit import train
from ldm.stages.load import load_module

EVERY = ["callbacks.val_loss.every_n_steps=2", "callbacks.val_loss.num_samples=6", "callbacks.val_loss.batch_size=4"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_tiny_root(tmp_path_factory.mktemp("val_loss"))


def logged(run_dir) -> dict[int, float]:
    return {row["step"]: row["val/loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in row}


def test_latent_diffusion_val_loss_is_the_fixed_noise_loss_of_the_weights(root, tmp_path):
    cfg = compose_config(root, tmp_path, ["logger=none", "trainer.max_steps=3", "~callbacks.fid", *EVERY])
    metrics = train(cfg)
    values = logged(tmp_path)
    assert sorted(values) == [2, 3]  # every 2 steps and at the end
    assert metrics["val/loss"] == pytest.approx(values[3])

    # by hand, from the final weights: the same 6 held-out images in batches of 4 and 2, a CPU generator per batch
    module = load_module(tmp_path / "checkpoints" / "last.ckpt")
    ddpm = DDPMScheduler.from_config(module.scheduler_config)
    gamma = cfg.diffusion.min_snr_gamma
    assert gamma == 1.0  # conf/experiment/shapes.yaml
    total = 0.0
    for i, batch in enumerate(held_out_batches(root / "shapes" / "val", 16, 6, 4)):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            posterior = module.vae.encode(batch["pixel_values"].float() / 127.5 - 1).latent_dist
            latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g))
            latents = latents * module.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=g)
            t = torch.linspace(0, 999, len(latents)).round().long()
            cond = module.text_encoder.encode(batch["caption"])
            eps = module.unet(ddpm.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
        snr = ddpm.alphas_cumprod[t] / (1 - ddpm.alphas_cumprod[t])
        weight = snr.clamp(max=gamma) / snr  # Min-SNR (the shapes recipe's gamma), epsilon prediction
        total += float((weight * F.mse_loss(eps, noise, reduction="none").mean(dim=(1, 2, 3))).mean()) * len(latents)
    assert values[3] == pytest.approx(total / 6, rel=1e-4)
    # fixed draws: evaluating again on the same weights gives the same number, bit for bit
    callback = ValidationLoss(num_samples=6, batch_size=4)
    callback.batches = held_out_batches(root / "shapes" / "val", 16, 6, 4)
    assert callback.evaluate(_Trainer(), module) == callback.evaluate(_Trainer(), module) == pytest.approx(values[3])


class _Trainer:
    """What ValidationLoss.evaluate reads of a trainer, outside a fit (fp32: no autocast)."""

    global_step, is_global_zero, loggers, callback_metrics = 3, True, [], {}
    precision_plugin = SimpleNamespace(forward_context=contextlib.nullcontext)


def test_vae_stage_val_loss_is_reconstruction_plus_kl_on_fixed_draws(root, tmp_path):
    cfg = compose_config(root, tmp_path / "run", [*VAE_TINY, "logger=none", "trainer.max_steps=2", *EVERY,
                                                   f"paths.vae_dir={tmp_path / 'vae'}"], experiment="shapes_vae", tiny=False)
    train(cfg)
    values = logged(tmp_path / "run")
    assert sorted(values) == [2]
    module = load_module(tmp_path / "run" / "checkpoints" / "last.ckpt")
    total = 0.0
    for i, batch in enumerate(held_out_batches(root / "shapes" / "val", 16, 6, 4)):
        g = torch.Generator().manual_seed(i)
        x = batch["pixel_values"].float() / 127.5 - 1
        with torch.no_grad():
            posterior = module.vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
            rec = F.mse_loss(module.vae.decode(z).sample, x)  # the recipe's L2
            kl = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).sum(dim=(1, 2, 3)).mean() / x[0].numel()
        total += float(rec + cfg.model.kl_weight * kl) * len(x)
    assert values[2] == pytest.approx(total / 6, rel=1e-4)


def test_clip_stage_val_loss_is_open_clips_contrastive_loss(root, tmp_path):
    from open_clip.loss import ClipLoss

    overrides = ["logger=none", "data.resolution=16", "data.batch_size=8", "data.shuffle_buffer=8",
                 "trainer.accelerator=cpu", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
                 "trainer.val_check_interval=2", "optim.warmup_steps=1", f"paths.clip_dir={tmp_path / 'clip'}", *EVERY,
                 *[f"model.clip.{k}={v}" for k, v in _flat(TINY_OPEN_CLIP).items()]]  # fmt: skip
    train(compose_config(root, tmp_path / "run", overrides, experiment="shapes_clip", tiny=False))
    values = logged(tmp_path / "run")
    assert sorted(values) == [2]
    module = load_module(tmp_path / "run" / "checkpoints" / "last.ckpt")
    total = 0.0
    for batch in held_out_batches(root / "shapes" / "val", 16, 6, 4):
        with torch.no_grad():
            image, text = module.features(batch["pixel_values"], batch["caption"])
            total += float(ClipLoss()(image, text, module.model.logit_scale.exp())) * len(image)
    assert values[2] == pytest.approx(total / 6, rel=1e-4)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
