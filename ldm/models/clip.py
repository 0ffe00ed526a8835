"""A whole open_clip CLIP (vision + text towers) for stage 0: built from an open_clip architecture config
made small by overrides, and saved as a directory that open_clip itself loads.

    model, model_cfg = build_open_clip("ViT-B-32", embed_dim=64, vision_cfg=dict(image_size=32, patch_size=4,
                                       width=64, layers=2), text_cfg=dict(context_length=32, width=64, layers=3))
    save_open_clip_dir(model, model_cfg, "data/models/clip-shapes")
    open_clip.create_model_and_transforms("local-dir:data/models/clip-shapes")   # config + weights + transforms
    open_clip_text_encoder("local-dir:data/models/clip-shapes")                  # the frozen text tower for LDM

Unlike `open_clip.create_model(arch, text_cfg=...)`, which replaces a whole config entry, the overrides here
are merged key by key into the architecture's own config, so only what differs has to be listed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.models.text_encoders import save_open_clip_checkpoint

CONFIG_NAME = "open_clip_config.json"  # the names open_clip's 'local-dir:' / 'hf-hub:' loaders look for
WEIGHTS_NAME = "open_clip_model.safetensors"


def _merge(base: dict, overrides: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def open_clip_config(arch: str, **overrides: Any) -> dict:
    """open_clip's config of ``arch`` with ``overrides`` merged in (dicts key by key)."""
    import open_clip

    base = open_clip.get_model_config(arch)
    if base is None:
        raise ValueError(f"open_clip has no architecture {arch!r}; see open_clip.list_models()")
    return _merge(base, overrides, arch)


def build_open_clip(arch: str = "ViT-B-32", seed: int | None = 0, **overrides: Any) -> tuple[nn.Module, dict]:
    """A randomly initialised open_clip model of ``arch`` + overrides, and the model config it was built from."""
    import open_clip

    model_cfg = open_clip_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = open_clip.create_model(arch, **model_cfg)  # every entry complete: replacing them is what we want
    return model, model_cfg


def save_open_clip_dir(model: nn.Module, model_cfg: dict, out_dir: str | Path) -> Path:
    """Write ``out_dir/open_clip_config.json`` (model and preprocessing config) and the weights as safetensors:
    the layout `open_clip.create_model_and_transforms("local-dir:out_dir")` (and the hub's) reads."""
    import open_clip

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {k: v for k, v in preprocess_cfg.items() if v is not None}}
    save_open_clip_checkpoint(model, out_dir / WEIGHTS_NAME)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    return out_dir


def is_open_clip_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def load_open_clip_dir(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, image preprocessing transform, tokenizer) of a directory written by `save_open_clip_dir`."""
    import open_clip

    if not is_open_clip_dir(path):
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; not an open_clip model directory")
    name = f"local-dir:{path}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)
