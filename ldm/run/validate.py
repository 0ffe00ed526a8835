"""Check a training config in seconds, before anything heavy is built; one line names what is wrong.

    validate_config(cfg)   # raises ConfigError("data.resolution=30 is not a multiple of ...")

Checks, from config files only (model configs are JSON, shard counts come from manifest.json or tar
headers; no weights are loaded): required values are set; model paths exist (a local path, or a hub id
when the hub is not offline); the resolution is a multiple of the VAE's downsampling factor; the U-Net's
cross-attention width equals the text encoder's hidden size; sampler, LR schedule, noise schedule and
prediction type are known names; the shard patterns match files; a batch is no larger than the data;
+trainer/strategy=fsdp is not combined with what it cannot do (no EMA, compile, channels_last, ...); LoRA
settings are valid, every target module matches a layer, and an `init_from` file fits the model (key, shape, rank,
alpha, base model), checked on the model built on the meta device from its config.

Every fact comes from the code that owns it: parts are recognised by the function their `_target_` names
(`ldm.utils.targets`), names are checked against the tables the samplers, schedules and parameterisations use,
shard counts come from `ldm.data.format`. Aspect-ratio buckets (sizes a multiple of the VAE factor, a maximum
aspect ratio of at least 1, a batch some bucket can fill), tag-caption options and DreamBooth settings are checked
by the data code that uses them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import open_clip
import torch
from diffusers import UNet2DConditionModel
from diffusers.optimization import SchedulerType
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.data.bucketed import plan_records
from ldm.data.buckets import check_multiple, parse_buckets
from ldm.data.captions import caption_processor
from ldm.data.dreambooth import DreamBooth
from ldm.data.format import expand_urls, is_remote, sample_counts
from ldm.data.plan import BucketPlanner
from ldm.diffusion.parameterization import TARGETS
from ldm.diffusion.sampling import SCHEDULERS
from ldm.diffusion.schedules import SCHEDULES
from ldm.models.adapters import AdapterError, LoRA
from ldm.models.formats.lora import LoraFileError
from ldm.models.text_encoders import hf_clip_text_encoder, open_clip_text_encoder
from ldm.models.unet import base_model_version, build_unet, load_unet
from ldm.models.vae import load_vae
from ldm.stages.latent_diffusion import LatentDiffusion
from ldm.training.fsdp import ShardedUNetStrategy
from ldm.utils.targets import names_target

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")  # org/name


class ConfigError(ValueError):
    """A config that cannot train; the message is one line naming the setting at fault."""


def _get(cfg: DictConfig, key: str, default: Any = None, prefix: str = "") -> Any:
    """cfg[key]; ConfigError when it is `???`. ``prefix`` names where ``cfg`` sits (for the message)."""
    try:
        return OmegaConf.select(cfg, key, default=default, throw_on_missing=True)
    except MissingMandatoryValue:
        name = f"{prefix}.{key}" if prefix else key
        raise ConfigError(f"{name} is required but not set (???): set it on the command line, e.g. {name}=...") from None


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _model_dir(key: str, path: str, subfolder: str | None) -> Path | None:
    """The local model folder (path/subfolder), None for a hub id; ConfigError when it is missing."""
    local = Path(path)
    if not local.exists():
        if HUB_ID.match(str(path)) and not _hub_offline():
            return None  # a hub id: from_pretrained resolves it
        hint = " (and HF_HUB_OFFLINE is set)" if HUB_ID.match(str(path)) else ""
        raise ConfigError(f"{key}.path={path}: no such model directory{hint}")
    folder = local / subfolder if subfolder else local
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key}.path={path}: {folder} holds no config.json (wrong path or subfolder?)")
    return folder


def _json(folder: Path | None) -> dict | None:
    return json.loads((folder / "config.json").read_text()) if folder is not None else None


def _vae_factor(vae: DictConfig) -> int | None:
    if names_target(vae, load_vae):
        config = _json(_model_dir("model.vae", _get(vae, "path", prefix="model.vae"), vae.get("subfolder", "vae")))
        channels = config["block_out_channels"] if config else None
    else:
        channels = vae.get("block_out_channels")
    return 2 ** (len(channels) - 1) if channels else None


def _unet_width(unet: DictConfig) -> int | None:
    if names_target(unet, load_unet):
        config = _json(_model_dir("model.unet", _get(unet, "path", prefix="model.unet"), unet.get("subfolder", "unet")))
        return config["cross_attention_dim"] if config else None
    return unet.get("cross_attention_dim")


def _text_width(text_encoder: DictConfig) -> int | None:
    if names_target(text_encoder, hf_clip_text_encoder):
        folder = _model_dir("model.text_encoder", _get(text_encoder, "path", prefix="model.text_encoder"), text_encoder.get("subfolder"))
        config = _json(folder)
        return config.get("hidden_size", config.get("text_config", {}).get("hidden_size")) if config else None
    if names_target(text_encoder, open_clip_text_encoder):
        arch = _get(text_encoder, "arch", prefix="model.text_encoder")
        pretrained = _get(text_encoder, "pretrained", prefix="model.text_encoder")
        if str(arch).startswith("local-dir:") and not (Path(str(arch)[len("local-dir:"):]) / "open_clip_config.json").is_file():
            raise ConfigError(f"model.text_encoder.arch={arch}: no open_clip model directory (open_clip_config.json) there")
        config = open_clip.get_model_config(arch)
        if config is None:
            raise ConfigError(f"model.text_encoder.arch={arch}: not an open_clip architecture")
        if pretrained and not Path(pretrained).is_file() and ("/" in str(pretrained) or "." in str(pretrained)):
            raise ConfigError(f"model.text_encoder.pretrained={pretrained}: no such file")
        text_cfg = text_encoder.get("text_cfg") or {}  # open_clip replaces the whole entry when overridden
        return text_cfg.get("width", config["text_cfg"]["width"])
    return None


def _check_names(cfg: DictConfig) -> None:
    for key in ("sampling.sampler", "callbacks.fid.sampler"):
        name = _get(cfg, key)
        if name is not None and name not in SCHEDULERS:
            raise ConfigError(f"{key}={name!r} is not a sampler; expected one of {sorted(SCHEDULERS)}")
    schedule = _get(cfg, "optim.schedule")
    if schedule is not None and schedule not in {s.value for s in SchedulerType}:
        raise ConfigError(f"optim.schedule={schedule!r} is not an LR schedule; expected one of "
                          f"{sorted(s.value for s in SchedulerType)}")  # fmt: skip
    noise = _get(cfg, "diffusion.schedule")
    if noise is not None and noise not in SCHEDULES:
        raise ConfigError(f"diffusion.schedule={noise!r} is not a noise schedule; expected one of {sorted(SCHEDULES)}")
    prediction = _get(cfg, "diffusion.prediction_type")
    if prediction is not None and prediction not in TARGETS:
        raise ConfigError(f"diffusion.prediction_type={prediction!r}; expected one of {sorted(TARGETS)}")


def _check_data(cfg: DictConfig) -> None:
    for key in ("train_shards", "val_shards"):
        spec = _get(cfg, f"data.{key}")
        if spec is None and key == "val_shards":
            continue
        try:
            urls = expand_urls(spec)
        except FileNotFoundError as error:
            raise ConfigError(f"data.{key}={spec}: {error}") from None
        if key != "train_shards" or cfg.data.get("samples_per_epoch") is not None:
            continue
        local = [u for u in urls if not is_remote(u)]
        total = sum(sample_counts(local).values())  # an unreadable tar counts 0: the reader names it later
        batch = _get(cfg, "data.batch_size")
        if local and len(local) == len(urls) and batch > total:
            raise ConfigError(f"data.batch_size={batch} is larger than the {total} samples of data.{key}={spec}")


def _check_fsdp(cfg: DictConfig) -> None:
    """What `+trainer/strategy=fsdp` (ldm/lightning/fsdp.py) cannot do, named before anything starts."""
    strategy = _get(cfg, "trainer.strategy")
    if isinstance(strategy, str) and strategy.startswith("fsdp"):
        raise ConfigError(f"trainer.strategy={strategy}: Lightning's FSDP would shard the frozen VAE, text encoder "
                          f"and EMA with the U-Net; use +trainer/strategy=fsdp")  # fmt: skip
    if not names_target(strategy, ShardedUNetStrategy):
        return
    model = cfg.get("model") or {}
    if not names_target(model, LatentDiffusion):
        raise ConfigError(f"+trainer/strategy=fsdp shards the latent-diffusion U-Net; model={model.get('_target_')} "
                          f"has none: use +trainer/strategy=ddp")  # fmt: skip
    if not model.get("ema_decay"):
        raise ConfigError("model.ema_decay=null with +trainer/strategy=fsdp: sample grids, FID and export sample "
                          "with the EMA, the one U-Net every rank holds whole; set model.ema_decay")  # fmt: skip
    for key in ("callbacks.fid.use_ema", "callbacks.sample_grid.use_ema"):
        if _get(cfg, key, True) is False:
            raise ConfigError(f"{key}=false with +trainer/strategy=fsdp: the raw U-Net is sharded, only the EMA "
                              f"can sample")  # fmt: skip
    if model.get("compile"):
        raise ConfigError("model.compile with +trainer/strategy=fsdp is not supported (untested with the "
                          "sharded U-Net): use +trainer/strategy=ddp for compiled training")  # fmt: skip
    if model.get("channels_last"):
        raise ConfigError("model.channels_last with +trainer/strategy=fsdp is not supported (FSDP's flat parameters "
                          "do not keep the layout, and its optimizer state does not round-trip with it)")  # fmt: skip
    if str(_get(cfg, "trainer.precision", "")) == "16-mixed" and _get(cfg, "trainer.gradient_clip_val"):
        raise ConfigError("trainer.precision=16-mixed with +trainer/strategy=fsdp and trainer.gradient_clip_val: "
                          "clipping scaled sharded gradients is not supported; use bf16-mixed")  # fmt: skip


def _check_finetune_data(cfg: DictConfig, factor: int | None) -> None:
    """Buckets, tag captions and DreamBooth (ldm/data/buckets.py, captions.py, dreambooth.py), checked by the code
    that uses them: sizes a multiple of the VAE factor, a batch that some bucket can fill (image sizes from
    sizes.json, or read once from the image headers)."""
    data = cfg.get("data") or {}
    try:
        captions = data.get("captions")
        caption_processor(OmegaConf.to_container(captions) if captions is not None else None)
        dreambooth = data.get("dreambooth")
        if dreambooth is not None:
            DreamBooth(**OmegaConf.to_container(dreambooth, resolve=True))
        buckets = parse_buckets(OmegaConf.to_container(data.buckets) if data.get("buckets") is not None else None,
                                _get(cfg, "data.resolution") or 0)  # fmt: skip
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error).splitlines()[0]) from None
    if buckets is None:
        if dreambooth is None:
            return
        buckets = [(_get(cfg, "data.resolution"),) * 2]
    if data.get("samples_per_epoch") is not None:
        raise ConfigError("data.samples_per_epoch with data.buckets or data.dreambooth: planned epochs are exact "
                          "passes; set data.samples_per_epoch=null")  # fmt: skip
    try:
        if factor:
            check_multiple(buckets, factor)
        urls = expand_urls(_get(cfg, "data.train_shards"))
        if all(not is_remote(url) for url in urls):
            BucketPlanner(plan_records(urls), buckets, _get(cfg, "data.batch_size"), upscale=bool(data.get("upscale")))
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error).splitlines()[0]) from None


def _meta_unet(unet: DictConfig) -> UNet2DConditionModel | None:
    """The configured U-Net on the meta device (no weights): its layers, for the adapter checks."""
    if names_target(unet, load_unet):
        config = _json(_model_dir("model.unet", _get(unet, "path", prefix="model.unet"), unet.get("subfolder", "unet")))
    elif names_target(unet, build_unet):
        config = {k: v for k, v in OmegaConf.to_container(unet, resolve=True).items() if k not in ("_target_", "seed")}
    else:
        return None
    if config is None:
        return None
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _meta_text_model(text_encoder: DictConfig) -> CLIPTextModel | None:
    if not names_target(text_encoder, hf_clip_text_encoder):
        return None
    folder = _model_dir("model.text_encoder", _get(text_encoder, "path", prefix="model.text_encoder"), text_encoder.get("subfolder"))
    if folder is None:
        return None
    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig.from_pretrained(folder))


def _check_adapter(cfg: DictConfig) -> None:
    """model/adapter=lora: its settings, its targets, its init_from file, and what it is not combined with."""
    model = cfg.get("model") or {}
    node = model.get("adapter")
    if not names_target(node, LoRA):
        return
    settings = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "_target_"}
    try:
        lora = LoRA(**settings)
    except AdapterError as error:
        raise ConfigError(str(error)) from None
    except TypeError as error:  # an unknown setting
        raise ConfigError(f"model.adapter: {error}".replace("LoRA.__init__() ", "")) from None
    precision = str(_get(cfg, "trainer.precision", ""))
    if lora.base_dtype in ("bfloat16", "float16") and "mixed" not in precision:
        raise ConfigError(f"model.adapter.base_dtype={lora.base_dtype} with trainer.precision={precision}: a "
                          f"low-precision base runs under autocast; use trainer.precision=bf16-mixed")  # fmt: skip
    if names_target(_get(cfg, "trainer.strategy"), ShardedUNetStrategy):
        raise ConfigError("model/adapter=lora with +trainer/strategy=fsdp: the adapters are small, train them with "
                          "+trainer/strategy=ddp")  # fmt: skip
    if lora.text_encoder and not names_target(model.get("text_encoder"), hf_clip_text_encoder):
        raise ConfigError("model.adapter.text_encoder=true needs a transformers CLIP text encoder "
                          "(model/text_encoder=hf_clip)")  # fmt: skip
    if lora.init_from and not Path(lora.init_from).exists():
        raise ConfigError(f"model.adapter.init_from={lora.init_from}: no such file or directory")
    unet = _meta_unet(model.get("unet"))
    if unet is None:  # a hub id: checked when it is loaded
        return
    text_model = _meta_text_model(model.get("text_encoder")) if lora.text_encoder else None
    try:
        lora.attach_unet(unet)
        adapted = {"unet": unet}
        if text_model is not None:
            adapted["text_encoder"] = lora.attach_text_encoder(text_model)
        version = base_model_version(unet.config, _get(cfg, "diffusion.prediction_type", "epsilon"))
        lora.load_init(adapted, version, check_only=True)
    except (AdapterError, LoraFileError) as error:
        raise ConfigError(str(error)) from None


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError (one line) for the first problem found."""
    _check_names(cfg)
    _check_fsdp(cfg)
    _check_adapter(cfg)
    model = cfg.get("model")
    resolution = _get(cfg, "data.resolution")
    factor = None
    if model is not None and model.get("vae") is not None:
        factor = _vae_factor(model.vae)
        if factor and resolution is not None and resolution % factor:
            raise ConfigError(f"data.resolution={resolution} is not a multiple of the VAE's downsampling "
                              f"factor {factor} (model.vae)")  # fmt: skip
    if model is not None and model.get("unet") is not None and model.get("text_encoder") is not None:
        unet_width, text_width = _unet_width(model.unet), _text_width(model.text_encoder)
        if unet_width and text_width and unet_width != text_width:
            raise ConfigError(f"model.unet.cross_attention_dim={unet_width} does not match the text encoder's "
                              f"hidden size {text_width} (model.text_encoder)")  # fmt: skip
    _check_data(cfg)
    _check_finetune_data(cfg, factor)
