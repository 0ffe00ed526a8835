"""Classifier-free guidance: the caption-dropout rate is the configured one, dropped rows carry the
empty caption's encoding by the same text encoder, and guidance scale 1 is the plain conditional model."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from tiny import compose_config, make_tiny_root

from ldm.diffusion import guided
from ldm.stages.latent_diffusion import drop_mask


@pytest.fixture(scope="module")
def module_factory(tmp_path_factory):
    root = make_tiny_root(tmp_path_factory.mktemp("tiny"))

    def build(*overrides):
        cfg = compose_config(root, tmp_path_factory.mktemp("run"), list(overrides))
        return instantiate(cfg.model, _convert_="all")

    return build


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_drop_mask_rate(p):
    torch.manual_seed(0)
    n = 200_000
    rate = drop_mask(n, p).float().mean().item()
    assert abs(rate - p) < 4.5 * (p * (1 - p) / n) ** 0.5 + 1e-9


def test_drop_mask_rejects_bad_rate():
    with pytest.raises(ValueError, match="cfg_dropout"):
        drop_mask(4, 1.5)


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_training_condition_drops_at_configured_rate(module_factory, p):
    module = module_factory(f"diffusion.cfg_dropout={p}")
    assert module.cfg_dropout == p
    captions = ["a large red circle in the center", "a small blue square at the top left"] * 1000
    torch.manual_seed(1)
    cond = module.training_condition(captions)["encoder_hidden_states"]  # (B, L, D)
    empty = module.encode_text([""])["encoder_hidden_states"][0]
    full = module.encode_text(captions[:2])["encoder_hidden_states"]
    is_empty = (cond == empty).flatten(1).all(1)
    is_caption = torch.stack([(c == full[i % 2]).all() for i, c in enumerate(cond)])
    assert torch.all(is_empty ^ is_caption)  # every row is exactly one of the two
    n = len(captions)
    assert abs(is_empty.float().mean().item() - p) < 4.5 * (p * (1 - p) / n) ** 0.5


def test_guidance_scale_one_is_the_conditional_prediction(module_factory):
    module = module_factory()
    unet = module.unet.eval()
    captions = ["a large red circle in the center", "a small blue square at the top left"]
    cond = module.encode_text(captions)["encoder_hidden_states"]
    uncond = module.empty_condition()["encoder_hidden_states"].expand_as(cond)
    x = torch.randn(2, *module.latent_shape)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        batched = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
        plain = unet(x, t, encoder_hidden_states=cond).sample
    out_uncond, out_cond = batched.chunk(2)
    torch.testing.assert_close(guided(out_uncond, out_cond, 1.0), plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(guided(out_uncond, out_cond, 3.0), plain, atol=1e-3)


def test_text_cache_gives_the_encoder_output(module_factory):
    plain = module_factory()
    cached = module_factory("model.text_cache_size=2")
    captions = ["a large red circle in the center", "a small blue square at the top left", "a red square"]
    for batch in (captions, captions[::-1], captions[:1] * 3, [captions[i] for i in (0, 2, 0, 1, 2, 2)]):
        torch.testing.assert_close(cached.encode_text(batch), plain.encode_text(batch))
    assert len(cached._text_cache) == 2  # bounded
