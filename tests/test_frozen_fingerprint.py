"""A checkpoint leaves its frozen VAE and text encoder out and reloads them from their paths; it records their
fingerprints, so that a path which now holds other weights (a relative path read from another working directory,
a stage-1 directory overwritten by a new run) is refused in one line instead of decoding with the wrong VAE."""

from __future__ import annotations

import pytest
import torch
from tiny import compose_config, make_tiny_root

from ldm.models.fingerprint import difference, fingerprint
from ldm.models.vae import build_vae
from ldm.run.fit import train
from ldm.stages.load import load_module
from ldm.training.checkpoint import load_checkpoint

TINY_VAE = dict(block_out_channels=[8, 16], norm_num_groups=4, sample_size=16)


def test_fingerprint_ignores_dtype_and_tells_trainings_apart():
    vae = build_vae(**TINY_VAE, seed=0)
    saved = fingerprint(vae)
    assert difference(saved, fingerprint(build_vae(**TINY_VAE, seed=1))) is not None  # another initialisation
    for dtype in (torch.bfloat16, torch.float16):
        assert difference(saved, fingerprint(vae.to(dtype))) is None
        vae.float()
    with torch.no_grad():  # one weight moved by 5 %: a different part
        vae.decoder.conv_out.weight.mul_(1.05)
    assert difference(saved, fingerprint(vae)) is not None
    assert difference(saved, fingerprint(build_vae(**{**TINY_VAE, "latent_channels": 8}))) == \
        "its tensors' names or shapes differ"


def test_fingerprint_reaches_the_last_weight_of_a_large_tensor():
    # CLIP's token embedding (49,408 x 768): past 2**24 elements a float32 position would round beyond the end
    embedding = torch.nn.Embedding(49408, 768)
    assert fingerprint(embedding)["values"][-1] == embedding.weight[-1, -1].item()


REFUSED = (r"^model\.vae: the vae loaded from '.*vae-shapes' is not the one this checkpoint was trained with "
           r"\(\d+ of \d+ sampled weights differ\)")


@pytest.fixture
def trained(tmp_path):
    """(the data root, a 2-step run's last.ckpt)"""
    root = make_tiny_root(tmp_path / "root")
    train(compose_config(root, tmp_path / "run", ["logger=none", "~callbacks.fid"]))
    return root, tmp_path / "run" / "checkpoints" / "last.ckpt"


def test_a_checkpoint_refuses_a_vae_that_is_not_the_one_it_trained_with(trained):
    root, ckpt = trained
    saved = load_checkpoint(ckpt)["frozen_fingerprints"]
    assert set(saved) == {"vae", "text_encoder"}
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in load_checkpoint(ckpt)["state_dict"])
    load_module(ckpt).generate(["a small red circle"], seed=0, num_inference_steps=2)  # its own VAE: fine

    # a new stage-1 run writes the same directory
    build_vae(**TINY_VAE, seed=1).save_pretrained(root / "models" / "vae-shapes")
    module = load_module(ckpt)  # the frozen parts are built on first use, and checked then
    with pytest.raises(ValueError, match=REFUSED) as e:
        module.generate(["a small red circle"], seed=0, num_inference_steps=2)
    assert "\n" not in str(e.value)


def test_a_resumed_fit_refuses_another_vae_before_training(trained, tmp_path):
    root, ckpt = trained
    build_vae(**TINY_VAE, seed=1).save_pretrained(root / "models" / "vae-shapes")
    # the fit builds its frozen parts before it restores the checkpoint: they are checked as it is restored
    cfg = compose_config(root, tmp_path / "resumed", ["logger=none", "~callbacks.fid", f"ckpt_path={ckpt}",
                                                      "trainer.max_steps=4"])  # fmt: skip
    with pytest.raises(ValueError, match=REFUSED):
        train(cfg)
    assert not (tmp_path / "resumed" / "checkpoints" / "last.ckpt").exists()


def test_a_checkpoint_saved_without_building_the_parts_keeps_their_fingerprints(trained):
    # (training on cached latents never builds the VAE: a resumed run's checkpoints carry what they were given)
    _, ckpt = trained
    module = load_module(ckpt)
    assert "vae" not in module._modules and "text_encoder" not in module._modules
    saved = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(saved)
    assert saved["frozen_fingerprints"] == load_checkpoint(ckpt)["frozen_fingerprints"]
