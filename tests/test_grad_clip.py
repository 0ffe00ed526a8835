"""Gradient clipping with a fused optimizer under bf16 mixed precision, in every stage's real Trainer run.

A fused AdamW (the default on a GPU, `optim.optimizer.fused: null`) tells Lightning's mixed-precision plugin that it
unscales gradients itself, and the plugin then refuses `trainer.gradient_clip_val` outright ("does not allow for
gradient clipping"): the CIFAR-10 VAE stage died so on its first GPU step. Under bf16 nothing is scaled, so the
stages clip themselves (`Stage.configure_gradient_clipping`). Checked on the CPU, where AdamW is fused on request too:
the run trains, and the gradient norm the optimizer steps with is at most the clip value."""

from __future__ import annotations

import json
import math

import pytest
import pytorch_lightning as pl
import torch
from tiny import compose_config, make_tiny_root

from ldm.run.fit import train

CLIP = 1e-3  # far below the tiny models' gradient norms: every step is clipped


class StepNorms(pl.Callback):
    """Writes the global gradient norm each optimizer step stepped with (after clipping; read right after the step)
    to `out`."""

    def __init__(self, out: str):
        self.out, self.norms = out, []

    def on_train_start(self, trainer, pl_module):
        def record(optimizer, args, kwargs):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))))

        for optimizer in trainer.optimizers:
            optimizer.register_step_post_hook(record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # the clip factor rides on the fused optimizer's grad_scale for one step only: left on, it would rescale the
        # next step's gradients by this step's factor
        assert not any(hasattr(o, "grad_scale") for o in trainer.optimizers)
        assert getattr(pl_module, "grad_norm", None) is None

    def on_train_end(self, trainer, pl_module):
        with open(self.out, "w") as f:
            json.dump(self.norms, f)


FUSED_BF16 = ["trainer.precision=bf16-mixed", "optim.optimizer.fused=true", f"trainer.gradient_clip_val={CLIP}",
              "trainer.max_steps=2", "logger=none", "+callbacks.norms._target_=test_grad_clip.StepNorms"]  # fmt: skip
STAGES = {
    "vae": ("shapes_vae", ["data.resolution=16", "data.batch_size=8", "data.shuffle_buffer=8",
                           "model.vae.block_out_channels=[8,16]", "model.vae.norm_num_groups=4", "model.vae.sample_size=16",
                           "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "optim.warmup_steps=1",
                           "+callbacks.export.max_batches=2", "callbacks.reconstructions.num_images=8",
                           "callbacks.reconstructions.batch_size=4", "callbacks.reconstructions.grid_images=4"], False),
    "latent_diffusion": ("shapes", [], True),
}  # fmt: skip


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_fused_optimizer_clips_under_bf16(stage, tmp_path):
    if "fused" not in torch.optim.AdamW.__init__.__code__.co_varnames:
        pytest.skip("this torch has no fused AdamW")
    experiment, overrides, tiny = STAGES[stage]
    out = tmp_path / "norms.json"
    cfg = compose_config(make_tiny_root(tmp_path / "tiny"), tmp_path / "run",
                         [*overrides, *FUSED_BF16, f"+callbacks.norms.out={out}",
                          *([f"paths.vae_dir={tmp_path / 'vae'}"] if stage == "vae" else [])],
                         experiment=experiment, tiny=tiny)  # fmt: skip
    train(cfg)
    norms = json.loads(out.read_text())
    assert len(norms) == 2 and all(math.isfinite(n) and 0 < n <= CLIP * (1 + 1e-3) for n in norms), norms
