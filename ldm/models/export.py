"""Export a trained latent-diffusion model in the formats other tools load (`python -m ldm.export --format ...`).

    export_pipeline(module, "runs/x/pipeline")              # diffusers StableDiffusionPipeline directory
    export_diffusers_lora(module, "runs/x/lora")            # pytorch_lora_weights.safetensors (load_lora_weights)
    export_kohya(module, "runs/x/lora/x.safetensors")       # lora_unet_* / lora_te_* (SDXL: lora_te1_* / lora_te2_*)
    export_single_file(module, "runs/x/model.safetensors")  # original layout (from_single_file, ComfyUI, A1111)

    pipe = StableDiffusionPipeline.from_pretrained("runs/x/pipeline")   # loads and runs as is

Weights are written as safetensors; the U-Net (and an adapted text encoder) is the EMA copy when EMA is on. A
LoRA-adapted model exports its adapters as LoRA files, and its adapters fused into the base (merged) as a pipeline
directory or a single file; a fully fine-tuned one exports as a pipeline directory or a single file. An open_clip
text encoder is converted to the `CLIPTextModel` layout diffusers uses for Stable Diffusion 2.x. An SDXL model
exports as a `StableDiffusionXLPipeline` directory, or a single file in SDXL's own layout (its two text encoders
under `conditioner.embedders.0.` and `.1.`) that `StableDiffusionXLPipeline.from_single_file` loads.

Reading one back (`load_pipeline`) first checks its `model_index.json`: diffusers imports whatever module a
component names there, so only diffusers' and transformers' own classes are accepted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import is_accelerate_available
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.diffusion import make_scheduler
from ldm.models.adapters import has_adapter, kohya_renames, lora_weights, merged
from ldm.models.clip_convert import open_clip_to_hf
from ldm.models.formats import kohya
from ldm.models.formats.diffusers_lora import write_diffusers_lora
from ldm.models.formats.single_file import (
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    clip_to_ldm,
    clip_to_open_clip,
    open_clip_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
    write_single_file,
)
from ldm.models.sdxl import SDXLTextEncoders
from ldm.models.text_encoders import HFCLIPTextEncoder, OpenCLIPTextEncoder
from ldm.models.unet import base_model_version


def to_hf_text_encoder(text_encoder) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """(CLIPTextModel, CLIPTokenizer) for an ldm text encoder: HF CLIP as is (adapters merged), open_clip converted."""
    if isinstance(text_encoder, HFCLIPTextEncoder):
        if text_encoder.clip_skip:
            raise ValueError("export: a CLIP text encoder with clip_skip > 0 has no StableDiffusionPipeline layout")
        model = text_encoder.text_encoder
        if has_adapter(model):
            model = merged(model).float()
        return model, text_encoder.tokenizer
    if isinstance(text_encoder, OpenCLIPTextEncoder):
        return open_clip_to_hf(text_encoder)
    raise TypeError(f"export: no diffusers layout for text encoder {type(text_encoder).__name__}")


def plain_text_models(text_encoder) -> dict:
    """The text encoder's transformers CLIP models by part name (`text_encoder`, SDXL's `text_encoder_2`), each with
    its adapters fused (a merged fp32 copy) where it has any."""
    return {part: merged(m).float() if has_adapter(m) else m for part, m in text_encoder.text_models().items()}


def build_pipeline(module, sampler: str | None = None, use_ema: bool = True):
    """A `StableDiffusionPipeline` (SDXL: `StableDiffusionXLPipeline`) around the module's parts, adapters merged
    (no safety checker, no watermark: research weights)."""
    text_encoder = module.sampling_text_encoder(use_ema)
    scheduler = make_scheduler(sampler or module.sampling["sampler"], module.scheduler_config)
    unet = merged(module.sampling_unet(use_ema)).float().eval()  # a copy: the module keeps its adapters
    if isinstance(text_encoder, SDXLTextEncoders):
        return StableDiffusionXLPipeline(
            vae=module.vae,
            **plain_text_models(text_encoder),  # text_encoder, text_encoder_2: adapters merged
            tokenizer=text_encoder.tokenizer,
            tokenizer_2=text_encoder.tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,  # the unconditional input SDXL trains and samples with
            add_watermarker=False,
        )
    hf_text_encoder, tokenizer = to_hf_text_encoder(text_encoder)
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


def export_pipeline(module, out_dir: str | Path, sampler: str | None = None, use_ema: bool = True, **_) -> Path:
    """Write the pipeline directory (`model_index.json` + one subfolder per part, safetensors)."""
    pipe = build_pipeline(module, sampler, use_ema)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


# --- LoRA files ---------------------------------------------------------------------------------------------------
def lora_parts(module, use_ema: bool = True) -> dict:
    """{"unet": {module name: LoraModule}, "text_encoder": {...}[, "text_encoder_2": {...}]} of an adapted module
    (EMA adapters when on)."""
    if getattr(module, "adapter", None) is None:
        raise ValueError("export: this checkpoint trained the whole U-Net, it has no LoRA adapters; export it as "
                         "--format pipeline or single-file")  # fmt: skip
    return {part: lora_weights(model) for part, model in module.adapted_models(use_ema).items()}


def export_diffusers_lora(module, out_dir: str | Path, use_ema: bool = True, **_) -> Path:
    """`out_dir/pytorch_lora_weights.safetensors`: `pipe.load_lora_weights(out_dir)` on the base pipeline."""
    pipeline_class = StableDiffusionXLPipeline if module.is_sdxl else StableDiffusionPipeline
    return write_diffusers_lora(out_dir, lora_parts(module, use_ema), pipeline_class)


def kohya_metadata(module, steps: int | None = None) -> dict[str, str]:
    """sd-scripts' ss_* metadata of an adapted module: network, rank, alpha, base model, resolution, steps."""
    cfg = module.run_config or {}
    lora = module.adapter
    version = base_model_version(module.unet.config, module.prediction_type)
    resolution = (cfg.get("data") or {}).get("resolution") or module.resolution
    unet_cfg = (cfg.get("model") or {}).get("unet") or {}
    optim = cfg.get("optim") or {}
    metadata = {
        "ss_network_module": kohya.NETWORK_MODULE,
        "ss_network_dim": lora.rank,
        "ss_network_alpha": lora.linear_alpha(),
        "ss_network_dropout": lora.dropout,
        "ss_base_model_version": version,
        "ss_v2": version.startswith("sd_v2"),
        "ss_sd_model_name": unet_cfg.get("path") or "ldm (U-Net trained from scratch)",
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_steps": steps if steps is not None else module.trained_steps,
        "ss_learning_rate": optim.get("lr"),
        "ss_lr_scheduler": optim.get("schedule"),
        "ss_mixed_precision": (cfg.get("trainer") or {}).get("precision"),
        "ss_seed": cfg.get("seed"),
        "ss_output_name": cfg.get("name"),
        "ss_training_finished_at": time.time(),
        "ss_text_encoder_lr": optim.get("lr") if module.text_encoder_trains else 0,
        "ss_prediction_type": module.prediction_type,
    }
    if lora.conv_rank:
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(lora.conv_rank), "conv_alpha": str(lora.conv_alpha_value())})
    return {k: str(v) for k, v in metadata.items() if v is not None}


def export_kohya(module, path: str | Path, use_ema: bool = True, steps: int | None = None,
                 dtype: torch.dtype | None = None, **_) -> Path:  # fmt: skip
    """One kohya-layout .safetensors file (a directory ``path`` gets `<run name>.safetensors` inside)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / f"{(module.run_config or {}).get('name') or 'lora'}.safetensors"
    renames = kohya_renames({"unet": module.sampling_unet(use_ema)})  # SDXL: the openaimodel names kohya uses
    return kohya.write_kohya(path, lora_parts(module, use_ema), kohya_metadata(module, steps), dtype, renames)


# --- single file --------------------------------------------------------------------------------------------------
def _without_adapters(model):
    """``model`` itself, or a copy with its adapters merged into the base weights."""
    return merged(model).float() if has_adapter(model) else model


def text_encoder_to_ldm(text_encoder) -> dict:
    """The text encoder's weights in the original layout: SD 1.x's transformers CLIP, SD 2.x's open_clip tower, or
    SDXL's pair (CLIP-L as transformers names it, OpenCLIP bigG in open_clip's layout)."""
    if isinstance(text_encoder, SDXLTextEncoders):
        return {**clip_to_ldm(_without_adapters(text_encoder.text_encoder).state_dict(), SDXL_CLIP_PREFIX),
                **clip_to_open_clip(_without_adapters(text_encoder.text_encoder_2).state_dict(), SDXL_OPEN_CLIP_PREFIX)}  # fmt: skip
    if isinstance(text_encoder, OpenCLIPTextEncoder):
        return open_clip_to_ldm(text_encoder.state_dict())
    hf_text_encoder, _ = to_hf_text_encoder(text_encoder)
    return clip_to_ldm(hf_text_encoder.state_dict())


def export_single_file(module, path: str | Path, use_ema: bool = True, dtype: torch.dtype | None = None, **_) -> Path:
    """One original-layout .safetensors (adapters merged); diffusers loads it with
    `StableDiffusionPipeline.from_single_file(path, config=<a pipeline directory of the same architecture>)`
    (SDXL: `StableDiffusionXLPipeline.from_single_file`, the file holding both text encoders)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / f"{(module.run_config or {}).get('name') or 'model'}.safetensors"
    unet = merged(module.sampling_unet(use_ema)).float()
    state = {
        **unet_to_ldm(unet.state_dict(), unet.config),
        **vae_to_ldm(module.vae.state_dict(), module.vae.config),
        **text_encoder_to_ldm(module.sampling_text_encoder(use_ema)),
    }
    metadata = {"format": "pt", "ldm_prediction_type": module.prediction_type,
                "ldm_base_model_version": base_model_version(unet.config, module.prediction_type)}  # fmt: skip
    return write_single_file(path, state, dtype, metadata)


EXPORTS = {  # --format of `python -m ldm.export`
    "pipeline": export_pipeline,
    "diffusers-lora": export_diffusers_lora,
    "kohya": export_kohya,
    "single-file": export_single_file,
}


PIPELINES = {cls.__name__: cls for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline)}  # what we load
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
    if index.get("_class_name") not in PIPELINES:
        raise UntrustedPipelineError(f"{index_path}: _class_name={index.get('_class_name')!r}; expected one of "
                                     f"{sorted(PIPELINES)}")  # fmt: skip
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):  # options such as requires_safety_checker
            continue
        library, class_name = (value + [None, None])[:2]
        if library is None and class_name is None:  # a component left out (no safety checker)
            continue
        if library not in PIPELINE_LIBRARIES or not (isinstance(class_name, str) and class_name.isidentifier()):
            raise UntrustedPipelineError(f"{index_path}: component {name!r} names {value!r}; only diffusers' and "
                                         f"transformers' own classes are loaded")  # fmt: skip


def load_pipeline(path: str | Path):
    """A pipeline directory as its class's `from_pretrained` loads it (`StableDiffusionPipeline`,
    `StableDiffusionXLPipeline`), after `check_pipeline_dir`."""
    check_pipeline_dir(path)
    cls = PIPELINES[json.loads((Path(path) / "model_index.json").read_text())["_class_name"]]
    options = {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}
    return cls.from_pretrained(path, low_cpu_mem_usage=is_accelerate_available(), **options)
