"""What every config key may hold: one entry per key, checked right after Hydra composes, before anything heavy.

    check_schema(cfg, added={"my_api_key"})   # ConfigError("data.batch_size=-4: expected an integer >= 1")

`KEYS` has one line per key of conf/ (tests/test_schema.py fails when a key of conf/ has none): its type, range
or choices (`ldm.utils.rules`). A new key is one more line here. Keys added on purpose with `+key=` need none;
a section that names a `_target_` this table does not know is the user's own component, its keys unchecked.

The names a key may take (samplers, LR and noise schedules, prediction types, Lightning precisions) and the
`_target_`s the checks recognise parts by are written out here, because the modules that own them import torch;
tests/test_schema.py checks every one against the code that owns it (`ldm.diffusion`, diffusers, Lightning,
`ldm.utils.targets.target_of` of the real classes and functions). Plain Python + omegaconf: no torch.
"""

from __future__ import annotations

from collections.abc import Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from ldm.utils.rules import (
    Any,
    Bool,
    Choice,
    ConfigError,
    Float,
    Int,
    ListOf,
    Options,
    Path,
    Section,
    Str,
    check_tree,
)

# --- names, as the code that owns them spells them (tests/test_schema.py compares) -----------------------
SAMPLERS = ("ddim", "ddpm", "dpm++", "dpm++_karras", "dpm++_sde_karras", "dpmsolver++", "euler", "euler_a",
            "euler_karras", "lms", "pndm")  # ldm.diffusion.sampling.SCHEDULERS
NOISE_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # ldm.diffusion.schedules.SCHEDULES
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")  # ldm.diffusion.parameterization.TARGETS
LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                "piecewise_constant")  # diffusers.optimization.SchedulerType  # fmt: skip
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
              "32-true", "64-true", 64, 32, 16, "64", "32", "16", "bf16")  # Lightning's _PRECISION_INPUT  # fmt: skip
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")

# --- the `_target_`s the checks recognise parts by (target_of of the real objects; tests compare) ---------
LATENT_DIFFUSION = "ldm.stages.latent_diffusion.LatentDiffusion"
CLIP_MODULE = "ldm.stages.clip.CLIPModule"
SHARD_DATA_MODULE = "ldm.data.datamodule.ShardDataModule"
BUILD_UNET = "ldm.models.unet.build_unet"
LOAD_UNET = "ldm.models.unet.load_unet"
BUILD_VAE = "ldm.models.vae.build_vae"
LOAD_VAE = "ldm.models.vae.load_vae"
HF_CLIP_TEXT_ENCODER = "ldm.models.text_encoders.hf_clip_text_encoder"
OPEN_CLIP_TEXT_ENCODER = "ldm.models.text_encoders.open_clip_text_encoder"
SDXL_TEXT_ENCODERS = "ldm.models.sdxl.sdxl_text_encoders"
SHARDED_UNET_STRATEGY = "ldm.training.fsdp.ShardedUNetStrategy"
LORA = "ldm.models.adapters.LoRA"
WANDB_LOGGER = "ldm.training.loggers.wandb_logger"

# --- rules used by several keys ---------------------------------------------------------------------------
COUNT = Int(min=1)
SEED = Int(min=0, max=2**32 - 1)
DURATION = Str(none=True, pattern=r"\d+:\d\d:\d\d:\d\d", note="DD:HH:MM:SS")  # Lightning's Timer
SHARDS = Str() | ListOf(Str(), min_len=1)  # a folder, brace pattern, glob, list file or url; or a list of them
TARGET = Str()
PARTIAL = Bool()
CHANNELS = ListOf(Int(min=1), min_len=1)
BLOCK_TYPES = ListOf(Str(), min_len=1)
STEPS_OR_OFF = Int(min=0, none=True, note="(0 or null: off)")

# --- command-line options with no config key of their own (the others use their key's rule: ldm.utils.cli.rule_type)
# noise levels sigma (low, high]: guidance only there (ldm.diffusion.sampling.guides_at); ldm.sample/evaluate too
GUIDANCE_INTERVAL = ListOf(Float(min=0), min_len=2, max_len=2, none=True)
STRENGTH = Float(0, 1, note="(img2img: 0 gives the image back, 1 starts from noise)")  # ldm.sample --strength

KEYS = {
    # --- conf/train.yaml ----------------------------------------------------------------------------------
    "name": Str(),
    "seed": SEED,
    "ckpt_path": Path(exists="file", none=True),
    "resume": Choice("auto", "auto_or_new") | Path(exists="any", none=True, note="expected auto, auto_or_new, a "
                                                                               "checkpoint file or a run directory"),
    "sweep": Any(),  # set by the sweep resolver, not by users
    "prompts": ListOf(Str(), min_len=1),
    "objective.metric": Str(none=True),
    "objective.reduce": Choice("best", "last"),
    "objective.direction": Choice("minimize", "maximize"),
    # --- conf/paths ---------------------------------------------------------------------------------------
    "paths.data_dir": Path(),
    "paths.models_dir": Path(),
    "paths.output_dir": Path(),
    "paths.clip_dir": Path(),
    "paths.vae_dir": Path(),
    # --- conf/data ----------------------------------------------------------------------------------------
    "data._target_": TARGET,
    "data.train_shards": SHARDS,
    "data.val_shards": Str(none=True) | ListOf(Str(), min_len=1),
    "data.resolution": Int(min=8, none=True, note="(pixels)"),
    "data.batch_size": COUNT,
    "data.num_workers": Int(min=0, none=True, note="(null: none on a CPU, half the cores up to 8 with a GPU)"),
    "data.random_flip": Bool(),
    "data.text_states": Bool() | Choice("auto"),
    "data.shuffle_buffer": Int(min=0),
    "data.seed": SEED,
    "data.samples_per_epoch": Int(min=1, none=True),
    "data.max_bad_fraction": Float(0, 1),
    "data.center_crop": Bool(),
    "data.upscale": Bool(),
    "data.buckets": ListOf(ListOf(Int(min=8), min_len=2, max_len=2), min_len=1) | Section(none=True),
    "data.buckets.area": Int(min=64, none=True, note="(pixels; null: data.resolution squared)"),
    "data.buckets.step": Int(min=8),
    "data.buckets.max_aspect": Float(min=1),
    "data.captions": Section(none=True),
    "data.captions.keep_tokens": Int(min=0),
    "data.captions.shuffle_tags": Bool(),
    "data.captions.tag_dropout": Float(0, 1, open_max=True),
    "data.captions.trigger": Str(none=True),
    "data.captions.separator": Str(),
    "data.dreambooth": Section(none=True),
    "data.dreambooth.class_prompt": Str(),
    "data.dreambooth.class_shards": Path(),
    "data.dreambooth.num_class_images": COUNT,
    "data.dreambooth.prior_loss_weight": Float(min=0),
    "data.dreambooth.sample_batch_size": COUNT,
    "data.jpeg_draft": Bool(),
    "data.uint8": Bool(),
    # --- conf/diffusion -----------------------------------------------------------------------------------
    "diffusion.schedule": Choice(*NOISE_SCHEDULES),
    "diffusion.num_train_timesteps": Int(min=2, max=100_000),
    "diffusion.beta_start": Float(0, 1, open_min=True, open_max=True),
    "diffusion.beta_end": Float(0, 1, open_min=True, open_max=True),
    "diffusion.zero_terminal_snr": Bool(),
    "diffusion.prediction_type": Choice(*PREDICTION_TYPES),
    "diffusion.cfg_dropout": Float(0, 1),
    "diffusion.min_snr_gamma": Float(min=0, open_min=True, none=True),
    "diffusion.offset_noise": Float(0, 1),
    # --- conf/sampling ------------------------------------------------------------------------------------
    "sampling.sampler": Choice(*SAMPLERS),
    "sampling.num_inference_steps": Int(min=1, max=1000),
    "sampling.guidance_scale": Float(min=0),
    "sampling.negative_prompt": Str(none=True),
    "sampling.guidance_interval": GUIDANCE_INTERVAL,
    # --- conf/optim ---------------------------------------------------------------------------------------
    "optim.lr": Float(min=0),  # 0 trains nothing (e.g. a run that continues a LoRA file unchanged)
    "optim.weight_decay": Float(min=0),
    "optim.warmup_steps": Int(min=0),
    "optim.schedule": Choice(*LR_SCHEDULES),
    "optim.optimizer": Section(),
    "optim.optimizer._target_": TARGET,
    "optim.optimizer._partial_": PARTIAL,
    "optim.optimizer.lr": Float(min=0),
    "optim.optimizer.weight_decay": Float(min=0),
    "optim.optimizer.betas": ListOf(Float(0, 1, open_max=True), min_len=2, max_len=2),
    "optim.optimizer.fused": Bool(none=True),
    "optim.lr_scheduler": Section(),
    "optim.lr_scheduler._target_": TARGET,
    "optim.lr_scheduler._partial_": PARTIAL,
    "optim.lr_scheduler.name": Choice(*LR_SCHEDULES),
    "optim.lr_scheduler.num_warmup_steps": Int(min=0),
    "optim.lr_scheduler.num_training_steps": Int(min=-1),
    # --- conf/trainer -------------------------------------------------------------------------------------
    "trainer._target_": TARGET,
    "trainer.default_root_dir": Path(),
    "trainer.accelerator": Choice(*ACCELERATORS),
    "trainer.devices": Int(min=1) | Choice("auto", -1) | ListOf(Int(min=0), min_len=1),
    "trainer.num_nodes": COUNT,
    "trainer.strategy": Str() | Section(),
    "trainer.precision": Choice(*PRECISIONS),
    "trainer.max_steps": Int(min=-1, note="(-1: no limit)"),
    "trainer.max_epochs": Int(min=-1, none=True, note="(-1: no limit)"),
    "trainer.gradient_clip_val": Float(min=0, none=True),
    "trainer.log_every_n_steps": COUNT,
    "trainer.num_sanity_val_steps": Int(min=-1),
    "trainer.enable_model_summary": Bool(),
    "trainer.enable_progress_bar": Bool(),
    "trainer.plugins": ListOf(Options(), none=True),
    "trainer.val_check_interval": Int(min=1, none=True) | Float(0, 1, open_min=True, note="(a fraction of an epoch)"),
    "trainer.check_val_every_n_epoch": Int(min=1, none=True),
    "trainer.max_time": DURATION,
    "trainer.benchmark": Bool(none=True),
    "trainer.limit_val_batches": Int(min=0) | Float(0, 1),
    "trainer.strategy._target_": TARGET,
    "trainer.strategy.gradient_as_bucket_view": Bool(),  # +trainer/strategy=ddp
    "trainer.strategy.static_graph": Bool(),
    "trainer.strategy.sharded_module": Str(),  # +trainer/strategy=fsdp
    "trainer.strategy.block_classes": ListOf(Str(), min_len=1),
    "trainer.strategy.sharding_strategy": Choice(*FSDP_SHARDING),
    # --- conf/logger (logger=none: null) ------------------------------------------------------------------
    "logger": Section(none=True),
    "logger._target_": TARGET,
    "logger.project": Str(),
    "logger.name": Str(),
    "logger.save_dir": Path(),
    "logger.group": Str(none=True),
    "logger.tags": ListOf(Str(), none=True),
    # --- conf/model: the stage (ldm, vae_stage, clip_stage) -----------------------------------------------
    "model._target_": TARGET,
    "model.optimizer": Any(),  # ${optim.optimizer}: checked there
    "model.lr_scheduler": Any(),  # ${optim.lr_scheduler}
    "model.diffusion": Any(),  # ${diffusion}
    "model.sampling": Any(),  # ${sampling}
    "model.ema_decay": Float(0, 1, open_max=True, none=True),
    "model.ema_warmup": Bool(),
    "model.ema_every_n_steps": COUNT,
    "model.checkpoint_frozen": Bool(),
    "model.text_cache_size": Int(min=0),
    "model.channels_last": Bool(),
    "model.compile": Bool() | Options(),
    "model.compile.mode": Choice("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "model.compile.dynamic": Bool(none=True),
    "model.compile.backend": Choice("inductor", "cudagraphs", "aot_eager", "eager"),  # ldm/training/compile.py
    "model.gradient_checkpointing": Bool(),
    "model.vae_bf16": Bool(),
    "model.step_graph": Bool() | Choice("auto"),
    "model.kl_weight": Float(min=0),  # vae_stage
    "model.reconstruction_loss": Choice("l1", "l2"),
    "model.disc_start": Int(min=0),
    "model.disc_weight": Float(min=0),
    "model.val_max_images": COUNT,  # clip_stage
    "model.hard_negative_weight": Float(min=0),
    "model.caption_groups": Section(none=True),
    "model.caption_groups.*": ListOf(Str(), min_len=2),
    # --- conf/model/unet ----------------------------------------------------------------------------------
    "model.unet._target_": TARGET,
    "model.unet.sample_size": COUNT,
    "model.unet.in_channels": COUNT,
    "model.unet.out_channels": COUNT,
    "model.unet.block_out_channels": CHANNELS,
    "model.unet.down_block_types": BLOCK_TYPES,
    "model.unet.up_block_types": BLOCK_TYPES,
    "model.unet.layers_per_block": COUNT,
    "model.unet.attention_head_dim": COUNT | CHANNELS,
    "model.unet.cross_attention_dim": COUNT,
    "model.unet.norm_num_groups": COUNT,
    "model.unet.path": Str(),
    "model.unet.subfolder": Str(none=True),
    # --- conf/model/vae -----------------------------------------------------------------------------------
    "model.vae._target_": TARGET,
    "model.vae._partial_": PARTIAL,
    "model.vae.path": Str(),
    "model.vae.subfolder": Str(none=True),
    "model.vae.block_out_channels": CHANNELS,
    "model.vae.latent_channels": COUNT,
    "model.vae.layers_per_block": COUNT,
    "model.vae.norm_num_groups": COUNT,
    "model.vae.sample_size": COUNT,
    # --- conf/model/text_encoder --------------------------------------------------------------------------
    "model.text_encoder._target_": TARGET,
    "model.text_encoder._partial_": PARTIAL,
    "model.text_encoder.path": Str(),
    "model.text_encoder.subfolder": Str(none=True),
    "model.text_encoder.tokenizer_subfolder": Str(none=True),
    "model.text_encoder.arch": Str(),
    "model.text_encoder.pretrained": Str(none=True),
    "model.text_encoder.layer": Choice("penultimate", "last"),
    "model.text_encoder.torch_dtype": Str(none=True),
    # --- conf/model/adapter (model/adapter=lora; null: the whole U-Net trains) ------------------------------
    "model.adapter": Section(none=True),
    "model.adapter._target_": TARGET,
    "model.adapter.rank": COUNT,
    "model.adapter.alpha": Float(min=0, open_min=True, none=True),
    "model.adapter.dropout": Float(0, 1, open_max=True),
    "model.adapter.target_modules": ListOf(Str(), min_len=1),
    "model.adapter.conv_rank": Int(min=1, none=True),
    "model.adapter.conv_alpha": Float(min=0, open_min=True, none=True),
    "model.adapter.conv_target_modules": ListOf(Str(), min_len=1),
    "model.adapter.text_encoder": Bool(),
    "model.adapter.text_encoder_target_modules": ListOf(Str(), min_len=1),
    "model.adapter.base_dtype": Choice("auto", "float32", "bfloat16", "float16"),
    "model.adapter.init_from": Path(exists="any", none=True),
    "model.adapter.init_lora_weights": Choice("gaussian", True, "true"),
    "model.adapter.align_rank": COUNT,
    # --- conf/model/discriminator (vae_stage) ---------------------------------------------------------------
    "model.discriminator": Section(none=True),
    "model.discriminator._target_": TARGET,
    "model.discriminator.channels": COUNT,
    "model.discriminator.num_layers": COUNT,
    # --- conf/model/clip_stage.yaml: open_clip config overrides -------------------------------------------
    "model.clip._target_": TARGET,
    "model.clip.arch": Str(),
    "model.clip.seed": Int(min=0, max=2**32 - 1, none=True),
    "model.clip.embed_dim": COUNT,
    "model.clip.vision_cfg.image_size": COUNT,
    "model.clip.vision_cfg.patch_size": COUNT,
    "model.clip.vision_cfg.width": COUNT,
    "model.clip.vision_cfg.layers": COUNT,
    "model.clip.vision_cfg.head_width": COUNT,
    "model.clip.text_cfg.context_length": COUNT,
    "model.clip.text_cfg.width": COUNT,
    "model.clip.text_cfg.heads": COUNT,
    "model.clip.text_cfg.layers": COUNT,
    # --- conf/callbacks: one section per callback (null turns one off) ------------------------------------
    "callbacks": Section(none=True),
    "callbacks.*": Section(none=True),
    "callbacks.checkpoint._target_": TARGET,
    "callbacks.checkpoint.dirpath": Path(),
    "callbacks.checkpoint.every_n_train_steps": STEPS_OR_OFF,
    "callbacks.checkpoint.save_last": Bool() | Choice("link"),
    "callbacks.checkpoint.enable_version_counter": Bool(),
    "callbacks.checkpoint.save_top_k": Int(min=-1, note="(-1: all)"),
    "callbacks.checkpoint.monitor": Str(none=True),
    "callbacks.checkpoint.mode": Choice("min", "max"),
    "callbacks.clock._target_": TARGET,
    "callbacks.clock.duration": DURATION,
    "callbacks.clock.exclude_evaluations": Bool(),
    "callbacks.data_health._target_": TARGET,
    "callbacks.data_health.log_every_n_steps": COUNT,
    "callbacks.bucket_counts._target_": TARGET,
    "callbacks.bucket_warmup._target_": TARGET,
    "callbacks.export._target_": TARGET,
    "callbacks.export.out_dir": Path(),
    "callbacks.export.lora_dir": Path(none=True),
    "callbacks.fid._target_": TARGET,
    "callbacks.fid.every_n_steps": STEPS_OR_OFF,
    "callbacks.fid.every_n_images": STEPS_OR_OFF,
    "callbacks.fid.num_images": Int(min=2),
    "callbacks.fid.cpu_num_images": Int(min=2),
    "callbacks.fid.num_reference": Int(min=2, none=True),
    "callbacks.fid.shards": Str(none=True) | ListOf(Str(), min_len=1),
    "callbacks.fid.cache_dir": Path(),
    "callbacks.fid.network": Path(exists="file", none=True),
    "callbacks.fid.clip_model": Path(exists="dir", none=True),
    "callbacks.fid.batch_size": COUNT,
    "callbacks.fid.seed": SEED,
    "callbacks.fid.guidance_scale": Float(min=0, none=True),
    "callbacks.fid.num_inference_steps": Int(min=1, max=1000, none=True),
    "callbacks.fid.sampler": Choice(*SAMPLERS, none=True),
    "callbacks.fid.use_ema": Bool(),
    "callbacks.fid.autocast": Bool(),
    "callbacks.fid.compile": Bool(),
    "callbacks.fid.at_end": Bool(),
    "callbacks.fid.grid_images": Int(min=0),
    "callbacks.fid.max_time_fraction": Float(0, 1, open_min=True, none=True),
    "callbacks.metrics_log._target_": TARGET,
    "callbacks.metrics_log.path": Path(),
    "callbacks.nonfinite._target_": TARGET,
    "callbacks.nonfinite.max_in_a_row": COUNT,
    "callbacks.nonfinite.check_every_n_steps": COUNT,
    "callbacks.preemption._target_": TARGET,
    "callbacks.preemption.exit_code": Int(min=0, max=255),
    "callbacks.reconstructions._target_": TARGET,
    "callbacks.reconstructions.num_images": Int(min=2),
    "callbacks.reconstructions.every_n_steps": STEPS_OR_OFF,
    "callbacks.reconstructions.cache_dir": Path(),
    "callbacks.reconstructions.network": Path(exists="file", none=True),
    "callbacks.reconstructions.batch_size": COUNT,
    "callbacks.reconstructions.grid_images": Int(min=0),
    "callbacks.sample_grid._target_": TARGET,
    "callbacks.sample_grid.prompts": ListOf(Str(), min_len=1),
    "callbacks.sample_grid.every_n_steps": STEPS_OR_OFF,
    "callbacks.sample_grid.seed": SEED,
    "callbacks.step_seed._target_": TARGET,
    "callbacks.step_seed.seed": SEED,
    "callbacks.cpu_threads._target_": TARGET,
    "callbacks.cpu_threads.every_n_seconds": Float(min=0, open_min=True),
    "callbacks.cpu_threads.startup_seconds": Float(min=0),
    "callbacks.cpu_threads.threads": Int(min=1, none=True),
    "callbacks.val_loss._target_": TARGET,
    "callbacks.val_loss.every_n_steps": STEPS_OR_OFF,
    "callbacks.val_loss.num_samples": COUNT,
    "callbacks.val_loss.batch_size": COUNT,
    "callbacks.val_loss.shards": Str(none=True) | ListOf(Str(), min_len=1),
    "callbacks.val_loss.seed": SEED,
    "callbacks.val_loss.at_end": Bool(),
    "callbacks.throughput._target_": TARGET,
    "callbacks.throughput.log_every_n_steps": COUNT,
    "callbacks.profile._target_": TARGET,
    "callbacks.profile.start": Int(min=0),
    "callbacks.profile.steps": COUNT,
    "callbacks.profile.out": Path(none=True),
    "callbacks.profile.row_limit": COUNT,
    "callbacks.profile.python_steps": Int(min=0),
    "callbacks.profile.stacks": Bool(),
}  # fmt: skip


def plain(cfg: DictConfig) -> dict:
    """The config resolved to plain Python; a `???` or an interpolation that does not resolve is one line."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        key = error.full_key
        raise ConfigError(f"{key} is required but not set (???): set it on the command line, e.g. {key}=...") from None
    except InterpolationResolutionError as error:
        raise ConfigError(f"{error.full_key}: {str(error).splitlines()[0]}") from None


def interpolated_keys(cfg: DictConfig, prefix: str = "") -> set[str]:
    """Dotted keys whose value is an interpolation (`model.optimizer: ${optim.optimizer}`)."""
    keys = set()
    for name in cfg.keys():
        key = f"{prefix}{name}"
        if OmegaConf.is_interpolation(cfg, name):
            keys.add(key)
        elif isinstance(cfg._get_node(name), DictConfig):
            keys |= interpolated_keys(cfg._get_node(name), f"{key}.")
    return keys


def check_schema(cfg: DictConfig, added: Iterable[str] | None = None, files: bool = True) -> dict:
    """Check every key of ``cfg`` against `KEYS`; return the config as plain Python. ``added``: the keys the command
    line added on purpose (`+key=...`); None means unknown keys are not checked (a config composed elsewhere).
    ``files=False``: not yet whether paths that must exist do (`check_paths`).

    Keys set by the user are checked before the interpolations that copy them, so a bad value is reported under
    the key it was given to (`trainer.max_steps`, not `optim.lr_scheduler.num_training_steps`)."""
    config = plain(cfg)
    strict, added = added is not None, tuple(added or ())
    check_tree(config, KEYS, added, strict, skip=interpolated_keys(cfg), files=files)
    check_tree(config, KEYS, added, strict, files=files)
    return config


def check_paths(config: dict) -> None:
    """The paths `KEYS` says must exist, do (after `check_schema(..., files=False)` passed)."""
    check_tree(config, KEYS, strict=False)
