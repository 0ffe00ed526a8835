"""LoRA adapters on a frozen base: the U-Net (diffusers' PEFT integration) and optionally the transformers CLIP text
encoders (transformers' PEFT integration: SD's one, SDXL's two), all through `peft`. Only the adapters train.

    lora = LoRA(rank=4, alpha=4)                  # conf/model/adapter/lora.yaml (model/adapter=lora)
    lora.attach_unet(unet)                        # base frozen; lora_A / lora_B added to to_q, to_k, to_v, to_out.0
    weights = lora_weights(unet)                  # {"down_blocks.0...attn1.to_q": LoraModule(down, up, alpha), ...}
    set_lora_weights(unet, weights, "my.safetensors")   # checked: every module targeted, every shape, rank, alpha
    plain = merged(unet)                          # a copy with W + (alpha / rank) * up @ down, no peft layers

A LoRA module adds (alpha / rank) * up @ down to a weight W (out, in): `down` (rank, in) is peft's lora_A and kohya's
lora_down, `up` (out, rank) is lora_B / lora_up (Hu et al. 2021). Convolutions (LoCon): `down` is a convolution
with W's kernel (rank, in, k, k), `up` a 1x1 one (out, rank, 1, 1). Module names are those of the adapted model
(`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`); the file formats (ldm/models/formats/) map them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from diffusers.utils import recurse_remove_peft_layers
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ldm.models.formats.lora import LoraFileError, LoraModule
from ldm.models.formats.lora_file import read_lora
from ldm.models.formats.single_file import unet_module_names_to_ldm
from ldm.models.lora_align import align_ranks

ADAPTER = "default"  # the peft adapter name (diffusers' and transformers' add_adapter default)
BASE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AdapterError(ValueError):
    """A LoRA setting or file that cannot be used; the message is one line naming the option or file and the key.
    (A file that does not fit the model at all raises ldm.models.formats.lora.LoraFileError.)"""


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is an adapter tensor (peft's lora_A / lora_B / ...), not a base weight."""
    return any(f".{name}." in key for name in LoraLayer.adapter_layer_names)


def has_adapter(module: nn.Module | None) -> bool:
    return module is not None and any(isinstance(m, BaseTunerLayer) for m in module.modules())


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the module's full name, or its suffix after a dot."""
    return name == target or name.endswith("." + target)


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d)) or isinstance(module, BaseTunerLayer)


@dataclass
class LoRA:
    """What to adapt and how: `rank` and `alpha` (scale alpha / rank) for `target_modules` (module names or name
    suffixes in the U-Net, peft's matching); `conv_rank` / `conv_alpha` add LoCon adapters to
    `conv_target_modules` (the ResNet 3x3 convolutions by default); `text_encoder` adapts the text encoders'
    `text_encoder_target_modules` too (same rank and alpha; SDXL: both encoders). `base_dtype`: the frozen base's
    dtype in training ("auto": bf16 under bf16 mixed precision on a GPU, else as loaded). `init_from`: a LoRA file to
    continue (diffusers `pytorch_lora_weights.safetensors` or kohya `.safetensors`); it must match these settings.
    `align_rank`: linear adapters compute as if their rank were a multiple of it (zero padding: the same result; 1:
    off), which puts their matrix products on aligned GPU kernels."""

    rank: int = 4
    alpha: float | None = None  # None: rank (scale 1)
    dropout: float = 0.0
    target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0")
    conv_rank: int | None = None
    conv_alpha: float | None = None
    conv_target_modules: Sequence[str] = ("conv1", "conv2")
    text_encoder: bool = False
    text_encoder_target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "out_proj")
    base_dtype: str = "auto"
    init_from: str | None = None
    init_lora_weights: str | bool = "gaussian"  # peft's initialisation of lora_A (lora_B starts at zero)
    align_rank: int = 8  # linear adapters compute at their rank rounded up to this multiple (ldm/models/lora_align.py)

    def __post_init__(self) -> None:
        for key in ("rank", "conv_rank", "align_rank"):
            value = getattr(self, key)
            if (value is not None or key != "conv_rank") and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                what = "" if key == "align_rank" else " (the LoRA rank)"
                raise AdapterError(f"model.adapter.{key}={value} must be a positive integer{what}")
        for key in ("alpha", "conv_alpha"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise AdapterError(f"model.adapter.{key}={value} must be positive (the scale is alpha / rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"model.adapter.dropout={self.dropout} must be in [0, 1)")
        if self.base_dtype not in BASE_DTYPES:
            raise AdapterError(f"model.adapter.base_dtype={self.base_dtype!r}; expected one of {sorted(BASE_DTYPES)}")
        for key in ("target_modules", "conv_target_modules", "text_encoder_target_modules"):
            value = getattr(self, key)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise AdapterError(f"model.adapter.{key}={value!r} must be a list of module names")
            setattr(self, key, tuple(value))
        if not self.target_modules and not self.conv_rank and not self.text_encoder:
            raise AdapterError("model.adapter.target_modules is empty and nothing else is adapted")

    # --- the peft configs --------------------------------------------------------------------------------
    def linear_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    def conv_alpha_value(self) -> float:
        return float(self.conv_alpha if self.conv_alpha is not None else self.conv_rank)

    def unet_targets(self) -> dict[str, tuple[int, float]]:
        """Target name -> (rank, alpha) for the U-Net."""
        targets = {t: (self.rank, self.linear_alpha()) for t in self.target_modules}
        if self.conv_rank:
            targets.update({t: (self.conv_rank, self.conv_alpha_value()) for t in self.conv_target_modules})
        return targets

    def text_encoder_targets(self) -> dict[str, tuple[int, float]]:
        if not self.text_encoder:
            return {}
        return {t: (self.rank, self.linear_alpha()) for t in self.text_encoder_target_modules}

    def _peft_config(self, targets: Mapping[str, tuple[int, float]]) -> LoraConfig:
        rank, alpha = self.rank, self.linear_alpha()
        # per-target rank and alpha where they differ (the LoCon convolutions); peft matches these keys as regexes
        rank_pattern = {re.escape(t): r for t, (r, _) in targets.items() if r != rank}
        alpha_pattern = {re.escape(t): a for t, (_, a) in targets.items() if a != alpha}
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=self.dropout, target_modules=list(targets),
                          rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                          init_lora_weights=self.init_lora_weights)  # fmt: skip

    def load_init(self, models: Mapping[str, nn.Module], base_model_version: str | None = None,
                  check_only: bool = False) -> None:  # fmt: skip
        """Copy the adapters of `init_from` into ``models`` ({"unet": ..., "text_encoder": ...[, "text_encoder_2": ...]},
        adapters attached), after checking every key, shape, rank and alpha; nothing is copied when anything does not
        fit (nor with ``check_only``: the config check runs this on models built on the meta device)."""
        if not self.init_from:
            return
        names = {part: [n for n, _ in m.named_modules()] for part, m in models.items()}
        renames = kohya_renames(models)
        try:
            weights, keys, _ = read_lora(self.init_from, names, base_model_version, renames, two_text_encoders(models))
        except LoraFileError as error:  # "<file>: <key> ...": say which setting named the file
            raise LoraFileError(f"model.adapter.init_from={error}") from None
        text = "model.adapter.text_encoder_target_modules (with model.adapter.text_encoder=true)"
        options = {"unet": "model.adapter.target_modules (or conv_target_modules with conv_rank)"}
        for part, part_weights in weights.items():
            set_lora_weights(models[part], part_weights, f"model.adapter.init_from={self.init_from}", keys[part],
                             options.get(part, text), check_only=True)  # fmt: skip
        if check_only:
            return
        for part, part_weights in weights.items():
            set_lora_weights(models[part], part_weights, self.init_from, keys[part])

    # --- attaching -------------------------------------------------------------------------------------------
    def attach_unet(self, unet: nn.Module) -> nn.Module:
        """Freeze the U-Net and add the adapters (diffusers' `add_adapter`)."""
        return self._attach(unet, self.unet_targets(), "model.adapter.target_modules", "the U-Net")

    def attach_text_encoder(self, text_model: nn.Module, part: str = "text_encoder") -> nn.Module:
        """Freeze a transformers CLIP text model (`CLIPTextModel`, SDXL's `CLIPTextModelWithProjection`) and add the
        adapters (transformers' `add_adapter`); ``part``: its name in the pipeline (for messages)."""
        return self._attach(text_model, self.text_encoder_targets(), "model.adapter.text_encoder_target_modules",
                            "the text encoder" if part == "text_encoder" else f"the {part}")  # fmt: skip

    def _attach(self, model: nn.Module, targets: Mapping[str, tuple[int, float]], option: str, what: str) -> nn.Module:
        check_targets(model, targets, option, what)
        model.requires_grad_(False)
        if targets:
            model.add_adapter(self._peft_config(targets))
            align_ranks(model, self.align_rank)
        return model


def kohya_renames(models: Mapping[str, nn.Module]) -> dict[str, dict[str, str]]:
    """The layer names kohya gives where they are not diffusers': SDXL's U-Net is named in the openaimodel layout
    (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), as sd-scripts' SDXL U-Net names its modules."""
    unet = models.get("unet")
    if unet is None or getattr(unet.config, "addition_embed_type", None) != "text_time":
        return {}
    return {"unet": unet_module_names_to_ldm((n for n, _ in unet.named_modules()), unet.config)}


def two_text_encoders(models: Mapping[str, nn.Module]) -> bool | None:
    """Whether the model has two text encoders (SDXL: its U-Net takes a pooled text embedding), which decides kohya's
    prefixes (lora_te1_ / lora_te2_ against lora_te_) even when no text encoder is adapted; None: unknown."""
    unet = models.get("unet")
    if unet is None:
        return None
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def check_targets(model: nn.Module, targets: Iterable[str], option: str, what: str) -> list[str]:
    """The module names ``targets`` select in ``model``; AdapterError for a target that matches nothing or a
    module that is not a Linear or Conv2d."""
    names = [n for n, _ in model.named_modules() if n]
    selected = []
    for target in targets:
        matched = [n for n in names if _matches(n, target)]
        if not matched:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _adaptable(m)})
            raise AdapterError(f"{option}: {target!r} matches no module of {what} (its layers are named e.g. "
                               f"{', '.join(leaves[:8])})")  # fmt: skip
        for name in matched:
            module = model.get_submodule(name)
            if not _adaptable(module):
                raise AdapterError(f"{option}: {target!r} selects {name}, a {type(module).__name__}; LoRA adapts "
                                   f"Linear and Conv2d layers")  # fmt: skip
        selected += matched
    return selected


# --- weights ---------------------------------------------------------------------------------------------------
def lora_layers(model: nn.Module, adapter: str = ADAPTER) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def lora_weights(model: nn.Module | None, adapter: str = ADAPTER) -> dict[str, LoraModule]:
    """Module name -> its adapter (detached tensors, fp32 on the CPU). ``adapter``: the peft adapter name
    (diffusers' `load_lora_weights` names its first one `default_0`)."""
    if model is None:
        return {}
    return {
        name: LoraModule(
            down=m.lora_A[adapter].weight.detach().float().cpu(),
            up=m.lora_B[adapter].weight.detach().float().cpu(),
            alpha=float(m.lora_alpha[adapter]),
        )
        for name, m in lora_layers(model, adapter).items()
    }


@torch.no_grad()
def set_lora_weights(model: nn.Module, weights: Mapping[str, LoraModule], source: str,
                     names: Mapping[str, str] | None = None, option: str = "model.adapter.target_modules",
                     check_only: bool = False) -> None:  # fmt: skip
    """Copy ``weights`` into ``model``'s adapters, after checking all of them against it. ``names`` maps a module name
    to the key it has in ``source``, ``option`` is the setting that selects the targets (for messages); AdapterError
    names the file and the first offending key."""
    names = names or {}
    layers = lora_layers(model)
    for name, w in weights.items():
        key = names.get(name, name)
        layer = layers.get(name)
        if layer is None:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise AdapterError(f"{source}: {key} names no layer of the base model (unknown key, or a LoRA made "
                                   f"for another base model)") from None  # fmt: skip
            raise AdapterError(f"{source}: {key} adapts {name} ({type(module).__name__}), which the adapter settings "
                               f"do not target: add it to {option}")  # fmt: skip
        down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        if w.down.shape[1:] != down.shape[1:] or w.up.shape[0] != up.shape[0] or w.up.shape[2:] != up.shape[2:]:
            raise AdapterError(f"{source}: {key} has shapes down {tuple(w.down.shape)}, up {tuple(w.up.shape)} but the "
                               f"base layer {name} needs down (rank, {', '.join(map(str, down.shape[1:]))}) and up "
                               f"({up.shape[0]}, rank{''.join(', ' + str(s) for s in up.shape[2:])}): a LoRA made for "
                               f"another base model")  # fmt: skip
        if w.up.shape[1] != w.rank:
            raise AdapterError(f"{source}: {key} has down rank {w.rank} but up rank {w.up.shape[1]}")
        rank, alpha = layer.r[ADAPTER], float(layer.lora_alpha[ADAPTER])
        if w.rank != rank:
            raise AdapterError(f"{source}: {key} has rank {w.rank} where the adapter settings give {name} rank {rank}: "
                               f"set model.adapter.{'conv_rank' if down.dim() == 4 and down.shape[-1] > 1 else 'rank'}"
                               f"={w.rank}")  # fmt: skip
        if abs(w.alpha - alpha) > 1e-6 * max(1.0, alpha):
            raise AdapterError(f"{source}: {key} has alpha {w.alpha:g} where the adapter settings give {name} alpha "
                               f"{alpha:g}: set model.adapter.{'conv_alpha' if down.dim() == 4 and down.shape[-1] > 1 else 'alpha'}"
                               f"={w.alpha:g}")  # fmt: skip
    if check_only:
        return
    for name, w in weights.items():
        layer = layers[name]
        layer.lora_A[ADAPTER].weight.copy_(w.down)
        layer.lora_B[ADAPTER].weight.copy_(w.up)


def cast_base(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen base weights (not the adapters, which train in fp32) to ``dtype``, in place: a Parameter
    keeps its identity, so what shares it (the EMA copy) follows."""
    for name, p in model.named_parameters():
        if not is_adapter_key(name) and p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)


def keep_input_dtype(model: nn.Module) -> None:
    """Let autocast pick the adapters' matmul dtype: peft casts each adapted layer's input to the adapters' fp32 first,
    which under bf16 autocast allocates an fp32 copy and saves a second bf16 copy of the input for the backward;
    without it, the bf16 input itself is saved. Only for models that run under autocast (mixed precision)."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False  # what peft.helpers.disable_input_dtype_casting sets


def merged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its adapters fused into the base weights and the peft layers removed: a plain
    model of the base's architecture (what a merged export writes)."""
    model = copy.deepcopy(model)
    if not has_adapter(model):
        return model
    dtype = next(p.dtype for n, p in model.named_parameters() if not is_adapter_key(n))
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
    recurse_remove_peft_layers(model)  # each peft layer replaced by its (merged) base layer
    if hasattr(model, "peft_config"):  # what diffusers' unload_lora also forgets
        del model.peft_config
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False
    return model.to(dtype)
