"""A training step makes no host sync: nothing reads a tensor's value back to Python between logging steps.

On a GPU each such read (`.item()`, `bool(t)`, `float(t)`, `.tolist()`, ...) waits for every queued kernel, and so
does copying a Python number to the device (`LightningModule.log(name, 0.5)` on a GPU module). A small model then
runs at the speed of CPU + GPU instead of the slower of the two. Found here on the CPU: a torch function mode
counts those calls in every step of a real `ldm.train` run with the stage's own callbacks and the fused AdamW
(the GPU default), progress bar off (a shown progress bar reads the loss every step, by design)."""

from __future__ import annotations

import numbers
import traceback
from pathlib import Path

import pytest
import pytorch_lightning as pl
from omegaconf import OmegaConf
from tiny import compose_config, make_tiny_root
from torch.overrides import TorchFunctionMode

from ldm.run.fit import train

HOST_SIDE = ("ldm/data/health.py",)  # the loader's skip counters: host tensors on a GPU machine too
READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu", "__format__"}


class HostReads(TorchFunctionMode):
    """Records (what, where) for each read of a tensor's value on the host and each number sent to a device."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_device = name == "tensor" and args and isinstance(args[0], numbers.Number) and kwargs.get("device")
        if name in READS or (to_device and str(kwargs["device"]) != "cpu"):
            frames = [f for f in traceback.extract_stack()[:-1] if "torch/overrides" not in f.filename]
            if any(f.filename.endswith(HOST_SIDE) for f in frames):
                return func(*args, **kwargs)
            self.calls.append((name, " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-4:]))))
        return func(*args, **kwargs)


class CountPerStep(pl.Callback):
    """Counts from the start of each step to the start of the next (every hook in between), after `skip` steps."""

    steps: dict[int, list] = {}
    epoch_ends: set[int] = set()  # steps that ended an epoch: the loader restarts, Lightning validates

    def __init__(self, skip: int = 2):
        self.skip, self.mode = skip, None
        CountPerStep.steps, CountPerStep.epoch_ends = {}, set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            CountPerStep.epoch_ends.add(trainer.global_step)

    def _close(self, step):
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            CountPerStep.steps[step] = self.mode.calls
            self.mode = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close(trainer.global_step)  # the step that just ended
        if trainer.global_step >= self.skip:
            self.mode = HostReads()
            self.mode.__enter__()

    def on_train_end(self, trainer, pl_module):
        self._close(trainer.global_step)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_tiny_root(tmp_path_factory.mktemp("syncs"))


@pytest.mark.parametrize("stage", ["shapes", "shapes_vae", "shapes_clip"])
def test_steps_between_logging_steps_read_nothing_back(root, tmp_path, stage):
    from test_val_loss import _flat
    from test_vae_stage import VAE_TINY
    from tiny import TINY_OPEN_CLIP

    common = ["logger=csv", "trainer.max_steps=9", "trainer.log_every_n_steps=4", "optim.optimizer.fused=true",
              "trainer.enable_progress_bar=false", "callbacks.checkpoint.every_n_train_steps=100",
              "callbacks.throughput.log_every_n_steps=4", "callbacks.val_loss.every_n_steps=100",
              "callbacks.val_loss.num_samples=4", "callbacks.nonfinite.check_every_n_steps=4"]  # fmt: skip
    per_stage = {
        "shapes": ["callbacks.fid.every_n_steps=100", "callbacks.sample_grid.every_n_steps=100", "~callbacks.export",
                   "model.text_cache_size=64"],
        "shapes_vae": [*VAE_TINY, f"paths.vae_dir={tmp_path / 'vae'}", "callbacks.reconstructions.every_n_steps=100"],
        "shapes_clip": ["data.resolution=16", "data.batch_size=8", "data.shuffle_buffer=8", "trainer.accelerator=cpu",
                        "trainer.val_check_interval=100", f"paths.clip_dir={tmp_path / 'clip'}",
                        *[f"model.clip.{k}={v}" for k, v in _flat(TINY_OPEN_CLIP).items()]],
    }  # fmt: skip
    cfg = compose_config(root, tmp_path, [*common, *per_stage[stage]], experiment=stage, tiny=stage == "shapes")
    OmegaConf.set_struct(cfg, False)
    cfg.callbacks.count = {"_target_": "test_host_syncs.CountPerStep"}
    train(cfg)
    steps = CountPerStep.steps
    assert sorted(steps) == list(range(3, 10))
    quiet = {s: calls for s, calls in steps.items()  # not a logging step, an epoch's end or the last step
             if s % 4 and s != 9 and s not in CountPerStep.epoch_ends}  # fmt: skip
    assert quiet and all(not calls for calls in quiet.values()), quiet
    # the logging steps do read values back (the logger writes numbers): the counter sees them
    assert steps[4] and steps[8]
