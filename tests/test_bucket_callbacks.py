"""Bucketed training end to end (real Hydra config, Trainer, shards, tiny models): the largest-bucket warm-up
changes nothing the run trains on, and the bucket counts reach W&B (offline run file) as a table and a chart.

    .venv/bin/python -m pytest tests/test_bucket_callbacks.py -q
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fault_helpers import read_losses
from PIL import Image
from tiny import TINY, TINY_UNET, compose_config, make_tiny_root
from wandb_offline import history, run_files

from ldm.data.shards import write_shards
from ldm.run.fit import train

BUCKETS = [(16, 24), (20, 20), (24, 16)]  # latents 8x12, 10x10, 12x8 with the tiny VAE (factor 2); 20x20 largest
SIZES = [(32, 48), (48, 32), (40, 40), (33, 50), (50, 30), (22, 22), (10, 10)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = make_tiny_root(tmp_path_factory.mktemp("tiny"))
    rng = np.random.default_rng(0)
    samples = [(f"m{i:02d}", Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), "a large red circle")
               for i, (w, h) in enumerate(SIZES * 4)]  # fmt: skip
    write_shards(samples, root / "mixed", samples_per_shard=10, image_format="png", progress=False)
    return root


def overrides(root, losses) -> list[str]:
    return [f"data.train_shards={root / 'mixed'}", "data.buckets=[[16,24],[20,20],[24,16]]", "data.batch_size=3",
            "trainer.max_steps=3", "callbacks.fid=null", "callbacks.export=null", "callbacks.sample_grid=null",
            "callbacks.checkpoint=null", "+callbacks.record._target_=fault_helpers.RecordLoss",
            f"+callbacks.record.path={losses}"]  # fmt: skip


def test_warmup_at_the_largest_bucket_leaves_training_unchanged_and_counts_reach_wandb(root, tmp_path, monkeypatch,
                                                                                      caplog):  # fmt: skip
    without, with_ = tmp_path / "without.jsonl", tmp_path / "with.jsonl"
    train(compose_config(root, tmp_path / "a", [*overrides(root, without), "logger=none", "callbacks.bucket_warmup=null"]))

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="ldm.callbacks.bucket_warmup"):
        train(compose_config(root, tmp_path / "b", [*overrides(root, with_), "logger=wandb"]))
    assert any("largest bucket 20x20 (latents 10x10) tried with a batch of 3: it fits" in r.message
               for r in caplog.records)  # fmt: skip
    a, b = read_losses(without), read_losses(with_)
    assert len(a) == 3 and [r["keys"] for r in a] == [r["keys"] for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit for bit: RNG and gradients restored

    # the bucket counts, against the nearest aspect ratio worked out here
    counts = Counter()
    for w, h in SIZES * 4:
        bucket = min(BUCKETS, key=lambda s: abs(math.log(w / h) - math.log(s[0] / s[1])))
        if w >= bucket[0] and h >= bucket[1]:
            counts[bucket] += 1
    (run_file,) = run_files(tmp_path / "b")
    rows = history(run_file)
    logged = {k: v for row in rows for k, v in row.items() if k.startswith("data/bucket_images/")}
    assert logged == {f"data/bucket_images/{w}x{h}": float(counts[(w, h)]) for w, h in BUCKETS}
    assert any(row.get("data/too_small") == 4.0 for row in rows)  # the four 10x10 images
    table = next(row for row in rows if "data/buckets/path" in row)  # a table file, and the bar chart's table
    assert table["data/buckets/_type"] == "table-file" and table["data/bucket_images_table/_type"] == "table-file"
    data = json.loads((run_file.parent / "files" / table["data/buckets/path"]).read_text())
    assert data["columns"] == ["bucket", "width", "height", "images", "class_images"]
    assert [(r[1], r[2], r[3]) for r in data["data"]] == [(w, h, counts[(w, h)]) for w, h in BUCKETS]
    assert any("data/carried" in row for row in rows)


@pytest.mark.slow  # three subprocess runs (~2 min on 2 busy cores)
@pytest.mark.faults
def test_kill_9_mid_epoch_then_resume_auto_trains_the_same_bucketed_batches(root, tmp_path):
    """`python -m ldm.train` on bucketed data with 2 dataloader workers, killed with SIGKILL once a checkpoint
    in the middle of the second epoch exists (visits carried from the first pass pending), then resumed with
    resume=auto: step for step the batches (keys, bucket) and losses of the uninterrupted run."""
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    env.pop("WANDB_API_KEY", None)

    def cli(run_dir: Path, losses: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "ldm.train", "experiment=shapes", f"paths.data_dir={root}",
                f"hydra.run.dir={run_dir}", *TINY, *TINY_UNET, f"data.train_shards={root / 'mixed'}",
                "data.buckets=[[16,24],[20,20],[24,16]]", "data.batch_size=3", "data.num_workers=2",
                "trainer.max_steps=12", "callbacks.checkpoint.every_n_train_steps=2", "logger=none",
                "callbacks.fid=null", "callbacks.export=null", "callbacks.sample_grid=null",
                "+callbacks.record._target_=fault_helpers.RecordLoss", f"+callbacks.record.path={losses}",
                *extra]  # fmt: skip

    reference = tmp_path / "reference.jsonl"
    subprocess.run(cli(tmp_path / "ref", reference), env=env, check=True, capture_output=True, timeout=600)
    runs = tmp_path / "runs" / "shapes"
    killed = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(cli(runs / "first", killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second_epoch = next(r["step"] for r in read_losses(reference) if r["epoch"] == 1)  # 6: 24 images, 6 carried
    target = second_epoch + 2  # a checkpoint inside the second epoch, with the first pass's carried visits pending
    while not (runs / "first" / "checkpoints").exists() or not any(
            int(p.stem.split("step=")[1]) >= target for p in (runs / "first" / "checkpoints").glob("*step=*.ckpt")):
        assert proc.poll() is None, "the run ended before it was killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = max(int(p.stem.split("step=")[1]) for p in (runs / "first" / "checkpoints").glob("*step=*.ckpt"))
    assert saved < 12
    resumed = tmp_path / "resumed.jsonl"
    subprocess.run(cli(runs / "second", resumed, "resume=auto"), env=env, check=True, capture_output=True,
                   timeout=600)  # fmt: skip
    expected = {r["step"]: r for r in read_losses(reference)}
    got = read_losses(resumed)
    assert got[0]["step"] == saved + 1 and got[-1]["step"] == 12
    for row in got:
        ref = expected[row["step"]]
        assert (row["keys"], row["epoch"]) == (ref["keys"], ref["epoch"]), row["step"]
        assert abs(row["loss"] - ref["loss"]) <= 1e-6, row["step"]
