"""Export a trained latent-diffusion model as a diffusers `StableDiffusionPipeline` directory.

    export_pipeline(module, "runs/x/pipeline")
    pipe = StableDiffusionPipeline.from_pretrained("runs/x/pipeline")   # loads and runs as is

Weights are written as safetensors; the U-Net is the EMA copy when EMA is on. An open_clip text
encoder is converted to the `CLIPTextModel` layout diffusers uses for Stable Diffusion 2.x.

Reading one back (`load_pipeline`) first checks its `model_index.json`: diffusers imports whatever module a
component names there, so only diffusers' and transformers' own classes are accepted.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from diffusers import StableDiffusionPipeline
from diffusers.utils import is_accelerate_available
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.diffusion import make_scheduler
from ldm.models.clip_convert import open_clip_to_hf
from ldm.models.text_encoders import HFCLIPTextEncoder, OpenCLIPTextEncoder


def to_hf_text_encoder(text_encoder) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """(CLIPTextModel, CLIPTokenizer) for an ldm text encoder: HF CLIP as is, open_clip converted."""
    if isinstance(text_encoder, HFCLIPTextEncoder):
        if text_encoder.clip_skip:
            raise ValueError("export: a CLIP text encoder with clip_skip > 0 has no StableDiffusionPipeline layout")
        return text_encoder.text_encoder, text_encoder.tokenizer
    if isinstance(text_encoder, OpenCLIPTextEncoder):
        return open_clip_to_hf(text_encoder)
    raise TypeError(f"export: no diffusers layout for text encoder {type(text_encoder).__name__}")


def build_pipeline(module, sampler: str | None = None, use_ema: bool = True) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` around the module's parts (no safety checker: research weights)."""
    hf_text_encoder, tokenizer = to_hf_text_encoder(module.text_encoder)
    scheduler = make_scheduler(sampler or module.sampling["sampler"], module.scheduler_config)
    unet = copy.deepcopy(module.sampling_unet(use_ema)).eval()
    return StableDiffusionPipeline(
        vae=module.vae,
        text_encoder=hf_text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def export_pipeline(module, out_dir: str | Path, sampler: str | None = None, use_ema: bool = True) -> Path:
    """Write the pipeline directory (`model_index.json` + one subfolder per part, safetensors)."""
    pipe = build_pipeline(module, sampler, use_ema)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


# what a model_index.json component may name: (library, class); "stable_diffusion" is diffusers' own safety checker
PIPELINE_LIBRARIES = ("diffusers", "transformers", "stable_diffusion")


class UntrustedPipelineError(ValueError):
    """A pipeline directory whose model_index.json names a module other than diffusers' or transformers'."""


def check_pipeline_dir(path: str | Path) -> None:
    """Refuse (one line) a pipeline directory whose model_index.json names a library outside `PIPELINE_LIBRARIES`
    or a custom pipeline class: diffusers would import it."""
    index_path = Path(path) / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{path}: no model_index.json; not a diffusers pipeline directory")
    index = json.loads(index_path.read_text())
    if index.get("_class_name") != StableDiffusionPipeline.__name__:
        raise UntrustedPipelineError(f"{index_path}: _class_name={index.get('_class_name')!r}; expected "
                                     f"{StableDiffusionPipeline.__name__}")  # fmt: skip
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):  # options such as requires_safety_checker
            continue
        library, class_name = (value + [None, None])[:2]
        if library is None and class_name is None:  # a component left out (no safety checker)
            continue
        if library not in PIPELINE_LIBRARIES or not (isinstance(class_name, str) and class_name.isidentifier()):
            raise UntrustedPipelineError(f"{index_path}: component {name!r} names {value!r}; only diffusers' and "
                                         f"transformers' own classes are loaded")  # fmt: skip


def load_pipeline(path: str | Path) -> StableDiffusionPipeline:
    """A pipeline directory as `StableDiffusionPipeline.from_pretrained` loads it, after `check_pipeline_dir`."""
    check_pipeline_dir(path)
    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False,
                                                   low_cpu_mem_usage=is_accelerate_available())  # fmt: skip
