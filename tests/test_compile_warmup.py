"""The CIFAR-10 recipe's compile warm-up (Makefile, CIFAR10_WARMUP): a stage-2 run on an *untrained* VAE built with
the trained one's shapes fills Inductor's compile cache so that the real run, in another process, loading the saved
VAE, compiles nothing: every AOTAutograd graph of its compiled U-Net and VAE encoder is a cache hit (on 2 CPU cores the
first step went from ~90 s to ~6 s). Slow: the first process compiles a tiny U-Net on the CPU (~2.5 minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

RUN = """
import json, sys
from pathlib import Path
from tiny import compose_config
from ldm.run.fit import train
import torch._dynamo.utils as du
root, run_dir, vae = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
overrides = ["logger=none", "trainer.max_steps=2", "model.compile=true", "callbacks.fid=null", "callbacks.export=null",
             "callbacks.checkpoint=null", "callbacks.val_loss=null"]
if vae == "untrained":  # the shapes of root/models/vae-shapes (tests/tiny.py), random weights
    overrides += ["model/vae=scratch", "model.vae.block_out_channels=[8,16]", "model.vae.norm_num_groups=4",
                  "model.vae.sample_size=16", "+model.vae.frozen=true"]
train(compose_config(root, run_dir, overrides))
print(json.dumps({k: dict(du.counters[k]) for k in ("aot_autograd", "inductor")}))
"""


def _run(root: Path, run_dir: Path, vae: str, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", RUN, str(root), str(run_dir), vae], env=env, capture_output=True,
                         text=True, timeout=900, cwd=run_dir.parent)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_warm_up_on_an_untrained_vae_leaves_the_real_run_nothing_to_compile(tmp_path):
    from tiny import make_tiny_root

    root, cache = make_tiny_root(tmp_path / "root"), tmp_path / "inductor"
    warm = _run(root, tmp_path / "warm-up", "untrained", cache)
    assert warm["aot_autograd"].get("autograd_cache_miss", 0) > 0 and not warm["aot_autograd"].get("autograd_cache_hit")
    real = _run(root, tmp_path / "real", "saved", cache)
    assert real["aot_autograd"].get("autograd_cache_hit", 0) >= 2  # the U-Net's forward-backward, the VAE encoder
    assert not real["aot_autograd"].get("autograd_cache_miss") and not real["inductor"].get("fxgraph_cache_miss")
