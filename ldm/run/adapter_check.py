"""The adapter's checks that need the model's layers: settings, target modules and an `init_from` file, tried on the
configured U-Net (and text encoders) built on the meta device (no weights, no memory), before anything is built.

    check_adapter(cfg)   # ConfigError("model.adapter.target_modules: to_qq matches no layer of the U-Net ...")

Called by `ldm.run.fit` once torch and the model libraries are imported; the light checks (`ldm.run.validate`,
before any heavy import) cover the adapter's keys one by one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm.models.adapters import AdapterError, LoRA
from ldm.models.formats.lora import LoraFileError
from ldm.models.sdxl import sdxl_text_encoders
from ldm.models.text_encoders import hf_clip_text_encoder
from ldm.models.unet import base_model_version, build_unet, load_unet
from ldm.run.validate import model_dir, unet_config
from ldm.training.fsdp import ShardedUNetStrategy
from ldm.utils.rules import ConfigError
from ldm.utils.targets import names_target


def _meta_unet(unet: dict) -> UNet2DConditionModel | None:
    """The configured U-Net on the meta device: its layers, for the adapter checks (None for a hub id)."""
    if not names_target(unet, load_unet, build_unet):
        return None
    config = unet_config(unet)
    if config is None:
        return None
    config = {k: v for k, v in config.items() if k not in ("_target_", "seed", "path", "subfolder")}
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _meta_text_models(text_encoder: dict) -> dict[str, nn.Module]:
    """The configured transformers CLIP text models on the meta device, by part name (SDXL: both); none for a hub
    id."""
    if names_target(text_encoder, hf_clip_text_encoder):
        parts = {"text_encoder": (CLIPTextModel, text_encoder.get("subfolder"))}
    elif names_target(text_encoder, sdxl_text_encoders):
        parts = {"text_encoder": (CLIPTextModel, "text_encoder"),
                 "text_encoder_2": (CLIPTextModelWithProjection, "text_encoder_2")}  # fmt: skip
    else:
        return {}
    models = {}
    for part, (cls, subfolder) in parts.items():
        folder = model_dir("model.text_encoder", text_encoder["path"], subfolder)
        if folder is None:
            return {}
        with torch.device("meta"):
            models[part] = cls(CLIPTextConfig.from_pretrained(folder))
    return models


def check_adapter(cfg: DictConfig) -> None:
    """model/adapter=lora: its settings, its targets, its init_from file, and what it is not combined with."""
    config = OmegaConf.to_container(cfg, resolve=True)
    model = config.get("model") or {}
    node = model.get("adapter")
    if not names_target(node, LoRA):
        return
    settings = {k: v for k, v in node.items() if k != "_target_"}
    try:
        lora = LoRA(**settings)
    except AdapterError as error:
        raise ConfigError(str(error)) from None
    except TypeError as error:  # an unknown setting
        raise ConfigError(f"model.adapter: {error}".replace("LoRA.__init__() ", "")) from None
    precision = str((config.get("trainer") or {}).get("precision", ""))
    if lora.base_dtype in ("bfloat16", "float16") and "mixed" not in precision:
        raise ConfigError(f"model.adapter.base_dtype={lora.base_dtype} with trainer.precision={precision}: a "
                          f"low-precision base runs under autocast; use trainer.precision=bf16-mixed")  # fmt: skip
    if names_target((config.get("trainer") or {}).get("strategy"), ShardedUNetStrategy):
        raise ConfigError("model/adapter=lora with +trainer/strategy=fsdp: the adapters are small, train them with "
                          "+trainer/strategy=ddp")  # fmt: skip
    if lora.text_encoder and not names_target(model.get("text_encoder"), hf_clip_text_encoder, sdxl_text_encoders):
        raise ConfigError("model.adapter.text_encoder=true needs a transformers CLIP text encoder "
                          "(model/text_encoder=hf_clip, or SDXL's pair: model=sdxl)")  # fmt: skip
    if lora.init_from and not Path(lora.init_from).exists():
        raise ConfigError(f"model.adapter.init_from={lora.init_from}: no such file or directory")
    unet = _meta_unet(model.get("unet"))
    if unet is None:  # a hub id: checked when it is loaded
        return
    text_models = _meta_text_models(model.get("text_encoder")) if lora.text_encoder else {}
    try:
        lora.attach_unet(unet)
        adapted = {"unet": unet}
        for part, text_model in text_models.items():
            adapted[part] = lora.attach_text_encoder(text_model, part)
        version = base_model_version(unet.config, (config.get("diffusion") or {}).get("prediction_type", "epsilon"))
        lora.load_init(adapted, version, check_only=True)
    except (AdapterError, LoraFileError) as error:
        raise ConfigError(str(error)) from None
