"""What every training stage shares: the run's config in its checkpoints, and the count of images seen.

    class MyStage(Stage):
        def training_step(self, batch, batch_idx): ...

- `run_config`: the resolved (secrets redacted) config of the run, set by `ldm.run.fit.train` and written into
  every checkpoint as `checkpoint["config"]`; `ldm.stages.load.load_module` rebuilds the stage from it.
- `images_seen`: training images (samples) seen so far, all ranks together, counted here once per batch before
  the step runs and kept in checkpoints (`checkpoint["images_seen"]`). Callbacks read it (throughput, FID curves).
- `trained_steps`: the optimizer steps of the checkpoint the stage was loaded from (0 for a fresh one); exports
  record it (kohya's ss_steps).
- `intra_op_threads`: torch's CPU thread count is kept in checkpoints; a run resumed with another count is warned
  that it continues to float rounding, not bit for bit (CPU matrix products and convolutions sum in an order that
  depends on how many threads share them: 1 vs 2 threads moved weights by 1.2e-7 over 5 steps; README: exact resume).
- `progress_bar`: whether the trainer shows one; stages put their loss in it only then. Lightning turns every
  progress-bar metric into a Python number after every batch, shown or not: a host sync per step on a GPU.
- `step_skipped`: the non-finite guard's verdict for the current optimizer step, when the guard
  (`ldm.callbacks.nonfinite.NonFiniteLoss`) judges on the device: a 0-dim 0/1 float tensor, 1 when the fused
  optimizer skips the step. None otherwise (no guard, or a skipped step shows as dropped gradients).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor


def batch_size(batch) -> int:
    """Samples in a training batch: every stage's batches are dicts with a "caption" list."""
    return len(batch["caption"]) if isinstance(batch, dict) and "caption" in batch else len(batch)


class Stage(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.run_config: dict | None = None
        self.images_seen = 0
        self.trained_steps = 0
        self.step_skipped: Tensor | None = None

    @property
    def progress_bar(self) -> bool:
        return self._trainer is not None and self.trainer.progress_bar_callback is not None

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.images_seen += batch_size(batch) * self.trainer.world_size

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["images_seen"] = self.images_seen
        checkpoint["intra_op_threads"] = torch.get_num_threads()
        if self.run_config is not None:
            checkpoint["config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.images_seen = checkpoint.get("images_seen", 0)
        self.trained_steps = checkpoint.get("global_step", 0)
        saved, now = checkpoint.get("intra_op_threads"), torch.get_num_threads()
        if self._trainer is not None and saved is not None and saved != now and self.device.type == "cpu":
            rank_zero_warn(f"resuming with {now} CPU threads; the checkpoint was written with {saved}: the run "
                           f"continues to float rounding, not bit for bit (set OMP_NUM_THREADS={saved} for that)")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer (the default on a GPU), because
        # with fp16 such an optimizer unscales the gradients itself. Under bf16 and fp32 nothing is scaled: clip here.
        if not gradient_clip_val or "16-mixed" == str(self.trainer.precision):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            self.clip_grad_norm(params, gradient_clip_val)

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> None:
        """Clip the gradients' global norm (a stage with sharded parameters computes it over all ranks)."""
        torch.nn.utils.clip_grad_norm_(params, max_norm)
