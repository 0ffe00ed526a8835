"""Bucketed training end to end (real Hydra config, Trainer, shards, tiny models): the largest-bucket warm-up
changes nothing the run trains on, and the bucket counts reach W&B (offline run file) as a table and a chart.

    .venv/bin/python -m pytest tests/test_bucket_callbacks.py -q
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter

import numpy as np
import pytest
from fault_helpers import read_losses
from PIL import Image
from tiny import compose_config, make_tiny_root
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
    rows = history(run_file, wait_for="data/carried")
    logged = {k: v for row in rows for k, v in row.items() if k.startswith("data/bucket_images/")}
    assert logged == {f"data/bucket_images/{w}x{h}": float(counts[(w, h)]) for w, h in BUCKETS}
    assert any(row.get("data/too_small") == 4.0 for row in rows)  # the four 10x10 images
    table = next(row for row in rows if "data/buckets/path" in row)  # a table file, and the bar chart's table
    assert table["data/buckets/_type"] == "table-file" and table["data/bucket_images_table/_type"] == "table-file"
    data = json.loads((run_file.parent / "files" / table["data/buckets/path"]).read_text())
    assert data["columns"] == ["bucket", "width", "height", "images", "class_images"]
    assert [(r[1], r[2], r[3]) for r in data["data"]] == [(w, h, counts[(w, h)]) for w, h in BUCKETS]
    assert any("data/carried" in row for row in rows)
