"""diffusers LoRA files: `pytorch_lora_weights.safetensors`, written by diffusers' own `save_lora_weights` and loaded
by `pipe.load_lora_weights(dir)`.

    write_diffusers_lora("out/", {"unet": unet_weights, "text_encoder": te_weights})
    pipe = StableDiffusionPipeline.from_pretrained(base); pipe.load_lora_weights("out/")

Layout (peft's): `unet.<module>.lora_A.weight` (rank, in[, k, k]) and `unet.<module>.lora_B.weight` (out, rank[, 1, 1]),
likewise under `text_encoder.` (module names under `text_model.`); each part's LoraConfig (r, lora_alpha, target
modules, per-module rank_pattern / alpha_pattern) in the `lora_adapter_metadata` header entry, which diffusers reads
back so that alpha != rank survives. Without that entry diffusers takes alpha = rank (scale 1), and so does `read`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from diffusers import StableDiffusionPipeline
from torch import Tensor

from ldm.models.formats.lora import LoraFileError, LoraModule, canonical_name, name_table

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def adapter_config(modules: Mapping[str, LoraModule], part: str) -> dict:
    """The LoraConfig fields that describe ``modules`` exactly: the most common rank and alpha, and a pattern entry
    (the full module name) for every module that differs. peft matches these names as suffixes, so text-encoder names
    are given without `text_model.`: they then match the layers of a transformers 4 and a transformers 5 CLIP."""
    rank = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    names = {n: canonical_name(part, n).removeprefix("text_model.") for n in modules}
    return {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(names.values()),
        "rank_pattern": {names[n]: m.rank for n, m in modules.items() if m.rank != rank},
        "alpha_pattern": {names[n]: m.alpha for n, m in modules.items() if m.alpha != alpha},
    }


def write_diffusers_lora(out_dir: str | Path, weights: Mapping[str, Mapping[str, LoraModule]],
                         pipeline_class=StableDiffusionPipeline) -> Path:  # fmt: skip
    """`out_dir/pytorch_lora_weights.safetensors` through ``pipeline_class.save_lora_weights`` (one
    `<part>_lora_layers` and `<part>_lora_adapter_metadata` argument per part: unet, text_encoder[, text_encoder_2])."""
    kwargs = {}
    for part, modules in weights.items():
        if not modules:
            continue
        layers = {}
        for name, m in modules.items():
            layers[f"{canonical_name(part, name)}.lora_A.weight"] = m.down.contiguous()
            layers[f"{canonical_name(part, name)}.lora_B.weight"] = m.up.contiguous()
        kwargs[f"{part}_lora_layers"] = layers
        kwargs[f"{part}_lora_adapter_metadata"] = adapter_config(modules, part)
    pipeline_class.save_lora_weights(out_dir, safe_serialization=True, weight_name=WEIGHT_NAME, **kwargs)
    return Path(out_dir) / WEIGHT_NAME


def is_diffusers(tensors: Mapping[str, Tensor]) -> bool:
    return any(k.endswith(".lora_A.weight") for k in tensors)


def _pattern_value(patterns: Mapping[str, float], name: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it (after a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def from_state_dict(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], names: Mapping[str, Iterable[str]],
                    source: str):  # fmt: skip
    """(weights, keys) as `ldm.models.formats.kohya.from_state_dict` gives them."""
    config = json.loads(metadata.get(METADATA_KEY, "{}"))
    tables = {part: name_table(part, module_names) for part, module_names in names.items()}
    pairs: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        part, _, rest = key.partition(".")
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", rest)
        if match is None:
            raise LoraFileError(f"{source}: {key}: not a lora_A / lora_B weight (DoRA, biases and older diffusers "
                                f"layouts are not read)")  # fmt: skip
        if part not in tables:
            raise LoraFileError(f"{source}: {key} adapts a part this model does not have or cannot adapt ({part})")
        pairs.setdefault((part, match.group(1)), {})[match.group(2)] = tensor
    weights: dict[str, dict[str, LoraModule]] = {}
    keys: dict[str, dict[str, str]] = {}
    for (part, canonical), ab in pairs.items():
        key = f"{part}.{canonical}"
        name = tables[part].get(canonical)
        if name is None:
            raise LoraFileError(f"{source}: {key} names no layer of the {part.replace('_', ' ')} (unknown key, or a "
                                f"LoRA made for another base model)")  # fmt: skip
        if set(ab) != {"lora_A", "lora_B"}:
            raise LoraFileError(f"{source}: {key} has no {'lora_B' if 'lora_A' in ab else 'lora_A'}.weight")
        down, up = ab["lora_A"].float(), ab["lora_B"].float()
        rank = down.shape[0]
        if f"{part}.lora_alpha" in config:
            alpha = _pattern_value(config.get(f"{part}.alpha_pattern", {}), canonical, config[f"{part}.lora_alpha"])
        else:
            alpha = rank  # diffusers' convention for files without metadata: scale 1
        weights.setdefault(part, {})[name] = LoraModule(down, up, float(alpha))
        keys.setdefault(part, {})[name] = key
    return weights, keys
