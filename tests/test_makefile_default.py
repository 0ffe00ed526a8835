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


def test_stages_0_and_1_run_side_by_side_where_a_gpu_is():
    """STAGE_JOBS (2 where `nvidia-smi -L` lists a GPU, else 1): the CLIP and VAE stages in one make with that many
    jobs, their output kept whole per stage when they run side by side; the latent-diffusion stage after both."""

    def recipe(jobs: str) -> list[str]:
        out = subprocess.run(["make", "-n", "-B", "train", "UV=uv", "DATA=DATA", f"STAGE_JOBS={jobs}"], cwd=REPO,
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        return [line for line in out.splitlines() if "clip vae" in line or "-m ldm.train" in line]

    side_by_side, one_by_one = recipe("2"), recipe("1")
    assert "-j2 --output-sync=target clip vae" in side_by_side[0] and "-j1  clip vae" in one_by_one[0]
    for lines in (side_by_side, one_by_one):
        assert "experiment=shapes " in lines[-1] + " " and "experiment=shapes_" not in lines[-1]
