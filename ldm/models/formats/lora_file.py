"""Read a LoRA file in whichever layout it is, diffusers or kohya, into `LoraModule`s named as the model names them.

    weights, keys, metadata = read_lora("my_lora.safetensors", {"unet": unet_names}, base_model_version="sd_v1")
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from ldm.models.formats import diffusers_lora, kohya
from ldm.models.formats.lora import LoraFileError, read_safetensors, safetensors_file


def model_family(version: str) -> str:
    """sd_v1, sd_v2 or sdxl from an ss_base_model_version (sd_v1, sd_v2_512, sd_v2_768_v, sdxl_base_v1-0, ...)."""
    return "sdxl" if version.startswith("sdxl") else "_".join(version.split("_")[:2])


def read_lora(path: str | Path, names: Mapping[str, Iterable[str]], base_model_version: str | None = None,
              renames: Mapping[str, Mapping[str, str]] | None = None,
              two_text_encoders: bool | None = None):  # fmt: skip
    """``(weights, keys, metadata)``: weights[part][module name] a LoraModule, keys[part][module name] the key it has
    in the file (for messages), the file's metadata. ``names``: the module names of each part of the model it is for;
    ``base_model_version``: the model's (kohya's ss_base_model_version); a file that records another family is
    refused; ``two_text_encoders``: whether the model has two (SDXL), when no text encoder is among ``names``.
    LoraFileError (one line) names the file and the first key that does not fit."""
    path = safetensors_file(path, diffusers_lora.WEIGHT_NAME)
    tensors, metadata = read_safetensors(path)
    if not tensors:
        raise LoraFileError(f"{path}: holds no tensors")
    theirs = metadata.get("ss_base_model_version")
    if theirs and base_model_version and model_family(theirs) != model_family(base_model_version):
        raise LoraFileError(f"{path}: made for another base model (ss_base_model_version={theirs}; this model is "
                            f"{base_model_version})")  # fmt: skip
    if kohya.is_kohya(tensors):
        return (*kohya.from_state_dict(tensors, names, str(path), renames, two_text_encoders), metadata)
    if diffusers_lora.is_diffusers(tensors):
        return (*diffusers_lora.from_state_dict(tensors, metadata, names, str(path)), metadata)
    raise LoraFileError(f"{path}: not a LoRA file in the diffusers (unet.*.lora_A.weight) or kohya (lora_unet_*."
                        f"lora_down.weight) layout; first key {next(iter(tensors))}")  # fmt: skip
