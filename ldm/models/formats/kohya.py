"""kohya sd-scripts LoRA files: the layout ComfyUI and Automatic1111 load (and diffusers' `load_lora_weights` reads).

    write_kohya("my_lora.safetensors", {"unet": unet_weights, "text_encoder": te_weights}, metadata)
    weights, keys = from_state_dict(tensors, {"unet": unet_module_names}, "my_lora.safetensors")

The naming rule (sd-scripts networks/lora.py, `LoRANetwork.create_modules`): a layer's key is its prefix and its
module name with every "." replaced by "_": `lora_unet_` + the diffusers U-Net's name
(`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`; kohya trains SD 1.x/2.x on U-Nets named as
diffusers names them), `lora_te_` + the transformers CLIP text model's name under `text_model.`
(`lora_te_text_model_encoder_layers_0_self_attn_q_proj`). A model with two text encoders (SDXL) uses `lora_te1_`
and `lora_te2_`. Each layer holds `<name>.lora_down.weight` (rank, in[, k, k]), `<name>.lora_up.weight`
(out, rank[, 1, 1]) and `<name>.alpha` (a scalar; scale alpha / rank; absent means alpha = rank). The name is
not invertible by itself ("_" is also inside names), so reading maps names through a table of the model's layers.

Metadata: sd-scripts' `ss_*` strings (network module, dim, alpha, base model version, ...), plus the two hashes
the additional-networks extension indexes files by (`sshs_model_hash`, `sshs_legacy_hash`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from ldm.models.formats.lora import LoraFileError, LoraModule, canonical_name, name_table

NETWORK_MODULE = "networks.lora"
SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def prefixes(parts: Iterable[str], two_text_encoders: bool | None = None) -> dict[str, str]:
    """Part -> key prefix: lora_unet / lora_te, or lora_te1 / lora_te2 for a model with two text encoders (SDXL; by
    default: when `text_encoder_2` is among ``parts``)."""
    if two_text_encoders or (two_text_encoders is None and "text_encoder_2" in parts):
        return {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    return {"unet": "lora_unet", "text_encoder": "lora_te"}


def kohya_name(prefix: str, name: str) -> str:
    """sd-scripts' rule: `prefix + "." + module name`, every "." replaced by "_"."""
    return f"{prefix}.{name}".replace(".", "_")


def to_state_dict(weights: Mapping[str, Mapping[str, LoraModule]], dtype: torch.dtype | None = None,
                  renames: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, Tensor]:  # fmt: skip
    """``renames``: part -> {module name: the name kohya gives the layer} where that is not the diffusers name (SDXL's
    U-Net: the openaimodel layout, `ldm.models.formats.single_file.unet_module_names_to_ldm`)."""
    keys = prefixes(weights)
    state = {}
    for part, modules in weights.items():
        renamed = (renames or {}).get(part, {})
        for name, m in modules.items():
            base = kohya_name(keys[part], renamed.get(name, canonical_name(part, name)))
            state[f"{base}.lora_down.weight"] = m.down.to(dtype or m.down.dtype).contiguous()
            state[f"{base}.lora_up.weight"] = m.up.to(dtype or m.up.dtype).contiguous()
            state[f"{base}.alpha"] = torch.tensor(float(m.alpha))  # sd-scripts keeps alpha as a float32 scalar
    return state


def addnet_hashes(state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """The additional-networks extension's (model hash, legacy hash) of a file: sha256 of the tensor bytes after the
    header, and of the 64 KiB at 1 MiB, computed with only the ss_* metadata (as sd-scripts computes them)."""
    data = safetensors.torch.save(dict(state), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def write_kohya(path: str | Path, weights: Mapping[str, Mapping[str, LoraModule]], metadata: Mapping[str, str],
                dtype: torch.dtype | None = None, renames: Mapping[str, Mapping[str, str]] | None = None) -> Path:  # fmt: skip
    """One .safetensors file; ``metadata`` values must be strings (ss_* keys, see ldm.models.export)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = to_state_dict(weights, dtype, renames)
    metadata = {k: str(v) for k, v in metadata.items()}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = addnet_hashes(state, metadata)
    safetensors.torch.save_file(state, str(path), metadata=metadata)
    return path


def is_kohya(tensors: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("lora_") and k.endswith(".lora_down.weight") for k in tensors)


def from_state_dict(tensors: Mapping[str, Tensor], names: Mapping[str, Iterable[str]], source: str,
                    renames: Mapping[str, Mapping[str, str]] | None = None,
                    two_text_encoders: bool | None = None):  # fmt: skip
    """(weights, keys): weights[part][module name] = LoraModule, keys[part][module name] = the file's layer name.
    ``names``: the module names of each adapted part of the model the file is loaded into; ``renames``: as
    `to_state_dict`'s (a layer is found under either of its names); ``two_text_encoders``: as `prefixes`' (whether
    the model has two text encoders, adapted or not: which text-encoder prefixes are its own)."""
    parts = prefixes(names, two_text_encoders)
    by_prefix = sorted(((p + "_", part) for part, p in parts.items()), key=lambda x: -len(x[0]))
    tables = {}
    for part in (p for p in parts if p in names):
        table = name_table(part, names[part])
        tables[part] = {kohya_name(parts[part], c): n for c, n in table.items()}
        renamed = (renames or {}).get(part, {})
        tables[part].update({kohya_name(parts[part], renamed[n]): n for n in table.values() if n in renamed})
    layers: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        layer, _, suffix = key.partition(".")
        if suffix not in SUFFIXES:
            kind = "DoRA" if "dora" in suffix else "LyCORIS (LoHa/LoKr/...)" if suffix.startswith(("hada", "lokr")) else "unknown"
            raise LoraFileError(f"{source}: {key}: a {kind} tensor; only plain LoRA (lora_down, lora_up, alpha) is read")
        layers.setdefault(layer, {})[suffix] = tensor
    weights: dict[str, dict[str, LoraModule]] = {}
    keys: dict[str, dict[str, str]] = {}
    for layer, parts_of_layer in layers.items():
        part = next((part for p, part in by_prefix if layer.startswith(p)), None)
        if part is None:
            if layer.startswith(("lora_te1_", "lora_te2_")):
                other = " (lora_te1_/lora_te2_ (two text encoders: SDXL))"
            elif layer.startswith("lora_te_"):
                other = " (lora_te_: one text encoder, SD 1.x/2.x; SDXL's two are lora_te1_/lora_te2_)"
            else:
                other = " (unknown prefix)"
            raise LoraFileError(f"{source}: {layer}: made for another base model{other}")
        if part not in tables:
            raise LoraFileError(f"{source}: {layer} adapts the {part.replace('_', ' ')}, which this run does not adapt "
                                f"(model.adapter.text_encoder=true adapts a transformers CLIP: model/text_encoder=hf_clip, "
                                f"or SDXL's two)")  # fmt: skip
        name = tables[part].get(layer)
        if name is None:
            raise LoraFileError(f"{source}: {layer} names no layer of the {part.replace('_', ' ')} (unknown key, or a "
                                f"LoRA made for another base model)")  # fmt: skip
        if "lora_down.weight" not in parts_of_layer or "lora_up.weight" not in parts_of_layer:
            missing = "lora_up.weight" if "lora_down.weight" in parts_of_layer else "lora_down.weight"
            raise LoraFileError(f"{source}: {layer} has no {missing}")
        down, up = parts_of_layer["lora_down.weight"].float(), parts_of_layer["lora_up.weight"].float()
        alpha = float(parts_of_layer["alpha"]) if "alpha" in parts_of_layer else float(down.shape[0])
        weights.setdefault(part, {})[name] = LoraModule(down, up, alpha)
        keys.setdefault(part, {})[name] = layer
    return weights, keys
