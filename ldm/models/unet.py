"""The denoiser: a diffusers `UNet2DConditionModel`, built from a config or loaded pretrained.

    unet = build_unet(sample_size=8, in_channels=4, block_out_channels=[64, 128], cross_attention_dim=64)
    unet = load_unet("runwayml/stable-diffusion-v1-5")   # hub id or local diffusers directory
    to_channels_last(unet)   # weights NHWC, and every transformer block hands NHWC on (no copy back to NCHW)
"""

from __future__ import annotations

import types

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import is_accelerate_available


def build_unet(seed: int | None = 0, **config) -> UNet2DConditionModel:
    """A fresh U-Net; `config` is `UNet2DConditionModel`'s own keyword arguments (lists become tuples)."""
    if seed is not None:
        torch.manual_seed(seed)
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return UNet2DConditionModel(**config)


def load_unet(path: str, subfolder: str | None = "unet", **kwargs) -> UNet2DConditionModel:
    """`UNet2DConditionModel.from_pretrained(path, subfolder=...)`, trainable (fine-tuning): in train mode, which
    `from_pretrained` leaves off and Lightning does not turn on (a U-Net with dropout would train without it)."""
    kwargs.setdefault("low_cpu_mem_usage", is_accelerate_available())  # diffusers' notice otherwise asks for it
    return UNet2DConditionModel.from_pretrained(path, subfolder=subfolder, **kwargs).train()


def base_model_version(config, prediction_type: str = "epsilon") -> str:
    """The model family as kohya's `ss_base_model_version` names it, from the U-Net's shape: SDXL's added
    time/text embedding, SD 2.x's 1024-wide (OpenCLIP-H) cross-attention, else SD 1.x; `_v` for v-prediction."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl_base_v1-0"
    version = "sd_v2" if config.get("cross_attention_dim") == 1024 else "sd_v1"
    return version + ("_v" if prediction_type == "v_prediction" else "")


def to_channels_last(unet: torch.nn.Module) -> torch.nn.Module:
    """The U-Net's weights in channels_last (NHWC), and its `Transformer2DModel`s' outputs left NHWC.

    diffusers' `Transformer2DModel` turns its (B, H*W, C) tokens back into an image with
    `.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()`: the permuted view already is an NHWC image, and the
    `.contiguous()` copies it into NCHW, which the next channels_last convolution copies back. Without that copy
    (the same values; only the strides differ) the image stays NHWC from block to block. Each continuous-input
    transformer gets, as an instance attribute, the same output step minus the copy."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    unet.to(memory_format=torch.channels_last)
    for module in unet.modules():
        if isinstance(module, Transformer2DModel) and getattr(module, "is_input_continuous", False):
            module._get_output_for_continuous_inputs = types.MethodType(_nhwc_output, module)
    return unet


def _nhwc_output(self, hidden_states, residual, batch_size, height, width, inner_dim):
    """`Transformer2DModel._get_output_for_continuous_inputs` without the final copy to NCHW."""

    def to_image(tokens):
        return tokens.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)  # an NHWC-strided view

    if self.use_linear_projection:
        return to_image(self.proj_out(hidden_states)) + residual
    return self.proj_out(to_image(hidden_states)) + residual
