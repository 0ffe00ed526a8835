"""On a CPU run, torch's thread count follows the cores that other processes leave free (ldm/utils/cpu.py says why).

    CPUThreads(every_n_seconds=10)   # conf/callbacks/cpu_threads.yaml, first in every stage's list

At the start of fit it watches the machine for `startup_seconds` (this process idle) and sets
`torch.set_num_threads` to one thread per free core; then, every `every_n_seconds` of training, it measures what
the other processes used since the last look (the machine's busy time minus this process tree's) and sets the
count again, so a process that starts or stops beside a run is followed within seconds. Logs `train/cpu_threads`.
Does nothing on GPU runs, or where `/proc` is missing, or when `threads` fixes the count.
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from ldm.utils.cpu import CPUSample, available_cores, threads_for


class CPUThreads(pl.Callback):
    def __init__(self, every_n_seconds: float = 10.0, startup_seconds: float = 0.3, threads: int | None = None):
        if threads is not None and threads < 1:
            raise ValueError(f"callbacks.cpu_threads.threads must be >= 1 or null, got {threads}")
        self.every = every_n_seconds
        self.startup = startup_seconds
        self.fixed = threads
        self.cores = available_cores()
        self._sample: CPUSample | None = None
        self.active = False

    def on_fit_start(self, trainer, pl_module):
        self.active = pl_module.device.type == "cpu"
        if not self.active:
            return
        if self.fixed is not None:
            return self._set(self.fixed, "fixed by callbacks.cpu_threads.threads")
        first = CPUSample.now()
        if first is None:
            self.active = False
            return
        time.sleep(self.startup)  # this process idle: what is busy now is the others
        self._sample = CPUSample.now()
        others = first.others_busy(self._sample)
        self._set(threads_for(self.cores, others), f"other processes busy on {others:.1f} of {self.cores} cores")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.active or self._sample is None or time.monotonic() - self._sample.wall < self.every:
            return
        now = CPUSample.now()
        others = self._sample.others_busy(now)
        self._sample = now
        self._set(threads_for(self.cores, others), f"other processes busy on {others:.1f} of {self.cores} cores")
        pl_module.log("train/cpu_threads", torch.tensor(float(torch.get_num_threads())), batch_size=1)

    @staticmethod
    def _set(threads: int, why: str) -> None:
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            rank_zero_info(f"CPU threads: {threads} ({why})")
