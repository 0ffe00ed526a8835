"""Components from where users have them: every experiment composes; the latent-diffusion stage trains
with an open_clip text tower (SD 2.x style) and exports to a StableDiffusionPipeline; and a run fine-tunes
from a diffusers pipeline directory (model_index.json) through the same from_pretrained path a hub id takes."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from diffusers import StableDiffusionPipeline
from omegaconf import OmegaConf
from tiny import CONF, compose_config, make_tiny_root

from ldm.models.export import export_pipeline
from ldm.models.text_encoders import save_open_clip_checkpoint
from ldm.run.fit import train
from ldm.stages.load import load_module
from ldm.training.checkpoint import load_checkpoint

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment, tmp_path):
    cfg = compose_config(tmp_path, tmp_path / "run", experiment=experiment, tiny=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["_target_"].startswith("ldm.stages.")
    assert resolved["trainer"]["max_steps"] > 0


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_root(tmp_path_factory.mktemp("tiny"))


OPEN_CLIP_TINY = dict(
    embed_dim=16,
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=3),
    vision_cfg=dict(image_size=32, patch_size=16, width=32, layers=1, head_width=16),
)


def hydra_value(v) -> str:
    """A Python value in Hydra's override grammar ({a:1,b:2})."""
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def test_open_clip_text_tower_trains_and_exports(tiny_root, tmp_path):
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", **OPEN_CLIP_TINY)
    checkpoint = save_open_clip_checkpoint(model, tmp_path / "open_clip_tiny.safetensors")
    overrides = [
        "logger=none",
        "model/text_encoder=open_clip",
        "model.text_encoder.arch=ViT-B-32",
        f"model.text_encoder.pretrained={checkpoint}",
        *(f"+model.text_encoder.{k}={hydra_value(v)}" for k, v in OPEN_CLIP_TINY.items()),
        "model.unet.cross_attention_dim=32",
    ]
    cfg = compose_config(tiny_root, tmp_path / "run", overrides)
    assert OmegaConf.to_container(cfg.model.text_encoder)["text_cfg"]["width"] == 32
    train(cfg)
    module = load_module(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert module.text_encoder.layer == "penultimate"
    export_pipeline(module, tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    prompts = ["a small blue square at the top left"]
    expected = pipe(prompts, num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                    generator=torch.Generator().manual_seed(1)).images
    ours = module.generate(prompts, seed=1, guidance_scale=3.0, num_inference_steps=3)
    torch.testing.assert_close(ours, expected.float(), atol=2e-4, rtol=0)
    # an export under another sampler carries its settings ("DPM++ 2M SDE Karras": Karras sigmas, noise per step)
    export_pipeline(module, tmp_path / "pipe_sde", sampler="dpm++_sde_karras")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe_sde")
    assert pipe.scheduler.config.use_karras_sigmas and pipe.scheduler.config.algorithm_type == "sde-dpmsolver++"
    expected = pipe(prompts, num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                    generator=torch.Generator().manual_seed(1)).images
    ours = module.generate(prompts, seed=1, guidance_scale=3.0, num_inference_steps=3, sampler="dpm++_sde_karras")
    torch.testing.assert_close(ours, expected.float(), atol=2e-4, rtol=0)


def test_finetune_from_a_pipeline_directory(tiny_root, tmp_path):
    # A first run exports a pipeline directory, the layout of a hub model such as stable-diffusion-v1-5.
    first = compose_config(tiny_root, tmp_path / "first", ["logger=none"])
    train(first)
    pipe_dir: Path = tmp_path / "first" / "pipeline"
    assert (pipe_dir / "model_index.json").is_file()
    overrides = [
        "logger=none",
        "model/unet=pretrained",
        f"model.unet.path={pipe_dir}",
        f"model.vae.path={pipe_dir}",
        "model.vae.subfolder=vae",
        "model/text_encoder=hf_clip",  # the export holds the text tower converted to CLIPTextModel
        f"model.text_encoder.path={pipe_dir}",
        "model.ema_decay=null",
    ]
    second = compose_config(tiny_root, tmp_path / "second", overrides, tiny_unet=False)
    from hydra.utils import instantiate

    module = instantiate(second.model, _convert_="all")
    exported_unet = StableDiffusionPipeline.from_pretrained(pipe_dir).unet
    for (name, p), (_, q) in zip(module.unet.named_parameters(), exported_unet.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)  # starts from the exported (EMA) weights
    train(second)
    assert load_checkpoint(tmp_path / "second" / "checkpoints" / "last.ckpt")["global_step"] == 2
