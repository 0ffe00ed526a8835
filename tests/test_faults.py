"""Fault injection on real runs (real Hydra config, Lightning Trainer, WebDataset shards, subprocesses and
signals): kill -9 and exact resume, preemption, truncated and corrupt checkpoints, a full disk, NaN
batches, invalid configs, W&B without a usable server or key, malicious pickles, leaked secrets."""

from __future__ import annotations

import http.server
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from fault_helpers import FAST, FullDisk, by_step, read_losses, tiny_root  # noqa: F401 (a fixture)
from omegaconf import OmegaConf
from tiny import CONF, TINY, TINY_UNET, compose_config

from ldm.run.fit import train
from ldm.run.resume import ResumeWarning, find_auto, resolve_resume
from ldm.run.validate import ConfigError, validate_config
from ldm.stages.load import load_module
from ldm.training.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    UnsafeCheckpointError,
    atomic_save,
    read_checkpoint,
)

pytestmark = pytest.mark.faults

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _record(path: Path) -> list[str]:
    return ["+callbacks.record._target_=fault_helpers.RecordLoss", f"+callbacks.record.path={path}"]


def _cli(root: Path, run_dir: Path, overrides: list[str]) -> list[str]:
    """`python -m ldm.train` with the tiny test config (as compose_config builds it) in ``run_dir``."""
    return [sys.executable, "-m", "ldm.train", "experiment=shapes", f"paths.data_dir={root}",
            f"hydra.run.dir={run_dir}", *TINY, *TINY_UNET, *overrides]  # fmt: skip


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), **extra}
    env.pop("WANDB_API_KEY", None) if "WANDB_API_KEY" not in extra else None
    return env


def _steps_in(run_dir: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in (run_dir / "checkpoints").glob("*.ckpt")
                  if (m := re.fullmatch(r"epoch=\d+-step=(\d+)\.ckpt", p.name)))  # fmt: skip


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    start = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the fault was injected:\n{out[-3000:]}")
        if time.monotonic() - start > timeout:
            proc.kill()
            raise AssertionError("timed out waiting to inject the fault")
        time.sleep(0.02)


# --- 2. exact resume after kill -9 ------------------------------------------------------------------


@pytest.mark.slow  # 2-3 subprocess runs: ~1 min idle, 2-3 min on 2 busy cores (`pytest -m faults` runs it)
@pytest.mark.parametrize("num_workers,kill_after", [(0, 3), (2, 6)])
def test_kill_9_then_resume_auto_gives_the_same_losses(tiny_root, tmp_path, num_workers, kill_after):
    max_steps = 9  # 6 batches of 8 an epoch: the run crosses an epoch boundary; checkpoints at 3, 6, 9
    common = [*FAST, f"data.num_workers={num_workers}", f"trainer.max_steps={max_steps}", "data.batch_size=8",
              "callbacks.checkpoint.every_n_train_steps=3"]  # fmt: skip
    # the uninterrupted reference
    reference = tmp_path / "reference.jsonl"
    train(compose_config(tiny_root, tmp_path / "ref", [*common, *_record(reference)]))

    # the same run, killed with SIGKILL once a checkpoint at step >= kill_after exists
    runs = tmp_path / "runs" / "shapes"
    killed = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(_cli(tiny_root, runs / "first", [*common, *_record(killed)]), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    _wait_for(proc, lambda: any(s >= kill_after for s in _steps_in(runs / "first")))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = max(_steps_in(runs / "first"))
    assert saved < max_steps, "the run finished before it was killed"

    # resume=auto from a new run directory: finds the sibling's newest valid checkpoint, continues there
    resumed = tmp_path / "resumed.jsonl"
    out = subprocess.run(_cli(tiny_root, runs / "second", [*common, "resume=auto", *_record(resumed)]),
                         env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (runs / "second" / "checkpoints").exists()  # it continued in the first run's directory

    expected, got = read_losses(reference), read_losses(resumed)
    assert got[0]["step"] == saved + 1 and got[-1]["step"] == max_steps
    ref = by_step(expected)
    for row in got:  # step for step: the same batch (keys) and the same loss
        ref_row = next(r for r in expected if r["step"] == row["step"])
        assert row["keys"] == ref_row["keys"], f"step {row['step']}: other samples"
        assert row["epoch"] == ref_row["epoch"], (row, ref_row)
        assert abs(row["loss"] - ref[row["step"]]) <= 1e-6, f"step {row['step']}: {row['loss']} != {ref[row['step']]}"

    # and the final state: weights, EMA, optimizer moments, LR schedule, counters
    a = read_checkpoint(tmp_path / "ref" / "checkpoints" / "last.ckpt")
    b = read_checkpoint(runs / "first" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == max_steps
    for key in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], atol=1e-6, rtol=0, msg=key)
    for pa, pb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(pb["exp_avg_sq"], pa["exp_avg_sq"], atol=1e-9, rtol=1e-5)
        assert pb["step"] == pa["step"]
    assert b["lr_schedulers"] == a["lr_schedulers"]
    assert b["images_seen"] == a["images_seen"] == max_steps * 8  # the stage's count (ldm.stages.base)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_stream_resumes_at_the_same_sample_with_the_same_augmentation(tiny_root, num_workers):
    from ldm.data.datamodule import ShardDataModule

    kwargs = dict(train_shards=str(tiny_root / "shapes" / "train"), val_shards=None, resolution=16, batch_size=5,
                  num_workers=num_workers, shuffle_buffer=8, random_flip=True)  # fmt: skip
    loader = ShardDataModule(**kwargs).train_dataloader()
    epochs = [list(loader) for _ in range(3)]  # the uninterrupted stream
    fresh = ShardDataModule(**kwargs)  # a new process: epoch 1 (pass 1), 4 batches already trained on
    fresh.load_state_dict({"epoch_start_pass": 1, "batches": 4})
    resumed = fresh.train_dataloader()
    for expected, got in [(epochs[1][4:], list(resumed)), (epochs[2], list(resumed))]:
        assert [b["key"] for b in got] == [b["key"] for b in expected]
        for a, b in zip(expected, got):
            assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
    # augmentation still changes from pass to pass: some image is flipped differently in epochs 0 and 1
    pixels = [{k: x for b in epoch for k, x in zip(b["key"], b["pixel_values"])} for epoch in epochs[:2]]
    assert any(not torch.equal(pixels[0][k], pixels[1][k]) for k in pixels[0])


# --- 1. preemption ------------------------------------------------------------------------------------


@pytest.mark.slow  # a subprocess run, then a resumed one
@pytest.mark.parametrize("signum,exit_code", [(signal.SIGTERM, 3), (signal.SIGUSR1, 0)])
def test_signal_saves_a_checkpoint_and_exits_with_the_requeue_code(tiny_root, tmp_path, signum, exit_code):
    run_dir = tmp_path / "runs" / "shapes" / "job"
    losses = tmp_path / "losses.jsonl"
    overrides = [*FAST, "trainer.max_steps=100000", "callbacks.checkpoint.every_n_train_steps=1000",
                 f"callbacks.preemption.exit_code={exit_code}", *_record(losses)]  # fmt: skip
    proc = subprocess.Popen(_cli(tiny_root, run_dir, overrides), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    _wait_for(proc, lambda: losses.exists() and len(read_losses(losses)) >= 3)
    sent = time.monotonic()
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == exit_code, output[-3000:]
    assert time.monotonic() - sent < 30
    assert f"preempted by {signal.Signals(signum).name}" in output
    saved = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    # saved at the end of the step it was in (the recorder runs after the preemption callback)
    assert saved - 1 == read_losses(losses)[-1]["step"]
    assert re.search(rf"saved \S+last\.ckpt at step {saved}; resume with resume=auto", output)
    assert not (run_dir / "samples").exists()  # end-of-training work skipped

    # resume=auto in the same directory (a requeued job) continues from there
    cfg_overrides = [*FAST, f"trainer.max_steps={saved + 2}", "resume=auto", *_record(losses)]
    train(compose_config(tiny_root, run_dir, cfg_overrides))
    steps = [row["step"] for row in read_losses(losses)]
    assert steps[-3:] == [saved - 1, saved + 1, saved + 2]


# --- 3. atomic checkpoints, keep-last-N, corrupt checkpoints at resume, full disk ---------------------


@pytest.fixture(scope="module")
def four_steps(tiny_root, tmp_path_factory):
    """A real run of 4 steps, a checkpoint every step, keeping the last 3."""
    run_dir = tmp_path_factory.mktemp("runs") / "shapes" / "a"
    train(compose_config(tiny_root, run_dir, [*FAST, "trainer.max_steps=4"]))
    return run_dir


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / "shapes" / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy


def test_keep_last_n_and_no_temporary_files(four_steps):
    names = sorted(p.name for p in (four_steps / "checkpoints").iterdir())
    kept = ["epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert names == sorted(kept + [name + ".sha256" for name in kept])


def test_truncated_newest_checkpoints_are_skipped_with_a_warning(four_steps, tmp_path, tiny_root):
    run_dir = _copy_run(four_steps, tmp_path)
    for name in ("last.ckpt", "epoch=0-step=4.ckpt"):  # a crash mid-copy, or a damaged disk
        path = run_dir / "checkpoints" / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (run_dir / "checkpoints" / "epoch=0-step=4.ckpt.sha256").unlink()  # without its checksum: torch.load fails
    with pytest.warns(ResumeWarning) as caught:
        found = find_auto(run_dir.parent / "new", "shapes")
    assert found == run_dir / "checkpoints" / "epoch=0-step=3.ckpt"
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert re.search(r"step=4\.ckpt is unreadable \(truncated or corrupt\).*trying the previous", messages[0])
    assert re.search(r"last\.ckpt is corrupt: its bytes do not match last\.ckpt\.sha256; trying the previous",
                     messages[1])
    # a resumed run starts from step 3 and ends at 5, in the original directory
    cfg = compose_config(tiny_root, run_dir.parent / "new", [*FAST, "trainer.max_steps=5", "resume=auto"])
    with pytest.warns(ResumeWarning):
        train(cfg)
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 5


def test_corrupt_bytes_are_detected(four_steps, tmp_path):
    run_dir = _copy_run(four_steps, tmp_path)
    path = run_dir / "checkpoints" / "last.ckpt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # inside a tensor: it still unpickles
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"last\.ckpt is corrupt: its bytes do not match last\.ckpt\.sha256"):
        read_checkpoint(path)


def test_auto_skips_checkpoints_it_cannot_continue_from_and_takes_the_newest_good(four_steps, tmp_path, tiny_root):
    """A sibling run directory holds the newest checkpoint of the same run name, but with an empty state dict: it is
    skipped with a warning naming why, and the older good one is taken."""
    good = _copy_run(four_steps, tmp_path)
    sibling = tmp_path / "runs" / "shapes" / "b" / "checkpoints"
    sibling.mkdir(parents=True)
    empty = read_checkpoint(good / "checkpoints" / "last.ckpt")
    empty["state_dict"] = {}
    atomic_save(empty, sibling / "last.ckpt")  # newest by mtime
    cfg = compose_config(tiny_root, tmp_path / "runs" / "shapes" / "new", [*FAST, "resume=auto"])
    with pytest.warns(ResumeWarning, match=r"cannot resume from .*b/checkpoints/last\.ckpt: its state_dict is empty"):
        found = resolve_resume(cfg)
    assert found == str(good / "checkpoints" / "last.ckpt") and cfg.paths.output_dir == str(good)


def test_auto_stops_in_one_line_when_checkpoints_exist_but_none_is_good(four_steps, tmp_path, tiny_root):
    run_dir = _copy_run(four_steps, tmp_path)
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    for name in names:
        (run_dir / "checkpoints" / name).write_bytes(b"not a checkpoint")
    cfg = compose_config(tiny_root, run_dir.parent / "new", [*FAST, "resume=auto"])
    with pytest.warns(ResumeWarning), pytest.raises(CheckpointError) as caught:
        resolve_resume(cfg)
    message = str(caught.value)
    assert message.startswith(f"resume=auto found 4 checkpoint(s) of run 'shapes' but can continue from none: ")
    assert all(name in message for name in names) and message.endswith("start fresh with resume=auto_or_new")
    assert "\n" not in message
    cfg = compose_config(tiny_root, run_dir.parent / "new", [*FAST, "resume=auto_or_new"])
    with pytest.warns(ResumeWarning):
        assert resolve_resume(cfg) is None  # a fresh start, as asked
    assert cfg.paths.output_dir == str(run_dir.parent / "new")


def test_resume_removes_what_interrupted_saves_left_and_no_checkpoint(four_steps, tmp_path, tiny_root):
    run_dir = _copy_run(four_steps, tmp_path)
    folder = run_dir / "checkpoints"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    stale = [folder / ".last.ckpt.tmp-4242", folder / ".epoch=0-step=5.ckpt.tmp-4242", folder / ".last.ckpt.sha256.tmp-77"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    cfg = compose_config(tiny_root, run_dir.parent / "new", [*FAST, "resume=auto"])
    assert resolve_resume(cfg) == str(folder / "last.ckpt")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("how", ["ckpt_path", "resume"])
def test_resuming_from_a_named_checkpoint_removes_what_interrupted_saves_left_beside_it(four_steps, tmp_path,
                                                                                        tiny_root, how):  # fmt: skip
    """`ckpt_path=` (the run writes a new directory) and `resume=<file>` (it continues there) clean the folder the
    killed run saved into as `resume=auto` does; the checkpoints and their checksums stay as they were."""
    run_dir = _copy_run(four_steps, tmp_path)
    folder = run_dir / "checkpoints"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for path in (folder / ".last.ckpt.tmp-4242", folder / ".epoch=0-step=5.ckpt.tmp-4242",
                 folder / ".last.ckpt.sha256.tmp-77"):  # fmt: skip
        path.write_bytes(b"half a checkpoint")
    cfg = compose_config(tiny_root, run_dir.parent / "new", [*FAST, f"{how}={folder / 'last.ckpt'}"])
    assert resolve_resume(cfg) == str(folder / "last.ckpt")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_resume_with_another_cpu_thread_count_says_it_is_not_bit_for_bit(four_steps, tmp_path, tiny_root):
    """CPU sums split over threads: another thread count sums in another order (README: exact resume)."""
    run_dir = _copy_run(four_steps, tmp_path)
    saved = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["intra_op_threads"]
    cfg = compose_config(tiny_root, run_dir.parent / "new", [*FAST, "trainer.max_steps=5", "resume=auto"])
    torch.set_num_threads(saved + 1)
    try:
        with pytest.warns(UserWarning, match=rf"resuming with {saved + 1} CPU threads; the checkpoint was written "
                                             rf"with {saved}: the run continues to float rounding, not bit for bit"):
            train(cfg)
    finally:
        torch.set_num_threads(saved)


def test_a_failed_checksum_write_says_what_exists(tmp_path, monkeypatch):
    import ldm.training.checkpoint as checkpoint_module

    def full(path, text):
        path.write_text(text[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "_write_sidecar", full)
    state = {"state_dict": {"w": torch.ones(3)}, "global_step": 7}
    with pytest.raises(CheckpointError) as caught:
        atomic_save(state, tmp_path / "last.ckpt")
    assert str(caught.value) == (f"checkpoint {tmp_path}/last.ckpt was written and is complete, but its checksum file "
                                 f"last.ckpt.sha256 could not be written: disk full (ENOSPC); the checkpoint loads "
                                 f"without it (unchecked), the earlier checkpoints in {tmp_path} are intact")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 7  # what the message says


def test_full_disk_during_a_save_in_training_raises_and_keeps_the_previous_checkpoint(tiny_root, tmp_path, monkeypatch):
    import pytorch_lightning as pl

    import ldm.training.checkpoint as checkpoint_module

    before = {}

    class FillDiskAfterStep2(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:  # the saves at the end of step 3 hit a full disk
                before.update({p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()})
                monkeypatch.setattr(checkpoint_module, "_open_tmp", lambda path: FullDisk(path, 4096))

    _with_callbacks(monkeypatch, FillDiskAfterStep2())
    with pytest.raises(CheckpointError, match=r"disk full \(ENOSPC\).*previous checkpoints.*intact"):
        train(compose_config(tiny_root, tmp_path, [*FAST, "trainer.max_steps=5"]))
    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    assert after == before  # nothing replaced, no temporary file left
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2


@pytest.mark.slow  # ~30 s of imports in a subprocess on 2 busy cores
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare for a private tmpfs")
def test_full_tmpfs_raises_enospc_and_keeps_the_previous_checkpoint(tmp_path):
    """A real size-limited filesystem (tmpfs of 1 MiB in a private mount namespace)."""
    script = f"""
import sys, subprocess, torch
sys.path.insert(0, {str(REPO)!r})
from ldm.training.checkpoint import atomic_save, read_checkpoint, CheckpointError
from pathlib import Path
d = Path({str(tmp_path / "mnt")!r})
atomic_save({{"state_dict": {{"w": torch.ones(50_000)}}}}, d / "last.ckpt")         # 200 kB: fits
try:
    atomic_save({{"state_dict": {{"w": torch.zeros(500_000)}}}}, d / "last.ckpt")   # 2 MB: does not
except CheckpointError as e:
    print("ERROR", e)
print("KEPT", float(read_checkpoint(d / "last.ckpt")["state_dict"]["w"].sum()))
print("FILES", sorted(p.name for p in d.iterdir()))
"""
    (tmp_path / "mnt").mkdir()
    (tmp_path / "s.py").write_text(script)
    cmd = f"mount -t tmpfs -o size=1m tmpfs {tmp_path / 'mnt'} && {sys.executable} {tmp_path / 's.py'}"
    out = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=120)
    if "mount" in out.stderr and out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    assert re.search(r"ERROR could not write checkpoint .*last\.ckpt: disk full \(ENOSPC\)", out.stdout)
    assert "KEPT 50000.0" in out.stdout and "FILES ['last.ckpt', 'last.ckpt.sha256']" in out.stdout


def test_atomic_checkpoint_io_is_lightnings_io(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.arange(3.0)}, "global_step": 1}, tmp_path / "a.ckpt")
    assert io.load_checkpoint(tmp_path / "a.ckpt")["state_dict"]["w"].tolist() == [0.0, 1.0, 2.0]
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt", "a.ckpt.sha256"]
    io.remove_checkpoint(tmp_path / "a.ckpt")
    assert os.listdir(tmp_path) == []


# --- 4. non-finite losses -----------------------------------------------------------------------------


def _with_callbacks(monkeypatch, *extra):
    from ldm.run import fit as train_module

    real = train_module.instantiate

    def instantiate(config, *args, **kwargs):
        if "callbacks" in kwargs:
            kwargs["callbacks"] = [*extra, *kwargs["callbacks"]]
        return real(config, *args, **kwargs)

    monkeypatch.setattr(train_module, "instantiate", instantiate)


# fused=true: the fused AdamW (the GPU default) skips on the device through `found_inf`, no host sync
@pytest.mark.parametrize("fused", ["null", "true"])
def test_a_nan_batch_skips_the_step_and_is_counted(tiny_root, tmp_path, monkeypatch, fused):
    from fault_helpers import PoisonBatches

    _with_callbacks(monkeypatch, PoisonBatches([1]))  # the batch of step 2
    metrics = train(compose_config(tiny_root, tmp_path, [*FAST, "trainer.max_steps=3", f"optim.optimizer.fused={fused}"]))
    assert metrics["train/nonfinite_steps"] == 1.0
    step1 = read_checkpoint(tmp_path / "checkpoints" / "epoch=0-step=1.ckpt")
    step2 = read_checkpoint(tmp_path / "checkpoints" / "epoch=0-step=2.ckpt")
    for key, value in step1["state_dict"].items():  # the skipped step changed no weight, EMA or moment
        assert torch.equal(step2["state_dict"][key], value), key
    moments = step2["optimizer_states"][0]["state"]
    assert all(s["step"] == 1 for s in moments.values())
    last = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert all(s["step"] == 2 for s in last["optimizer_states"][0]["state"].values())
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_n_nan_steps_in_a_row_stop_the_run_naming_the_step(tiny_root, tmp_path, monkeypatch):
    from fault_helpers import PoisonBatches

    from ldm.callbacks.nonfinite import NonFiniteLossError

    _with_callbacks(monkeypatch, PoisonBatches([2, 3, 4]))
    cfg = compose_config(tiny_root, tmp_path, [*FAST, "trainer.max_steps=8", "callbacks.nonfinite.max_in_a_row=3"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 5, 3 steps in a row"):
        train(cfg)
    good = read_checkpoint(tmp_path / "checkpoints" / "epoch=0-step=2.ckpt")
    last = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4
    for key, value in good["state_dict"].items():
        assert torch.equal(last["state_dict"][key], value), key


def test_the_fused_path_stops_at_its_next_check_naming_the_step(tiny_root, tmp_path, monkeypatch):
    from fault_helpers import PoisonBatches

    from ldm.callbacks.nonfinite import NonFiniteLossError

    _with_callbacks(monkeypatch, PoisonBatches([2, 3, 4]))
    cfg = compose_config(tiny_root, tmp_path, [*FAST, "trainer.max_steps=12", "callbacks.nonfinite.max_in_a_row=3",
                                               "callbacks.nonfinite.check_every_n_steps=4", "optim.optimizer.fused=true"])  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 5, 3 steps in a row"):
        train(cfg)
    last = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 7  # stopped at the check after step 8, before its checkpoint; 6-8 were good
    assert last["callbacks"]["NonFiniteLoss"] == {"skipped": 3, "in_a_row": 0}
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert all(s["step"] == 4 for s in last["optimizer_states"][0]["state"].values())  # 7 steps, 3 skipped


@pytest.mark.parametrize("guarded", [True, False])
def test_an_infinite_gradient_of_a_finite_loss_is_skipped(guarded):
    """d sqrt(w)/dw at w = 0 is inf while sqrt(0) = 0: with gradient clipping, this would make NaN weights."""
    import pytorch_lightning as pl

    from ldm.callbacks.nonfinite import NonFiniteLoss

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.v = torch.nn.Parameter(torch.ones(3))

        def training_step(self, batch, batch_idx):
            return torch.sqrt(self.w).sum() + (self.v * batch).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.1)

    probe, callback = Probe(), NonFiniteLoss()
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                         callbacks=[callback] if guarded else [])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(probe, torch.utils.data.DataLoader(torch.ones(4, 3), batch_size=None))
    if guarded:
        assert callback.skipped == 1 and torch.equal(probe.v.detach(), torch.ones(3))
        assert torch.equal(probe.w.detach(), torch.zeros(1)) and not trainer.optimizers[0].state  # no moments
    else:  # what the guard prevents
        assert torch.isnan(probe.w.detach()).all()


# --- 5. config errors in seconds ----------------------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    ("model.vae.path=/nonexistent/vae", r"^model\.vae\.path=/nonexistent/vae: no such model directory$"),
    ("model/text_encoder=hf_clip model.text_encoder.path=/nonexistent/clip",
     r"^model\.text_encoder\.path=/nonexistent/clip: no such model"),
    ("paths.clip_dir=/nonexistent/clip", r"^callbacks\.fid\.clip_model=/nonexistent/clip: no such directory$"),
    ("paths.clip_dir=/nonexistent/clip callbacks.fid.clip_model=null",
     r"^model\.text_encoder\.arch=local-dir:/nonexistent/clip: no open_clip model"),
    ("data.resolution=17", r"^data\.resolution=17 is not a multiple of the VAE's downsampling factor 2"),
    ("model.unet.cross_attention_dim=48", r"^model\.unet\.cross_attention_dim=48 does not match the text encoder's "
                                          r"hidden size 32"),
    ("sampling.sampler=heun2", r"^sampling\.sampler='heun2': expected one of ddim, ddpm, dpm\+\+"),
    ("optim.schedule=cosine_warm", r"^optim\.schedule='cosine_warm': expected one of linear, cosine"),
    ("diffusion.schedule=cosine", r"^diffusion\.schedule='cosine': expected one of linear, scaled_linear"),
    ("data.resolution=18", r"^data\.resolution=18: its 9x9 latents \(VAE factor 2\) do not halve evenly through "
                           r"the U-Net's 2 levels \(model\.unet\.block_out_channels\); use a multiple of 4$"),
    ("data.train_shards='/nonexistent/{000000..000009}.tar'", r"^data\.train_shards=.*does not exist"),
    ("data.train_shards=/tmp/*.nothing.tar", r"^data\.train_shards=.*no shards match"),
    ("data.batch_size=64", r"^data\.batch_size=64 is larger than the 48 samples of data\.train_shards="),
    ("data.buckets=[[16,16],[15,16]]", r"^data\.buckets: 15x16 is not a multiple of the VAE's downsampling factor 2"),
    ("data.buckets={max_aspect:0.5}", r"^data\.buckets\.max_aspect=0\.5: expected a number >= 1"),
    ("data.buckets={area:4096,step:128}", r"^data\.buckets\.area=4096 is below one 128x128 step"),
    ("data.buckets=[[16,16]] data.samples_per_epoch=1000", r"^data\.samples_per_epoch with data\.buckets"),
    ("data.captions={tag_dropout:1.5}", r"^data\.captions\.tag_dropout=1\.5: expected a number in \[0, 1\)"),
    ("data.dreambooth={class_prompt:'',class_shards:/tmp/x}", r"^data\.dreambooth\.class_prompt='': expected a non-"),
])  # fmt: skip
def test_invalid_config_is_one_line_naming_the_setting(tiny_root, tmp_path, override, message):
    cfg = compose_config(tiny_root, tmp_path, override.split(" "))
    start = time.monotonic()
    with pytest.raises(ConfigError, match=message) as caught:
        validate_config(cfg)
    assert time.monotonic() - start < 10
    assert "\n" not in str(caught.value)


def test_no_image_fitting_a_bucket_is_one_line_before_any_model_loads(tiny_root, tmp_path):
    """Needs the image sizes (sizes.json, else the headers): checked right after the imports, before anything is
    built (`ldm.run.data_check`)."""
    from ldm.run.data_check import check_buckets

    cfg = compose_config(tiny_root, tmp_path, ["data.buckets=[[32,32]]"])
    validate_config(cfg)  # the spec itself is fine
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"^no image fits a bucket: 48 too small for every bucket \(upscaling off: "
                                          r"set data\.upscale=true"):  # fmt: skip
        check_buckets(cfg)
    assert time.monotonic() - start < 10
    check_buckets(compose_config(tiny_root, tmp_path, ["data.buckets=[[32,32]]", "data.upscale=true"]))


def test_missing_required_value_and_pretrained_unet_are_checked(tiny_root, tmp_path):
    cfg = compose_config(tiny_root, tmp_path, ["model/unet=pretrained"], tiny_unet=False)
    with pytest.raises(ConfigError, match=r"^model\.unet\.path is required but not set"):
        validate_config(cfg)
    cfg = compose_config(tiny_root, tmp_path, ["model/unet=pretrained", f"model.unet.path={tiny_root}"],
                         tiny_unet=False)  # fmt: skip
    with pytest.raises(ConfigError, match=r"holds no config\.json"):
        validate_config(cfg)
    validate_config(compose_config(tiny_root, tmp_path))  # the tiny default is valid


def test_config_error_on_the_command_line_is_one_line_and_quick(tiny_root, tmp_path):
    start = time.monotonic()
    out = subprocess.run(_cli(tiny_root, tmp_path / "run", ["data.resolution=17"]), env=_env(),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == ("error: data.resolution=17 is not a multiple of the VAE's "
                                                   "downsampling factor 2 (model.vae)")  # fmt: skip
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert time.monotonic() - start < 60  # imports included, on a busy 2-core machine


# --- 6. W&B never stops training ----------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A local HTTP server on a free port, in a thread, answering with ``handler``."""

    def __init__(self, handler):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Rejects(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # what the W&B server answers to an unknown API key
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"errors": [{"message": "user is not logged in"}]}).encode()
        self.send_response(401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Silent(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        time.sleep(30)  # accepts the connection, never answers

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("server,reason", [
    (None, r"W&B server http://127\.0\.0\.1:\d+ unreachable"),
    (_Rejects, r"rejected the API key \(HTTP 401\)"),
    (_Silent, r"did not answer \(ReadTimeout\)"),
])  # fmt: skip
def test_wandb_falls_back_offline_with_one_warning(tmp_path, monkeypatch, caplog, server, reason):
    import ldm.training.loggers as loggers

    running = _Server(server) if server else None
    url = running.url if running else f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("WANDB_API_KEY", "fake0123456789abcdef0123456789abcdef0123")
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(loggers, "VERIFY_TIMEOUT_S", 1.0)
    start = time.monotonic()
    try:
        with caplog.at_level("WARNING", logger=loggers.__name__):
            logger = loggers.wandb_logger(project="t", save_dir=str(tmp_path))
    finally:
        if running:
            running.close()
    assert time.monotonic() - start < 8
    messages = [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()]
    assert len(messages) == 1 and re.search(reason, messages[0]) and "logging offline" in messages[0]
    assert logger._offline and os.environ["WANDB_MODE"] == "offline"


# --- 7. security: no code runs on load, no secrets written ---------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_a_checkpoint_that_would_run_code_is_refused(four_steps, tiny_root, tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    checkpoint = {"state_dict": {}, "global_step": 1, "config": {}, "evil": _Payload(marker)}
    if fmt == "torch":
        torch.save(checkpoint, path)
    else:
        path.write_bytes(pickle.dumps(checkpoint))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*evil\.ckpt.*could run code"):
        read_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        load_module(path)
    with pytest.raises(UnsafeCheckpointError):  # what Lightning calls when resuming
        AtomicCheckpointIO().load_checkpoint(path)
    cfg = compose_config(tiny_root, tmp_path / "run", [*FAST, f"resume={path}"])
    with pytest.raises(UnsafeCheckpointError):
        resolve_resume(cfg)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is real: unpickled without the guard it runs
    assert marker.read_text() == "pwned"


def test_api_keys_never_reach_configs_run_dirs_or_wandb_files(tiny_root, tmp_path):
    wandb_key, hf_token, config_secret = "wk" + "3" * 38, "hf_" + "Q" * 34, "s3cr3t-" + "z" * 20
    run_dir = tmp_path / "runs" / "shapes" / "r"
    overrides = ["logger=wandb", "callbacks.fid=null", "callbacks.export=null", "trainer.max_steps=2",
                 f"+hf_token={hf_token}", f"+api_key={config_secret}"]  # fmt: skip
    env = _env(WANDB_API_KEY=wandb_key, HF_TOKEN=hf_token, WANDB_BASE_URL=f"http://127.0.0.1:{_closed_port()}")
    env.pop("WANDB_MODE", None)
    out = subprocess.run(_cli(tiny_root, run_dir, overrides), env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (out.stdout + out.stderr).count("logging offline") == 1  # one line on the console (and in train.log)
    assert (run_dir / "train.log").read_text().count("logging offline") == 1
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and (run_dir / ".hydra" / "overrides.yaml").is_file()
    for path in files:
        data = path.read_bytes()
        for secret in (wandb_key, hf_token, config_secret):
            assert secret.encode() not in data, f"{secret[:6]}... found in {path.relative_to(run_dir)}"
    from wandb_offline import config, run_files

    (run_file,) = run_files(run_dir / "wandb")
    logged = config(run_file)
    assert logged["hf_token"] == logged["api_key"] == "<redacted>"
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["config"]["api_key"] == "<redacted>"
    assert "hf_token=<redacted>" in (run_dir / ".hydra" / "overrides.yaml").read_text()


def test_redaction_rules(monkeypatch):
    from ldm.utils.secrets import redact

    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    config = {"api_key": "k1", "wandb_secret": "k2", "db-password": "k3", "tokenizer_subfolder": "tokenizer",
              "keys": ["a"], "path": "/models/hf_abcdefghijklmnop/x", "hf_token": None,
              "overrides": ["data.batch_size=4", "+logger.api_key=k4", "a=1,+hf_token=k5,b=2"]}  # fmt: skip
    assert redact(config) == {
        "api_key": "<redacted>", "wandb_secret": "<redacted>", "db-password": "<redacted>",
        "tokenizer_subfolder": "tokenizer", "keys": ["a"], "path": "/models/<redacted>/x", "hf_token": None,
        "overrides": ["data.batch_size=4", "+logger.api_key=<redacted>", "a=1,+hf_token=<redacted>,b=2"],
    }  # fmt: skip
