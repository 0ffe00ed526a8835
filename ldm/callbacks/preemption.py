"""Preemption: on SIGTERM or SIGUSR1, save a checkpoint at the next step boundary and stop cleanly.

Clusters warn before they kill (SLURM: `#SBATCH --signal=USR1@120`, or SIGTERM on `scancel` and
preemption). The handler only sets a flag; at the end of the running step the callback writes
`checkpoints/last.ckpt` (atomically) and raises `Preempted`, which `ldm.train` turns into the exit code
`exit_code` (0 by default; e.g. 3 for a wrapper that requeues on it). End-of-training work (sample
grids, FID, export) is skipped: the grace period is short. Resume with `resume=auto`. Under DDP all
ranks stop at the same step when any rank got the signal.

    Trainer(callbacks=[Preemption(exit_code=3)])
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Preemption(pl.Callback):
    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), exit_code: int = 0,
                 filename: str = "last.ckpt"):  # fmt: skip
        self.signals = [getattr(signal, name) if isinstance(name, str) else signal.Signals(name) for name in signals]
        self.exit_code = exit_code
        self.filename = filename
        self.received: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer, pl_module):
        self.received = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handler) for sig in self.signals}

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        received = self.received is not None
        if trainer.world_size > 1:
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        checkpoint_dir = getattr(trainer.checkpoint_callback, "dirpath", None)
        path = Path(checkpoint_dir or Path(trainer.default_root_dir) / "checkpoints") / self.filename
        trainer.save_checkpoint(path)
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        message = f"preempted by {name}: saved {path} at step {trainer.global_step}; resume with resume=auto"
        rank_zero_info(message)
        self._restore()
        raise Preempted(message, self.exit_code)

    def on_train_end(self, trainer, pl_module):
        self._restore()

    def on_exception(self, trainer, pl_module, exception):
        self._restore()
