"""Speed options change speed, not results: fused AdamW under bf16 with gradient clipping trains, and
channels_last gives the same loss as the default memory format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from ldm.train import train
from tests.tiny import compose_config, make_tiny_root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_tiny_root(tmp_path_factory.mktemp("speed"))


def test_fused_adamw_with_bf16_and_gradient_clipping_trains(root, tmp_path):
    # Lightning's mixed-precision plugin refuses to clip for fused optimizers; the module clips itself under bf16
    cfg = compose_config(root, tmp_path, ["logger=csv", "trainer.precision=bf16-mixed", "optim.optimizer.fused=true",
                                          "trainer.gradient_clip_val=0.01", "~callbacks.fid", "~callbacks.export"])  # fmt: skip
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"])


def test_clipping_bounds_the_global_gradient_norm(root, tmp_path):
    cfg = compose_config(root, tmp_path)
    module = instantiate(cfg.model, _convert_="all")
    for p in module.unet.parameters():
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(module.unet.parameters(), fused=True)

    class Trainer:
        precision = "bf16-mixed"

    module.trainer = Trainer  # the hook reads trainer.precision only
    module.configure_gradient_clipping(optimizer, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.unet.parameters()]))
    assert norm == pytest.approx(0.5, rel=1e-4)


def test_channels_last_gives_the_same_loss(root, tmp_path):
    cfg = compose_config(root, tmp_path)
    losses = []
    for channels_last in (False, True):
        module = instantiate(cfg.model, _convert_="all", channels_last=channels_last)
        module.configure_model()
        latents = torch.randn(4, *module.latent_shape).contiguous(memory_format=torch.channels_last)
        cond = module.encode_captions(["a red circle"] * 4)
        torch.manual_seed(0)
        losses.append(module.diffusion_step(latents, cond).item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


class SleepAtEnd(__import__("pytorch_lightning").Callback):
    """Stands in for slow end-of-fit work (Lightning's final checkpoint of a large model)."""

    def on_train_end(self, trainer, pl_module):
        import time

        time.sleep(3.0)


def test_step_timer_times_only_the_steps_after_warm_up(root, tmp_path):
    import json

    out = tmp_path / "timer.json"
    cfg = compose_config(root, tmp_path, [
        "logger=none", "trainer.max_steps=3", "~callbacks.fid", "~callbacks.export", "~callbacks.sample_grid",
        "+callbacks.end._target_=tests.test_speed.SleepAtEnd",  # runs before the timer's on_train_end
        "+callbacks.timer._target_=ldm.lightning.callbacks.StepTimer", "+callbacks.timer.warmup=1",
        f"+callbacks.timer.out={out}",
    ])  # fmt: skip
    train(cfg)
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and result["batch_size"] == 4 and result["world_size"] == 1
    assert result["step_seconds"] < 1.5  # the 3 s of end-of-fit work is outside the window
    assert result["images_per_sec"] == pytest.approx(4 / result["step_seconds"], rel=1e-6)
