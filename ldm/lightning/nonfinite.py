"""Skip optimizer steps whose loss (or gradient) is NaN or infinite; stop after `max_in_a_row` in a row.

A skipped step changes no weight, no optimizer moment and no EMA: the gradients are dropped before the
optimizer runs (an optimizer skips parameters without a gradient). The batch is consumed and the step
counter and LR schedule advance. Gradients are checked too (one norm over all of them): an infinite
gradient of a finite loss would turn into NaN weights through gradient clipping. With fp16's GradScaler,
which skips overflowing steps itself, only the loss is checked. Under DDP all ranks skip together: a non-finite loss on any rank skips
the step everywhere. Skips are counted in `train/nonfinite_steps`; the checkpoints written before stay
valid, since skipped steps leave the weights as they were.

    Trainer(callbacks=[NonFiniteLoss(max_in_a_row=5)])
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: training stopped."""


class NonFiniteLoss(pl.Callback):
    def __init__(self, max_in_a_row: int = 5):
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.skipped = 0  # in all (kept in checkpoints)
        self.in_a_row = 0
        self._bad = False

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._bad = self._bad or not bool(torch.isfinite(loss.detach()).all())  # any micro-batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        what = "loss"
        if not self._bad and getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self._bad = bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
            what = "gradient"
        bad = trainer.strategy.reduce_boolean_decision(self._bad, all=False)  # one rank bad: all skip
        self._bad = False
        if not bad:
            self.in_a_row = 0
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        self.in_a_row += 1
        step = trainer.global_step + 1
        if self.in_a_row >= self.max_in_a_row:  # the loss, or a gradient
            raise NonFiniteLossError(
                f"non-finite {what} at step {step}, {self.in_a_row} steps in a row (max_in_a_row="
                f"{self.max_in_a_row}); stopping. The checkpoints written so far hold the weights before them"
            )
        rank_zero_warn(f"non-finite {what} at step {step}: step skipped ({self.in_a_row} in a row, "
                       f"{self.skipped} in all)")  # fmt: skip

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.log("train/nonfinite_steps", float(self.skipped), batch_size=1)

    def state_dict(self):
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict):
        self.skipped, self.in_a_row = state_dict["skipped"], state_dict["in_a_row"]
