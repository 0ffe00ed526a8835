"""Where a training step's time goes: `StepProfile` records `steps` consecutive steps of a real run with
torch.profiler (host and, on a GPU, device activity) and writes what decides a small model's speed:

    python -m ldm.train experiment=cifar10 'callbacks=[ldm,profile]' callbacks.profile.start=1000

- `profile/summary.json`: per step, the wall time, the GPU's busy time (the union of its kernels' intervals) and
  its share of the wall time (a GPU busy 30 % of the time waits on the host the rest), the host's waits for the
  device (synchronising CUDA calls: their count and time) and for the data loader;
- `profile/summary.txt`: the same, the GPU's kernel time by kind (attention, convolutions, matrix products, cuDNN's
  layout transposes, ...: `kind_of`), then the ops with the most device time and the most host time;
- with `stacks=true` (Python stacks recorded: slower steps in the window, so not the default), `host_syncs_where`:
  each synchronising call's Python call site (the first frame outside torch and the two that called it), counted;
- `profile/trace.json.gz`: the timeline, for Perfetto (ui.perfetto.dev) or chrome://tracing;
- `profile/host_python.txt`: where the host's Python time goes, function by function in milliseconds a step
  (cProfile, over the `python_steps` steps after the first window, so that neither profiler slows the other's
  steps): what Lightning's loop, the callbacks, the optimizer and the EMA cost a step that waits on the host;
  `profile/host_python.pstats`, cProfile's own file of the same steps (who calls what: `python -m pstats FILE`).

The window opens after `start` steps (compilation, cuDNN autotuning and the loader's start are over by then) and
costs those few steps some speed; the rest of the run is not profiled.
"""

from __future__ import annotations

import cProfile
import gzip
import json
import pstats
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch.profiler import ProfilerActivity, profile

LOADER_NEXT = "enumerate(DataLoader)"  # torch's DataLoader records each __next__ under this name
FRAME = re.compile(r"^(?P<file>.+\.py)\((?P<line>\d+)\): (?P<func>.+)$")  # a Python frame's event (with_stack)


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of [start, end) intervals (any order, overlapping or not)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


KERNEL_KINDS = [  # (kind, substrings of the lower-cased CUDA kernel name), first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn::fusion")),
    ("layout transposes (cuDNN NCHW<->NHWC)", ("nchwtonhwc", "nhwctonchw")),
    ("convolution", ("conv", "implicit_gemm", "dgrad", "wgrad", "fprop", "xmma_fprop", "sm90_xmma")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "norm_kernel", "lpnorm")),
    ("matmul on narrow operands (Ampere kernels, align1/align2)", ("_align1", "_align2")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_", "cublas")),
    ("triton (fused elementwise, norms)", ("triton",)),
    ("copies / casts", ("copy", "cast", "convert")),
]


def kind_of(name: str) -> str:
    """The kind of a CUDA kernel by its name (KERNEL_KINDS), "other" for none."""
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def is_sync(name: str) -> bool:
    """A CUDA runtime call that makes the host wait: synchronisations and blocking (non-async) copies."""
    return name.startswith(("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")) or name in (
        "cudaMemcpy", "cudaMemcpy2D")  # fmt: skip


def is_kernel(event) -> bool:
    """Device work (a kernel, copy or memset), not a user annotation: `record_function` ranges (the optimizer step,
    `## Call CompiledFxGraph`) appear on the device timeline too, spanning the step, gaps included."""
    return event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


def call_site(event, frames: int = 3) -> str | None:
    """Where an event was called from, by the Python frames above it (a profile recorded with stacks): the first
    frame outside torch's own package and the ones that called it, "file:line function <- ...", or None."""
    found, parent = [], getattr(event, "cpu_parent", None)
    while parent is not None and len(found) < frames:
        frame = FRAME.match(parent.name)
        if frame and (found or "/torch/" not in frame["file"]):
            found.append(f"{Path(frame['file']).name}:{frame['line']} {frame['func']}")
        parent = parent.cpu_parent
    return " <- ".join(found) or None


def summarise(events, steps: int, wall_s: float) -> dict:
    """Per-step figures from a profiler's events (`profile.events()`) over `steps` steps lasting `wall_s`."""
    device = [e for e in events if is_kernel(e)]
    kernels = [(e.time_range.start, e.time_range.end) for e in device]
    syncs = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and is_sync(e.name)]
    loader = [e for e in events if e.name.startswith(LOADER_NEXT)]
    step_ms = 1000 * wall_s / steps
    out = {
        "steps": steps,
        "step_ms": step_ms,
        "loader_wait_ms": sum(e.cpu_time_total for e in loader) / 1000 / steps,
        "host_syncs_per_step": len(syncs) / steps,
        "host_sync_ms": sum(e.cpu_time_total for e in syncs) / 1000 / steps,
        "gpu_busy_ms": None,
        "gpu_busy_fraction": None,
        "kernels_per_step": None,
    }
    if kernels:
        busy_ms = busy_time(kernels) / 1000 / steps
        out.update(gpu_busy_ms=busy_ms, gpu_busy_fraction=busy_ms / step_ms, kernels_per_step=len(kernels) / steps)
        kinds = Counter()
        for e in device:
            kinds[kind_of(e.name)] += (e.time_range.end - e.time_range.start) / 1000 / steps
        out["gpu_ms_by_kind"] = dict(kinds.most_common())  # kernel time, overlaps counted twice
    sites = Counter(site for site in map(call_site, syncs) if site)
    if sites:
        out["host_syncs_where"] = dict(sites.most_common(10))
    return out


def python_table(stats: pstats.Stats, steps: int, row_limit: int) -> str:
    """cProfile's figures as milliseconds a step: the functions with the most time inclusive of what they call
    (the loop's structure: which hook or phase costs what), then the most time in their own code."""
    rows = [(ct, tt, nc, f"{Path(file).name}:{line}({name})" if line else name)
            for (file, line, name), (_, nc, tt, ct, _) in stats.stats.items()]  # fmt: skip

    def table(title: str, key: int) -> str:
        head = f"# {title}, ms a step over {steps} steps\n{'cumulative':>11} {'own':>8} {'calls':>7}  function"
        body = [f"{1e3 * ct / steps:11.3f} {1e3 * tt / steps:8.3f} {nc / steps:7.1f}  {where}"
                for ct, tt, nc, where in sorted(rows, key=lambda r: -r[key])[:row_limit]]  # fmt: skip
        return "\n".join([head, *body])

    return table("by time with callees", 0) + "\n\n" + table("by own time", 1) + "\n"


class StepProfile(pl.Callback):
    """Profiles training steps `start` .. `start + steps - 1` (global steps) on rank 0 and writes summary.json,
    summary.txt and trace.json.gz under `out` (default: the run directory's `profile/`); then the host's Python
    time over the next `python_steps` steps (0: not) to host_python.txt."""

    def __init__(self, start: int = 100, steps: int = 10, out: str | None = None, row_limit: int = 30,
                 python_steps: int = 10, stacks: bool = False):  # fmt: skip
        if start < 0 or steps < 1 or python_steps < 0:
            raise ValueError(f"StepProfile: start must be >= 0, steps >= 1 and python_steps >= 0, got start={start}, "
                             f"steps={steps}, python_steps={python_steps}")  # fmt: skip
        self.start, self.steps, self.out, self.row_limit = start, steps, out, row_limit
        self.python_steps, self.stacks = python_steps, stacks
        self._prof: profile | None = None
        self._python: cProfile.Profile | None = None
        self._python_first = 0
        self._t0 = 0.0
        self._done = False

    def _active(self, trainer) -> bool:
        return trainer.is_global_zero and not self._done

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._active(trainer) and self._prof is None and trainer.global_step >= self.start:
            activities = [ProfilerActivity.CPU]
            if pl_module.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
                torch.cuda.synchronize(pl_module.device)
            self._prof = profile(activities=activities, with_stack=self.stacks)
            self._prof.__enter__()
            self._first_step = trainer.global_step
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._python is not None and trainer.global_step - self._python_first >= self.python_steps:
            self._finish_python(trainer)
        if self._prof is not None and trainer.global_step - self._first_step >= self.steps:
            self._finish(trainer, pl_module)
            if self.python_steps:  # from here to this hook in `python_steps` steps: whole steps
                self._python_first = trainer.global_step
                self._python = cProfile.Profile()
                self._python.enable()

    def on_train_end(self, trainer, pl_module):
        if self._prof is not None:  # the run ended inside the window: what was recorded
            self._finish(trainer, pl_module)
        if self._python is not None:
            self._finish_python(trainer)

    def _dir(self, trainer) -> Path:
        out = Path(self.out or Path(trainer.default_root_dir) / "profile")
        out.mkdir(parents=True, exist_ok=True)
        return out

    def _finish_python(self, trainer) -> None:
        profiler, self._python = self._python, None
        profiler.disable()
        steps = trainer.global_step - self._python_first
        if steps < 1:
            return
        out = self._dir(trainer)
        text = python_table(pstats.Stats(profiler), steps, self.row_limit)
        (out / "host_python.txt").write_text(f"# steps {self._python_first}..{trainer.global_step - 1}\n" + text)
        profiler.dump_stats(out / "host_python.pstats")  # callers and callees: pstats.Stats(path).print_callers()

    def _finish(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        wall = time.perf_counter() - self._t0
        steps = trainer.global_step - self._first_step
        prof, self._prof, self._done = self._prof, None, True
        prof.__exit__(None, None, None)
        out = self._dir(trainer)
        summary = {"first_step": self._first_step, **summarise(prof.events(), max(steps, 1), wall)}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        table = prof.key_averages()
        device_sort = "self_device_time_total" if pl_module.device.type == "cuda" else "self_cpu_time_total"
        sites = summary.get("host_syncs_where", {})
        lines = [f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in summary.items()
                 if k not in ("host_syncs_where", "gpu_ms_by_kind")]  # fmt: skip
        text = "\n".join(lines)
        if summary.get("gpu_ms_by_kind"):
            text += "\n\n# GPU kernel time by kind, ms a step\n"
            text += "\n".join(f"{ms:9.3f}  {kind}" for kind, ms in summary["gpu_ms_by_kind"].items())
        if sites:
            text += "\n\n# host syncs by call site (count in the window)\n"
            text += "\n".join(f"{count:6d}  {site}" for site, count in sites.items())
        text += "\n\n# by device time\n" + table.table(sort_by=device_sort, row_limit=self.row_limit)
        text += "\n\n# by host time\n" + table.table(sort_by="self_cpu_time_total", row_limit=self.row_limit)
        (out / "summary.txt").write_text(text)
        raw = out / "trace.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(out / "trace.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
        rank_zero_info(f"StepProfile: steps {self._first_step}..{trainer.global_step - 1}: "
                       + ", ".join(lines) + f" (written to {out})")  # fmt: skip
