"""Every stop of a real `python -m ldm.train` run is one line on stderr naming the cause and its numbers, a
non-zero exit code and no traceback, and it is in the run's train.log together with the warnings that led there
(skipped samples, image conversions); no third-party notice clutters the output. A sweep writes no secret given on
its command line, in any file or on the console."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from fault_helpers import FAST, tiny_root  # noqa: F401 (a fixture)
from tiny import TINY, TINY_UNET

pytestmark = pytest.mark.faults
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    for name in ("HYDRA_FULL_ERROR", "LDM_DEBUG", "WANDB_API_KEY"):
        env.pop(name, None)
    return env


def _train(root: Path, run_dir: Path, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    where = f"hydra.sweep.dir={run_dir}" if multirun else f"hydra.run.dir={run_dir}"
    command = [sys.executable, "-m", "ldm.train", *(["-m"] if multirun else []), "experiment=shapes",
               f"paths.data_dir={root}", *TINY, *TINY_UNET, *FAST, where, *overrides]  # fmt: skip
    return subprocess.run(command, cwd=run_dir.parent, env=_env(), capture_output=True, text=True, timeout=900)


def _one_line_stop(out: subprocess.CompletedProcess) -> str:
    """The error line; asserts it is the only one the stop wrote to stderr, with no traceback anywhere."""
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and out.stderr.rstrip().endswith(errors[0]), out.stderr[-3000:]
    assert "pip install accelerate" not in out.stdout + out.stderr  # diffusers' notice is not printed
    assert "litlogger" not in out.stdout + out.stderr  # nor Lightning's
    return errors[0]


def test_too_much_bad_data_stops_in_one_line_naming_the_worst_shard(tiny_root, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(tiny_root / "shapes" / "train" / "000000.tar", shards)  # 16 good samples
    with wds.TarWriter(str(shards / "000003.tar"), encoder=False) as writer:  # 10 corrupt images, 2 grey ones
        for i in range(10):
            writer.write({"__key__": f"bad{i}", "png": b"not a png", "txt": b"a broken image"})
        for i in range(2):
            buffer = io.BytesIO()
            Image.new("L", (16, 16), 128).save(buffer, format="PNG")
            writer.write({"__key__": f"grey{i}", "png": buffer.getvalue(), "txt": b"a grey square"})
    run_dir = tmp_path / "run"
    out = _train(tiny_root, run_dir, f"data.train_shards={shards}", "data.max_bad_fraction=0.05",
                 "trainer.max_steps=100")  # fmt: skip
    line = _one_line_stop(out)
    assert line == (f"error: 10 of 28 samples of {shards} were bad (35.7% > max_bad_fraction 5.0%); most in "
                    f"{shards}/000003.tar (10); the warnings (and train.log) name each shard and key")
    log = (run_dir / "train.log").read_text()
    assert "skipping sample 'bad3' of shard" in log and "skipping sample 'bad3' of shard" in out.stderr
    assert re.search(rf"images in mode L are converted to RGB \(the first: key 'grey[01]' of shard {shards}/000003\.tar\)",
                     log)  # fmt: skip
    assert f"stopped: {line[len('error: '):]}" in log and "Traceback" in log  # the log keeps the traceback
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()  # what was written before the stop is kept


def test_a_non_finite_streak_stops_in_one_line(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    out = _train(tiny_root, run_dir, "+callbacks.poison._target_=fault_helpers.PoisonBatches",
                 "+callbacks.poison.steps=[1,2,3]", "callbacks.nonfinite.max_in_a_row=3", "trainer.max_steps=8",
                 "data.uint8=false")  # fmt: skip
    line = _one_line_stop(out)
    assert line == ("error: non-finite loss at step 4, 3 steps in a row (max_in_a_row=3); stopping. The checkpoints "
                    "written so far hold the weights before them")
    assert f"stopped: {line[len('error: '):]}" in (run_dir / "train.log").read_text()


def test_a_full_disk_stops_in_one_line_and_keeps_the_checkpoints(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    out = _train(tiny_root, run_dir, "+callbacks.fill._target_=fault_helpers.FullDiskFrom", "+callbacks.fill.step=2",
                 "trainer.max_steps=5")  # fmt: skip
    line = _one_line_stop(out)
    folder = run_dir / "checkpoints"
    assert line.startswith(f"error: could not write checkpoint {folder}/") and line.endswith(
        f"disk full (ENOSPC); nothing was replaced, the previous checkpoints in {folder} are intact")
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".sha256")) == [
        "epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"]  # no temporary file left
    assert f"stopped: {line[len('error: '):]}" in (run_dir / "train.log").read_text()


def test_a_sweep_writes_and_prints_no_secret(tiny_root, tmp_path, monkeypatch):
    """Not at the end only: no file of the sweep ever holds a secret (SecretProbe looks whenever anything is logged,
    from the moment the sweep starts, and as each job starts and ends)."""
    secret, swept = "sk-" + "Q7" * 16, "tok-" + "Z9" * 12
    sweep, finds = tmp_path / "sweep", tmp_path / "finds.txt"
    monkeypatch.setenv("LDM_PROBE_WORDS", f"{secret},{swept}")
    monkeypatch.setenv("LDM_PROBE_OUT", str(finds))
    out = _train(tiny_root, sweep, f"+my_api_key={secret}", f"+wandb_token={swept},other-{swept}",
                 "trainer.max_steps=1", "+hydra.callbacks.probe._target_=fault_helpers.SecretProbe",
                 multirun=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert not finds.exists(), finds.read_text()
    assert "Launching 2 jobs" in out.stdout + out.stderr and "+my_api_key=<redacted>" in out.stdout + out.stderr
    files = [p for p in sweep.rglob("*") if p.is_file()]
    assert {"multirun.yaml", "index.json", "report.md", "report.csv"} <= {p.name for p in files}
    for text, where in [(out.stdout, "stdout"), (out.stderr, "stderr")] + [(p.read_bytes().decode(errors="replace"),
                                                                            str(p.relative_to(sweep))) for p in files]:
        assert secret not in text and swept not in text, f"a secret in {where}"
    index = json.loads((sweep / "index.json").read_text())
    assert "+my_api_key=<redacted>" in index["command"] and index["jobs"][0]["status"] == "completed"
    assert index["jobs"][0]["name"] == "shapes-0 wandb_token=<redacted>"


def test_a_sweep_whose_jobs_all_fail_exits_non_zero_in_one_line(tiny_root, tmp_path):
    """The jobs pass the config checks (a key added with `+` is AdamW's to judge) and fail when training starts:
    each is recorded as failed, the report is written, and the command fails in one line naming the first."""
    sweep = tmp_path / "sweep"
    out = _train(tiny_root, sweep, "+optim.optimizer.eps=-1,-2", "trainer.max_steps=1", multirun=True)
    line = _one_line_stop(out)
    assert line.startswith(f"error: sweep {sweep}: none of its 2 jobs completed: job 0 failed: ValueError: Invalid "
                           f"epsilon value: -1"), line  # fmt: skip
    index = json.loads((sweep / "index.json").read_text())
    assert [job["status"] for job in index["jobs"]] == ["failed", "failed"]
    assert (sweep / "report.md").is_file()
