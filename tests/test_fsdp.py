"""FSDP (`+trainer/strategy=fsdp`, ldm/training/fsdp.py) computes what one process computes on the doubled batch.

- Two ranks holding the U-Net sharded by the strategy of conf/trainer/strategy/fsdp.yaml (gloo on CPU, NCCL on two
  GPUs) each take half of a batch: their gathered gradients, the weights after two AdamW steps, the EMA (updated
  from the gathered weights, whole on every rank) and the optimizer state a checkpoint holds equal one process's
  on the whole batch; that state loads back into the shards.
- A real `ldm.train` run on 2 FSDP ranks ends with the same checkpoint (weights, EMA, AdamW moments) as the same
  run under DDP (itself checked against one process in tests/test_ddp.py), with a gradient-clipping threshold that
  binds (a norm over one rank's shard would differ); resuming its step-1 checkpoint under FSDP gives its step-2
  checkpoint; the FSDP checkpoint exports to a pipeline and loads in a one-process run.
- What FSDP cannot do is refused at start-up in one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from data_parallel import BATCH, SDXL_UNET, UNET, assert_adam_weights_close, fixed_batch, rank_device, take
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tiny import CONF, TINY, TINY_UNET, compose_config, make_tiny_root
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from ldm.models.unet import build_unet
from ldm.stages.latent_diffusion import LatentDiffusion
from ldm.training.fsdp import full_optimizer_state, load_full_optimizer_state

STRATEGY = OmegaConf.load(CONF / "trainer" / "strategy" / "fsdp.yaml")


def _module(device, checkpointing=False, sdxl=False) -> LatentDiffusion:
    torch.manual_seed(0)
    unet = build_unet(**(SDXL_UNET if sdxl else UNET))  # SDXL's: conditioning dicts with added conditions
    module = LatentDiffusion(unet, vae=lambda: None, text_encoder=lambda: None,
                             diffusion=dict(min_snr_gamma=5.0), ema_decay=0.5,
                             gradient_checkpointing=checkpointing)  # frozen parts never built
    module.configure_model()  # (what Lightning calls before the strategy wraps the U-Net)
    return module.to(device)


def _train(module, batch, rows, device, fused):
    """Two steps on the given rows (loss, backward, AdamW, EMA via the module's optimizer_step); returns
    (first step's gradients, weights, EMA weights), full tensors on the CPU, and the optimizer."""
    latents, cond, noise, t = take(batch, rows, device)
    optimizer = torch.optim.AdamW(module.unet.parameters(), lr=1e-3, fused=fused)
    for step in range(2):
        optimizer.zero_grad()
        module.diffusion_step(latents, cond, noise, t).backward()
        if step == 0:
            with FSDP.summon_full_params(module.unet, with_grads=True) if isinstance(module.unet, FSDP) else nullcontext():
                grads = [p.grad.detach().cpu().clone() for p in module.unet.parameters()]
        module.optimizer_step(0, step, optimizer)
    with FSDP.summon_full_params(module.unet) if isinstance(module.unet, FSDP) else nullcontext():
        weights = [p.detach().cpu().clone() for p in module.unet.parameters()]
    return (grads, weights, [p.detach().cpu().clone() for p in module.ema.module.parameters()]), optimizer


def _moments(state: dict) -> list:
    """AdamW's (step, exp_avg, exp_avg_sq) per parameter, in parameter order, on the CPU."""
    return [[state["state"][i][k].cpu() for k in ("step", "exp_avg", "exp_avg_sq")] for i in sorted(state["state"])]


def _rank(rank, world_size, init_file, backend, fused, checkpointing, sdxl, out):
    with rank_device(rank, world_size, init_file, backend) as device:
        module = _module(device, checkpointing, sdxl)
        strategy = instantiate(STRATEGY)  # what `+trainer/strategy=fsdp` builds
        strategy.parallel_devices = [device]  # (set by Lightning: this rank's device)
        module = strategy._setup_model(module)  # wraps the U-Net, as Lightning's setup does
        assert isinstance(module.unet, FSDP)
        assert not any(isinstance(m, FSDP) for name, m in module.named_modules() if not name.startswith("unet"))
        assert len([m for m in module.unet.modules() if isinstance(m, FSDP)]) > 1  # blocks are units of their own
        half = BATCH // world_size
        result, optimizer = _train(module, fixed_batch(sdxl), slice(rank * half, (rank + 1) * half), device, fused)
        # checkpoints: the gathered optimizer state (rank 0's), and that state loaded back into fresh shards
        full = full_optimizer_state(module.unet, optimizer, device)
        shared = [full]
        dist.broadcast_object_list(shared, src=0)
        fresh = torch.optim.AdamW(module.unet.parameters(), lr=1e-3, fused=fused)
        load_full_optimizer_state(module.unet, fresh, shared[0], device)
        for p in module.unet.parameters():  # (a parameter wholly in the other rank's shard has no state here)
            for key, value in optimizer.state[p].items():
                assert torch.equal(fresh.state[p][key].cpu(), value.cpu()), f"rank {rank}: reloaded {key} differs"
        assert sum(len(optimizer.state[p]) for p in module.unet.parameters()) > 0
        torch.save((*result, _moments(full) if rank == 0 else None, full.get("param_groups")), f"{out}.{rank}")


def _check(tmp_path, backend, fused, device, checkpointing=False, sdxl=False):
    reference = _module(device, checkpointing, sdxl)
    expected, optimizer = _train(reference, fixed_batch(sdxl), slice(0, BATCH), device, fused)
    expected_state = optimizer.state_dict()
    out = str(tmp_path / "result")
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), backend, fused, checkpointing, sdxl, out), nprocs=2, join=True)
    for rank in range(2):
        grads, weights, ema, moments, param_groups = torch.load(f"{out}.{rank}")
        for i, (a, b) in enumerate(zip(grads, expected[0], strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, b.abs().max().item()),
                                       msg=lambda m: f"rank {rank} gradient {i}: {m}")  # fmt: skip
        # weights to 1 % of a step where the step is well conditioned (tests/data_parallel.py says why); the EMA
        # (decay 0.5) is their average with the first step's
        for name, got, want in (("weight", weights, expected[1]), ("ema", ema, expected[2])):
            for i, (a, b, g) in enumerate(zip(got, want, expected[0], strict=True)):
                assert_adam_weights_close(a, b, g, lr=1e-3, msg=f"rank {rank} {name} {i}")
    _, _, _, moments, param_groups = torch.load(f"{out}.0")  # the optimizer state a checkpoint holds
    assert [g["params"] for g in param_groups] == [g["params"] for g in expected_state["param_groups"]]
    for i, (got, want) in enumerate(zip(moments, _moments(expected_state), strict=True)):
        for name, a, b in zip(("step", "exp_avg", "exp_avg_sq"), got, want):
            # to rounding, relative to the largest moment: the second step's gradients are taken at weights that
            # already differ where the first step was ill-conditioned (measured on a loaded 2-core CI machine:
            # 1.5e-5 of the largest exp_avg; a wrong reduction or a lost shard is off by its whole size)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(),
                                       msg=lambda m: f"optimizer {name} {i}: {m}")  # fmt: skip
    initial = [p.cpu() for p in _module("cpu", sdxl=sdxl).unet.parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(expected[2], initial)) > 1e-4  # the EMA moved: can fail


def test_two_fsdp_gloo_ranks_equal_one_process_on_the_doubled_batch(tmp_path):
    _check(tmp_path, "gloo", False, "cpu", checkpointing=True)  # with the U-Net's activation checkpointing


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_fsdp_gpus_equal_one_gpu_on_the_doubled_batch(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    _check(tmp_path, "nccl", True, "cuda:0")


# --- the config: what +trainer/strategy=fsdp builds, and what it refuses at start-up ---------------------------
def test_the_fsdp_config_builds_the_strategy_with_a_block_wrap_policy_and_launches_ranks(tmp_path):
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from ldm.run.launch import ranks_to_launch
    from ldm.training.fsdp import ShardedUNetStrategy

    cfg = compose_config(tmp_path, tmp_path / "run", ["+trainer/strategy=fsdp", "trainer.devices=2"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, ShardedUNetStrategy) and strategy.sharded_module == "unet"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {ResnetBlock2D, Transformer2DModel}
    assert strategy.kwargs["use_orig_params"] is True  # the optimizer and the EMA see the U-Net's own parameters
    assert ranks_to_launch(cfg.trainer) == 2


@pytest.mark.parametrize("overrides, message", [
    (["model.ema_decay=null"], r"^model\.ema_decay=null with \+trainer/strategy=fsdp: "),
    (["callbacks.fid.use_ema=false"], r"^callbacks\.fid\.use_ema=false with \+trainer/strategy=fsdp"),
    (["model.compile=true"], r"^model\.compile with \+trainer/strategy=fsdp is not supported"),
    (["model.channels_last=true"], r"^model\.channels_last with \+trainer/strategy=fsdp is not supported"),
    (["trainer.precision=16-mixed"], r"^trainer\.precision=16-mixed with \+trainer/strategy=fsdp"),
])  # fmt: skip
def test_what_fsdp_cannot_do_is_refused_in_one_line(tmp_path, overrides, message):
    from ldm.run.validate import ConfigError, validate_config

    # model.compile=false: the shapes experiments compile (CUDA graphs on a GPU), which FSDP refuses first
    fsdp = ["+trainer/strategy=fsdp", "trainer.devices=2", "model.compile=false"]
    cfg = compose_config(tmp_path, tmp_path / "run", [*fsdp, *overrides])
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_fsdp_for_a_stage_without_a_unet_is_refused(tmp_path):
    from ldm.run.validate import ConfigError, validate_config

    cfg = compose_config(tmp_path, tmp_path / "run", ["+trainer/strategy=fsdp"], experiment="shapes_vae", tiny=False)
    with pytest.raises(ConfigError, match=r"^\+trainer/strategy=fsdp shards the latent-diffusion U-Net; model=.*"
                                          r"AutoencoderModule has none"):  # fmt: skip
        validate_config(cfg)


def test_lightnings_own_fsdp_string_is_refused(tmp_path):
    from ldm.run.validate import ConfigError, validate_config

    cfg = compose_config(tmp_path, tmp_path / "run", ["trainer.strategy=fsdp", "trainer.devices=2"])
    with pytest.raises(ConfigError, match=r"^trainer\.strategy=fsdp: .* use \+trainer/strategy=fsdp$"):
        validate_config(cfg)


def test_a_refused_fsdp_config_stops_the_command_line_before_any_rank_starts(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ldm.train", "experiment=shapes", f"paths.data_dir={tmp_path}",
                          *TINY, "trainer.devices=2", "+trainer/strategy=fsdp", "model.ema_decay=null",
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: model.ema_decay=null with +trainer/strategy=fsdp")
    assert not (tmp_path / "run" / "launch").exists()  # torchrun never ran


# --- through the real CLI: `ldm.train` on 2 FSDP ranks (gloo), compared with DDP ------------------------------
def _ldm_train(cwd, run_dir, root, *args, device_args=()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")]))  # fault_helpers
    command = [sys.executable, "-m", "ldm.train", "experiment=shapes", f"paths.data_dir={root}", *TINY, *TINY_UNET,
               "logger=csv", "trainer.gradient_clip_val=0.01", f"hydra.run.dir={run_dir}", *args]
    out = subprocess.run([*command, *device_args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


def _assert_same_checkpoint(got: dict, want: dict, exact: bool = False) -> None:
    """Weights, EMA and AdamW moments equal, same step. Not `exact`: to rounding (FSDP reduces gradients in another
    order than DDP); AdamW's step moves a weight by about lr (1e-4) whatever its gradient, so weights agree to 1 % of a
    step, and the moments, which scale with the (clipped) gradients, to 1e-5 of their largest value."""
    assert got["global_step"] == want["global_step"]
    assert got["state_dict"].keys() == want["state_dict"].keys()
    tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-6}
    for key, value in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, **tolerance, msg=lambda m: f"{key}: {m}")
    assert [g["params"] for g in got["optimizer_states"][0]["param_groups"]] == [
        g["params"] for g in want["optimizer_states"][0]["param_groups"]]
    for i, _ in enumerate(want["optimizer_states"][0]["state"]):
        for name, value in want["optimizer_states"][0]["state"][i].items():
            torch.testing.assert_close(got["optimizer_states"][0]["state"][i][name], value, rtol=tolerance["rtol"],
                                       atol=0 if exact else 1e-5 * value.abs().max().item(),
                                       msg=lambda m: f"optimizer {name} {i}: {m}")  # fmt: skip


GPU_RUN = ["trainer.accelerator=gpu", "callbacks.fid.num_images=4"]  # fused AdamW, device-side non-finite guard


@pytest.mark.parametrize("device_args", [
    pytest.param([], marks=pytest.mark.slow, id="cpu"),  # three 2-rank runs and a one-process run: ~5 min on 2 cores
    pytest.param(GPU_RUN, id="gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                                               reason="needs 2 GPUs")]),
])  # fmt: skip
def test_fsdp_training_run_equals_ddp_resumes_exactly_and_exports(tmp_path, device_args):
    from diffusers import StableDiffusionPipeline

    from ldm.training.checkpoint import read_checkpoint

    root = make_tiny_root(tmp_path / "tiny")
    fsdp, ddp, resumed, single = (tmp_path / name for name in ("fsdp", "ddp", "resumed", "single"))
    _ldm_train(tmp_path, fsdp, root, "trainer.devices=2", "+trainer/strategy=fsdp", device_args=device_args)
    _ldm_train(tmp_path, ddp, root, "trainer.devices=2", "+trainer/strategy=ddp", device_args=device_args)
    step1 = fsdp / "checkpoints" / "epoch=0-step=1.ckpt"
    got, want = (read_checkpoint(run / "checkpoints" / "last.ckpt") for run in (fsdp, ddp))
    _assert_same_checkpoint(got, want)
    assert sum(k.startswith("ema.module.") for k in got["state_dict"]) > 0
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in got["state_dict"])  # frozen parts left out
    # the clip bound, over all shards: AdamW's first moment after step 1 is (1 - beta1) * the clipped gradient
    first = read_checkpoint(step1)["optimizer_states"][0]["state"]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s["exp_avg"]) for s in first.values()]))
    torch.testing.assert_close(norm.item(), 0.1 * 0.01, rtol=1e-5, atol=0)

    # resumed under FSDP from step 1: the step-2 checkpoint of the uninterrupted run (bit for bit on the CPU)
    _ldm_train(tmp_path, resumed, root, "trainer.devices=2", "+trainer/strategy=fsdp", f"ckpt_path='{step1}'",
               device_args=device_args)
    _assert_same_checkpoint(read_checkpoint(resumed / "checkpoints" / "last.ckpt"), got, exact=not device_args)

    # the FSDP checkpoint in one process: training resumes from it (its AdamW moments restored) ...
    _ldm_train(tmp_path, single, root, "trainer.devices=1", f"ckpt_path='{step1}'", device_args=device_args)
    state = read_checkpoint(single / "checkpoints" / "last.ckpt")["optimizer_states"][0]["state"]
    assert all(s["step"].item() == 2 for s in state.values())
    # ... and `ldm.export` writes a pipeline holding its EMA weights, as did the run's own export callback
    subprocess.run([sys.executable, "-m", "ldm.export", str(fsdp / "checkpoints" / "last.ckpt"), str(tmp_path / "exported")],
                   check=True, cwd=tmp_path, capture_output=True)  # fmt: skip
    for folder in (tmp_path / "exported", fsdp / "pipeline"):
        unet = StableDiffusionPipeline.from_pretrained(folder).unet
        for name, value in unet.state_dict().items():
            torch.testing.assert_close(value, got["state_dict"][f"ema.module.{name}"], rtol=0, atol=0)


@pytest.mark.slow  # one 2-rank run of ldm.train: ~1.5 min on 2 cores
def test_a_nan_batch_under_fsdp_skips_the_step_on_both_ranks(tmp_path):
    """The non-finite guard (callbacks.nonfinite) judges each rank's gradient shard and all ranks skip together:
    the poisoned step changes no weight, EMA or AdamW moment; the next step trains."""
    from ldm.training.checkpoint import read_checkpoint

    root = make_tiny_root(tmp_path / "tiny")
    run = tmp_path / "run"
    _ldm_train(tmp_path, run, root, "trainer.devices=2", "+trainer/strategy=fsdp", "trainer.max_steps=3",
               "callbacks.fid=null", "callbacks.export=null", "callbacks.sample_grid=null",
               "+callbacks.poison._target_=fault_helpers.PoisonBatches", "+callbacks.poison.steps=[1]")  # fmt: skip
    step1, step2, last = (read_checkpoint(run / "checkpoints" / name)
                          for name in ("epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"))  # fmt: skip
    for key, value in step1["state_dict"].items():
        assert torch.equal(step2["state_dict"][key], value), key
    assert all(s["step"] == 1 for s in step2["optimizer_states"][0]["state"].values())
    assert all(s["step"] == 2 for s in last["optimizer_states"][0]["state"].values())
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert any(not torch.equal(last["state_dict"][k], v) for k, v in step2["state_dict"].items() if k.startswith("unet."))
    assert last["callbacks"]["NonFiniteLoss"]["skipped"] == 1
