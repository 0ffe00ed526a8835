"""LoRA fine-tuning end to end on tiny real components: a "pretrained" Stable Diffusion pipeline directory (random
weights, saved by diffusers), `model/adapter=lora` through the real Hydra config and Lightning Trainer, and every
export loaded by diffusers' own loaders (`load_lora_weights` for the diffusers and kohya files, `from_pretrained`
for the merged pipeline, `from_single_file` for the original-layout checkpoint), giving the images `ldm.sample`
gives for the trained checkpoint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from lora_parallel import BATCH, lora_module, lora_rank, lora_step
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import compose_config, make_tiny_root
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.diffusion import make_scheduler, scheduler_config
from ldm.export import main as export_main
from ldm.models.adapters import is_adapter_key, lora_weights
from ldm.models.formats.kohya import addnet_hashes, kohya_name
from ldm.models.formats.single_file import unet_to_ldm, vae_to_ldm
from ldm.models.unet import build_unet
from ldm.models.vae import build_vae
from ldm.run.fit import train
from ldm.run.validate import ConfigError
from ldm.stages.load import load_module
from ldm.training.checkpoint import load_checkpoint

TINY_UNET = dict(sample_size=8, block_out_channels=[16, 32], norm_num_groups=8, attention_head_dim=4,
                 cross_attention_dim=32, layers_per_block=1,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])  # fmt: skip
PROMPTS = ["a large red circle in the center", "a small blue square at the top left"]
ATOL = 2e-4  # as tests/test_train.py's export check: float32 rounding through different code paths


def save_base_pipeline(root: Path, out: Path, **unet) -> Path:
    """A tiny "pretrained" StableDiffusionPipeline directory: a random U-Net, the tiny root's VAE and transformers
    CLIP (as `make_tiny_root` saved them), the dpm++ scheduler of the default diffusion config."""
    pipe = StableDiffusionPipeline(
        vae=build_vae(block_out_channels=[8, 16], norm_num_groups=4, sample_size=16),
        text_encoder=CLIPTextModel.from_pretrained(root / "models" / "clip-tiny" / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(root / "models" / "clip-tiny" / "tokenizer"),
        unet=build_unet(seed=1, **{**TINY_UNET, **unet}),
        scheduler=make_scheduler("dpm++", scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(out)
    return out


def lora_config(root: Path, base: Path, run_dir: Path, overrides: list[str] = ()):
    """`experiment=shapes` with model/adapter=lora on the base pipeline directory (SD 1.x style: its transformers
    CLIP and VAE), shrunk to seconds on a CPU."""
    return compose_config(root, run_dir, [
        "model/adapter=lora", "model/unet=pretrained", f"model.unet.path={base}",
        "model/text_encoder=hf_clip", f"model.text_encoder.path={base}", f"model.vae.path={base}", "model.vae.subfolder=vae",
        "optim.lr=2e-2", "logger=csv", *overrides,
    ], tiny_unet=False)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_root(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def base(tiny_root, tmp_path_factory) -> Path:
    return save_base_pipeline(tiny_root, tmp_path_factory.mktemp("base") / "sd-tiny")


@pytest.fixture(scope="module")
def lora_run(tiny_root, base, tmp_path_factory) -> Path:
    """Three steps of LoRA with LoCon convolutions and the text encoder adapted (rank 4, alpha 8; conv rank 2); an EMA
    that moves within three steps, so that what is exported (the EMA) changes the images measurably."""
    run_dir = tmp_path_factory.mktemp("lora")
    metrics = train(lora_config(tiny_root, base, run_dir, [
        "trainer.max_steps=3", "model.ema_decay=0.5", "model.adapter.alpha=8", "model.adapter.conv_rank=2", "model.adapter.text_encoder=true",
    ]))  # fmt: skip
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def base_pipe(base: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(base)


def images(pipe, guidance_scale: float) -> torch.Tensor:
    return pipe(PROMPTS, num_inference_steps=4, guidance_scale=guidance_scale, output_type="pt",
                generator=torch.Generator().manual_seed(3)).images.float()  # fmt: skip


def ours(ckpt: Path, guidance_scale: float) -> torch.Tensor:
    return load_module(ckpt).generate(PROMPTS, seed=3, guidance_scale=guidance_scale, num_inference_steps=4)


def assert_same_images(pipe, ckpt: Path) -> None:
    for w in (1.0, 4.0):
        torch.testing.assert_close(ours(ckpt, w), images(pipe, w), atol=ATOL, rtol=0)


# --- training -------------------------------------------------------------------------------------------------------
def test_only_the_adapters_train_and_are_checkpointed(lora_run):
    ckpt = load_checkpoint(lora_run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    keys = list(ckpt["state_dict"])
    extra = [k for k in keys if not is_adapter_key(k) and k not in ("ema.n_averaged", "ema_text_encoder.n_averaged")]
    assert extra == []
    assert {k.split(".")[0] for k in keys} == {"unet", "ema", "text_encoder", "ema_text_encoder"}
    assert any(".conv1.lora_A." in k for k in keys) and any(".q_proj.lora_B." in k for k in keys)  # LoCon, text encoder
    n_trained = sum(1 for k in keys if k.startswith(("unet.", "text_encoder.")))
    assert len(ckpt["optimizer_states"][0]["state"]) == n_trained
    # the adapted model was scored and sampled in training; its adapters were exported at the end
    metrics = json.loads((lora_run / "metrics.json").read_text())
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("train/loss", "val/fid", "val/clip_score"))
    assert (lora_run / "samples" / "step_000003.png").is_file()
    assert (lora_run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (lora_run / "lora" / "shapes.safetensors").is_file()


def test_base_weights_are_bit_identical_after_a_fit(tiny_root, base, tmp_path):
    """The real module and Trainer of a LoRA config, fitted in this process: every base weight of the U-Net and of the
    adapted text encoder is, bit for bit, what diffusers / transformers load from the base directory."""
    cfg = lora_config(tiny_root, base, tmp_path, ["trainer.max_steps=2", "model.adapter.text_encoder=true",
                                                  "callbacks.fid=null", "callbacks.export=null", "logger=none"])  # fmt: skip
    module = instantiate(cfg.model, _convert_="all")
    trainer = instantiate(cfg.trainer, callbacks=[instantiate(c) for c in cfg.callbacks.values() if c], logger=False)
    trainer.fit(module, datamodule=instantiate(cfg.data, _convert_="all"))
    for part, reference in ((module.unet, UNet2DConditionModel.from_pretrained(base, subfolder="unet")),
                            (module.text_encoder.text_encoder, CLIPTextModel.from_pretrained(base, subfolder="text_encoder"))):  # fmt: skip
        trained = {k.replace(".base_layer", ""): v for k, v in part.state_dict().items() if not is_adapter_key(k)}
        expected = reference.state_dict()
        assert trained.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(trained[key], value), key
        assert all(w.up.abs().max() > 0 for w in lora_weights(part).values())  # the adapters did train


# --- exports, each loaded by diffusers' own loader ------------------------------------------------------------------
def test_diffusers_lora_loads_with_load_lora_weights_and_matches_ldm_sample(lora_run, base, tmp_path):
    ckpt = lora_run / "checkpoints" / "last.ckpt"
    out = export_main([str(ckpt), str(tmp_path / "lora"), "--format", "diffusers-lora"])
    assert out == tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    pipe = base_pipe(base)
    plain = images(pipe, 4.0)
    pipe.load_lora_weights(tmp_path / "lora")
    assert (images(pipe, 4.0) - plain).abs().max() > 50 * ATOL  # the adapters change the images: the check can fail
    assert_same_images(pipe, ckpt)


KOHYA_LAYER = re.compile(r"^(lora_unet|lora_te)_[a-z0-9_]+$")


def kohya_candidates(unet, text_model) -> set[str]:
    """sd-scripts' rule (networks/lora.py, LoRANetwork.create_modules), written out independently: every Linear or
    Conv2d child of a U-Net Transformer2DModel (and, with conv_dim, of a ResnetBlock2D / Downsample2D / Upsample2D),
    and of a CLIPAttention / CLIPMLP, named `prefix + "." + module name + "." + child name` with "." -> "_". The text
    model is named as transformers 4 names it (under `text_model.`), which is what ComfyUI and A1111 map."""
    names = set()
    for prefix, root, kinds in (("lora_unet", unet, ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")),
                                ("lora_te", text_model, ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"))):  # fmt: skip
        for name, module in root.named_modules():
            if type(module).__name__ in kinds:
                if prefix == "lora_te" and not name.startswith("text_model."):
                    name = "text_model." + name  # transformers >= 5 flattened CLIPTextModel
                for child_name, child in module.named_modules():
                    if type(child).__name__ in ("Linear", "Conv2d") and child_name:
                        names.add(f"{prefix}.{name}.{child_name}".replace(".", "_"))
    return names


def test_kohya_file_follows_the_naming_rule_and_matches_ldm_sample(lora_run, base, tmp_path):
    ckpt = lora_run / "checkpoints" / "last.ckpt"
    path = export_main([str(ckpt), str(tmp_path / "my_lora.safetensors"), "--format", "kohya"])
    with safe_open(str(path), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    layers = {k.split(".", 1)[0] for k in keys}
    assert all(KOHYA_LAYER.match(layer) for layer in layers)
    assert all(k.split(".", 1)[1] in ("lora_down.weight", "lora_up.weight", "alpha") for k in keys)
    assert len(keys) == 3 * len(layers)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    text_model = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    candidates = kohya_candidates(unet, text_model)
    assert layers <= candidates
    # exactly the targeted ones: the attention projections, the ResNet 3x3 convolutions, the CLIP attention projections
    targeted = {c for c in candidates if re.search(r"_(to_q|to_k|to_v|to_out_0|conv1|conv2|[qkv]_proj|out_proj)$", c)}
    assert layers == targeted
    module = load_module(ckpt)
    for layer in layers:
        rank = tensors[f"{layer}.lora_down.weight"].shape[0]
        conv = "_conv" in layer
        assert rank == (2 if conv else 4) and float(tensors[f"{layer}.alpha"]) == (2.0 if conv else 8.0)
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "4"
    assert float(metadata["ss_network_alpha"]) == 8.0 and json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_sd_model_name"] == str(base)
    assert metadata["ss_steps"] == "3" and metadata["ss_resolution"] == "(16, 16)"
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == addnet_hashes(tensors, metadata)
    assert module.trained_steps == 3

    pipe = base_pipe(base)
    pipe.load_lora_weights(str(path))  # diffusers converts the kohya names itself
    assert_same_images(pipe, ckpt)


def test_merged_pipeline_and_single_file_load_and_match_ldm_sample(lora_run, tmp_path):
    ckpt = lora_run / "checkpoints" / "last.ckpt"
    merged_dir = export_main([str(ckpt), str(tmp_path / "merged")])
    pipe = StableDiffusionPipeline.from_pretrained(merged_dir)
    assert not any("lora" in k for k in pipe.unet.state_dict()) and not any("lora" in k for k in pipe.text_encoder.state_dict())
    assert_same_images(pipe, ckpt)

    path = export_main([str(ckpt), str(tmp_path / "model.safetensors"), "--format", "single-file"])
    with safe_open(str(path), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
        assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
        assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."))
                   for k in f.keys())  # fmt: skip
    single = StableDiffusionPipeline.from_single_file(str(path), config=str(merged_dir), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(single, name).state_dict(), getattr(pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert_same_images(single, ckpt)


def test_a_full_fine_tune_exports_a_single_file_too(tiny_root, tmp_path):
    """A whole-U-Net run of the built-in default (an open_clip text tower, SD 2.x's layout): its single file holds the
    tower as `cond_stage_model.model.*` and loads with `from_single_file` into the exported pipeline's weights."""
    run_dir = tmp_path / "run"
    train(compose_config(tiny_root, run_dir, ["trainer.max_steps=1", "callbacks.fid=null", "logger=none"]))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    path = export_main([str(ckpt), str(tmp_path / "full.safetensors"), "--format", "single-file"])
    with safe_open(str(path), "pt") as f:
        assert any(k.startswith("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight") for k in f.keys())
    pipe = StableDiffusionPipeline.from_pretrained(run_dir / "pipeline")
    single = StableDiffusionPipeline.from_single_file(str(path), config=str(run_dir / "pipeline"), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(single, name).state_dict(), getattr(pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert_same_images(single, ckpt)
    with pytest.raises(ValueError, match="trained the whole U-Net, it has no LoRA adapters"):
        export_main([str(ckpt), str(tmp_path / "x.safetensors"), "--format", "kohya"])


@pytest.mark.parametrize("unet", [
    TINY_UNET,
    dict(TINY_UNET, block_out_channels=[16, 32, 32], layers_per_block=2,  # SD's block kinds, three levels
         down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
])  # fmt: skip
def test_the_single_file_layout_is_what_diffusers_converts_back(unet):
    """Our diffusers -> original maps, inverted by diffusers' own single-file converters, give every tensor back."""
    model = build_unet(**unet)
    vae = build_vae(block_out_channels=[8, 16, 16], norm_num_groups=4, sample_size=16)
    for ours_, theirs, part in ((unet_to_ldm, convert_ldm_unet_checkpoint, model), (vae_to_ldm, convert_ldm_vae_checkpoint, vae)):
        state = part.state_dict()
        back = theirs(ours_(state, part.config), dict(part.config))
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)


# --- start points -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["diffusers-lora", "kohya"])
def test_a_run_continues_a_lora_file(lora_run, tiny_root, base, tmp_path, fmt):
    """`model.adapter.init_from`: a new run starts from the exported adapters (one step at lr 0 keeps them), in the
    U-Net and the text encoder, bit for bit."""
    ckpt = lora_run / "checkpoints" / "last.ckpt"
    out = tmp_path / ("lora" if fmt == "diffusers-lora" else "lora.safetensors")
    export_main([str(ckpt), str(out), "--format", fmt])
    run_dir = tmp_path / "run"
    train(lora_config(tiny_root, base, run_dir, [
        f"model.adapter.init_from={out}", "model.adapter.alpha=8", "model.adapter.conv_rank=2",
        "model.adapter.text_encoder=true", "trainer.max_steps=1", "optim.lr=0", "callbacks.fid=null",
        "callbacks.export=null", "logger=none",
    ]))  # fmt: skip
    trained, continued = load_module(ckpt), load_module(run_dir / "checkpoints" / "last.ckpt")
    for exported, started in ((trained.ema.module, continued.unet),
                              (trained.ema_text_encoder.module.text_encoder, continued.text_encoder.text_encoder)):  # fmt: skip
        a, b = lora_weights(exported), lora_weights(started)
        assert a.keys() == b.keys() and len(a) > 0
        for name in a:
            assert torch.equal(a[name].down, b[name].down) and torch.equal(a[name].up, b[name].up), name
            assert a[name].alpha == b[name].alpha


def test_resume_is_exact(tiny_root, base, tmp_path):
    """Four LoRA steps in one go, and two then two more from the checkpoint: the same adapters, EMA and AdamW state."""
    common = ["callbacks.fid=null", "callbacks.export=null", "logger=none", "model.adapter.text_encoder=true",
              "callbacks.checkpoint.every_n_train_steps=2", "optim.lr_scheduler.num_training_steps=4"]  # fmt: skip
    train(lora_config(tiny_root, base, tmp_path / "straight", [*common, "trainer.max_steps=4"]))
    train(lora_config(tiny_root, base, tmp_path / "first", [*common, "trainer.max_steps=2"]))
    train(lora_config(tiny_root, base, tmp_path / "resumed", [
        *common, "trainer.max_steps=4", f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"]))  # fmt: skip
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


# --- data parallel --------------------------------------------------------------------------------------------------
def test_two_gloo_ranks_equal_one_process_on_the_doubled_batch(tmp_path):
    """Only the adapters are in DDP's buckets; their averaged gradients and the adapters after an AdamW step on two
    ranks with half the batch each are one process's on the whole batch, and the base is untouched."""
    reference = lora_module("cpu")
    base = {k: v.clone() for k, v in reference.unet.state_dict().items() if not is_adapter_key(k)}
    expected = lora_step(reference, reference.unet, slice(0, BATCH))
    assert all(torch.equal(reference.unet.state_dict()[k], v) for k, v in base.items())
    mp.spawn(lora_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "result")), nprocs=2, join=True)
    for rank in range(2):
        grads, weights = torch.load(f"{tmp_path / 'result'}.{rank}")
        assert len(grads) == len(expected[0]) == len(reference.trainable_parameters())
        for i, (a, b) in enumerate(zip(grads, expected[0])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, b.abs().max().item()), msg=f"grad {i}")
        for i, (a, b) in enumerate(zip(weights, expected[1])):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"rank {rank} weight {i}")


# --- bad input: one line, before anything is built or written -----------------------------------------------------
def lora_file(path: Path, unet: UNet2DConditionModel, rank: int = 4, alpha: float = 4.0, extra: dict | None = None,
              metadata: dict | None = None, prefix: str = "lora_unet") -> Path:  # fmt: skip
    """A kohya file for ``unet``'s attention projections, with random adapters."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, module in unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            key = kohya_name(prefix, name)
            state[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g)
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g)
            state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file({**state, **(extra or {})}, str(path), metadata=metadata)
    return path


BAD = {  # name: (overrides of lora_config, or of the tiny default after "PLAIN"; file maker; the one-line message)
    "rank 0": (["model.adapter.rank=0"], None, r"^model\.adapter\.rank=0: expected an integer >= 1"),
    "negative alpha": (["model.adapter.alpha=-1"], None, r"^model\.adapter\.alpha=-1\.?0?: expected a number > 0"),
    "a target matching nothing": (["model.adapter.target_modules=[to_q,to_qq]"], None,
                                  r"^model\.adapter\.target_modules: 'to_qq' matches no module of the U-Net"),
    "a non-layer target": (["model.adapter.target_modules=[attn1]"], None, r"'attn1' selects .*attn1, a Attention"),
    "an unknown setting": (["+model.adapter.rnk=4"], None, r"^model\.adapter: got an unexpected keyword argument 'rnk'"),
    "a missing file": (["model.adapter.init_from=/nonexistent/lora.safetensors"], None, r"no such file or directory"),
    "an open_clip text encoder": (["PLAIN", "model/adapter=lora", "model.adapter.text_encoder=true"], None,
                                  r"^model\.adapter\.text_encoder=true needs a transformers CLIP"),
    "FSDP": (["+trainer/strategy=fsdp", "model.compile=false"], None, r"^model/adapter=lora with \+trainer/strategy=fsdp"),
    "a bf16 base without autocast": (["model.adapter.base_dtype=bfloat16"], None,
                                     r"^model\.adapter\.base_dtype=bfloat16 with trainer\.precision=32-true"),
    "unknown keys": ([], lambda p, u: lora_file(p, u, extra={"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 16),
                                                             "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(16, 4)}),
                     r"^model\.adapter\.init_from=\S+lora\.safetensors: lora_unet_down_blocks_7_attentions_0_proj_in names no "
                     r"layer of the unet"),
    "shapes of another base": ([], lambda p, u: lora_file(p, build_unet(**dict(TINY_UNET, block_out_channels=[32, 64]))),
                               r"lora_unet_\w+_to_\w+ has shapes down \(4, 32\), up \(32, 4\) but the base layer .* "
                               r"needs down \(rank, 16\) and up \(16, rank\): a LoRA made for another base model"),
    "another base (metadata)": ([], lambda p, u: lora_file(p, u, metadata={"ss_base_model_version": "sdxl_base_v1-0"}),
                                r"^model\.adapter\.init_from=\S+: made for another base model \(ss_base_model_version="
                                r"sdxl_base_v1-0; this model is sd_v1\)"),
    "another base (SDXL keys)": ([], lambda p, u: lora_file(p, u, prefix="lora_te1"),
                                 r"lora_te1_\w+: made for another base model \(lora_te1_/lora_te2_ \(two text encoders: SDXL\)\)"),
    "another rank": ([], lambda p, u: lora_file(p, u, rank=8, alpha=8.0),
                     r"has rank 8 where the adapter settings give .* rank 4: set model\.adapter\.rank=8"),
    "another alpha": ([], lambda p, u: lora_file(p, u, alpha=1.0),
                      r"has alpha 1 where the adapter settings give .* alpha 4: set model\.adapter\.alpha=1"),
    "untargeted layers": (["model.adapter.target_modules=[to_q]"], lambda p, u: lora_file(p, u),
                          r"lora_unet_\w+_to_[kv]\w* adapts .*, which the adapter settings do not target: add it to "
                          r"model\.adapter\.target_modules"),
    "a DoRA file": ([], lambda p, u: lora_file(p, u, extra={"lora_unet_conv_in.dora_scale": torch.zeros(1)}),
                    r"lora_unet_conv_in\.dora_scale: a DoRA tensor; only plain LoRA"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_lora_input_is_one_line_before_anything_is_written(tiny_root, base, tmp_path, case):
    overrides, make, message = BAD[case]
    if make is not None:
        path = make(tmp_path / "lora.safetensors", UNet2DConditionModel.from_pretrained(base, subfolder="unet"))
        overrides = [*overrides, f"model.adapter.init_from={path}"]
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's checkpoint")
    if overrides[:1] == ["PLAIN"]:
        cfg = compose_config(tiny_root, run_dir, overrides[1:])
    else:
        cfg = lora_config(tiny_root, base, run_dir, overrides)
    with pytest.raises(ConfigError, match=message) as caught:
        train(cfg)  # validate_config runs first: nothing is built, nothing written
    assert "\n" not in str(caught.value)
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")) == ["checkpoints", "checkpoints/last.ckpt"]
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"an earlier run's checkpoint"


def test_a_bad_lora_file_on_the_command_line_is_one_line(tiny_root, base, tmp_path):
    path = lora_file(tmp_path / "lora.safetensors", build_unet(**dict(TINY_UNET, block_out_channels=[32, 64])))
    args = ["experiment=shapes", f"paths.data_dir={tiny_root}", "model/adapter=lora", "model/unet=pretrained",
            f"model.unet.path={base}", "model/text_encoder=hf_clip", f"model.text_encoder.path={base}",
            f"model.vae.path={base}", "model.vae.subfolder=vae", f"model.adapter.init_from={path}", "logger=none",
            f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "ldm.train", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert re.match(rf"^error: model\.adapter\.init_from={re.escape(str(path))}: lora_unet_\w+ has shapes down "
                    rf"\(4, 32\), up \(32, 4\) but the base layer [\w.]+ needs down \(rank, 16\)", last), last
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # a multirun through the CLI: one process that imports everything, two trainings, two FIDs
def test_a_sweep_over_rank_alpha_and_lr_gives_one_adapted_run_per_job(tiny_root, base, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "experiment=shapes", f"paths.data_dir={tiny_root}", "data.resolution=16", "data.batch_size=4",
            "data.num_workers=0", "trainer.accelerator=cpu", "trainer.max_steps=2", "callbacks.fid.cpu_num_images=4",
            "callbacks.fid.max_time_fraction=null", "sampling.num_inference_steps=2", "callbacks.export=null",
            "logger=none", "model/adapter=lora", "model/unet=pretrained", f"model.unet.path={base}",
            "model/text_encoder=hf_clip", f"model.text_encoder.path={base}", f"model.vae.path={base}",
            "model.vae.subfolder=vae", "objective.metric=val/fid", "model.adapter.rank=2,8",
            "model.adapter.alpha=${model.adapter.rank}", "optim.lr=1e-3", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "ldm.train", *args], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    index = json.loads((sweep / "index.json").read_text())
    assert index["params"] == ["model.adapter.rank"]
    assert [(job["status"], job["params"]) for job in index["jobs"]] == [
        ("completed", {"model.adapter.rank": 2}), ("completed", {"model.adapter.rank": 8})]  # fmt: skip
    for job, rank in zip(index["jobs"], (2, 8)):
        state = load_checkpoint(sweep / job["dir"] / "checkpoints" / "last.ckpt")["state_dict"]
        downs = [v for k, v in state.items() if k.startswith("unet.") and ".lora_A." in k]
        assert downs and all(v.shape[0] == rank for v in downs)
        assert torch.isfinite(torch.tensor(job["objective"]))


def test_a_bf16_base_trains_samples_and_exports_under_bf16_mixed(tiny_root, base, tmp_path):
    """The GPU setting on a CPU: `trainer.precision=bf16-mixed` with the frozen base cast to bf16 (what base_dtype=auto
    does on a GPU), the adapters in fp32; the sample grid and FID, which run outside the training step's autocast,
    sample with it; the checkpoint holds fp32 adapters and exports against the fp32 base reloaded from its source."""
    run_dir = tmp_path / "run"
    train(lora_config(tiny_root, base, run_dir, ["trainer.precision=bf16-mixed", "model.adapter.base_dtype=bfloat16",
                                                 "trainer.max_steps=2", "model.adapter.text_encoder=true"]))  # fmt: skip
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert all(v.dtype == torch.float32 for k, v in ckpt["state_dict"].items() if is_adapter_key(k))
    assert (run_dir / "samples" / "step_000002.png").is_file() and (run_dir / "fid" / "history.json").is_file()
    module = load_module(run_dir / "checkpoints" / "last.ckpt")
    assert module.unet.conv_in.weight.dtype == torch.float32
    pipe = base_pipe(base)
    pipe.load_lora_weights(run_dir / "lora")  # written at the end of the fit from the fp32 adapters
    assert_same_images(pipe, run_dir / "checkpoints" / "last.ckpt")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_base_is_bf16_and_the_compiled_lora_step_trains(tiny_root, base, tmp_path):
    """bf16-mixed on a GPU with `base_dtype=auto` and torch.compile: the frozen base runs in bf16, the adapters train in
    fp32 (fused AdamW), and the checkpoint exports a LoRA that diffusers loads onto the fp32 base on the CPU."""
    run_dir = tmp_path / "run"
    cfg = lora_config(tiny_root, base, run_dir, ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed",
                                                 "model.compile=true", "trainer.max_steps=4", "model.ema_decay=0.5",
                                                 "model.adapter.text_encoder=true"])  # fmt: skip
    module = instantiate(cfg.model, _convert_="all")
    trainer = instantiate(cfg.trainer, callbacks=[instantiate(c) for c in cfg.callbacks.values() if c], logger=False)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    trainer.fit(module, datamodule=instantiate(cfg.data, _convert_="all"))
    assert module.base_dtype == torch.bfloat16
    for name, p in module.unet.named_parameters():
        assert p.dtype == (torch.float32 if is_adapter_key(name) else torch.bfloat16), name
    assert all(w.up.abs().max() > 0 for w in lora_weights(module.unet).values())
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    pipe = base_pipe(base)
    pipe.load_lora_weights(run_dir / "lora")
    for w in (1.0, 4.0):  # the CPU, fp32: the adapters trained on the GPU against the fp32 base
        torch.testing.assert_close(ours(ckpt, w), images(pipe, w), atol=ATOL, rtol=0)
