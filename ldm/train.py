"""Train a stage (latent diffusion, or the VAE) from a Hydra config.

    python -m ldm.train experiment=shapes                      # the built-in default (see `make train`)
    python -m ldm.train experiment=shapes trainer.max_steps=50 logger=csv
    python -m ldm.train experiment=shapes ckpt_path=runs/.../checkpoints/last.ckpt   # resume
    python -m ldm.train experiment=shapes resume=auto     # continue the newest valid checkpoint of this run
    python -m ldm.train -m experiment=shapes optim.lr=1e-4,3e-4                     # a sweep (ldm/sweep.py)

Every run writes its checkpoints, samples and resolved config under its own Hydra run directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from ldm.lightning.checkpoint import CheckpointError
from ldm.lightning.preemption import Preempted
from ldm.lightning.resume import resolve_resume
from ldm.sweep import run_job
from ldm.utils.secrets import redact, redact_argv, redact_files
from ldm.validate import ConfigError, validate_config


def train(cfg: DictConfig) -> dict[str, float]:
    validate_config(cfg)  # seconds, before anything heavy
    ckpt_path = resolve_resume(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.model, _convert_="all")
    module.run_config = redact(OmegaConf.to_container(cfg, resolve=True))  # no API keys in logs or checkpoints
    callbacks = [instantiate(c, _convert_="all") for c in (cfg.get("callbacks") or {}).values() if c]
    logger = instantiate(cfg.logger, _convert_="all") if cfg.get("logger") else False
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    if logger:
        logger.log_hyperparams(module.run_config)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()  # close this run: a later run in the process (a sweep) gets its own
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    redact_argv()
    if hydra_cfg.output_subdir:
        redact_files(Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir)
    try:
        return run_job(cfg, train)  # sweeps (ldm/sweep.py): W&B group, job index, DDP ranks, failures, objective
    except (ConfigError, CheckpointError) as error:
        sys.exit(f"error: {error}")
    except Preempted as preempted:
        sys.exit(preempted.exit_code)


if __name__ == "__main__":
    main()
