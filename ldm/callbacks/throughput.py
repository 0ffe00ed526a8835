"""Speed: `train/images_per_sec` and friends while training (`Throughput`), and a timed window for benchmarks
(`StepTimer`, what scripts/bench_train.py reads).

    Trainer(callbacks=[Throughput(log_every_n_steps=10)])       # conf/callbacks/throughput.yaml
    Trainer(callbacks=[StepTimer(warmup=10, out="timing.json")])
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from ldm.stages.base import batch_size


def host(value: float) -> torch.Tensor:
    """A number to log, as a CPU tensor: `LightningModule.log` copies a Python number to the module's device, and
    on a GPU that copy (from pageable memory) waits for every queued kernel: a host sync per logged number."""
    return torch.tensor(float(value), dtype=torch.float64)


def allocator_counts(device: torch.device) -> dict[str, int]:
    """The CUDA caching allocator's counters so far: cudaMalloc and cudaFree calls, retries after a failed one."""
    stats = torch.cuda.memory_stats(device)
    return {key: int(stats.get(key, 0)) for key in ("num_device_alloc", "num_device_free", "num_alloc_retries")}


class Throughput(pl.Callback):
    """Logs `train/images_per_sec` (all ranks together), `train/elapsed_seconds` (wall time since the fit
    started, evaluations and start-up included: curves against time), `train/images_seen` (the stage's count,
    `ldm.stages.base.Stage.images_seen`) and `train/lr` (Lightning's LearningRateMonitor refuses to run without a
    logger; this works with `logger=none`). Writes where start-up went to the log: set-up before the loop
    (models, callbacks' reference statistics) and the first step (compilation, CUDA graph capture, autotuning)."""

    def __init__(self, log_every_n_steps: int = 10):
        self.every = log_every_n_steps
        self._t0: float | None = None
        self._images = 0
        self._fit_start: float | None = None
        self._first_step_told = False

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":  # before the models are configured and before any callback's on_fit_start
            self._fit_start = time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        if self._fit_start is not None:
            rank_zero_info(f"start-up: the training loop began {time.perf_counter() - self._fit_start:.1f} s after "
                           f"the fit started (models, data, callbacks' set-up)")  # fmt: skip

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if not self._first_step_told:  # _t0 is still the first step's start
            rank_zero_info(f"start-up: the first step took {now - self._t0:.1f} s on the host (compilation, "
                           f"CUDA graph capture, autotuning)")  # fmt: skip
            self._first_step_told = True
        self._images += batch_size(batch) * trainer.world_size
        if trainer.global_step % self.every == 0 and self._t0 is not None:
            elapsed = now - self._t0
            pl_module.log("train/images_per_sec", host(self._images / max(elapsed, 1e-9)), batch_size=1)
            if self._fit_start is not None:
                pl_module.log("train/elapsed_seconds", host(now - self._fit_start), batch_size=1)
            self._t0, self._images = time.perf_counter(), 0
        pl_module.log("train/images_seen", host(pl_module.images_seen), batch_size=1)
        if trainer.optimizers:
            pl_module.log("train/lr", host(trainer.optimizers[0].param_groups[0]["lr"]), batch_size=1)


class StepTimer(pl.Callback):
    """Times training steps after `warmup` of them (compilation, autotuning, loader start-up): writes
    {"images_per_sec", "step_seconds", "steps", "batch_size", "peak_memory_gib", "world_size"} as JSON to `out`
    (rank 0) and logs `bench/images_per_sec`. GPU work is synchronised only at the window's two ends. On a GPU the
    JSON also holds `peak_reserved_gib` and `allocator`: the caching allocator's cudaMalloc and cudaFree calls and
    its retries (each retry frees cached blocks and waits for the GPU) within the window, which changing batch
    shapes (buckets) can cause."""

    def __init__(self, warmup: int = 10, out: str | None = None):
        self.warmup, self.out = warmup, out
        self._t0 = None
        self._steps = self._images = 0
        self._allocator: dict[str, int] = {}  # the counters where the window opens (GPU only) and closes
        self._allocator_end: dict[str, int] | None = None

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self._t0 is None:
            self._sync(pl_module)
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
                self._allocator = allocator_counts(pl_module.device)
            self._t0 = time.perf_counter()
            rank_zero_info(f"StepTimer: {self.warmup} warm-up steps done; timing from here")
        if self._t0 is not None:
            self._steps += 1
            self._images += batch_size(batch) * trainer.world_size

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # the window closes at the last step, before end-of-fit work (a final checkpoint can take many seconds)
        if self._t0 is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            self._sync(pl_module)
            self._elapsed = time.perf_counter() - self._t0
            if self._allocator:
                self._allocator_end = allocator_counts(pl_module.device)

    def on_train_end(self, trainer, pl_module):
        if self._t0 is None or not self._steps:
            raise RuntimeError(f"StepTimer: no step after the {self.warmup} warm-up steps; raise trainer.max_steps")
        self._sync(pl_module)
        elapsed = getattr(self, "_elapsed", None) or time.perf_counter() - self._t0
        result = {
            "images_per_sec": self._images / elapsed,
            "step_seconds": elapsed / self._steps,
            "steps": self._steps,
            "batch_size": self._images // (self._steps * trainer.world_size),
            "world_size": trainer.world_size,
            "peak_memory_gib": torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            if pl_module.device.type == "cuda" else None,
        }  # fmt: skip
        if pl_module.device.type == "cuda":  # what the process holds: with CUDA graphs (mode=reduce-overhead) the
            # graphs' private memory pools are reserved before the window and their replays allocate nothing, so
            # the allocated peak leaves them out
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(pl_module.device) / 2**30
        if self._allocator:
            end = self._allocator_end or allocator_counts(pl_module.device)
            result["allocator"] = {k: v - self._allocator[k] for k, v in end.items()}
        rank_zero_info(f"StepTimer: {result}")
        if self.out and trainer.is_global_zero:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out).write_text(json.dumps(result))
