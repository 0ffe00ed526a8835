"""Skip optimizer steps whose loss (or gradient) is NaN or infinite; stop after `max_in_a_row` in a row.

A skipped step changes no weight, no optimizer moment and no EMA. The batch is consumed and the step counter
and LR schedule advance. Gradients are checked too (one norm over all of them): an infinite gradient of a
finite loss would turn into NaN weights through gradient clipping. With fp16's GradScaler, which skips
overflowing steps itself, only the loss is checked. Under DDP all ranks skip together: a non-finite loss on
any rank skips the step everywhere. Skips are counted in `train/nonfinite_steps`; the checkpoints written
before stay valid, since skipped steps leave the weights as they were.

A stage that runs its whole step as one CUDA graph (`model.step_graph`) judges each step inside it, with the same
arithmetic (`ldm.training.optim.nonfinite_kind`, skipped by the fused optimizer's `found_inf`), when this guard is
on (`skip_nonfinite`, set here); the guard counts the verdicts it leaves (`step_verdict`) as below.

Two ways to skip, chosen per step from the optimizer:
- a fused optimizer (`fused=True`, the GPU default here): without waiting for the GPU. The verdict stays a
  device tensor handed to the optimizer as `found_inf` (torch's own protocol: the attribute through which its
  GradScaler tells fused kernels to skip) and to the module as `step_skipped` (`ldm.stages.base.Stage`), which
  its EMA update reads (`LatentDiffusion.optimizer_step`). Counts are read back
  every `check_every_n_steps` steps, so a run of `max_in_a_row` bad steps stops at the next check (the step
  named in the error is the one that completed the run). Two host syncs per step are saved.
- any other optimizer: the verdict is read at once and the gradients are dropped (an optimizer skips
  parameters without a gradient).

    Trainer(callbacks=[NonFiniteLoss(max_in_a_row=5)])
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_warn

from ldm.training.optim import is_fused, nonfinite_kind


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: training stopped."""


class NonFiniteLoss(pl.Callback):
    def __init__(self, max_in_a_row: int = 5, check_every_n_steps: int = 10):
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row must be >= 1, got {max_in_a_row}")
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.max_in_a_row = max_in_a_row
        self.check_every = check_every_n_steps
        self.skipped = 0  # in all (kept in checkpoints)
        self.in_a_row = 0
        self._loss_bad: torch.Tensor | None = None  # this step's micro-batches, on the device
        self._dev: dict[str, torch.Tensor] | None = None  # device-side counters of the fused path
        self._optimizer: torch.optim.Optimizer | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if hasattr(pl_module, "skip_nonfinite"):  # a graphed step judges itself, if asked to
            pl_module.skip_nonfinite = True

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if getattr(pl_module, "graphs_steps", False):  # judged inside the step's graph
            return
        bad = ~torch.isfinite(loss.detach()).all()  # any micro-batch
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if getattr(pl_module, "graphs_steps", False):
            return
        loss_bad, self._loss_bad = self._loss_bad, None
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if loss_bad is None:  # no backward through Lightning seen for this optimizer: judge the gradients only
            if not grads:
                return
            loss_bad = torch.zeros((), dtype=torch.bool, device=grads[0].device)
        norm = torch.nn.utils.get_total_norm(grads) if grads and not scaled else None
        grad_bad = ~torch.isfinite(norm) if norm is not None else torch.zeros_like(loss_bad)
        pl_module.grad_norm = norm  # gradient clipping, next, reuses it: one pass over the gradients, not two
        if is_fused(optimizer) and not scaled:
            self._skip_on_device(trainer, pl_module, optimizer, loss_bad, grad_bad)
            return
        what = "loss" if bool(loss_bad) else "gradient"
        bad = trainer.strategy.reduce_boolean_decision(bool(loss_bad | grad_bad), all=False)  # one rank bad: all skip
        if bad:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        self._count_on_host(trainer.global_step + 1, what if bad else None)

    def _count_on_host(self, step: int, what: str | None) -> None:
        """Count optimizer step ``step``, skipped for a non-finite ``what`` ("loss", "gradient") or not (None)."""
        if what is None:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        self._stop_if_too_many(step, what, self.in_a_row)
        rank_zero_warn(f"non-finite {what} at step {step}: step skipped ({self.in_a_row} in a row, {self.skipped} in "
                       "all)")  # fmt: skip

    # --- the fused path: verdicts and counters stay on the device ----------------------------------------
    def _skip_on_device(self, trainer, pl_module, optimizer, loss_bad: torch.Tensor, grad_bad: torch.Tensor) -> None:
        kind = nonfinite_kind(loss_bad, grad_bad)  # 1 loss, 2 gradient
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(kind, op=dist.ReduceOp.MAX)  # asynchronous to the host on NCCL
        bad = self._count_on_device(trainer.global_step + 1, kind)
        optimizer.found_inf = bad  # read by torch's fused kernel: it skips the step on the device
        pl_module.step_skipped = bad  # read by the module's EMA update
        self._optimizer = optimizer

    def _count_on_device(self, step: int, kind: torch.Tensor) -> torch.Tensor:
        """Count optimizer step ``step``'s verdict (0 finite, 1 loss, 2 gradient) in the device counters; returns its
        0/1 float skip flag."""
        bad = (kind > 0).float()
        if self._dev is None or self._dev["skipped"].device != bad.device:
            zero = torch.zeros((), device=bad.device)
            self._dev = {"skipped": zero + self.skipped, "run": zero + self.in_a_row, "stop_step": zero - 1,
                         "stop_kind": zero.clone(), "new": zero.clone()}  # fmt: skip
        d = self._dev
        d["skipped"] += bad
        d["new"] += bad
        d["run"] = (d["run"] + 1) * bad
        hit = (d["run"] >= self.max_in_a_row) & (d["stop_step"] < 0)
        d["stop_step"] = torch.where(hit, float(step), d["stop_step"])
        d["stop_kind"] = torch.where(hit, kind, d["stop_kind"])
        return bad

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        verdict = getattr(pl_module, "step_verdict", None) if getattr(pl_module, "graphs_steps", False) else None
        if verdict is not None and is_fused(trainer.optimizers[0]):  # judged and skipped inside the step: counted here
            self._count_on_device(trainer.global_step, verdict)  # (the step is counted in global_step already)
        elif verdict is not None:  # the step read its verdict on the host (no fused optimizer): so does the count
            self._count_on_host(trainer.global_step, {0: None, 1: "loss", 2: "gradient"}[int(verdict.item())])
        if self._optimizer is not None and hasattr(self._optimizer, "found_inf"):
            del self._optimizer.found_inf  # this step's verdict, as GradScaler leaves it
        pl_module.step_skipped = None
        if self._dev is not None:
            pl_module.log("train/nonfinite_steps", self._dev["skipped"], batch_size=1)
            if trainer.global_step % self.check_every == 0:
                self._read_back(trainer)
        else:
            pl_module.log("train/nonfinite_steps", float(self.skipped), batch_size=1)

    def on_train_end(self, trainer, pl_module):
        if self._dev is not None:
            self._read_back(trainer)

    def _read_back(self, trainer) -> None:
        d = self._dev
        skipped, run, new, stop_step, stop_kind = (int(d[k].item()) for k in ("skipped", "run", "new", "stop_step", "stop_kind"))  # fmt: skip
        d["new"].zero_()
        self.skipped, self.in_a_row = skipped, run
        if stop_step >= 0:
            self._stop_if_too_many(stop_step, "loss" if stop_kind == 1 else "gradient", self.max_in_a_row)
        if new:
            rank_zero_warn(f"non-finite loss or gradient in {new} of the steps up to step {trainer.global_step}: "
                           f"skipped ({run} in a row now, {skipped} in all)")  # fmt: skip

    def _stop_if_too_many(self, step: int, what: str, in_a_row: int) -> None:
        if in_a_row >= self.max_in_a_row:  # the loss, or a gradient
            raise NonFiniteLossError(
                f"non-finite {what} at step {step}, {in_a_row} steps in a row (max_in_a_row="
                f"{self.max_in_a_row}); stopping. The checkpoints written so far hold the weights before them"
            )

    def state_dict(self):
        if self._dev is not None:  # a checkpoint holds the counts as of its step
            self.skipped, self.in_a_row = int(self._dev["skipped"].item()), int(self._dev["run"].item())
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict):
        self.skipped, self.in_a_row = state_dict["skipped"], state_dict["in_a_row"]
        self._dev = None  # rebuilt from these counts at the next step
