"""A trained stage back from its checkpoint: built from the config saved in it, with its trained weights; and
nothing else built, whatever that config names.

    module = load_module("runs/x/checkpoints/last.ckpt")   # frozen parts come from their sources
    images = module.generate(["a red circle"], seed=0)

Serves `ldm.sample`, `ldm.export` and `ldm.evaluate`. A checkpoint is a file someone may have sent you: its pickle
is read with `weights_only=True` (`ldm.training.checkpoint`), and before its config's `model` section is handed to
Hydra's `instantiate`, every `_target_` in it (at any depth, in lists too) must be one of `BUILDERS`: the stages,
the builders of their parts and the optimizer pieces conf/optim names. A name is resolved without importing
anything (only modules already imported, read without `__getattr__` hooks) and compared by identity with those
objects, so `torch.optim.AdamW` and `torch.optim.adamw.AdamW` are the same builder and a lookalike is not. Options
that would make a builder's library run code it loads (`weights_only: false`, `trust_remote_code: true`, ...) and
interpolations (a saved config is resolved when written) are refused too. Each refusal is one line naming the key.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.models.adapters import LoRA
from ldm.models.clip import build_open_clip
from ldm.models.sdxl import sdxl_text_encoders
from ldm.models.text_encoders import hf_clip_text_encoder, open_clip_text_encoder
from ldm.models.unet import build_unet, load_unet
from ldm.models.vae import build_vae, load_vae
from ldm.stages.autoencoder import AutoencoderModule, PatchDiscriminator
from ldm.stages.clip import CLIPModule
from ldm.stages.latent_diffusion import LatentDiffusion
from ldm.training.checkpoint import UnsafeCheckpointError, load_checkpoint
from ldm.utils.targets import target_of

# What a saved config may build. A new part's builder (e.g. an adapter's) is one more entry here.
BUILDERS = (
    LatentDiffusion, AutoencoderModule, PatchDiscriminator, CLIPModule,  # the stages (ldm.stages)
    build_unet, load_unet, build_vae, load_vae, hf_clip_text_encoder, open_clip_text_encoder, build_open_clip,
    LoRA,  # model/adapter=lora
    sdxl_text_encoders,  # model=sdxl
    torch.optim.AdamW, get_scheduler,  # conf/optim/adamw.yaml
)  # fmt: skip
# Options that make a library run code from the files it loads (pickles, custom modules).
UNSAFE_OPTIONS = {
    "weights_only": lambda value: value is False,  # torch.load through open_clip / transformers
    "trust_remote_code": bool,  # transformers / diffusers custom code
    "custom_pipeline": lambda value: value is not None,  # diffusers community pipelines
    "custom_revision": lambda value: value is not None,
}


class UntrustedConfigError(UnsafeCheckpointError):
    """A checkpoint whose saved config names something other than ldm's own builders."""


def resolve_loaded(target: str):
    """The object a `_target_` names, looked up among modules already imported and without running any code
    (no import, no module `__getattr__`); None when it is not there."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        obj = sys.modules.get(".".join(parts[:i]))
        if obj is None:
            continue
        for name in parts[i:]:
            obj = vars(obj).get(name) if hasattr(obj, "__dict__") else None
            if obj is None:
                return None
        return obj
    return None


def check_saved_config(node, where: str = "model") -> None:
    """Refuse (UntrustedConfigError, one line) a saved config section that names anything outside `BUILDERS`,
    turns on an option of `UNSAFE_OPTIONS`, or holds an interpolation."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = f"{where}.{key}"
            if key == "_target_":
                obj = resolve_loaded(value) if isinstance(value, str) else None
                if not any(obj is builder for builder in BUILDERS):
                    raise UntrustedConfigError(
                        f"{path}={value!r} is not one of ldm's builders; a checkpoint may only name "
                        f"{', '.join(sorted({target_of(b).rsplit('.', 1)[-1] for b in BUILDERS}))}"
                    )
            elif key in UNSAFE_OPTIONS and UNSAFE_OPTIONS[key](value):
                raise UntrustedConfigError(f"{path}={value!r} would let a library run code from the files it loads")
            check_saved_config(value, path)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            check_saved_config(value, f"{where}[{i}]")
    elif isinstance(node, str) and "${" in node:
        raise UntrustedConfigError(f"{where}={node!r} is an interpolation; a saved config is resolved when written")


def load_module(path: str | Path, map_location: str | torch.device = "cpu"):
    """The LightningModule a checkpoint was trained as, with its trained weights, in eval mode."""
    checkpoint = load_checkpoint(path, map_location)
    model = checkpoint["config"].get("model") if isinstance(checkpoint["config"], Mapping) else None
    if not isinstance(model, Mapping) or "_target_" not in model:
        raise UntrustedConfigError(f"refusing to build {path}: its saved config has no model section to build from")
    try:
        check_saved_config(model)
    except UntrustedConfigError as error:
        raise UntrustedConfigError(f"refusing to build {path}: its saved config's {error}") from None
    module = instantiate(OmegaConf.create(model), _convert_="all")
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    module.run_config = checkpoint["config"]
    return module.eval()
