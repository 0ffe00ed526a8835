"""The whole training step as one function (`model.step_graph`), captured as a CUDA graph on a GPU.

On the CPU the step runs uncaptured, and must train exactly as Lightning's automatic optimization does with the same
config: the same weights, EMA, optimizer moments and non-finite counts after every step (the graphed step does the
closure's, the guard's, the clipping's and the EMA's device work in one function; a mismatch here is a mismatch of
arithmetic, not of capture). On a GPU (`-m gpu`) the captured replays train as the eager steps do."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from fault_helpers import FAST, tiny_root  # noqa: F401 (a fixture)
from tiny import compose_config

from ldm.run.fit import train
from ldm.training.checkpoint import read_checkpoint
from ldm.training.step_graph import StepGraph, capturing, lr_tensors

CLIP = ["trainer.gradient_clip_val=1e-3"]  # below the tiny U-Net's gradient norms: every step is clipped


class Replays(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        self.count = pl_module._step_graph.replays if pl_module.graphs_steps else None


def _fit(root, run_dir, overrides, monkeypatch=None, poison=()):
    if poison:
        from fault_helpers import PoisonBatches
        from test_faults import _with_callbacks

        _with_callbacks(monkeypatch, PoisonBatches(list(poison)))
    return train(compose_config(root, run_dir, [*FAST, "callbacks.checkpoint.every_n_train_steps=1", "trainer.max_steps=4",
                                                *overrides]))  # fmt: skip


def _assert_same_checkpoints(a, b, steps):
    for step in steps:
        name = f"epoch=0-step={step}.ckpt"
        ca, cb = read_checkpoint(a / "checkpoints" / name), read_checkpoint(b / "checkpoints" / name)
        assert ca["state_dict"].keys() == cb["state_dict"].keys()
        for key, value in ca["state_dict"].items():
            assert torch.equal(cb["state_dict"][key], value), (step, key)
        sa, sb = ca["optimizer_states"][0], cb["optimizer_states"][0]
        assert sa["param_groups"] == sb["param_groups"], step
        for i, moments in sa["state"].items():
            for name, value in moments.items():
                assert torch.equal(sb["state"][i][name], value), (step, i, name)
        assert ca["callbacks"]["NonFiniteLoss"] == cb["callbacks"]["NonFiniteLoss"]


@pytest.mark.parametrize("fused", ["null", "true"])  # true: found_inf and grad_scale on the device, as on a GPU
def test_the_whole_step_trains_as_the_automatic_step(tiny_root, tmp_path, monkeypatch, fused):
    common = [*CLIP, f"optim.optimizer.fused={fused}"]
    eager = _fit(tiny_root, tmp_path / "eager", [*common, "model.step_graph=false"], monkeypatch, poison=[1])
    whole = _fit(tiny_root, tmp_path / "whole", [*common, "model.step_graph=true"], monkeypatch, poison=[1])
    assert eager["train/nonfinite_steps"] == whole["train/nonfinite_steps"] == 1.0  # the poisoned step 2, skipped
    assert whole["train/loss"] == eager["train/loss"]
    _assert_same_checkpoints(tmp_path / "eager", tmp_path / "whole", [2, 3, 4])  # (the last three are kept)


def test_the_whole_step_keeps_an_ema_every_k_steps(tiny_root, tmp_path):
    for mode in ("false", "true"):
        _fit(tiny_root, tmp_path / mode, ["model.ema_every_n_steps=2", f"model.step_graph={mode}"])
    _assert_same_checkpoints(tmp_path / "false", tmp_path / "true", [2, 3, 4])  # (the last three are kept)


def test_a_run_it_cannot_capture_is_refused_in_one_line(tiny_root, tmp_path):
    with pytest.raises(ValueError, match=r"^model.step_graph=true cannot capture .*accumulate_grad_batches=2"):
        _fit(tiny_root, tmp_path, ["model.step_graph=true", "+trainer.accumulate_grad_batches=2"])
    # auto (the default's): Lightning's own step where it cannot capture, and on a CPU
    _fit(tiny_root, tmp_path / "auto", ["model.step_graph=auto", "+trainer.accumulate_grad_batches=2"])


def test_a_capture_sees_tensor_learning_rates_and_the_run_its_own():
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    rates = lr_tensors(optimizer)
    optimizer.param_groups[0]["lr"] = 5e-4  # as the LR scheduler sets it
    with capturing(optimizer, rates):
        assert optimizer.param_groups[0]["lr"] is rates[0] and optimizer.param_groups[0]["capturable"]
        assert rates[0].item() == torch.tensor(5e-4).item()
    assert optimizer.param_groups[0]["lr"] == 5e-4 and optimizer.param_groups[0]["capturable"] is False
    with pytest.raises(ValueError, match="SGD cannot be captured"):
        lr_tensors(torch.optim.SGD([param], lr=0.1, momentum=0.9))


def test_off_a_gpu_every_call_runs_the_step():
    calls = []
    graph = StepGraph(lambda inputs: calls.append(inputs["x"].sum()) or inputs["x"] * 2, [], warmup=1)
    for i in range(3):
        assert torch.equal(graph({"x": torch.full((2,), float(i))}), torch.full((2,), 2.0 * i))
    assert len(calls) == 3 and graph.graph is None


@pytest.mark.gpu
def test_replays_train_as_the_eager_steps_on_a_gpu(tiny_root, tmp_path, monkeypatch):
    """Captured after 3 eager steps, replayed for the other 5: the weights after 8 steps match the eager run's (the
    same kernels, the same per-step seeds), and the graph did replay."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gpu = ["trainer.accelerator=gpu", "trainer.max_steps=8", *CLIP]
    eager = _fit(tiny_root, tmp_path / "eager", [*gpu, "model.step_graph=false", "model.compile=false"])
    from test_faults import _with_callbacks

    replays = Replays()
    _with_callbacks(monkeypatch, replays)
    whole = _fit(tiny_root, tmp_path / "whole", [*gpu, "model.step_graph=true"])
    a = read_checkpoint(tmp_path / "eager" / "checkpoints" / "last.ckpt")
    b = read_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    assert replays.count == 5  # steps 4 (captured, then replayed) to 8
    worst = max(((b["state_dict"][k].double() - v.double()).abs().max().item(), k)
                for k, v in a["state_dict"].items() if v.is_floating_point())  # fmt: skip
    # not bit for bit (3.9e-5 on one H200, session 24: the GPU's order of summation, which Adam's normalised step
    # amplifies where gradients are small), but far below one step (lr 4e-3), which stale weights would miss by
    assert worst[0] <= 2e-4, worst
    assert abs(whole["train/loss"] - eager["train/loss"]) <= 1e-4 * abs(eager["train/loss"]) + 1e-5
    assert b["optimizer_states"][0]["param_groups"][0]["lr"] == a["optimizer_states"][0]["param_groups"][0]["lr"]
