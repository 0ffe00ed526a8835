"""The run's clock (ldm/callbacks/clock.py) in a real Lightning Trainer on a fake monotonic clock: it stops where
Lightning's own `Timer` does, or, leaving evaluations out, after the same training time however much evaluating
happened, also across a resume; and real tiny `ldm.train` runs of stages 1 and 2 keep one clock that leaves their
rFID / FID evaluations out."""

from __future__ import annotations

import types

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning.callbacks.timer as timer_module
from ldm.callbacks.clock import TrainingClock

VAE_TINY = ["data.resolution=16", "data.batch_size=8", "data.shuffle_buffer=8", "data.num_workers=0",
            "model.vae.block_out_channels=[8,16]", "model.vae.norm_num_groups=4", "model.vae.sample_size=16",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "optim.warmup_steps=1",
            "callbacks.export=null", "callbacks.reconstructions.num_images=8", "callbacks.reconstructions.batch_size=4",
            "callbacks.reconstructions.grid_images=4"]  # fmt: skip
NOW = [0.0]  # the fake clock: a training step takes 1 s, an evaluation 3 s


@pytest.fixture(autouse=True)
def fake_time(monkeypatch):
    NOW[0] = 1000.0
    monkeypatch.setattr(timer_module, "time", types.SimpleNamespace(monotonic=lambda: NOW[0]))


class Steps(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        NOW[0] += 1.0
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Evaluator(pl.Callback):
    """Evaluates for 3 s every 2nd step and reports it as `eval_seconds`, kept in its state (as FIDCallback)."""

    def __init__(self):
        self.eval_seconds = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % 2 == 0:
            NOW[0] += 3.0
            self.eval_seconds += 3.0

    def state_dict(self):
        return {"eval_seconds": self.eval_seconds}

    def load_state_dict(self, state_dict):
        self.eval_seconds = state_dict["eval_seconds"]


def fit(clock, max_steps=100, ckpt_path=None, save=None):
    data = DataLoader(TensorDataset(torch.randn(256, 2)), batch_size=2)
    trainer = pl.Trainer(max_steps=max_steps, callbacks=[Evaluator(), clock], logger=False, accelerator="cpu",
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Steps(), data, ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return trainer


def test_without_exclusion_it_stops_where_lightnings_timer_does():
    # after step k the wall clock shows k + 3 * (k // 2) s: 10 s at step 4
    assert fit(TrainingClock("00:00:00:10")).global_step == 4
    assert fit(timer_module.Timer("00:00:00:10", interval="step")).global_step == 4


def test_leaving_evaluations_out_buys_the_same_training_time():
    clock = TrainingClock("00:00:00:10", exclude_evaluations=True)
    trainer = fit(clock)
    assert trainer.global_step == 10  # 10 s of steps; the 15 s of evaluations did not count
    assert clock.time_elapsed() == 10.0 and clock.evaluation_seconds() == 15.0


def test_resume_continues_the_clock_without_counting_evaluations_twice(tmp_path):
    first = fit(TrainingClock("00:00:00:10", exclude_evaluations=True), max_steps=6, save=tmp_path / "six.ckpt")
    assert first.global_step == 6  # 6 s of training, 9 s of evaluations
    clock = TrainingClock("00:00:00:10", exclude_evaluations=True)
    resumed = fit(clock, ckpt_path=tmp_path / "six.ckpt")
    assert resumed.global_step == 10 and clock.time_elapsed() == 10.0


@pytest.mark.parametrize("experiment,evaluator,overrides", [
    ("shapes", "ldm.callbacks.fid.FIDCallback", ["callbacks.fid.every_n_steps=1", "callbacks.export=null"]),
    ("shapes_vae", "ldm.callbacks.reconstruction.ReconstructionQuality",
     ["callbacks.reconstructions.every_n_steps=1", *VAE_TINY]),
])  # fmt: skip
def test_a_training_run_has_one_clock_and_leaves_its_evaluations_out(tmp_path, experiment, evaluator, overrides):
    """In stage 2 (FID) and stage 1 (rFID): trainer.max_time goes to callbacks.clock (Lightning builds no second
    Timer); with exclude_evaluations its elapsed time is the wall time less the evaluating callback's seconds."""
    from hydra.utils import get_class
    from tiny import compose_config, make_tiny_root

    import ldm.run.fit as fit_module

    root, run_dir = make_tiny_root(tmp_path / "root"), tmp_path / "run"
    cfg = compose_config(root, run_dir, ["logger=none", "trainer.max_steps=3", "trainer.max_time=00:01:00:00",
                                         "callbacks.clock.exclude_evaluations=true", "callbacks.checkpoint=null",
                                         *overrides], experiment=experiment, tiny=experiment == "shapes")  # fmt: skip
    assert cfg.callbacks.clock.duration == "00:01:00:00"
    seen = {}
    real_fit = pl.Trainer.fit

    def spy(trainer, *args, **kwargs):
        seen["trainer"] = trainer
        return real_fit(trainer, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(timer_module, "time", __import__("time"))  # this run's times are real
        m.setattr(pl.Trainer, "fit", spy)
        fit_module.train(cfg)
    trainer = seen["trainer"]
    timers = [cb for cb in trainer.callbacks if isinstance(cb, timer_module.Timer)]
    assert len(timers) == 1 and isinstance(timers[0], TrainingClock) and timers[0]._duration == 3600
    clock, evaluating = timers[0], next(cb for cb in trainer.callbacks if isinstance(cb, get_class(evaluator)))
    assert evaluating.eval_seconds > 0 and clock.evaluation_seconds() == pytest.approx(evaluating.eval_seconds)
    wall = clock.end_time() - clock.start_time()
    assert clock.time_elapsed() == pytest.approx(wall - evaluating.eval_seconds)
    assert 0 < clock.time_elapsed() < wall
