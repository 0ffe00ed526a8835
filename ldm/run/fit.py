"""Train one run from its composed config: `train(cfg)` in this process, `run(cfg)` starting ranks when needed.

    from ldm.run.fit import train
    metrics = train(cfg)        # check, resume, seed, build (data, stage, callbacks, logger, trainer), fit
                                # (DreamBooth: the class images the data lacks are generated first)

Everything is built from the config by `hydra.utils.instantiate`; nothing is added to it here, so the config a
run saves (`.hydra/config.yaml`) is the one it trained with (`trainer.max_time` goes to `callbacks.clock` where a run
has one: ldm/callbacks/clock.py). Resuming (`resume=auto`) is the one exception: it
points `paths.output_dir` (and the W&B run id) at the run being continued, and says so in the log.
"""

from __future__ import annotations

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.loggers import WandbLogger

from ldm.run.adapter_check import check_adapter
from ldm.run.class_images import ensure_class_images
from ldm.run.data_check import check_buckets
from ldm.run.launch import launch, ranks_to_launch
from ldm.run.resume import resolve_resume
from ldm.run.validate import validate_config
from ldm.training.allocator import default_allocator_settings
from ldm.utils.exit_watch import watch_exit
from ldm.utils.secrets import redact
from ldm.utils.sweep_index import register_resolvers

register_resolvers()  # ${ldm.run_name:...} and friends in conf/ resolve wherever a config is trained


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the run in this process; returns the trainer's final metrics."""
    validate_config(cfg)  # seconds, before anything heavy
    default_allocator_settings()  # expandable segments, before the first CUDA allocation (bucket shapes)
    check_adapter(cfg)  # the adapter against the model's layers (on the meta device)
    check_buckets(cfg)  # a batch some bucket can fill (image sizes from sizes.json, or their headers once)
    ckpt_path = resolve_resume(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.model, _convert_="all")
    module.run_config = redact(OmegaConf.to_container(cfg, resolve=True))  # no API keys in logs or checkpoints
    ensure_class_images(datamodule, module)  # DreamBooth: class images from the base model, before any step
    callbacks = [instantiate(c, _convert_="all") for c in (cfg.get("callbacks") or {}).values() if c]
    logger = instantiate(cfg.logger, _convert_="all") if cfg.get("logger") else False
    clock = {"max_time": None} if any(isinstance(c, Timer) for c in callbacks) else {}  # callbacks.clock runs it
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, **clock)
    if logger:
        logger.log_hyperparams(module.run_config)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()  # close this run: a later run in the process (a sweep) gets its own
        watch_exit()  # LDM_EXIT_STACKS: where the time goes between here and the process's end
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def run(cfg: DictConfig) -> dict[str, float]:
    """Train ``cfg``: in this process, or on the ranks it starts itself (DDP over several devices, ldm.run.launch);
    rank 0's final metrics."""
    nprocs = ranks_to_launch(cfg.trainer)
    if nprocs:
        validate_config(cfg)  # a config mistake in one line here, before any rank starts (each rank checks again)
        check_adapter(cfg)
        check_buckets(cfg)
        return launch(cfg, cfg.paths.output_dir, nprocs)
    return train(cfg)
