"""Train a stage (CLIP, VAE or latent diffusion) from a Hydra config.

    python -m ldm.train experiment=shapes                      # the built-in default (see `make train`)
    python -m ldm.train experiment=shapes trainer.max_steps=50 logger=csv
    python -m ldm.train experiment=shapes ckpt_path=runs/.../checkpoints/last.ckpt   # resume
    python -m ldm.train experiment=shapes resume=auto     # continue the newest valid checkpoint of this run
    python -m ldm.train -m experiment=shapes optim.lr=1e-4,3e-4                     # a sweep (ldm/sweeps/)

Every run writes its checkpoints, samples and resolved config under its own Hydra run directory. A single run
goes straight to `ldm.run.fit.run`; only a multirun's jobs go through the sweep code (`ldm.sweeps.job`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ldm.callbacks.preemption import Preempted
from ldm.run.fit import run
from ldm.run.validate import ConfigError
from ldm.sweeps.job import run_job
from ldm.training.checkpoint import CheckpointError
from ldm.utils.secrets import redact_argv, redact_files


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    redact_argv()
    if hydra_cfg.output_subdir:
        redact_files(Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir)
    try:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return run_job(cfg)  # index entry, failure capture, the sweeper's objective
        run(cfg)
        return None
    except (ConfigError, CheckpointError) as error:
        sys.exit(f"error: {error}")
    except Preempted as preempted:
        sys.exit(preempted.exit_code)


if __name__ == "__main__":
    main()
