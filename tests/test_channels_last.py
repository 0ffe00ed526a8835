"""`to_channels_last` keeps the U-Net's images NHWC through its transformer blocks (no copy back to NCHW) and
changes no value: outputs and gradients equal diffusers' own forward, for SD's convolutional and SDXL's linear
projections."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch.utils._python_dispatch import TorchDispatchMode

from ldm.models.sdxl import TIME_IDS, TINY_SDXL_UNET
from ldm.models.unet import build_unet, to_channels_last

SD_UNET = dict(sample_size=8, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=4,
               cross_attention_dim=24, norm_num_groups=8)  # fmt: skip


def inputs(unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    kwargs = {"encoder_hidden_states": torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - TIME_IDS * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                       "time_ids": torch.rand(2, TIME_IDS, generator=g) * 64}  # fmt: skip
    return x, torch.tensor([10, 700]), kwargs


@pytest.mark.parametrize("config", [SD_UNET, TINY_SDXL_UNET], ids=["conv-projection", "linear-projection"])
def test_same_outputs_and_gradients_with_nhwc_transformer_outputs(config):
    reference = build_unet(**config)
    nhwc = to_channels_last(copy.deepcopy(reference))
    x, t, kwargs = inputs(reference)
    layouts = []
    for module in nhwc.modules():
        if isinstance(module, Transformer2DModel):
            module.register_forward_hook(lambda m, args, out: layouts.append(
                out[0].is_contiguous(memory_format=torch.channels_last) and not out[0].is_contiguous()))

    expected = reference(x, t, **kwargs).sample
    out = nhwc(x.contiguous(memory_format=torch.channels_last), t, **kwargs).sample
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert layouts and all(layouts), "a transformer block handed on an NCHW copy"

    expected.square().mean().backward()
    out.square().mean().backward()
    for (name, p), q in zip(reference.named_parameters(), nhwc.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


class TransformerClones(TorchDispatchMode):
    """Counts the tensor copies made inside Transformer2DModel forwards (`.contiguous()` of a non-contiguous view,
    or a reshape that cannot be a view, is an aten.clone)."""

    def __init__(self, unet):
        super().__init__()
        self.count, self.inside = 0, 0
        for m in unet.modules():
            if isinstance(m, Transformer2DModel):
                m.register_forward_pre_hook(lambda *_: setattr(self, "inside", self.inside + 1))
                m.register_forward_hook(lambda *_: setattr(self, "inside", self.inside - 1))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += self.inside > 0 and func is torch.ops.aten.clone.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("config", [SD_UNET, TINY_SDXL_UNET], ids=["conv-projection", "linear-projection"])
def test_no_copy_inside_the_transformer_blocks(config):
    # what to_channels_last removes: diffusers' transformer output is copied to NCHW, here for NHWC input too
    # (the ResNet blocks' own .contiguous() before a 1x1 shortcut convolution copies NHWC inputs: not counted)
    plain = build_unet(**config).to(memory_format=torch.channels_last)
    nhwc = to_channels_last(copy.deepcopy(plain))
    x, t, kwargs = inputs(plain)
    x = x.contiguous(memory_format=torch.channels_last)
    counts = []
    for unet in (plain, nhwc):
        clones = TransformerClones(unet)
        with torch.no_grad(), clones:
            unet(x, t, **kwargs)
        counts.append(clones.count)
    blocks = sum(isinstance(m, Transformer2DModel) for m in plain.modules())
    assert counts[0] >= blocks > 0 and counts[1] == 0, counts


def test_compiled_channels_last_forces_inductor_layout_optimization(monkeypatch):
    """Inductor's heuristic keeps an SD U-Net's convolutions NCHW (some have out_channels * 2 <= in_channels, "as in
    pytorch_unet"); with `model.channels_last` the stage compiles with its layout optimization forced, a `mode` turned
    into the Inductor options it stands for (torch.compile takes no mode beside options)."""
    from ldm.stages.latent_diffusion import LatentDiffusion
    from ldm.training.compile import makes_cuda_graphs, with_inductor_options

    options = with_inductor_options({"mode": "reduce-overhead", "dynamic": False}, force_layout_optimization=True)
    assert options == {"dynamic": False, "options": {"triton.cudagraphs": True, "force_layout_optimization": True}}
    assert makes_cuda_graphs(options)
    torch.compile(torch.nn.Linear(2, 2), **options)  # torch.compile checks each option against Inductor's config
    with pytest.raises(RuntimeError, match="no_such_option"):
        torch.compile(torch.nn.Linear(2, 2), **with_inductor_options({}, no_such_option=True))
    assert with_inductor_options({"backend": "cudagraphs"}, force_layout_optimization=True) == {"backend": "cudagraphs"}
    compiled = []
    for channels_last, expected in ((True, {"options": {"force_layout_optimization": True}}), (False, {})):
        module = LatentDiffusion(build_unet(**SD_UNET), vae=lambda: None, text_encoder=lambda: None,
                                 compile=True, channels_last=channels_last)  # fmt: skip
        monkeypatch.setattr(module, "compile_parts", lambda modules, options: compiled.append(options))
        module.configure_model()
        assert compiled.pop() == expected
