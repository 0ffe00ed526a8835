"""The run's clock: `trainer.max_time` as Lightning's `Timer` runs it, optionally with evaluations left out.

    TrainingClock(duration="00:00:12:00", exclude_evaluations=True)   # conf/callbacks/clock.yaml

With `exclude_evaluations`, the elapsed training time leaves out the seconds that callbacks spend evaluating the
model in the middle of training (in-training FID: ~30-60 s for 10,000 images on one H200), so a time budget buys the
same training whether a run measures itself on the way or not, and a denser FID curve does not shorten the run it
draws. An evaluating callback says what it spent as `eval_seconds`, a running total (`FIDCallback`,
`ReconstructionQuality`); the clock counts what it grew by since training (re)started in this process, so a total
restored from a checkpoint is not left out twice. Under DDP rank 0's clock decides for all ranks, as Lightning's
does. Compilation, data loading, checkpoints and the logging callbacks stay on the clock.

As a `Timer`, the clock keeps its elapsed time in checkpoints, and resuming continues it; Lightning builds no second
timer from `trainer.max_time` when one is in the callbacks.
"""

from __future__ import annotations

from pytorch_lightning.callbacks import Timer
from pytorch_lightning.trainer.states import RunningStage


class TrainingClock(Timer):
    """Lightning's step-interval `Timer`; with `exclude_evaluations`, training time less callbacks' `eval_seconds`."""

    def __init__(self, duration=None, exclude_evaluations: bool = False, verbose: bool = True):
        super().__init__(duration=duration, interval="step", verbose=verbose)
        self.exclude_evaluations = exclude_evaluations
        self._evaluators: list = []
        self._eval_start: float | None = None  # the evaluators' total when training (re)started
        self._eval_end: float | None = None    # ... and when it ended (the final evaluation comes after)

    def setup(self, trainer, pl_module, stage):
        self._evaluators = [cb for cb in trainer.callbacks if cb is not self and hasattr(cb, "eval_seconds")]

    def evaluation_seconds(self) -> float:
        """Seconds spent evaluating since training started in this process."""
        if not self.exclude_evaluations or self._eval_start is None:
            return 0.0
        now = self._eval_end if self._eval_end is not None else _total(self._evaluators)
        return now - self._eval_start

    def time_elapsed(self, stage: str = RunningStage.TRAINING) -> float:
        elapsed = super().time_elapsed(stage)
        return elapsed - self.evaluation_seconds() if RunningStage(stage) == RunningStage.TRAINING else elapsed

    def on_train_start(self, trainer, pl_module):
        self._eval_start, self._eval_end = _total(self._evaluators), None  # restored totals (resume) count once
        super().on_train_start(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        self._eval_end = _total(self._evaluators)


def _total(callbacks) -> float:
    return float(sum(cb.eval_seconds for cb in callbacks))
