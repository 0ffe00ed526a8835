"""The latent-diffusion LightningModule: encode, drop captions, noise, predict, loss. Nothing else.

The VAE and the text encoder are frozen (eval, no grad, no optimizer state) and left out of training
checkpoints: they are reloaded from where they came from (their `from_pretrained` path), and the checkpoint
keeps their fingerprints (`ldm.models.fingerprint`) so that a source which now holds other weights is refused.
Only the U-Net (and its EMA copy) trains and is saved.

    module = LatentDiffusion(unet, vae, text_encoder, diffusion=dict(prediction_type="epsilon"),
                             optimizer=functools.partial(torch.optim.AdamW, lr=1e-4))
    trainer.fit(module, datamodule)
    images = module.generate(["a red circle"], seed=0)     # (1, 3, H, W) in [0, 1]

A frozen part may be given as a factory (Hydra `_partial_: true`, as conf/model/vae and text_encoder do) instead
of a module: it is then built when training starts, unless the data module delivers cached latents and text
encodings (`data=latents`: its `cached_encodings` is true), in which case it is built on first use, so such a
run only loads it when it samples, evaluates or exports.

LoRA (`adapter`, conf/model/adapter/lora.yaml): the U-Net's base weights are frozen (bf16 under bf16 mixed precision on a
GPU) and only peft adapters train, with their own EMA; checkpoints hold the adapters, the base is reloaded from its
source as the frozen VAE and text encoder are. `adapter.text_encoder` adapts the text encoder too (its transformers
CLIP models: SD's one, SDXL's two), which then runs on every step with gradients (no caption cache, no cached
encodings).

Speed options (all off by default, harmless on CPU): `channels_last` (NHWC weights and activations, transformer
blocks included: `ldm.models.unet.to_channels_last`, and the VAE's weights and the images it encodes; compiled,
with Inductor's layout optimization forced, which its heuristic declines for U-Nets, so that the compiled kernels
keep NHWC too), `compile` (torch.compile of the
U-Net in place, and of the VAE encoder when it encodes on the fly; True or a dict of torch.compile options
such as {"mode": "max-autotune-no-cudagraphs"}), `gradient_checkpointing`. `vae_bf16` (on): under bf16 mixed
precision the frozen VAE runs in plain bf16. Attention goes through PyTorch's scaled_dot_product_attention (diffusers'
default processor), which picks the flash kernel under bf16 on the GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from ldm.data.transforms import to_model_range
from ldm.diffusion import (
    add_noise,
    config_alpha_bar,
    diffusion_loss,
    loss_mask,
    make_scheduler,
    min_snr_weight,
    offset_noise,
    as_condition,
    sample_latents,
    sample_timesteps,
    scheduler_config,
    snr,
    target,
    unet_inputs,
)
from ldm.models.adapters import BASE_DTYPES, LoRA, cast_base, is_adapter_key, keep_input_dtype
from ldm.models.fingerprint import difference, fingerprint
from ldm.models.sdxl import time_ids
from ldm.models.unet import base_model_version, to_channels_last
from ldm.models.vae import downsample_factor
from ldm.stages.base import Stage
from ldm.training.compile import allow_recompiles, compile_options, makes_cuda_graphs, with_inductor_options
from ldm.training.ema import EMA
from ldm.training.fsdp import FSDP, full_params
from ldm.training.optim import clipping_grad_scale, configure_optimizers, is_fused, nonfinite_kind
from ldm.training.step_graph import StepGraph, capturing, detached, fill_lr, lr_tensors

FROZEN_PREFIXES = ("vae.", "text_encoder.")


def drop_mask(batch_size: int, p: float, device: torch.device | str | None = None) -> Tensor:
    """Which captions classifier-free-guidance training replaces by the empty caption: Bernoulli(p), (B,) bool."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"diffusion.cfg_dropout must be in [0, 1], got {p}")
    return torch.rand(batch_size, device=device) < p


class LatentDiffusion(Stage):
    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: torch.nn.Module,
        diffusion: Mapping[str, Any] | None = None,
        sampling: Mapping[str, Any] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        ema_decay: float | None = None,
        ema_warmup: bool = True,
        ema_every_n_steps: int = 1,
        checkpoint_frozen: bool = False,
        text_cache_size: int = 0,
        channels_last: bool = False,
        compile: bool | Mapping[str, Any] = False,
        gradient_checkpointing: bool = False,
        vae_bf16: bool = True,
        adapter: LoRA | None = None,
        step_graph: bool | str = False,
    ):
        super().__init__()
        self.unet = unet
        self.adapter = adapter
        if adapter is not None:
            adapter.attach_unet(unet)  # base frozen, adapters added (before the EMA copies the U-Net)
        # Frozen parts given as factories are built on first use (see __getattr__).
        self._frozen_factories: dict[str, Callable[[], torch.nn.Module]] = {}
        # Their fingerprints (ldm.models.fingerprint): taken once, saved in checkpoints, checked against what a
        # checkpoint's config loads again (a relative path read from another directory finds other weights).
        self._fingerprints: dict[str, dict] = {}
        self._expected: dict[str, dict] = {}
        self._sources: dict[str, str] = {}
        for name, part in (("vae", vae), ("text_encoder", text_encoder)):
            if isinstance(part, torch.nn.Module):
                setattr(self, name, part)
            else:
                self._frozen_factories[name] = part
        self.channels_last = channels_last
        self.vae_bf16 = vae_bf16
        self.compile_options = compile_options(compile)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        diffusion = dict(diffusion or {})
        self.prediction_type = diffusion.get("prediction_type", "epsilon")
        self.cfg_dropout = float(diffusion.get("cfg_dropout", 0.1))
        self.min_snr_gamma = diffusion.get("min_snr_gamma")
        self.offset_noise = float(diffusion.get("offset_noise", 0.0))
        self.scheduler_config = scheduler_config(**diffusion)  # the one definition of the noise schedule
        self.sampling = {"sampler": "dpm++", "num_inference_steps": 25, "guidance_scale": 5.0, **(sampling or {})}
        self.optimizer_factory = optimizer or torch.optim.AdamW
        self.lr_scheduler_factory = lr_scheduler
        self.checkpoint_frozen = checkpoint_frozen
        self.step_graph = step_graph
        if step_graph not in (True, False, "auto"):
            raise ValueError(f"model.step_graph must be true, false or auto, got {step_graph!r}")
        self._step_graph: StepGraph | None = None  # made when training starts (`_start_step_graph`)
        self._captured_lrs: list[Tensor] = []
        self.step_verdict: Tensor | None = None  # the graphed step's non-finite verdict (0 finite, 1 loss, 2 gradient)
        self.skip_nonfinite = False  # set by the non-finite guard (ldm.callbacks.nonfinite), which counts the verdicts
        self.register_buffer("alpha_bar", config_alpha_bar(self.scheduler_config), persistent=False)  # (T,)

        # EMA of the U-Net weights (torch's AveragedModel layout, updated without host syncs); sampling uses it.
        # (of the adapters only when adapted)
        self.ema = EMA(unet, ema_decay, ema_warmup, ema_every_n_steps) if ema_decay else None
        self.ema_decay, self.ema_warmup, self.ema_every_n_steps = ema_decay, ema_warmup, ema_every_n_steps
        self.base_dtype: torch.dtype | None = None  # an adapted model's frozen base, when cast (adapters stay fp32)
        self._empty: dict[str, Tensor] | None = None  # the unconditional text inputs (batch 1)
        # The text encoder is frozen, so a caption always encodes the same: data sets with few distinct
        # captions (class templates, the built-in shapes) skip most text-encoder work with this cache.
        self.text_cache_size = text_cache_size
        self._text_cache: OrderedDict[str, dict[str, Tensor]] = OrderedDict()

        if isinstance(text_encoder, torch.nn.Module):
            self._check_text_width(text_encoder.hidden_size, "the text encoder's hidden size")
            self._adapt_text_encoder(text_encoder)

    @property
    def text_encoder_trains(self) -> bool:
        return self.adapter is not None and self.adapter.text_encoder

    def _adapt_text_encoder(self, text_encoder: torch.nn.Module) -> None:
        """With `adapter.text_encoder`: adapters on each of the text encoder's transformers CLIP models (SDXL: both),
        and their EMA."""
        if not self.text_encoder_trains:
            return
        text_models = text_encoder.text_models() if hasattr(text_encoder, "text_models") else {}
        if not text_models:
            raise ValueError(f"model.adapter.text_encoder=true needs a transformers CLIP text encoder "
                             f"(model/text_encoder=hf_clip, or SDXL's pair), not {type(text_encoder).__name__}")  # fmt: skip
        for part, text_model in text_models.items():
            self.adapter.attach_text_encoder(text_model, part)
        # Adapters of layers whose outputs the conditioning never reads (SDXL's encoder 1 above its penultimate layer)
        # get no gradient: they do not train (out of the optimizer, shared with the EMA, stay as loaded), so that DDP
        # without a static graph (Lightning's `ddp`, what trainer.devices=2 picks) does not wait for their gradients.
        for layer in text_encoder.unread_layers():
            layer.requires_grad_(False)
        if self.ema_decay:
            self.ema_text_encoder = EMA(text_encoder, self.ema_decay, self.ema_warmup, self.ema_every_n_steps)

    def _check_text_width(self, width: int, what: str) -> None:
        if self.unet.config.cross_attention_dim != width:
            raise ValueError(f"model.unet.cross_attention_dim={self.unet.config.cross_attention_dim} does not "
                             f"match {what} {width}")  # fmt: skip

    def __getattr__(self, name: str):
        # Reached only when normal lookup fails: a frozen part not built yet. Build it, frozen, on this device.
        factories = self.__dict__.get("_frozen_factories", {})
        if name in factories:
            part = factories.pop(name)().to(self.device)
            if name == "vae" and self._vae_in_bf16():
                part.to(torch.bfloat16)
            if name == "vae" and self.channels_last:  # NHWC convolutions when encoding on the fly and decoding
                part.to(memory_format=torch.channels_last)
            if name == "text_encoder":
                self._check_text_width(part.hidden_size, "the text encoder's hidden size")
                self._adapt_text_encoder(part)
            self.add_module(name, part)
            self._check_frozen(name)
            return part
        return super().__getattr__(name)

    def build_frozen(self) -> None:
        """Build the frozen parts still given as factories (a no-op for those already built)."""
        for name in list(self._frozen_factories):
            getattr(self, name)  # builds it (see __getattr__)

    def configure_model(self) -> None:
        """Frozen parts and speed options (Lightning calls this before the strategy moves and wraps the module and
        before the optimizer): in a fit, the frozen encoders are built now unless the data module delivers cached
        encodings (a text encoder that trains adapters is always built; with cached latents but no cached text
        states, the text encoder alone)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if self._trainer is not None and (not getattr(datamodule, "cached_encodings", False)
                                          or self.text_encoder_trains):  # fmt: skip
            self.build_frozen()
        elif self._trainer is not None and not getattr(datamodule, "carries_text_states", True):
            self.text_encoder  # cached latents, captions encoded here: built now, before the strategy wraps the module
        if self.adapter is not None and not getattr(self, "_adapter_ready", False):
            self._setup_adapter()
        if self.channels_last:
            to_channels_last(self.unet)
        if self.compile_options is not None and not getattr(self, "_compiled", False):
            buckets = len(getattr(datamodule, "bucket_sizes", None) or ())
            if buckets > 1:  # a graph per bucket (and per batch size of a short batch) may be kept, none runs eagerly
                allow_recompiles(2 * buckets)
            # the VAE encoder too when encoding on the fly (cached latents leave the VAE unbuilt)
            encoder = [self.vae.encoder] if "vae" in self._modules else []
            options = self.compile_options
            on_gpu = self._trainer is not None and self.trainer.strategy.root_device.type == "cuda"
            if self.step_graph and on_gpu and makes_cuda_graphs(options) and self._capture_problem() is None:
                rank_zero_info("model.step_graph: the whole step is one CUDA graph; model.compile's CUDA graphs would "
                               "nest in it, so the U-Net and the VAE encoder run their eager kernels in it")  # fmt: skip
                # (a run it cannot capture, `auto` under DDP say, keeps model.compile: its step stays Lightning's)
                options = None
            if self.channels_last:  # Inductor's own heuristic keeps the SD U-Nets' convolutions NCHW (see to_channels_last)
                options = with_inductor_options(options, force_layout_optimization=True)
            self.compile_parts([self.unet, *encoder], options)
        if "vae" in self._modules and self._vae_in_bf16():
            self.vae.to(torch.bfloat16)

    def _setup_adapter(self) -> None:
        """Once, before training (before a resumed checkpoint's weights are restored, and before Lightning moves the
        module to its device): the frozen base in its training dtype, and the adapters of `adapter.init_from` in the
        model and its EMA."""
        adapted = self.adapted_models(use_ema=False)
        dtype = BASE_DTYPES[self.adapter.base_dtype]
        on_gpu = self.trainer.strategy.root_device.type == "cuda"  # (Lightning moves the module there after this hook)
        if dtype is None and on_gpu and "bf16" in str(self.trainer.precision):
            dtype = torch.bfloat16  # "auto": the frozen base in bf16 under bf16 mixed precision
        if dtype is not None:
            for part in adapted.values():
                cast_base(part, dtype)  # the EMA shares the base, so it follows
            self.base_dtype = dtype
        if "mixed" in str(self.trainer.precision):
            for part in adapted.values():
                keep_input_dtype(part)  # the EMA copies were made with the flag unset: they cast, as diffusers does
        version = base_model_version(self.unet.config, self.prediction_type)
        self.adapter.load_init(adapted, version)
        if self.ema is not None:
            self.adapter.load_init(self.adapted_models(use_ema=True), version)
        self._adapter_ready = True

    def adapted_models(self, use_ema: bool = True) -> dict[str, torch.nn.Module]:
        """The models that carry adapters, by the part name LoRA files give them: {"unet": ...} and, with
        `adapter.text_encoder`, {"text_encoder": ...} (SDXL: and "text_encoder_2"), their EMA copies when EMA is on
        and ``use_ema``."""
        models = {"unet": self.sampling_unet(use_ema)}
        if self.text_encoder_trains:
            models.update(self.sampling_text_encoder(use_ema).text_models())
        return models

    def _vae_in_bf16(self) -> bool:
        """Under bf16 mixed precision the frozen VAE runs in plain bf16, weights and activations (autocast off),
        as diffusers' training scripts run it: autocast would keep its GroupNorms in fp32 on full-size activations."""
        return self.vae_bf16 and self._trainer is not None and "bf16" in str(self.trainer.precision)

    # --- frozen encoders -------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.unet.config.sample_size
        return (self.unet.config.in_channels, s, s)

    def _latent_size(self, size: tuple[int, int]) -> tuple[int, int]:
        factor = downsample_factor(self.vae)
        if size[0] % factor or size[1] % factor:
            raise ValueError(f"size {size[1]}x{size[0]} is not a multiple of the VAE's downsampling factor {factor}")
        return size[0] // factor, size[1] // factor

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size * downsample_factor(self.vae)

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, H, W) in [-1, 1] (or uint8) -> scaled latents (B, C, H/f, W/f), sampled from the posterior
        (with ``generator`` when given)."""
        layout = torch.channels_last if self.channels_last else torch.preserve_format
        pixels = to_model_range(pixel_values).to(self.vae.dtype, memory_format=layout)  # one copy a step, not two
        with self._vae_precision():
            posterior = self.vae.encode(pixels).latent_dist
            latents = posterior.sample(generator)
        shift = self.vae.config.shift_factor or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1]."""
        shift = self.vae.config.shift_factor or 0.0
        z = latents / self.vae.config.scaling_factor + shift
        with self._vae_precision():
            images = self.vae.decode(z.to(self.vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _vae_precision(self):
        """Autocast off for a bf16 VAE (plain bf16 throughout); as it is for an fp32 one."""
        if self.vae.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, enabled=False)
        return contextlib.nullcontext()

    @property
    def is_sdxl(self) -> bool:
        """Whether the U-Net takes SDXL's added conditions (a pooled text embedding and the size/crop time ids)."""
        return self.unet.config.addition_embed_type == "text_time"

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """Captions -> the U-Net's text inputs: {"encoder_hidden_states": (B, L, D)} (+ SDXL's "text_embeds"
        (B, P)); memoised (LRU) when `text_cache_size` > 0."""
        if not self.text_cache_size:
            return self.text_encoder.condition(list(captions))
        cache = self._text_cache
        unique = list(dict.fromkeys(captions))
        missing = [c for c in unique if c not in cache]
        if missing:
            encoded = self.text_encoder.condition(missing)
            for i, caption in enumerate(missing):
                cache[caption] = {k: v[i] for k, v in encoded.items()}
        out = {k: torch.stack([cache[c][k] for c in unique]).to(self.device) for k in cache[unique[0]]}
        if len(unique) < len(captions):  # repeats (class captions): one row each, gathered on the device
            row = {c: i for i, c in enumerate(unique)}
            index = self._host_index([row[c] for c in captions])
            out = {k: v.index_select(0, index) for k, v in out.items()}
        for caption in unique:
            cache.move_to_end(caption)
        while len(cache) > self.text_cache_size:
            cache.popitem(last=False)
        return out

    def _host_index(self, rows: list[int]) -> Tensor:
        """Row numbers made on the host, on the module's device without waiting for it (a pinned, non-blocking copy:
        a copy from pageable memory would wait for every queued kernel)."""
        index = torch.tensor(rows, dtype=torch.long)
        if self.device.type == "cuda":
            return index.pin_memory().to(self.device, non_blocking=True)
        return index.to(self.device)

    def empty_condition(self) -> dict[str, Tensor]:
        """The unconditional text inputs (batch 1), what dropped captions train with and guidance samples with: the
        empty caption's encoding (SDXL: zeros), from the frozen text encoder once, or cached with the latents."""
        if self._empty is None:
            with torch.no_grad():
                self._empty = self.text_encoder.empty_condition()
        if self._empty["encoder_hidden_states"].device != self.device:
            self._empty = {k: v.to(self.device) for k, v in self._empty.items()}
        return self._empty

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        cached = getattr(datamodule, "empty_condition", None)  # LatentShardDataModule
        if cached is not None and datamodule.carries_text_states:  # else the encoder's own, as its captions' are
            self._check_text_width(cached["encoder_hidden_states"].shape[-1], "the cached text encodings' width")
            self._empty = {k: v.float().to(self.device) for k, v in cached.items()}

    @staticmethod
    def _where(drop: Tensor, empty: dict[str, Tensor], cond: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rows of ``cond`` where ``drop`` (B,) is set replaced by ``empty`` (batch 1), key by key."""
        return {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), empty[k].to(v.dtype), v) for k, v in cond.items()}

    def condition(self, captions: Sequence[str], drop: Tensor | None = None) -> dict[str, Tensor]:
        """Text conditioning; rows where ``drop`` is set get the unconditional input instead."""
        cond = self.encode_text(captions)
        return cond if drop is None else self._where(drop, self.empty_condition(), cond)

    def added_conditions(self, batch: Mapping[str, Any], latents: Tensor) -> dict[str, Tensor]:
        """SDXL's size and crop conditioning of a batch, `time_ids` (B, 6): each sample's original size, crop
        top-left and target size as the loader recorded them (a batch without them: the latents' own size, no
        crop); nothing for the other families."""
        if not self.is_sdxl:
            return {}
        if "original_size" in batch:
            sizes = [batch[k].to(latents.device) for k in ("original_size", "crop_top_left", "target_size")]
        else:
            factor = downsample_factor(self.vae)
            target = torch.tensor([latents.shape[-2] * factor, latents.shape[-1] * factor], device=latents.device)
            size = target.expand(latents.shape[0], 2)
            sizes = [size, torch.zeros_like(size), size]
        return {"time_ids": time_ids(*sizes)}

    # --- training --------------------------------------------------------------------------
    def diffusion_step(self, latents: Tensor, cond: Tensor | Mapping[str, Tensor], noise: Tensor | None = None,
                       t: Tensor | None = None, mask: Tensor | None = None,
                       sample_weight: Tensor | None = None) -> Tensor:  # fmt: skip
        """One denoising loss on latents (B, C, h, w) with conditioning (hidden states (B, L, D), or the U-Net's
        conditioning dict: `as_condition`); the noise (B, C, h, w) and
        timesteps (B,) are drawn here unless given. `mask` (B, 1, h', w'): a loss mask (white = learn, resized to
        the latents); `sample_weight` (B,): per-sample loss weights (DreamBooth's prior_loss_weight)."""
        b = latents.shape[0]
        if noise is None:  # randn of the shape, not randn_like: the same noise whatever the memory format
            noise = offset_noise(torch.randn(latents.shape, device=latents.device), self.offset_noise)
        if t is None:
            t = sample_timesteps(b, self.scheduler_config["num_train_timesteps"], device=latents.device)
        ab = self.alpha_bar[t]  # (B,)
        x_t = add_noise(latents, noise, ab)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        model_output = self.unet(x_t, t, **unet_inputs(as_condition(cond))).sample
        weight = min_snr_weight(snr(ab), self.min_snr_gamma, self.prediction_type)
        if sample_weight is not None:
            weight = weight * sample_weight.to(weight.device)
        mask = loss_mask(mask, latents.shape[-2:]) if mask is not None else None
        return diffusion_loss(model_output, target(self.prediction_type, latents, noise, ab), weight, mask)

    def training_condition(self, captions: Sequence[str] | None, cached: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Conditioning for training: each caption is replaced by the unconditional input with probability
        `diffusion.cfg_dropout` (classifier-free guidance training, Ho & Salimans 2022; SDXL's zeros, as its
        paper's embedders drop). The one place where caption dropout happens. ``cached``: the captions' encodings
        (from the caption cache, or cached with the latents; then ``captions`` may be None)."""
        b = len(captions) if captions is not None else cached["encoder_hidden_states"].shape[0]
        drop = drop_mask(b, self.cfg_dropout, self.device)
        if self.text_encoder_trains and self.is_sdxl:  # adapted text encoders, with gradients; dropped: SDXL's zeros
            return self._where(drop, self.empty_condition(), self.text_encoder.condition(list(captions)))
        if self.text_encoder_trains:  # adapted text encoder: encoded with gradients, dropped captions as ""
            return self.text_encoder.condition(["" if d else c for c, d in zip(captions, drop.tolist())])
        if cached is None:
            return self.condition(captions, drop)
        return self._where(drop, self.empty_condition(), dict(cached))

    @staticmethod
    def cached_latents(batch: Mapping[str, Tensor]) -> Tensor:
        """A draw from the cached (already scaled) posterior: mean + std * eps, (B, C, h, w) float32."""
        mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
        return mean + std * torch.randn_like(mean)

    BATCH_TENSORS = ("pixel_values", "latent_mean", "latent_std", "mask", "loss_weight", "original_size",
                     "crop_top_left", "target_size")  # fmt: skip

    def training_inputs(self, batch: dict) -> dict[str, Any]:
        """The host's part of a training step, no random draw: the batch's tensors, and its captions' encodings
        (cached with the latents, or from the frozen text encoder and its cache) as `encoder_hidden_states` (+ SDXL's
        `text_embeds`); the captions themselves only when the text encoder trains (encoded with gradients)."""
        inputs = {k: batch[k] for k in self.BATCH_TENSORS if k in batch}
        if "latent_mean" in batch and batch["latent_mean"].shape[1] != self.latent_shape[0]:
            raise ValueError(f"cached latents have {batch['latent_mean'].shape[1]} channels but the U-Net takes "
                             f"{self.latent_shape[0]}: precompute them with this model's VAE")  # fmt: skip
        if self.text_encoder_trains:
            inputs["caption"] = list(batch["caption"])
        elif "text_hidden" in batch:  # absent when captions change per visit (tag shuffling): encoded here
            inputs["encoder_hidden_states"] = batch["text_hidden"].float()
            if "text_pooled" in batch:  # SDXL
                inputs["text_embeds"] = batch["text_pooled"].float()
        else:
            inputs.update(self.encode_text(batch["caption"]))
        return inputs

    def training_loss(self, inputs: Mapping[str, Any]) -> Tensor:
        """The device's part of a training step (`training_inputs` made its inputs): the latents (a posterior draw),
        caption dropout, noise, timesteps, the U-Net and the loss."""
        if "latent_mean" in inputs:  # cached latents: no frozen encoder runs
            latents = self.cached_latents(inputs)  # (B, C, h, w): any bucket's h, w
        else:
            latents = self.encode_images(inputs["pixel_values"])  # (B, C, h, w)
        text = {k: inputs[k] for k in ("encoder_hidden_states", "text_embeds") if k in inputs}
        cond = self.training_condition(inputs.get("caption"), text or None)  # (+ SDXL's pooled)
        cond = {**cond, **self.added_conditions(inputs, latents)}
        return self.diffusion_step(latents, cond, mask=inputs.get("mask"), sample_weight=inputs.get("loss_weight"))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        inputs = self.training_inputs(batch)
        loss = self._graphed_step(inputs) if self._step_graph is not None else self.training_loss(inputs)
        self.log("train/loss", loss, prog_bar=self.progress_bar, batch_size=len(batch["caption"]))
        return loss

    @torch.no_grad()
    def validation_loss(self, batch: dict, generator: torch.Generator) -> Tensor:
        """The training loss on a held-out image batch with every draw fixed (`ldm.callbacks.val_loss`): posterior
        samples and noise from ``generator`` (CPU), timesteps evenly spaced over the schedule, no caption dropout."""
        latents = self.encode_images(batch["pixel_values"], generator)  # (B, C, h, w)
        b, num_t = latents.shape[0], self.scheduler_config["num_train_timesteps"]
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        t = torch.linspace(0, num_t - 1, b).round().long().to(latents.device)  # (B,)
        cond = {**self.condition(batch["caption"]), **self.added_conditions(batch, latents)}
        return self.diffusion_step(latents, cond, noise=noise, t=t)

    # --- the whole step as one CUDA graph (`step_graph`) ---------------------------------------------------
    def on_train_start(self) -> None:
        super().on_train_start()
        if self.step_graph is True or (self.step_graph == "auto" and self.device.type == "cuda"):
            self._start_step_graph()

    def on_train_end(self) -> None:
        super().on_train_end()
        graph = self._step_graph
        if graph is not None and self.device.type == "cuda":
            rank_zero_info(f"model.step_graph: {graph.replays} of this run's steps replayed its captured CUDA graph"
                           + ("" if graph.replays else " (none: too few steps, or no two batches alike)"))  # fmt: skip

    def _capture_problem(self) -> str | None:
        """What keeps this run's step from being captured (one phrase naming the option), or None."""
        trainer = self.trainer
        if trainer.world_size > 1 or isinstance(self.unet, FSDP):
            return f"{trainer.world_size} processes (one device only: gradients would be reduced inside the graph)"
        if trainer.accumulate_grad_batches != 1:
            return f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}"
        if str(trainer.precision) == "16-mixed":
            return "trainer.precision=16-mixed (its loss scaler reads the GPU on the host)"
        if self.text_encoder_trains:
            return "model.adapter.text_encoder=true (captions are encoded with gradients on the host)"
        optimizers = trainer.optimizers  # (none yet in configure_model)
        if len(optimizers) > 1:
            return f"{len(optimizers)} optimizers"
        if optimizers and self.device.type == "cuda" and not is_fused(optimizers[0]):
            return "optim.optimizer.fused=false (the step skips non-finite steps and clips on the device)"
        return None

    def _start_step_graph(self) -> None:
        """Check that this run's step can be captured (one line naming what cannot), and make its `StepGraph`."""
        problem = self._capture_problem()
        if problem is not None and self.step_graph == "auto":  # Lightning's own step then, as with step_graph=false
            rank_zero_info(f"model.step_graph=auto: the step is not captured ({problem})")
            return
        if problem is not None:
            raise ValueError(f"model.step_graph=true cannot capture this run's step: {problem}; set model.step_graph=false")
        optimizer = self.trainer.optimizers[0]
        if self.device.type == "cuda":
            self._captured_lrs = lr_tensors(optimizer)
        self._step_graph = StepGraph(self._whole_step, self.trainable_parameters(),
                                     capture_context=lambda: capturing(optimizer, self._captured_lrs))  # fmt: skip

    @property
    def graphs_steps(self) -> bool:
        """Whether training steps run whole as one function (`step_graph`; a CUDA graph on a GPU)."""
        return self._step_graph is not None

    def _graphed_step(self, inputs: dict[str, Tensor]) -> Tensor:
        """Forward, backward, clipping, optimizer and EMA of one step (`_whole_step`), replayed as a CUDA graph on a
        GPU; the loss to log, its verdict left in `step_verdict` for the non-finite guard."""
        if self._captured_lrs:
            fill_lr(self.trainer.optimizers[0], self._captured_lrs)  # the LR scheduler's value for this step
        loss, verdict = detached(self._step_graph(inputs))
        self.step_verdict = verdict
        return loss

    def _whole_step(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """All the device work of one optimization step, what the automatic path spreads over Lightning's closure,
        `NonFiniteLoss`, `configure_gradient_clipping` and `optimizer_step`, with the same arithmetic: the loss's
        backward, the global gradient norm, the non-finite verdict (with the guard), clipping (by the fused optimizer's
        `grad_scale`), the optimizer (skipping a non-finite step by its `found_inf`), the EMA. No host syncs with a
        fused optimizer (captured as a CUDA graph); with another (CPU) the verdict is read on the host."""
        trainer, optimizer = self.trainer, self.trainer.optimizers[0]
        params = self._step_graph.params
        for p in params:
            p.grad = None
        loss = self.training_loss(inputs)
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        clip, by_value = trainer.gradient_clip_val, trainer.gradient_clip_algorithm == "value"
        norm = torch.nn.utils.get_total_norm(grads) if self.skip_nonfinite or (clip and not by_value) else None
        verdict = None  # 0 finite, 1 loss, 2 gradient
        if self.skip_nonfinite:
            verdict = nonfinite_kind(~torch.isfinite(loss.detach()), ~torch.isfinite(norm))
        keep = None if verdict is None else (verdict == 0).float()
        fused = is_fused(optimizer)
        if clip and by_value:
            torch.nn.utils.clip_grad_value_(params, clip)
        elif clip and fused:
            optimizer.grad_scale = clipping_grad_scale(norm, clip)
        elif clip:
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
        if keep is not None and fused:
            optimizer.found_inf = 1 - keep
        stepped = keep is None or fused or bool(keep)  # (the host reads the verdict only without a fused optimizer)
        if stepped:
            optimizer.step()
        for name in ("grad_scale", "found_inf"):
            optimizer.__dict__.pop(name, None)
        if self.ema is not None and self.ema_every_n_steps == 1 and stepped:
            self.ema.update(self.unet, keep=keep)
        return loss.detach(), verdict

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        if self._step_graph is None:  # (the graphed step sets its gradients to None itself, before its backward)
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def backward(self, loss: Tensor, *args, **kwargs) -> None:
        if self._step_graph is None:  # (the graphed step ran its backward already)
            super().backward(loss, *args, **kwargs)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        if self._step_graph is not None:
            # The closure runs training_step, which runs the whole update (`_graphed_step`); stepping the optimizer
            # here (LightningOptimizer.step) would step it again. Lightning counts the step around this hook.
            optimizer_closure()
            every = self.ema_every_n_steps
            if self.ema is not None and every > 1 and self.trainer.global_step % every == 0:  # as below
                keep = None if self.step_verdict is None else (self.step_verdict == 0).float()
                self.ema.update(self.unet, keep=keep)
            return
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # EMA right after the update: a checkpoint saved at this step's end (callbacks run before the
        # module's on_train_batch_end) then holds the EMA of this step too, so resumed runs match. A step
        # whose gradients were dropped (non-finite loss) updated nothing, and neither does the EMA; nor does a
        # step a fused optimizer skipped on the device (`step_skipped`, set by NonFiniteLoss): no host sync.
        if self.ema is None:
            return
        every = self.ema_every_n_steps
        if every > 1 and self._trainer is not None and self.trainer.global_step % every:
            return  # not an EMA step (global_step counts this step already, and is restored on resume)
        # Under FSDP the EMA (whole on every rank) is updated from the gathered full weights (all ranks).
        skipped = self.step_skipped
        if skipped is None and all(p.grad is None for p in self.unet.parameters()):
            return  # gradients dropped: the step was skipped on the host
        keep = None if skipped is None else 1 - skipped  # skipped: not counted
        with full_params(self.unet):
            self.ema.update(self.unet, keep=keep)
        if "ema_text_encoder" in self._modules:
            self.ema_text_encoder.update(self.text_encoder, keep=keep)

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float, optimizer=None) -> None:
        if isinstance(self.unet, FSDP):  # sharded (ldm/training/fsdp.py): the norm over all ranks' shards
            self.unet.clip_grad_norm_(max_norm)
        else:
            super().clip_grad_norm(params, max_norm, optimizer)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer steps: the whole U-Net, or its adapters (and the text encoder's) when adapted."""
        params = [p for p in self.unet.parameters() if p.requires_grad]
        if self.text_encoder_trains:
            params += [p for p in self.text_encoder.parameters() if p.requires_grad]
        return params

    def configure_optimizers(self):
        return configure_optimizers(self.trainable_parameters(), self.optimizer_factory, self.lr_scheduler_factory)

    # --- frozen parts (and an adapted model's base) stay out of checkpoints --------------------------------
    def _reloaded(self, key: str) -> bool:
        """Whether a state-dict key is a weight reloaded from its source rather than saved: the frozen VAE and
        text encoder (unless `checkpoint_frozen`) and, when adapted, the U-Net's base and its EMA's (shared)."""
        if is_adapter_key(key):
            return False
        if key.startswith(FROZEN_PREFIXES + ("ema_text_encoder.module.",)):
            return not self.checkpoint_frozen
        return self.adapter is not None and key.startswith(("unet.", "ema.module."))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if self._reloaded(k)]:
            del state[key]
        if not self.checkpoint_frozen:  # reloaded from their sources: record which weights those held
            checkpoint["frozen_fingerprints"] = {
                name: self._frozen_fingerprint(name) if name in self._modules else self._expected[name]
                for name in ("vae", "text_encoder") if name in self._modules or name in self._expected
            }  # fmt: skip

    def _frozen_fingerprint(self, name: str) -> dict:
        if name not in self._fingerprints:  # frozen: taken once (trained adapters left out)
            self._fingerprints[name] = fingerprint(self._modules[name], skip=is_adapter_key)
        return self._fingerprints[name]

    def _check_frozen(self, name: str) -> None:
        """Refuse (ValueError, one line) a frozen part that holds other weights than the checkpoint loaded into this
        module was trained with."""
        if name not in self._expected:
            return
        problem = difference(self._expected[name], self._frozen_fingerprint(name))
        if problem:
            source = self._sources.get(name, "its source")
            raise ValueError(
                f"model.{name}: the {name.replace('_', ' ')} loaded from {source} is not the one this checkpoint was "
                f"trained with ({problem}); relative paths are read from the working directory ({os.getcwd()}): "
                f"run from the directory the run was trained in, or put that {name.replace('_', ' ')} back"
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._expected = dict(checkpoint.get("frozen_fingerprints") or {})
        config = checkpoint.get("config")
        parts = config.get("model", {}) if isinstance(config, Mapping) else {}
        for name in self._expected:
            part = parts.get(name) if isinstance(parts, Mapping) else None
            path = (part.get("path") or part.get("pretrained")) if isinstance(part, Mapping) else None
            if path:
                self._sources[name] = repr(str(path))
            if name in self._modules:
                self._check_frozen(name)
        state = checkpoint["state_dict"]
        if any(k.startswith(FROZEN_PREFIXES + ("ema_text_encoder.",)) for k in state):  # frozen parts or their adapters
            self.build_frozen()
        # Frozen weights come from their source, not from the checkpoint: put the loaded ones back.
        for key, value in self.state_dict().items():
            if key not in state and self._reloaded(key):
                state[key] = value

    # --- sampling ----------------------------------------------------------------------------
    def sampling_unet(self, use_ema: bool = True) -> UNet2DConditionModel:
        if use_ema and self.ema is not None:
            return self.ema.module
        if isinstance(self.unet, FSDP):  # its forward is a collective: rank 0 sampling alone would wait forever
            raise RuntimeError("sampling with the raw U-Net is not possible while it is sharded by FSDP: sample "
                               "with the EMA (model.ema_decay), which every rank holds whole")  # fmt: skip
        return self.unet

    def _base_precision(self):
        """Autocast for a frozen base cast to bf16, as in training (sampling callbacks run outside the training
        step's autocast); nothing otherwise."""
        if self.base_dtype in (None, torch.float32):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, self.base_dtype)

    @torch.no_grad()
    def sampling_condition(self, prompts: Sequence[str], use_ema: bool = True, size: tuple[int, int] | None = None,
                           negative_prompt: str | Sequence[str] | None = None,
                           ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:  # fmt: skip
        """(the prompts' conditioning, the unconditional one: batch 1, or the negative prompts' (one for all, or
        one per prompt) with batch B) to sample with, in fp32; SDXL's time ids as `StableDiffusionXLPipeline` sets
        them by default: original size = target size = the image size, no crop."""
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt: {len(negatives)} negative prompts for {len(prompts)} prompts")
        if self.text_encoder_trains:  # no caches: an adapted text encoder changes as it trains
            text_encoder = self.sampling_text_encoder(use_ema)
            with self._base_precision():
                cond = text_encoder.condition(list(prompts))
                uncond = text_encoder.empty_condition() if negatives is None else text_encoder.condition(negatives)
        else:
            cond = self.encode_text(prompts)
            uncond = self.empty_condition() if negatives is None else self.encode_text(negatives)
        cond = {k: v.float() for k, v in cond.items()}  # the noise and the sampler's arithmetic stay in fp32
        uncond = {k: v.float() for k, v in uncond.items()}
        if self.is_sdxl:
            h, w = size or (self.resolution, self.resolution)
            ids = time_ids(*(torch.tensor([[a, b]], device=self.device) for a, b in ((h, w), (0, 0), (h, w))))
            cond["time_ids"] = ids.expand(len(prompts), -1)
            uncond["time_ids"] = ids.expand(uncond["encoder_hidden_states"].shape[0], -1)
        return cond, uncond

    def sampling_text_encoder(self, use_ema: bool = True) -> torch.nn.Module:
        """The text encoder to sample with: the EMA of an adapted one when EMA is on, else the text encoder."""
        if use_ema and self.text_encoder_trains and "ema_text_encoder" in self._modules:
            return self.ema_text_encoder.module
        return self.text_encoder

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seed: int | Sequence[int] = 0,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        sampler: str | None = None,
        use_ema: bool = True,
        size: tuple[int, int] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        init_image: Tensor | None = None,
        strength: float = 0.75,
        guidance_interval: Sequence[float] | None = None,
    ) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] for ``prompts``; the same seed gives the same images. ``size``:
        (height, width) in pixels (a multiple of the VAE's factor), else the U-Net's own square size.

        ``seed`` is one seed for the batch (as StableDiffusionPipeline's generator), or one per prompt,
        which makes each image independent of how prompts are batched or split across ranks.
        ``negative_prompt`` (one for all, or one per prompt; default `sampling.negative_prompt`): what the
        unconditional half of classifier-free guidance encodes instead of the empty caption.
        ``init_image`` (1 or B, 3, H, W) in [-1, 1]: img2img, as StableDiffusionImg2ImgPipeline: the image's
        latents, noised to the last ``strength`` of the sampler's steps, are denoised from there.
        ``guidance_interval`` (low, high) (default `sampling.guidance_interval`): guidance only at the steps whose
        noise level sigma is in (low, high] (`ldm.diffusion.sampling.guides_at`)."""
        opts = self.sampling
        unet = self.sampling_unet(use_ema)
        was_training = unet.training
        unet.eval()
        scheduler = make_scheduler(sampler or opts["sampler"], self.scheduler_config)
        if isinstance(seed, int):
            generator = torch.Generator("cpu").manual_seed(seed)
        else:
            generator = [torch.Generator("cpu").manual_seed(int(s)) for s in seed]
        negative_prompt = opts.get("negative_prompt") if negative_prompt is None else negative_prompt
        cond, uncond = self.sampling_condition(prompts, use_ema, size, negative_prompt)
        init_latents = None if init_image is None else self.encode_init_image(init_image, len(prompts), generator)
        with self._base_precision():
            latents = sample_latents(
                unet,
                scheduler,
                cond,
                uncond,
                guidance_scale=opts["guidance_scale"] if guidance_scale is None else guidance_scale,
                num_inference_steps=num_inference_steps or opts["num_inference_steps"],
                latent_shape=self.latent_shape if size is None else (self.latent_shape[0], *self._latent_size(size)),
                generator=generator,
                init_latents=init_latents,
                strength=strength,
                guidance_interval=opts.get("guidance_interval") if guidance_interval is None else guidance_interval,
            ).float()
        unet.train(was_training)
        return self.decode_latents(latents)

    @torch.no_grad()
    def encode_init_image(self, image: Tensor, batch_size: int, generator) -> Tensor:
        """img2img's start: (1 or B, 3, H, W) in [-1, 1] -> scaled posterior samples (B, C, h, w), drawn from
        ``generator`` (one, or one per image) as StableDiffusionImg2ImgPipeline.prepare_latents draws them."""
        if image.ndim != 4 or image.shape[1] != 3 or batch_size % image.shape[0]:
            raise ValueError(f"init_image: expected (1 or {batch_size}, 3, H, W) images, got {tuple(image.shape)}")
        image = image.to(self.device, self.vae.dtype)
        with self._vae_precision():
            if isinstance(generator, list):  # one image at a time, each with its own generator
                image = image.repeat(batch_size // image.shape[0], 1, 1, 1)
                latents = torch.cat([self.vae.encode(image[i:i + 1]).latent_dist.sample(g)
                                     for i, g in enumerate(generator)])  # fmt: skip
            else:
                latents = self.vae.encode(image).latent_dist.sample(generator)
                latents = latents.repeat(batch_size // latents.shape[0], 1, 1, 1)
        shift = self.vae.config.shift_factor or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).float()  # (B, C, h, w)
