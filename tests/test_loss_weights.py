"""Masked loss and per-sample loss weights (DreamBooth's prior loss), against hand-computed values.

    .venv/bin/python -m pytest tests/test_loss_weights.py -q
"""

from __future__ import annotations

import pytest
import torch
from data_parallel import UNET

from ldm.diffusion import diffusion_loss, loss_mask
from ldm.models.unet import build_unet
from ldm.stages.latent_diffusion import LatentDiffusion


def test_masked_loss_is_the_hand_computed_weighted_mean():
    # B=2, C=2, 1x2 latents. Sample 0: squared errors c0 [1, 4], c1 [9, 16], mask [1, 0.5]; sample 1: mask 0.
    out = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]], [[[5.0, 5.0]], [[5.0, 5.0]]]])
    target = torch.zeros_like(out)
    mask = torch.tensor([[[[1.0, 0.5]]], [[[0.0, 0.0]]]])  # (B, 1, h, w)
    # sample 0: (1*1 + 0.5*4 + 1*9 + 0.5*16) / (2 channels * (1 + 0.5)) = 20 / 3; sample 1: 0 (nothing to learn)
    assert diffusion_loss(out, target, mask=mask).item() == pytest.approx((20 / 3 + 0) / 2)
    weight = torch.tensor([2.0, 1.0])
    assert diffusion_loss(out, target, weight, mask).item() == pytest.approx((2 * 20 / 3) / 2)
    # an all-ones mask is the plain mean: (1 + 4 + 9 + 16) / 4 and 25
    ones = torch.ones(2, 1, 1, 2)
    assert diffusion_loss(out, target, mask=ones).item() == pytest.approx((30 / 4 + 25) / 2)
    assert diffusion_loss(out, target).item() == pytest.approx((30 / 4 + 25) / 2)


def test_a_pixel_mask_becomes_the_share_of_pixels_to_learn_per_latent_pixel():
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    mask[..., :, :8] = 255  # left half white
    mask[..., :4, 8:] = 255  # and the top quarter of the right half
    latent = loss_mask(mask, (2, 2))  # 8x8 pixels per latent pixel
    assert latent.tolist() == [[[[1.0, 0.5], [1.0, 0.0]]]]
    grey = torch.full((1, 1, 2, 2), 0.25)  # float masks (cached latents) are taken as weights already
    assert loss_mask(grey, (2, 2)).tolist() == grey.tolist()


def _not_built():
    raise AssertionError("a frozen part was built: the cached path must not need it")


def test_training_step_weights_each_sample_by_its_mask_and_loss_weight():
    """A cached-latents batch with a loss mask and loss weights: the step's loss equals the weighted mean
    recomputed from what the U-Net saw and returned (noise recovered from x_t in closed form)."""
    torch.manual_seed(0)
    module = LatentDiffusion(build_unet(**UNET), _not_built, _not_built, diffusion={"cfg_dropout": 0.0})
    module._empty = {"encoder_hidden_states": torch.zeros(1, 7, 32)}
    b, h, w = 3, 8, 12  # a landscape bucket: latents need not be square
    latents = torch.randn(b, 4, h, w)
    mask = torch.zeros(b, 1, h * 8, w * 8, dtype=torch.uint8)
    mask[0] = 255
    mask[1, :, :, : w * 4] = 255  # left half
    batch = {"latent_mean": latents.half(), "latent_std": torch.zeros(b, 4, h, w, dtype=torch.float16),
             "text_hidden": torch.randn(b, 7, 32).half(), "caption": ["a", "b", "c"], "mask": mask,
             "loss_weight": torch.tensor([1.0, 1.0, 0.5])}  # fmt: skip
    seen = {}
    module.unet.register_forward_hook(lambda m, args, kwargs, out: seen.update(x=args[0], t=args[1], out=out.sample),
                                      with_kwargs=True)  # fmt: skip
    loss = module.training_step(batch, 0)

    x0 = batch["latent_mean"].float()
    ab = module.alpha_bar[seen["t"]].view(-1, 1, 1, 1)
    noise = (seen["x"] - ab.sqrt() * x0) / (1 - ab).sqrt()  # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps
    error = (seen["out"] - noise).pow(2)  # (B, C, h, w): epsilon prediction
    expected = [
        error[0].mean(),  # all white: the plain mean
        error[1, :, :, : w // 2].mean(),  # left half only
        0.0 * error[2].sum(),  # black: nothing to learn
    ]
    weights = [1.0, 1.0, 0.5]
    reference = sum(wt * e for wt, e in zip(weights, expected)) / b
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
