"""SDXL's single-file export (`python -m ldm.export CKPT model.safetensors --format single-file`) loaded by diffusers'
own `StableDiffusionXLPipeline.from_single_file`, offline, on tiny SDXL-shaped parts: every tensor of the U-Net, VAE
and both text encoders is the trained model's, and the images are `ldm.sample`'s. The file is SDXL's original layout
(`model.diffusion_model.`, `first_stage_model.`, CLIP-L under `conditioner.embedders.0.transformer.`, OpenCLIP bigG
under `conditioner.embedders.1.model.` in open_clip's names), which diffusers recognises as `xl_base`."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection
from test_sdxl import ATOL, PROMPTS, root, sdxl_config  # noqa: F401 (root: the tiny SDXL directory and shards)

from ldm.diffusion import make_scheduler
from ldm.export import main as export_main
from ldm.models.adapters import LoRA, merged
from ldm.models.export import build_pipeline, text_encoder_to_ldm
from ldm.models.formats.single_file import SDXL_OPEN_CLIP_PREFIX, SingleFileError, clip_to_open_clip, unet_to_ldm
from ldm.models.sdxl import SDXL_UNET, TIME_IDS, sdxl_text_encoders
from ldm.models.tokenizer import VOCAB_SIZE
from ldm.run.fit import train
from ldm.stages.load import load_module

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
PREFIXES = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
            "conditioner.embedders.1.model.")  # fmt: skip


def assert_same_parts(loaded, expected) -> None:
    for name in PARTS:
        a, b = getattr(loaded, name).state_dict(), getattr(expected, name).state_dict()
        assert a.keys() == b.keys(), name
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {different[:3]}"


def assert_same_images(pipe, module, size=(16, 16)) -> None:
    for w in (1.0, 4.0):
        expected = pipe(PROMPTS, num_inference_steps=3, guidance_scale=w, height=size[0], width=size[1],
                        output_type="pt", generator=torch.Generator().manual_seed(3)).images  # (B, 3, H, W)
        ours = module.generate(PROMPTS, seed=3, guidance_scale=w, num_inference_steps=3, size=size)
        diff = float((ours - expected.float()).abs().max())
        assert diff <= ATOL, f"guidance {w}: images differ by {diff}"


@pytest.fixture(scope="module")
def full_run(root, tmp_path_factory):  # noqa: F811
    """Two steps fine-tuning the whole U-Net (EMA on, as the default)."""
    run_dir = tmp_path_factory.mktemp("full")
    train(sdxl_config(root, run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


def test_a_fine_tuned_sdxl_loads_with_from_single_file(full_run, tmp_path):
    path = export_main([str(full_run), str(tmp_path / "sdxl.safetensors"), "--format", "single-file"])
    state = load_file(str(path))
    assert all(k.startswith(PREFIXES) for k in state), [k for k in state if not k.startswith(PREFIXES)][:3]
    assert {p for p in PREFIXES if any(k.startswith(p) for k in state)} == set(PREFIXES)
    bigg = "conditioner.embedders.1.model."  # (diffusers' xl_base key needs 10 blocks: the test below)
    assert bigg + "transformer.resblocks.1.mlp.c_proj.bias" in state and bigg + "positional_embedding" in state
    assert state[bigg + "text_projection"].shape == (40, 32)  # open_clip's (width, projection)
    assert state[bigg + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 40, 40)  # q, k, v stacked

    module = load_module(full_run)
    ours = build_pipeline(module)  # what the pipeline export writes: the EMA U-Net, the frozen VAE and encoders
    pipe_dir = export_main([str(full_run), str(tmp_path / "pipe")])
    single = StableDiffusionXLPipeline.from_single_file(str(path), config=str(pipe_dir), local_files_only=True)
    assert_same_parts(single, ours)
    assert single.config.force_zeros_for_empty_prompt
    assert_same_images(single, module)
    assert_same_images(single, module, size=(24, 16))  # a non-square size: the default micro-conditioning

    half = load_file(str(export_main([str(full_run), str(tmp_path / "half.safetensors"), "--format", "single-file",
                                      "--dtype", "float16"])))  # fmt: skip
    assert half.keys() == state.keys()
    assert all(half[k].dtype == torch.float16 and torch.equal(half[k], state[k].half()) for k in state)


def test_a_lora_run_exports_its_adapters_merged(root, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    train(sdxl_config(root, run_dir, "model/adapter=lora", "model.adapter.rank=2", "optim.lr=0.05",
                      "model.ema_decay=null"))  # fmt: skip
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    path = export_main([str(ckpt), str(tmp_path / "merged.safetensors"), "--format", "single-file"])
    assert not any("lora" in k for k in load_file(str(path)))
    module = load_module(ckpt)
    scheduler = make_scheduler(module.sampling["sampler"], module.scheduler_config)  # the run's sampler
    # the base model's directory as the config: the file carries every weight
    single = StableDiffusionXLPipeline.from_single_file(str(path), config=str(root / "sdxl"), scheduler=scheduler,
                                                        local_files_only=True)  # fmt: skip
    base = StableDiffusionXLPipeline.from_pretrained(root / "sdxl")
    assert not torch.equal(single.unet.state_dict()["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"],
                           base.unet.state_dict()["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"])  # fmt: skip
    assert_same_parts(single, build_pipeline(module))
    assert_same_images(single, module)


def test_adapted_sdxl_text_encoders_are_written_merged(root):  # noqa: F811
    """Both encoders of the pair with LoRA adapters: the file holds the merged weights, and diffusers' own
    converters read them back into encoders giving the adapted encoders' outputs."""
    encoders = sdxl_text_encoders(root / "sdxl")
    lora = LoRA(rank=2, alpha=2, text_encoder=True)
    for model in (encoders.text_encoder, encoders.text_encoder_2):
        lora.attach_text_encoder(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # peft starts lora_B at zero: an adapter that changes nothing
                    p.normal_(std=0.1)
    state = text_encoder_to_ldm(encoders)
    plain = [merged(encoders.text_encoder), merged(encoders.text_encoder_2)]
    back = [type(m)(m.config) for m in plain]
    first = convert_ldm_clip_checkpoint(state)  # drops conditioner.embedders.0.transformer.
    if not hasattr(back[0], "text_model"):  # transformers >= 5.6 flattens CLIPTextModel (as from_single_file does)
        first = {k.removeprefix("text_model."): v for k, v in first.items()}
    back[0].load_state_dict(first)
    second = convert_open_clip_checkpoint(back[1], state, prefix="conditioner.embedders.1.model.")
    back[1].load_state_dict(second)
    for got, want in zip(back, plain):
        assert all(torch.equal(got.state_dict()[k], v) for k, v in want.state_dict().items())
    ids = encoders.tokenize(PROMPTS)
    with torch.no_grad():
        for i, (got, adapted) in enumerate(zip(back, (encoders.text_encoder, encoders.text_encoder_2))):
            a, b = got(ids[:, i], output_hidden_states=True), adapted(ids[:, i], output_hidden_states=True)
            torch.testing.assert_close(a.hidden_states[-2], b.hidden_states[-2], atol=1e-5, rtol=0)
        pooled = back[1](ids[:, 1]).text_embeds
        torch.testing.assert_close(pooled, encoders.text_encoder_2(ids[:, 1]).text_embeds, atol=1e-5, rtol=0)


def test_the_sdxl_unet_layout_is_what_diffusers_converts_back():
    """SDXL's block structure (no attention in the first level, 2 resnets a level, several transformer layers a
    block, the added time/text embedding) at tiny widths: diffusers' own inverse gives every tensor back."""
    config = dict(SDXL_UNET, block_out_channels=(16, 32, 32), attention_head_dim=(2, 4, 4), norm_num_groups=8,
                  transformer_layers_per_block=(1, 2, 3), cross_attention_dim=32, addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=32 + TIME_IDS * 8)  # fmt: skip
    unet = UNet2DConditionModel(**config)
    state = unet.state_dict()
    ldm = unet_to_ldm(state, unet.config)
    assert "model.diffusion_model.label_emb.0.0.weight" in ldm
    assert "model.diffusion_model.middle_block.1.transformer_blocks.2.attn2.to_k.weight" in ldm
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_diffusers_takes_the_second_encoder_for_sdxl_bigg():
    """A bigG-shaped encoder (10 blocks, so diffusers' `xl_base` key
    `conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias` exists) at a tiny width: diffusers
    infers SDXL base from the file, and its own open_clip converter gives every tensor back."""
    config = CLIPTextConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=77, hidden_size=40, intermediate_size=64,
                            num_hidden_layers=10, num_attention_heads=2, hidden_act="gelu", projection_dim=32)  # fmt: skip
    model = CLIPTextModelWithProjection(config)
    state = clip_to_open_clip(model.state_dict(), SDXL_OPEN_CLIP_PREFIX)
    assert infer_diffusers_model_type(state) == "xl_base"
    back = convert_open_clip_checkpoint(model, state, prefix=SDXL_OPEN_CLIP_PREFIX)
    ours = model.state_dict()
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_what_open_clip_cannot_hold_is_one_line_naming_the_key():
    with pytest.raises(SingleFileError, match=r"^text encoder: text_model\.encoder\.layers\.0\.extra\.weight has no place"):
        clip_to_open_clip({"text_model.encoder.layers.0.extra.weight": torch.zeros(1)})
    with pytest.raises(SingleFileError, match=r"encoder\.layers\.0\.self_attn\.v_proj\.weight is missing"):
        clip_to_open_clip({f"text_model.encoder.layers.0.self_attn.{p}.weight": torch.zeros(2, 2) for p in ("q_proj", "k_proj")})
