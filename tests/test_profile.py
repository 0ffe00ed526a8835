"""StepProfile (ldm/callbacks/profile.py): the interval union against a brute-force count, and a real tiny `ldm.train`
run with the profile callback added the way README shows it, whose summary and trace are read back."""

from __future__ import annotations

import gzip
import json
import random

from tiny import compose_config, make_tiny_root

from types import SimpleNamespace

import torch

from ldm.callbacks.profile import busy_time, is_sync, summarise
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
