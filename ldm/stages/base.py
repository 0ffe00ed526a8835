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
- `grad_norm`: the global gradient norm of the current optimizer step, when the guard computed it (a 0-dim device
  tensor); gradient clipping then uses it instead of reading all gradients again.

Gradient clipping by norm under bf16 or fp32 (`trainer.gradient_clip_val`) with a fused optimizer (the GPU default)
does not rewrite the gradients: the clip factor c = min(1, max_norm / (norm + 1e-6)), computed on the device as
`torch.nn.utils.clip_grad_norm_` computes it, goes to the optimizer as `grad_scale` = 1 / c, which torch's fused
kernels divide every gradient by as they read it (the attribute through which its GradScaler unscales fp16
gradients). Same update, one pass over the gradients fewer (SDXL's: 10 GB read and written per step).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from ldm.training.compile import compile_in_place, eager_stance
from ldm.training.optim import clipping_grad_scale, is_fused


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
        self.grad_norm: Tensor | None = None

    @property
    def progress_bar(self) -> bool:
        return self._trainer is not None and self.trainer.progress_bar_callback is not None

    def compile_parts(self, modules: list[torch.nn.Module], options: dict | None) -> None:
        """torch.compile `modules` in place with `model.compile`'s options (`ldm.training.compile`), once, for the
        device the trainer runs on; called from `configure_model`, before the strategy wraps the module."""
        if options is None or getattr(self, "_compiled", False):
            return
        device = self.trainer.strategy.root_device.type if self._trainer is not None else "cpu"
        self._traced = compile_in_place(modules, options, device)  # False: left eager (cudagraphs off CUDA)
        self._compiled = True

    # A compiled stage validates eagerly (a few batches of new shapes, no gradients: compiling and capturing graphs
    # for them costs more than it saves; ldm.training.compile.eager_stance). Lightning calls these two around every
    # validation run; teardown restores the stance after a run that stopped inside one.
    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        if getattr(self, "_traced", False):
            eager_stance()

    def on_validation_model_train(self) -> None:
        self._default_stance()
        super().on_validation_model_train()

    def teardown(self, stage: str) -> None:
        self._default_stance()
        super().teardown(stage)

    def _default_stance(self) -> None:
        if getattr(self, "_traced", False):
            torch.compiler.set_stance("default")

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
            self.clip_grad_norm(params, gradient_clip_val, optimizer)

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float,
                       optimizer: torch.optim.Optimizer | None = None) -> None:  # fmt: skip
        """Clip the gradients' global norm (a stage with sharded parameters computes it over all ranks); with a
        fused ``optimizer``, by its `grad_scale` (see the module docstring)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        norm = self.grad_norm if self.grad_norm is not None else torch.nn.utils.get_total_norm(grads)
        if optimizer is None or not is_fused(optimizer) or getattr(optimizer, "grad_scale", None) is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
            return
        optimizer.grad_scale = clipping_grad_scale(norm, max_norm)
        self._grad_scaled = optimizer

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        scaled = self.__dict__.pop("_grad_scaled", None)
        if scaled is not None:
            del scaled.grad_scale  # this step's clip factor
        self.grad_norm = None
