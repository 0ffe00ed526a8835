"""`make train`'s extra overrides reach their stage (the Makefile's own lines, `make -n`): ARGS the latent-diffusion
stage, CLIP_ARGS stage 0 and VAE_ARGS stage 1 (README: a run without W&B end to end)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_each_stage_gets_its_own_overrides():
    recipe = subprocess.run(["make", "-n", "-B", "train", "UV=uv", "DATA=DATA", "ARGS=a=1", "CLIP_ARGS=c=2",
                             "VAE_ARGS=v=3"], cwd=REPO, check=True, capture_output=True, text=True).stdout  # fmt: skip
    stages = {line.split("experiment=")[1].split()[0]: line.split()[-1]
              for line in recipe.splitlines() if "-m ldm.train experiment=" in line}  # fmt: skip
    assert stages == {"shapes_clip": "c=2", "shapes_vae": "v=3", "shapes": "a=1"}
