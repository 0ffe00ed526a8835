"""Convert an open_clip text tower into a `transformers.CLIPTextModel` with the same token states.

This is how diffusers stores Stable Diffusion 2.x: the OpenCLIP ViT-H/14 text tower cut to its penultimate
block, with open_clip's `ln_final` as `final_layer_norm`, so a plain `CLIPTextModel(...).last_hidden_state`
gives what SD 2.x conditions on. Used to export a `StableDiffusionPipeline` directory from a model trained
with an `OpenCLIPTextEncoder`:

    text_encoder, tokenizer = open_clip_to_hf(open_clip_text_encoder)
    text_encoder.save_pretrained(out / "text_encoder")
    write_clip_tokenizer(out / "tokenizer", pad_token="!")  # vocab.json + merges.txt, like diffusers repos

Only the standard open_clip block is supported (pre-LayerNorm, fused q/k/v `nn.MultiheadAttention`, GELU or
QuickGELU MLP, causal mask, no layer scale): the layout CLIPTextModel can represent.
"""

from __future__ import annotations

import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.models.formats.single_file import OPEN_CLIP_BLOCK, OPEN_CLIP_LAYERS, OPEN_CLIP_QKV
from ldm.models.text_encoders import OpenCLIPTextEncoder
from ldm.models.tokenizer import clip_tokenizer


def _hidden_act(activation: nn.Module) -> str:
    """The transformers `hidden_act` name computing the same function as open_clip's MLP activation."""
    if isinstance(activation, QuickGELU):
        return "quick_gelu"
    if isinstance(activation, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[activation.approximate]
    raise ValueError(f"open_clip MLP activation {type(activation).__name__} has no CLIPTextModel equivalent")


def _check_convertible(encoder: OpenCLIPTextEncoder) -> None:
    if encoder.attn_mask is None:
        raise ValueError("open_clip text tower is bidirectional (no causal mask); CLIPTextModel is always causal")
    for i, block in enumerate(encoder.resblocks):
        if type(block) is not ResidualAttentionBlock:
            raise ValueError(f"resblocks[{i}] is a {type(block).__name__}; only ResidualAttentionBlock converts")
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            raise ValueError(f"resblocks[{i}] uses layer scale, which CLIPTextModel does not have")
        if {block.ln_1.eps, block.ln_2.eps} != {encoder.ln_final.eps}:
            raise ValueError(f"resblocks[{i}] layer norm eps differs from ln_final's; CLIPTextModel shares one eps")
        if block.attn.in_proj_weight is None or block.attn.in_proj_bias is None:
            raise ValueError(f"resblocks[{i}].attn has no fused in_proj weight and bias")


def _clip_text_config(encoder: OpenCLIPTextEncoder, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    block = encoder.resblocks[0]
    return CLIPTextConfig(
        vocab_size=encoder.token_embedding.num_embeddings,
        hidden_size=encoder.hidden_size,
        intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=len(encoder.resblocks),  # already cut to the penultimate block when layer="penultimate"
        num_attention_heads=block.attn.num_heads,
        max_position_embeddings=encoder.max_length,
        hidden_act=_hidden_act(block.mlp.gelu),
        layer_norm_eps=encoder.ln_final.eps,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _hf_state_dict(encoder: OpenCLIPTextEncoder) -> dict[str, torch.Tensor]:
    """open_clip text weights under CLIPTextModel's names (relative to the module holding `embeddings`)."""
    # the names the single-file export maps the other way (transformers -> open_clip), read backwards
    ours = encoder.state_dict()
    state = {hf: ours[open_clip] for hf, open_clip in OPEN_CLIP_LAYERS.items()}
    for i, block in enumerate(encoder.resblocks):
        hf = f"encoder.layers.{i}."
        # nn.MultiheadAttention stacks the q, k, v projections row-wise in in_proj: (3D, D) and (3D,).
        for name, weight, bias in zip(OPEN_CLIP_QKV, block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)):
            state[hf + f"self_attn.{name}.weight"] = weight
            state[hf + f"self_attn.{name}.bias"] = bias
        for hf_name, open_clip_name in OPEN_CLIP_BLOCK.items():
            module = block.get_submodule(open_clip_name)
            state[hf + hf_name + ".weight"] = module.weight
            state[hf + hf_name + ".bias"] = module.bias
    return {k: v.detach().clone() for k, v in state.items()}


def open_clip_to_hf(encoder: OpenCLIPTextEncoder) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A `CLIPTextModel` whose `last_hidden_state` equals `encoder`'s output, and a CLIP tokenizer padding
    with "!" (id 0) like open_clip. The model is in eval mode, with `encoder`'s dtype and device."""
    _check_convertible(encoder)
    tokenizer = clip_tokenizer(model_max_length=encoder.max_length, pad_token="!")
    reference = encoder.token_embedding.weight
    text_encoder = CLIPTextModel(_clip_text_config(encoder, tokenizer))
    # transformers 5 keeps embeddings/encoder/final_layer_norm on CLIPTextModel itself, 4.x on its .text_model.
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(_hf_state_dict(encoder), strict=True)
    text_encoder.to(device=reference.device, dtype=reference.dtype).eval()
    return text_encoder, tokenizer
