"""Check a training config in seconds, before anything heavy is imported or built; one line names what is wrong.

    validate_config(cfg)   # raises ConfigError("data.resolution=30 is not a multiple of ...")

First every key against its schema entry (`ldm.run.schema`: type, range, choices; unknown keys with a "did you
mean" when the command line's added keys are known). Then what depends on several keys or on files (model
configs are JSON, shard counts come from manifest.json or tar headers; no weights are loaded, nothing heavy is
imported): model paths exist (a local path, or a hub id when the hub is not offline); the resolution is a multiple
of the VAE's downsampling factor and its latents halve through every level of the U-Net; the U-Net's
cross-attention width equals the text encoder's hidden size; the shard patterns match files; a batch is no larger
than the data; aspect-ratio buckets, tag captions and DreamBooth settings are valid; +trainer/strategy=fsdp is not combined with what it cannot do (no EMA, compile, channels_last, ...).

Parts are recognised by the `_target_` they name (the strings in `ldm.run.schema`, which tests/test_schema.py
compares with `ldm.utils.targets.target_of` of the real functions); shard counts come from `ldm.data.format`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig

from ldm.data.buckets import check_multiple, parse_buckets
from ldm.data.captions import caption_processor
from ldm.data.dreambooth import DreamBooth
from ldm.data.format import expand_urls, is_remote, sample_counts
from ldm.run.schema import (
    BUILD_UNET,
    BUILD_VAE,
    CLIP_MODULE,
    HF_CLIP_TEXT_ENCODER,
    LATENT_DIFFUSION,
    LOAD_UNET,
    LOAD_VAE,
    OPEN_CLIP_TEXT_ENCODER,
    SDXL_TEXT_ENCODERS,
    SHARD_DATA_MODULE,
    SHARDED_UNET_STRATEGY,
    check_paths,
    check_schema,
)
from ldm.utils.rules import ConfigError

__all__ = ["ConfigError", "validate_config"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")  # org/name


def _names(node, target: str) -> bool:
    return isinstance(node, dict) and node.get("_target_") == target


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def model_dir(key: str, path: str, subfolder: str | None) -> Path | None:
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


def _json(key: str, folder: Path | None) -> dict | None:
    if folder is None:
        return None
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}: {folder / 'config.json'} is not readable JSON ({error})") from None


def _vae_channels(vae: dict) -> list | None:
    if _names(vae, LOAD_VAE):
        config = _json("model.vae", model_dir("model.vae", vae["path"], vae.get("subfolder", "vae")))
        return config.get("block_out_channels") if config else None
    return vae.get("block_out_channels") if _names(vae, BUILD_VAE) else None


def unet_config(unet: dict) -> dict | None:
    if _names(unet, LOAD_UNET):
        return _json("model.unet", model_dir("model.unet", unet["path"], unet.get("subfolder", "unet")))
    return unet if _names(unet, BUILD_UNET) else None


def open_clip_config(arch: str) -> dict | None:
    """An open_clip architecture's model config as `open_clip.get_model_config` reads it (a JSON file in
    open_clip's `model_configs/`, or a `local-dir:`'s open_clip_config.json), without importing open_clip;
    None for `hf-hub:` names. ConfigError for a name open_clip does not know."""
    if arch.startswith("hf-hub:"):
        return None
    if arch.startswith("local-dir:"):
        path = Path(arch[len("local-dir:"):]) / "open_clip_config.json"
        if not path.is_file():
            raise ConfigError(f"model.text_encoder.arch={arch}: no open_clip model directory (open_clip_config.json) there")
        config = json.loads(path.read_text())
        return config.get("model_cfg", config)
    spec = importlib.util.find_spec("open_clip")  # finds the package without running it
    path = Path(spec.origin).parent / "model_configs" / f"{arch}.json" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ConfigError(f"model.text_encoder.arch={arch}: not an open_clip architecture")
    return json.loads(path.read_text())


def _sdxl_text_configs(text_encoder: dict) -> list[dict] | None:
    """The configs of an SDXL directory's two text encoders (None for a hub id); one line when one is missing."""
    path = text_encoder["path"]
    if not Path(path).exists():
        model_dir("model.text_encoder", path, None)  # a hub id passes, a missing folder is said
        return None
    configs = []
    for part in ("text_encoder", "text_encoder_2"):
        if not (Path(path) / part / "config.json").is_file():
            raise ConfigError(f"model.text_encoder.path={path}: no {part}/config.json; an SDXL directory holds "
                              f"text_encoder, text_encoder_2, tokenizer and tokenizer_2 (StableDiffusionXLPipeline)")  # fmt: skip
        configs.append(_json("model.text_encoder", Path(path) / part))
    return configs


def _text_width(text_encoder: dict) -> int | None:
    if _names(text_encoder, SDXL_TEXT_ENCODERS):
        configs = _sdxl_text_configs(text_encoder)
        return sum(c["hidden_size"] for c in configs) if configs else None
    if _names(text_encoder, HF_CLIP_TEXT_ENCODER):
        folder = model_dir("model.text_encoder", text_encoder["path"], text_encoder.get("subfolder"))
        config = _json("model.text_encoder", folder)
        return config.get("hidden_size", config.get("text_config", {}).get("hidden_size")) if config else None
    if _names(text_encoder, OPEN_CLIP_TEXT_ENCODER):
        pretrained = text_encoder.get("pretrained")
        if pretrained and not Path(pretrained).is_file() and ("/" in str(pretrained) or "." in str(pretrained)):
            raise ConfigError(f"model.text_encoder.pretrained={pretrained}: no such file")
        config = open_clip_config(text_encoder["arch"])
        if config is None:
            return None
        text_cfg = text_encoder.get("text_cfg") or {}  # open_clip replaces the whole entry when overridden
        return text_cfg.get("width", config["text_cfg"]["width"])
    return None


def _check_added_conditions(unet_cfg: dict | None, text_encoder) -> None:
    """SDXL: the U-Net's added embedding takes the pooled text embedding and six time ids of addition_time_embed_dim
    each (`projection_class_embeddings_input_dim`); a U-Net without it cannot take an SDXL encoder pair, and the
    other way round."""
    if not unet_cfg or not isinstance(text_encoder, dict):
        return
    sdxl_unet, sdxl_text = unet_cfg.get("addition_embed_type") == "text_time", _names(text_encoder, SDXL_TEXT_ENCODERS)
    if sdxl_unet != sdxl_text:
        which = "takes SDXL's pooled text embedding and time ids" if sdxl_unet else "has no SDXL added embedding"
        raise ConfigError(f"model.unet {which} but model.text_encoder is "
                          f"{'not ' if sdxl_unet else ''}SDXL's encoder pair (model/text_encoder=sdxl)")  # fmt: skip
    configs = _sdxl_text_configs(text_encoder) if sdxl_text else None
    if configs:
        pooled, per_id = configs[1].get("projection_dim"), unet_cfg.get("addition_time_embed_dim")
        wanted = unet_cfg.get("projection_class_embeddings_input_dim")
        if pooled and per_id and wanted != pooled + 6 * per_id:
            raise ConfigError(f"model.unet: projection_class_embeddings_input_dim={wanted} does not match text_encoder_2's "
                              f"projection_dim {pooled} + 6 time ids x addition_time_embed_dim {per_id} = "
                              f"{pooled + 6 * per_id}")  # fmt: skip


def _check_model(config: dict) -> None:
    """Sizes that must agree across the parts: resolution, VAE factor, U-Net levels, cross-attention width."""
    model, resolution = config.get("model") or {}, (config.get("data") or {}).get("resolution")
    vae, unet, text_encoder = model.get("vae"), model.get("unet"), model.get("text_encoder")
    channels = _vae_channels(vae) if isinstance(vae, dict) else None
    factor = 2 ** (len(channels) - 1) if channels else None
    if factor and resolution is not None and resolution % factor:
        raise ConfigError(f"data.resolution={resolution} is not a multiple of the VAE's downsampling "
                          f"factor {factor} (model.vae)")  # fmt: skip
    unet_cfg = unet_config(unet) if isinstance(unet, dict) else None
    if unet_cfg and factor and resolution is not None:
        halvings = len(unet_cfg.get("block_out_channels") or [0]) - 1
        latent = resolution // factor
        if latent % 2**halvings:
            raise ConfigError(f"data.resolution={resolution}: its {latent}x{latent} latents (VAE factor {factor}) "
                              f"do not halve evenly through the U-Net's {halvings + 1} levels "
                              f"(model.unet.block_out_channels); use a multiple of {factor * 2**halvings}")  # fmt: skip
    _check_added_conditions(unet_cfg, text_encoder)  # (first: a pair's width mismatch says less than this)
    if unet_cfg and isinstance(text_encoder, dict):
        unet_width, text_width = unet_cfg.get("cross_attention_dim"), _text_width(text_encoder)
        if unet_width and text_width and unet_width != text_width:
            raise ConfigError(f"model.unet.cross_attention_dim={unet_width} does not match the text encoder's "
                              f"hidden size {text_width} (model.text_encoder)")  # fmt: skip
    vision = (model.get("clip") or {}).get("vision_cfg") if _names(model, CLIP_MODULE) else None
    if vision and vision.get("image_size") and vision.get("patch_size") and vision["image_size"] % vision["patch_size"]:
        raise ConfigError(f"model.clip.vision_cfg.image_size={vision['image_size']} (data.resolution) is not a "
                          f"multiple of model.clip.vision_cfg.patch_size={vision['patch_size']}")  # fmt: skip


def _check_values(config: dict) -> None:
    """Values that must agree with each other (each alone passed its schema entry)."""
    diffusion = config.get("diffusion") or {}
    if diffusion.get("beta_start") is not None and diffusion.get("beta_end") is not None:
        if diffusion["beta_start"] >= diffusion["beta_end"]:
            raise ConfigError(f"diffusion.beta_start={diffusion['beta_start']} must be below "
                              f"diffusion.beta_end={diffusion['beta_end']}")  # fmt: skip
    interval = (config.get("sampling") or {}).get("guidance_interval")
    if interval is not None and not interval[0] < interval[1]:
        raise ConfigError(f"sampling.guidance_interval=[{interval[0]}, {interval[1]}]: expected [low, high] noise "
                          f"levels with low < high")  # fmt: skip
    data = config.get("data") or {}
    if data.get("_target_") == SHARD_DATA_MODULE and data.get("resolution") is None:
        raise ConfigError("data.resolution=null: image shards need a resolution, e.g. data.resolution=512")
    if config.get("resume") not in (None, False, "", "none", "null") and config.get("ckpt_path"):
        raise ConfigError(f"resume={config['resume']!r} and ckpt_path={config['ckpt_path']!r}: set only one")


def _check_data(config: dict) -> None:
    data = config.get("data") or {}
    fid = (config.get("callbacks") or {}).get("fid") or {}
    for key, spec in (("data.train_shards", data.get("train_shards")), ("data.val_shards", data.get("val_shards")),
                      ("callbacks.fid.shards", fid.get("shards"))):  # fmt: skip
        if spec is None and key != "data.train_shards":
            continue
        try:
            urls = expand_urls(spec)
        except FileNotFoundError as error:
            raise ConfigError(f"{key}={spec}: {error}") from None
        if key != "data.train_shards" or data.get("samples_per_epoch") is not None:
            continue
        local = [u for u in urls if not is_remote(u)]
        if local and len(local) == len(urls):
            total = sum(sample_counts(local).values())  # an unreadable tar counts 0: the reader names it later
            if data["batch_size"] > total:
                raise ConfigError(f"data.batch_size={data['batch_size']} is larger than the {total} samples of "
                                  f"{key}={spec}")  # fmt: skip


def _check_finetune_data(config: dict) -> None:
    """Aspect-ratio buckets, tag captions and DreamBooth, by the (pure Python) code that uses them: a bucket spec
    that generates buckets, sides a multiple of the VAE factor, no resampled epochs with planned ones. Whether a
    batch can fill a bucket needs the image sizes: `ldm.run.data_check`, once the heavy imports are done."""
    data = config.get("data") or {}
    try:
        caption_processor(data.get("captions"))
        if data.get("dreambooth") is not None:
            DreamBooth(**data["dreambooth"])
        buckets = parse_buckets(data.get("buckets"), data.get("resolution") or 0)
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error).splitlines()[0]) from None
    if buckets is None and data.get("dreambooth") is None:
        return
    if data.get("samples_per_epoch") is not None:
        raise ConfigError("data.samples_per_epoch with data.buckets or data.dreambooth: planned epochs are exact "
                          "passes; set data.samples_per_epoch=null")  # fmt: skip
    vae = (config.get("model") or {}).get("vae")
    channels = _vae_channels(vae) if isinstance(vae, dict) else None
    if channels and buckets:
        try:
            check_multiple(buckets, 2 ** (len(channels) - 1))
        except ValueError as error:
            raise ConfigError(str(error)) from None


def _check_fsdp(config: dict) -> None:
    """What `+trainer/strategy=fsdp` (ldm/training/fsdp.py) cannot do, named before anything starts."""
    trainer, model = config.get("trainer") or {}, config.get("model") or {}
    strategy = trainer.get("strategy")
    if isinstance(strategy, str) and strategy.startswith("fsdp"):
        raise ConfigError(f"trainer.strategy={strategy}: Lightning's FSDP would shard the frozen VAE, text encoder "
                          f"and EMA with the U-Net; use +trainer/strategy=fsdp")  # fmt: skip
    if not _names(strategy, SHARDED_UNET_STRATEGY):
        return
    if not _names(model, LATENT_DIFFUSION):
        raise ConfigError(f"+trainer/strategy=fsdp shards the latent-diffusion U-Net; model={model.get('_target_')} "
                          f"has none: use +trainer/strategy=ddp")  # fmt: skip
    if not model.get("ema_decay"):
        raise ConfigError("model.ema_decay=null with +trainer/strategy=fsdp: sample grids, FID and export sample "
                          "with the EMA, the one U-Net every rank holds whole; set model.ema_decay")  # fmt: skip
    callbacks = config.get("callbacks") or {}
    for name in ("fid", "sample_grid"):
        if (callbacks.get(name) or {}).get("use_ema", True) is False:
            raise ConfigError(f"callbacks.{name}.use_ema=false with +trainer/strategy=fsdp: the raw U-Net is "
                              f"sharded, only the EMA can sample")  # fmt: skip
    if model.get("compile"):
        raise ConfigError("model.compile with +trainer/strategy=fsdp is not supported (untested with the "
                          "sharded U-Net): use +trainer/strategy=ddp for compiled training")  # fmt: skip
    if model.get("channels_last"):
        raise ConfigError("model.channels_last with +trainer/strategy=fsdp is not supported (FSDP's flat parameters "
                          "do not keep the layout, and its optimizer state does not round-trip with it)")  # fmt: skip
    if str(trainer.get("precision", "")) == "16-mixed" and trainer.get("gradient_clip_val"):
        raise ConfigError("trainer.precision=16-mixed with +trainer/strategy=fsdp and trainer.gradient_clip_val: "
                          "clipping scaled sharded gradients is not supported; use bf16-mixed")  # fmt: skip


def validate_config(cfg: DictConfig, added: Iterable[str] | None = None) -> None:
    """Raise ConfigError (one line) for the first problem found. ``added``: the keys the command line added on
    purpose (`+key=...`), when known; then any other key that no schema entry knows is an error too."""
    config = check_schema(cfg, added, files=False)  # what the config alone decides, first
    _check_values(config)
    _check_fsdp(config)
    check_paths(config)  # then what needs files: paths, model configs, shards
    _check_model(config)
    _check_data(config)
    _check_finetune_data(config)
