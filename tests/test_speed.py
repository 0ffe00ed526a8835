"""Speed options change speed, not results: fused AdamW under bf16 with gradient clipping trains, and
channels_last gives the same loss as the default memory format."""

from __future__ import annotations

import time

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from ldm.run.fit import train
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
    # with a fused optimizer the clip factor rides on its grad_scale: the gradients it steps with have norm 0.5
    # and the weights move exactly as with torch's clip_grad_norm_ before a plain (foreach) AdamW step
    cfg = compose_config(root, tmp_path)
    module = instantiate(cfg.model, _convert_="all")
    reference = [torch.nn.Parameter(p.detach().clone()) for p in module.unet.parameters()]
    for p, q in zip(module.unet.parameters(), reference, strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    optimizer = torch.optim.AdamW(module.unet.parameters(), fused=True)

    class Trainer:
        precision = "bf16-mixed"

    module.trainer = Trainer  # the hook reads trainer.precision only
    module.configure_gradient_clipping(optimizer, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    assert optimizer.grad_scale > 1  # the gradients themselves are not rewritten before the step
    optimizer.step()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.unet.parameters()]))
    assert norm == pytest.approx(0.5, rel=1e-4)
    torch.nn.utils.clip_grad_norm_(reference, 0.5)
    torch.optim.AdamW(reference, foreach=True).step()
    for p, q in zip(module.unet.parameters(), reference, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)


def test_clipping_reuses_the_norm_the_non_finite_guard_computed(root, tmp_path):
    # the guard's global norm (set as module.grad_norm) is the one clipping divides by: no second pass over the
    # gradients; a norm twice the true one halves the clip factor, which the step's gradients then show
    cfg = compose_config(root, tmp_path)
    module = instantiate(cfg.model, _convert_="all")
    for p in module.unet.parameters():
        p.grad = torch.randn_like(p)
    true_norm = torch.nn.utils.get_total_norm([p.grad for p in module.unet.parameters()])
    module.grad_norm = 2 * true_norm
    optimizer = torch.optim.AdamW(module.unet.parameters(), fused=True)

    class Trainer:
        precision = "bf16-mixed"

    module.trainer = Trainer
    module.configure_gradient_clipping(optimizer, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    optimizer.step()
    norm = torch.nn.utils.get_total_norm([p.grad for p in module.unet.parameters()])
    assert norm == pytest.approx(0.25, rel=1e-4)


def test_channels_last_gives_the_same_loss(root, tmp_path):
    cfg = compose_config(root, tmp_path)
    losses = []
    for channels_last in (False, True):
        module = instantiate(cfg.model, _convert_="all", channels_last=channels_last)
        module.configure_model()
        latents = torch.randn(4, *module.latent_shape).contiguous(memory_format=torch.channels_last)
        cond = module.encode_text(["a red circle"] * 4)["encoder_hidden_states"]
        torch.manual_seed(0)
        losses.append(module.diffusion_step(latents, cond).item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_channels_last_encodes_on_the_fly_in_nhwc_with_the_same_latents(root, tmp_path):
    """With channels_last the VAE is built with NHWC weights and encodes NHWC images (what a step encoding on the
    fly runs): the same latents as the default layout, and the same decoded images."""
    cfg = compose_config(root, tmp_path)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    results, layouts = [], []
    for channels_last in (False, True):
        module = instantiate(cfg.model, _convert_="all", compile=False, channels_last=channels_last)
        module.vae.encoder.conv_in.register_forward_pre_hook(
            lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        torch.manual_seed(0)
        latents = module.encode_images(pixels)
        results.append((latents, module.decode_latents(latents)))
    assert layouts == [False, True]
    assert module.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert module.vae.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    for nchw, nhwc in zip(*results, strict=True):
        torch.testing.assert_close(nhwc, nchw, rtol=1e-4, atol=1e-4 * nchw.abs().max().item())


def test_under_bf16_the_frozen_vae_runs_in_bf16_and_encodes_like_fp32(root, tmp_path):
    cfg = compose_config(root, tmp_path)
    module = instantiate(cfg.model, _convert_="all", compile=False)  # the stand-in trainer below has no strategy
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(0)
    reference = module.encode_images(pixels)  # fp32 VAE

    class Trainer:
        precision = "bf16-mixed"

    module.trainer = Trainer  # configure_model reads trainer.precision only
    module.configure_model()
    assert module.vae.dtype == torch.bfloat16 and module.unet.dtype == torch.float32
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in training: the VAE turns autocast off for itself
        latents = module.encode_images(pixels)
    assert latents.dtype == torch.float32
    assert torch.allclose(latents, reference, rtol=0.05, atol=0.05 * reference.abs().max().item())
    assert module.decode_latents(latents).dtype == torch.float32


class SleepAtEnd(pl.Callback):
    """Stands in for slow end-of-fit work (Lightning's final checkpoint of a large model), and notes when each
    training batch starts and ends (an independent clock for the timer's window)."""

    def __init__(self, path: str):
        self.path = path

    def _note(self, kind: str, step: int) -> None:
        with open(self.path, "a") as f:
            f.write(f"{kind} {step} {time.perf_counter()}\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._note("start", trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._note("end", trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        time.sleep(5.0)


def test_step_timer_times_only_the_steps_after_warm_up(root, tmp_path):
    import json

    out = tmp_path / "timer.json"
    cfg = compose_config(root, tmp_path, [
        "logger=none", "trainer.max_steps=3", "~callbacks.fid", "~callbacks.export", "~callbacks.sample_grid",
        "+callbacks.end._target_=tests.test_speed.SleepAtEnd",  # runs before the timer's on_train_end
        f"+callbacks.end.path={tmp_path / 'clock.txt'}",
        "+callbacks.timer._target_=ldm.callbacks.throughput.StepTimer", "+callbacks.timer.warmup=1",
        f"+callbacks.timer.out={out}",
    ])  # fmt: skip
    train(cfg)
    times = [(kind, int(step), float(t)) for kind, step, t in map(str.split, (tmp_path / "clock.txt").read_text().splitlines())]
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and result["batch_size"] == 4 and result["world_size"] == 1
    # the window runs from the start of step 2 (after 1 warm-up step) to the end of step 3, and leaves out the
    # 5 s of end-of-fit work: within 1 s of what the independent clock saw, however slow the steps are
    first = next(t for kind, step, t in times if kind == "start" and step == 1)
    last = next(t for kind, step, t in times if kind == "end" and step == 3)
    assert abs(result["step_seconds"] * 2 - (last - first)) < 1.0
    assert result["images_per_sec"] == pytest.approx(4 / result["step_seconds"], rel=1e-6)
    assert "allocator" not in result  # the CUDA allocator's counts: on a GPU only


class AllocateInWindow(pl.Callback):
    """Takes 1 GiB more than the caching allocator holds at the first timed step: one cudaMalloc in the window."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            self.block = torch.empty(2**30, dtype=torch.uint8, device=pl_module.device)


@pytest.mark.gpu
def test_step_timer_counts_the_allocators_cudamallocs_in_its_window(root, tmp_path):
    import json

    out = tmp_path / "timer.json"
    cfg = compose_config(root, tmp_path, [
        "logger=none", "trainer.max_steps=3", "trainer.accelerator=gpu", "~callbacks.fid", "~callbacks.export",
        "~callbacks.sample_grid", "+callbacks.alloc._target_=tests.test_speed.AllocateInWindow",
        "+callbacks.timer._target_=ldm.callbacks.throughput.StepTimer", "+callbacks.timer.warmup=1",
        f"+callbacks.timer.out={out}",
    ])  # fmt: skip
    train(cfg)
    result = json.loads(out.read_text())
    counts = result["allocator"]
    assert result["peak_reserved_gib"] >= max(1.0, result["peak_memory_gib"])  # the 1 GiB block, at least
    assert set(counts) == {"num_device_alloc", "num_device_free", "num_alloc_retries"}
    assert counts["num_device_alloc"] >= 1 and counts["num_alloc_retries"] >= 0
