"""Original-layout ("single-file") Stable Diffusion checkpoints: one safetensors file in the CompVis/Stability LDM
layout that Automatic1111 and ComfyUI load, and diffusers with `from_single_file(path, config=<pipeline dir>)`.

    state = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config),
             **clip_to_ldm(text_model.state_dict())}
    write_single_file("model.safetensors", state)

Prefixes: `model.diffusion_model.` (the U-Net's openaimodel layout), `first_stage_model.` (the VAE's), and the
text encoder's: `cond_stage_model.transformer.text_model.` for a transformers CLIP (SD 1.x) or
`cond_stage_model.model.` for an open_clip text tower (SD 2.x). SDXL files name their two encoders
`conditioner.embedders.0.transformer.` (CLIP-L, as transformers names it) and `conditioner.embedders.1.model.`
(OpenCLIP bigG in open_clip's layout, which `clip_to_open_clip` writes from the transformers model diffusers
holds it in):

    state = {**unet_to_ldm(...), **vae_to_ldm(...), **clip_to_ldm(text_encoder.state_dict(), SDXL_CLIP_PREFIX),
             **clip_to_open_clip(text_encoder_2.state_dict(), SDXL_OPEN_CLIP_PREFIX)}

The U-Net map follows the openaimodel layout block by block, so it holds for any UNet2DConditionModel of SD's
block kinds: input_blocks.0 is conv_in; then per down block, one input block per layer (resnet at .0, attention
at .1) and one for the downsampler (.0.op); middle_block is resnet, attention, resnet; per up block,
layers_per_block + 1 output blocks (resnet .0, attention .1, the upsampler's conv after them). Every key is mapped
or the conversion fails naming it. The inverse map is diffusers' `loaders.single_file_utils`, which tests load back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # + text_model.*
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # + text_model.*
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

UNET_LAYERS = {  # diffusers -> openaimodel, outside the blocks
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
               "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # norm1, conv1, norm2, conv2 keep their names
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_LAYERS = {"conv_norm_out": "norm_out"}
OPEN_CLIP_LAYERS = {  # transformers CLIP (inside text_model) -> open_clip, outside the blocks
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",  # an nn.Parameter in open_clip: no .weight
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_BLOCK = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # encoder.layers.N.* -> resblocks.N.*  # fmt: skip
OPEN_CLIP_QKV = ("q_proj", "k_proj", "v_proj")  # the rows of nn.MultiheadAttention's in_proj, in this order
_SELF_ATTN_QKV = {f"self_attn.{p}": p for p in OPEN_CLIP_QKV}


class SingleFileError(ValueError):
    """A model the original layout cannot hold; one line naming the key."""


def _layers_per_block(config: Mapping) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise SingleFileError(f"layers_per_block={layers}: the original layout needs one number for all blocks")
    return layers


def unet_prefix_map(config: Mapping, state: Mapping[str, Tensor]) -> list[tuple[str, str, Mapping[str, str]]]:
    """(diffusers module prefix, openaimodel prefix, renames of the module's own layers), for every block."""
    layers = _layers_per_block(config)
    has = lambda prefix: any(k.startswith(prefix + ".") for k in state)  # noqa: E731
    out = [(d, o, {}) for d, o in UNET_LAYERS.items()]
    i = 1
    for b in range(len(config["down_block_types"])):
        for j in range(layers):
            out.append((f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i}.0", UNET_RESNET))
            out.append((f"down_blocks.{b}.attentions.{j}", f"input_blocks.{i}.1", {}))
            i += 1
        if has(f"down_blocks.{b}.downsamplers.0"):
            out.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{i}.0.op", {}))
            i += 1
    out += [("mid_block.resnets.0", "middle_block.0", UNET_RESNET), ("mid_block.attentions.0", "middle_block.1", {}),
            ("mid_block.resnets.1", "middle_block.2", UNET_RESNET)]  # fmt: skip
    k = 0
    for b in range(len(config["up_block_types"])):
        for j in range(layers + 1):
            out.append((f"up_blocks.{b}.resnets.{j}", f"output_blocks.{k}.0", UNET_RESNET))
            attention = has(f"up_blocks.{b}.attentions.{j}")
            out.append((f"up_blocks.{b}.attentions.{j}", f"output_blocks.{k}.1", {}))
            if j == layers:
                out.append((f"up_blocks.{b}.upsamplers.0", f"output_blocks.{k}.{2 if attention else 1}", {}))
            k += 1
    return out


def _convert(state: Mapping[str, Tensor], prefixes: list[tuple[str, str, Mapping[str, str]]], what: str) -> dict[str, Tensor]:
    # longest prefix first: "up_blocks.0.resnets.1" must not take "up_blocks.0.resnets.10"'s keys (it cannot: the
    # match is on prefix + "."), and "conv_in" must not take "conv_in_x" (same)
    ordered = sorted(prefixes, key=lambda p: -len(p[0]))
    out = {}
    for key, tensor in state.items():
        for ours, theirs, renames in ordered:
            if key.startswith(ours + "."):
                rest = key[len(ours) + 1:]
                for a, b in renames.items():
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
                out[f"{theirs}.{rest}"] = tensor
                break
        else:
            raise SingleFileError(f"{what}: {key} has no place in the original layout (not a Stable Diffusion block)")
    return out


def unet_module_names_to_ldm(names: Iterable[str], config: Mapping) -> dict[str, str]:
    """diffusers U-Net module name -> its name in the openaimodel layout, for every module inside a block
    (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` -> `input_blocks.4.1.transformer_blocks.0.attn1.to_q`):
    the names kohya gives SDXL's LoRA layers. ``names``: all the U-Net's module names (`named_modules`)."""
    names = [n for n in names if n]
    ordered = sorted(unet_prefix_map(config, {f"{n}.weight": None for n in names}), key=lambda p: -len(p[0]))
    out = {}
    for name in names:
        for ours, theirs, renames in ordered:
            if name == ours or name.startswith(ours + "."):
                rest = name[len(ours) + 1:]
                for a, b in renames.items():
                    if rest == a or rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
                out[name] = f"{theirs}.{rest}" if rest else theirs
                break
    return out


def unet_to_ldm(state: Mapping[str, Tensor], config: Mapping, prefix: str = UNET_PREFIX) -> dict[str, Tensor]:
    """A diffusers UNet2DConditionModel's state dict in the openaimodel layout, under ``prefix``."""
    converted = _convert(state, unet_prefix_map(config, state), "unet")
    return {prefix + k: v for k, v in converted.items()}


def vae_to_ldm(state: Mapping[str, Tensor], config: Mapping, prefix: str = VAE_PREFIX) -> dict[str, Tensor]:
    """A diffusers AutoencoderKL's state dict in the LDM layout (attention projections as 1x1 convolutions)."""
    n = len(config["up_block_types"])
    maps: list[tuple[str, str, Mapping[str, str]]] = [("quant_conv", "quant_conv", {}), ("post_quant_conv", "post_quant_conv", {})]
    for coder in ("encoder", "decoder"):
        maps += [(f"{coder}.conv_in", f"{coder}.conv_in", {}), (f"{coder}.conv_out", f"{coder}.conv_out", {}),
                 (f"{coder}.conv_norm_out", f"{coder}.norm_out", {}),
                 (f"{coder}.mid_block.resnets.0", f"{coder}.mid.block_1", VAE_RESNET),
                 (f"{coder}.mid_block.resnets.1", f"{coder}.mid.block_2", VAE_RESNET),
                 (f"{coder}.mid_block.attentions.0", f"{coder}.mid.attn_1", VAE_ATTENTION)]  # fmt: skip
    for i in range(len(config["down_block_types"])):
        maps += [(f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block", {}),
                 (f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", {})]  # fmt: skip
    for i in range(n):
        maps += [(f"decoder.up_blocks.{i}.resnets", f"decoder.up.{n - 1 - i}.block", {}),
                 (f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv", {})]  # fmt: skip
    out = {}
    for key, tensor in _convert(state, maps, "vae").items():
        key = key.replace(".conv_shortcut.", ".nin_shortcut.")  # inside encoder.down.{i}.block.{j}
        if ".mid.attn_1." in key and tensor.dim() == 2:  # Linear (C, C) -> the original 1x1 convolution (C, C, 1, 1)
            tensor = tensor[:, :, None, None]
        out[prefix + key] = tensor
    return out


def clip_to_ldm(state: Mapping[str, Tensor], prefix: str = CLIP_PREFIX) -> dict[str, Tensor]:
    """A transformers CLIPTextModel's state dict under ``prefix``, named as transformers 4 names it (`text_model.`)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def open_clip_to_ldm(state: Mapping[str, Tensor], prefix: str = OPEN_CLIP_PREFIX) -> dict[str, Tensor]:
    """An open_clip text tower's weights (token_embedding, positional_embedding, resblocks, ln_final) under
    ``prefix`` as open_clip names them in a whole model (`transformer.resblocks.N`)."""
    return {prefix + ("transformer." + k if k.startswith("resblocks.") else k): v for k, v in state.items()}


def clip_to_open_clip(state: Mapping[str, Tensor], prefix: str = OPEN_CLIP_PREFIX) -> dict[str, Tensor]:
    """A transformers CLIPTextModel(WithProjection)'s state dict in open_clip's layout under ``prefix``: how SDXL's
    OpenCLIP bigG is stored (`transformer.resblocks.N.attn.in_proj_weight`, q, k and v stacked row-wise as
    nn.MultiheadAttention holds them; `ln_1`, `mlp.c_fc`, `ln_final`, `token_embedding`, `positional_embedding`),
    and `text_projection` as open_clip multiplies by it, (width, projection): the transformers Linear's weight
    transposed."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}  # (layer, weight | bias) -> {q_proj: tensor, ...}
    for key, tensor in state.items():
        name = key.removeprefix("text_model.")  # transformers 5 flattens CLIPTextModel, not ...WithProjection
        block = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)  # layer, module, kind
        if key == "text_projection.weight":  # Linear (projection, width), bias-free
            out["text_projection"] = tensor.T
        elif name in OPEN_CLIP_LAYERS:
            out[OPEN_CLIP_LAYERS[name]] = tensor
        elif name == "embeddings.position_ids":  # 0..L-1, a buffer older transformers saved; open_clip has none
            continue
        elif block and block[2] in OPEN_CLIP_BLOCK:
            out[f"transformer.resblocks.{block[1]}.{OPEN_CLIP_BLOCK[block[2]]}.{block[3]}"] = tensor
        elif block and block[2] in _SELF_ATTN_QKV:
            qkv.setdefault((block[1], block[3]), {})[_SELF_ATTN_QKV[block[2]]] = tensor
        else:
            raise SingleFileError(f"text encoder: {key} has no place in open_clip's layout (not a CLIP text block)")
    for (layer, kind), projections in qkv.items():
        missing = [p for p in OPEN_CLIP_QKV if p not in projections]
        if missing:
            raise SingleFileError(f"text encoder: encoder.layers.{layer}.self_attn.{missing[0]}.{kind} is missing; "
                                  f"open_clip stores q, k and v as one in_proj_{kind}")  # fmt: skip
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([projections[p] for p in OPEN_CLIP_QKV])
    return {prefix + k: v for k, v in out.items()}


def write_single_file(path: str | Path, state: Mapping[str, Tensor], dtype: torch.dtype | None = None,
                      metadata: Mapping[str, str] | None = None) -> Path:  # fmt: skip
    """One .safetensors file; ``dtype`` casts floating-point tensors (float16 halves the size)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SingleFileError(f"{path}: a single-file checkpoint is written as .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in state.items()}  # fmt: skip
    safetensors.torch.save_file(tensors, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path
