"""StepProfile (ldm/callbacks/profile.py): the interval union against a brute-force count, and a real tiny `ldm.train`
run with the profile callback added the way README shows it, whose summary and trace are read back."""

from __future__ import annotations

import gzip
import json
import random

from tiny import compose_config, make_tiny_root

from types import SimpleNamespace

import torch

from ldm.callbacks.profile import KERNEL_KINDS, busy_time, call_site, is_sync, kind_of, summarise
from ldm.run.fit import train


def test_busy_time_is_the_length_of_the_union():
    rng = random.Random(0)
    for _ in range(200):
        intervals = [(s, s + rng.randint(0, 15)) for s in (rng.randint(0, 60) for _ in range(rng.randint(0, 8)))]
        covered = {x for start, end in intervals for x in range(start, end)}  # unit cells [x, x + 1)
        assert busy_time(intervals) == len(covered), intervals


def test_host_waits_are_told_from_asynchronous_calls():
    assert is_sync("cudaStreamSynchronize") and is_sync("cudaDeviceSynchronize") and is_sync("cudaMemcpy")
    assert not is_sync("cudaMemcpyAsync") and not is_sync("cudaLaunchKernel")


def test_the_busy_time_counts_kernels_not_annotations():
    """On a GPU the optimizer step's `record_function` range lies on the device timeline too, around the whole step:
    counting it would call a GPU that idles between kernels busy (session 13's first profile said 92 % for 35 %)."""
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, start, end, device=cuda, annotation=False):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device,
                               is_user_annotation=annotation, cpu_time_total=end - start)  # fmt: skip

    events = [event("Optimizer.step#AdamW.step", 0, 10_000, annotation=True), event("gemm", 1_000, 2_000),
              event("conv", 1_500, 3_000), event("lerp", 9_000, 9_500), event("cudaStreamSynchronize", 9_600, 9_700, cpu),
              event("enumerate(DataLoader)#_MultiProcessingDataLoaderIter.__next__", 0, 400, cpu)]  # fmt: skip
    out = summarise(events, steps=2, wall_s=0.02)
    assert out["step_ms"] == 10 and out["kernels_per_step"] == 1.5
    assert out["gpu_busy_ms"] == 1.25 and out["gpu_busy_fraction"] == 0.125  # (2,000 + 500) us over 2 steps
    assert out["host_syncs_per_step"] == 0.5 and out["host_sync_ms"] == 0.05 and out["loader_wait_ms"] == 0.2
    assert out["gpu_ms_by_kind"] == {"convolution": 0.75, "matmul": 0.5, "other": 0.25}  # the annotation left out


def test_kernels_are_told_by_kind_from_their_names():
    """Names as one H200's profiles gave them (session 26, the LoRA step)."""
    kinds = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1x1x1_kernel0_0": "attention",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>": "layout transposes (cuDNN NCHW<->NHWC)",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
        "void cutlass::Kernel2<cutlass_80_tensorop_s16816gemm_bf16_64x64_32x6_nt_align2>": KERNEL_KINDS[4][0],
        "nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NNT": "matmul",
        "triton_poi_fused_cat_gelu_gelu_backward_mul_split_view_6": "triton (fused elementwise, norms)",
        "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_": "copies / casts",
    }  # fmt: skip
    assert {name: kind_of(name) for name in kinds} == kinds


def _read_back(x: torch.Tensor) -> float:
    return x.sum().item()


def _step() -> float:
    return _read_back(torch.randn(8) * 2)


def test_a_read_back_is_traced_to_its_python_caller():
    """Recorded with stacks, a host read-back (`.item()`, on a GPU a synchronising copy) names the function that
    made it and its callers, not torch's own frames."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as prof:
        _step()
    event = next(e for e in prof.events() if e.name == "aten::_local_scalar_dense")
    site = call_site(event)
    assert site is not None
    frames = site.split(" <- ")
    assert frames[0].startswith("test_profile.py:") and frames[0].endswith(" _read_back"), site
    assert frames[1].endswith(" _step") and len(frames) == 3


def test_host_syncs_are_counted_by_call_site():
    cpu = torch.autograd.DeviceType.CPU

    def frame(name, parent=None):
        return SimpleNamespace(name=name, cpu_parent=parent)

    caller = frame("/x/ldm/stages/latent_diffusion.py(430): training_step", frame("/x/lightning/loop.py(9): run"))
    inner = frame("/x/site-packages/torch/_tensor.py(77): item", frame("/x/ldm/callbacks/nonfinite.py(58): check", caller))

    def sync(parent):
        return SimpleNamespace(name="cudaStreamSynchronize", time_range=SimpleNamespace(start=0, end=1),
                               device_type=cpu, is_user_annotation=False, cpu_time_total=1, cpu_parent=parent)  # fmt: skip

    out = summarise([sync(inner), sync(inner), sync(caller), sync(None)], steps=2, wall_s=0.01)
    assert out["host_syncs_per_step"] == 2
    assert out["host_syncs_where"] == {
        "nonfinite.py:58 check <- latent_diffusion.py:430 training_step <- loop.py:9 run": 2,  # torch's frame skipped
        "latent_diffusion.py:430 training_step <- loop.py:9 run": 1,
    }  # and the sync without Python frames above it (recorded without stacks) has no site


def test_a_run_writes_its_window_summary_and_trace(tmp_path):
    root = make_tiny_root(tmp_path / "root")
    run = tmp_path / "run"
    cfg = compose_config(root, run, ["callbacks=[ldm,profile]", "callbacks.profile.start=2", "callbacks.profile.steps=3",
                                     "callbacks.profile.python_steps=2", "callbacks.profile.row_limit=300",
                                     "trainer.max_steps=7", "logger=none"])  # fmt: skip
    train(cfg)
    summary = json.loads((run / "profile" / "summary.json").read_text())
    assert summary["first_step"] == 2 and summary["steps"] == 3
    assert summary["step_ms"] > 0 and summary["loader_wait_ms"] >= 0
    assert summary["gpu_busy_ms"] is None and summary["host_syncs_per_step"] == 0  # CPU: no device, no CUDA calls
    text = (run / "profile" / "summary.txt").read_text()
    assert "# by host time" in text and "aten::convolution" in text  # the U-Net's ops were recorded
    with gzip.open(run / "profile" / "trace.json.gz") as f:
        trace = json.load(f)
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
    # then the host's Python time over the next two steps (5 and 6), in ms a step: the training step is in it, and
    # inside the loop's own step, which holds it (and the optimizer and callbacks)
    python = (run / "profile" / "host_python.txt").read_text()
    assert python.startswith("# steps 5..6\n") and "ms a step over 2 steps" in python
    rows = {line.split()[-1]: [float(x) for x in line.split()[:3]] for line in python.splitlines()
            if line and not line.startswith("#") and not line.lstrip().startswith("cumulative")}  # fmt: skip
    step = next(v for k, v in rows.items() if k.endswith("(training_step)") and "latent_diffusion" in k)
    loop = next(v for k, v in rows.items() if k.startswith("training_epoch_loop.py") and k.endswith("(advance)"))
    assert step[2] == 1.0 and loop[2] == 1.0  # once a step
    assert 0 < step[0] < loop[0] <= summary["step_ms"] * 50
    # cProfile's own file of the same steps: who called the training step (Lightning's strategy, once a step)
    import pstats

    stats = pstats.Stats(str(run / "profile" / "host_python.pstats"))
    (key,) = [k for k in stats.stats if k[2] == "training_step" and "latent_diffusion" in k[0]]
    callers = stats.stats[key][4]
    assert [c[2] for c in callers] == ["training_step"] and sum(v[0] for v in callers.values()) == 2
