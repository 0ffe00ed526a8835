"""The latent-diffusion LightningModule: encode, drop captions, noise, predict, loss. Nothing else.

The VAE and the text encoder are frozen (eval, no grad, no optimizer state) and left out of training
checkpoints: they are reloaded from where they came from (their `from_pretrained` path). Only the
U-Net (and its EMA copy) trains and is saved.

    module = LatentDiffusion(unet, vae, text_encoder, diffusion=dict(prediction_type="epsilon"),
                             optimizer=functools.partial(torch.optim.AdamW, lr=1e-4))
    trainer.fit(module, datamodule)
    images = module.generate(["a red circle"], seed=0)     # (1, 3, H, W) in [0, 1]

A frozen part may be given as a factory (Hydra `_partial_: true`, as conf/model/vae and text_encoder do) instead
of a module: it is then built when training starts, unless the data module delivers cached latents and text
encodings (`data=latents`: its `cached_encodings` is true), in which case it is built on first use, so such a
run only loads it when it samples, evaluates or exports.

Speed options (all off by default, harmless on CPU): `channels_last`, `compile` (torch.compile of the
U-Net in place, and of the VAE encoder when it encodes on the fly; True or a dict of torch.compile options
such as {"mode": "max-autotune-no-cudagraphs"}), `gradient_checkpointing`. `vae_bf16` (on): under bf16 mixed
precision the frozen VAE runs in plain bf16. Attention goes through PyTorch's scaled_dot_product_attention (diffusers'
default processor), which picks the flash kernel under bf16 on the GPU.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import Tensor

from ldm.data.transforms import to_model_range
from ldm.diffusion import (
    add_noise,
    config_alpha_bar,
    diffusion_loss,
    make_scheduler,
    min_snr_weight,
    offset_noise,
    sample_latents,
    sample_timesteps,
    scheduler_config,
    snr,
    target,
)
from ldm.models.vae import downsample_factor
from ldm.stages.base import Stage
from ldm.training.ema import EMA
from ldm.training.fsdp import FSDP, full_params
from ldm.training.optim import configure_optimizers

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
        checkpoint_frozen: bool = False,
        text_cache_size: int = 0,
        channels_last: bool = False,
        compile: bool | Mapping[str, Any] = False,
        gradient_checkpointing: bool = False,
        vae_bf16: bool = True,
    ):
        super().__init__()
        self.unet = unet
        # Frozen parts given as factories are built on first use (see __getattr__).
        self._frozen_factories: dict[str, Callable[[], torch.nn.Module]] = {}
        for name, part in (("vae", vae), ("text_encoder", text_encoder)):
            if isinstance(part, torch.nn.Module):
                setattr(self, name, part)
            else:
                self._frozen_factories[name] = part
        self.channels_last = channels_last
        self.vae_bf16 = vae_bf16
        self.compile_options = ({} if compile is True else dict(compile)) if compile else None
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
        self.register_buffer("alpha_bar", config_alpha_bar(self.scheduler_config), persistent=False)  # (T,)

        # EMA of the U-Net weights (torch's AveragedModel layout, updated without host syncs); sampling uses it.
        self.ema = EMA(unet, ema_decay) if ema_decay else None
        self._empty_hidden: Tensor | None = None
        # The text encoder is frozen, so a caption always encodes the same: data sets with few distinct
        # captions (class templates, the built-in shapes) skip most text-encoder work with this cache.
        self.text_cache_size = text_cache_size
        self._text_cache: OrderedDict[str, Tensor] = OrderedDict()

        if isinstance(text_encoder, torch.nn.Module):
            self._check_text_width(text_encoder.hidden_size, "the text encoder's hidden size")

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
            if name == "text_encoder":
                self._check_text_width(part.hidden_size, "the text encoder's hidden size")
            self.add_module(name, part)
            return part
        return super().__getattr__(name)

    def build_frozen(self) -> None:
        """Build the frozen parts still given as factories (a no-op for those already built)."""
        for name in list(self._frozen_factories):
            getattr(self, name)  # builds it (see __getattr__)

    def configure_model(self) -> None:
        """Frozen parts and speed options, once the module is on its device (Lightning calls this before the
        optimizer): the frozen encoders are built now unless the data module delivers cached encodings."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if not getattr(datamodule, "cached_encodings", False):
            self.build_frozen()
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if self.compile_options is not None and not getattr(self, "_compiled", False):
            self.unet.compile(**self.compile_options)  # in place: parameter names (and checkpoints) unchanged
            if "vae" in self._modules:  # encoding on the fly (cached latents leave the VAE unbuilt)
                self.vae.encoder.compile(**self.compile_options)
            self._compiled = True
        if "vae" in self._modules and self._vae_in_bf16():
            self.vae.to(torch.bfloat16)

    def _vae_in_bf16(self) -> bool:
        """Under bf16 mixed precision the frozen VAE runs in plain bf16, weights and activations (autocast off),
        as diffusers' training scripts run it: autocast would keep its GroupNorms in fp32 on full-size activations."""
        return self.vae_bf16 and self._trainer is not None and "bf16" in str(self.trainer.precision)

    # --- frozen encoders -------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.unet.config.sample_size
        return (self.unet.config.in_channels, s, s)

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size * downsample_factor(self.vae)

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, H, W) in [-1, 1] (or uint8) -> scaled latents (B, C, H/f, W/f), sampled from the posterior
        (with ``generator`` when given)."""
        with self._vae_precision():
            posterior = self.vae.encode(to_model_range(pixel_values).to(self.vae.dtype)).latent_dist
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

    @torch.no_grad()
    def encode_captions(self, captions: Sequence[str]) -> Tensor:
        """Captions -> text hidden states (B, L, D); memoised (LRU) when `text_cache_size` > 0."""
        if not self.text_cache_size:
            return self.text_encoder.encode(list(captions))
        cache = self._text_cache
        missing = list(dict.fromkeys(c for c in captions if c not in cache))
        if missing:
            for caption, hidden in zip(missing, self.text_encoder.encode(missing)):
                cache[caption] = hidden
        hidden = torch.stack([cache[c] for c in captions]).to(self.device)
        for caption in captions:
            cache.move_to_end(caption)
        while len(cache) > self.text_cache_size:
            cache.popitem(last=False)
        return hidden

    def empty_hidden(self) -> Tensor:
        """The empty caption's hidden states (1, L, D), encoded once by the same frozen text encoder
        (or, training on cached latents, the encoding cached with them)."""
        if self._empty_hidden is None:
            self._empty_hidden = self.encode_captions([""])
        if self._empty_hidden.device != self.device:
            self._empty_hidden = self._empty_hidden.to(self.device)
        return self._empty_hidden

    def on_fit_start(self) -> None:
        cached = getattr(self.trainer.datamodule, "empty_hidden", None)  # LatentShardDataModule
        if cached is not None:
            self._check_text_width(cached.shape[-1], "the cached text encodings' width")
            self._empty_hidden = cached.float().to(self.device)

    def condition(self, captions: Sequence[str], drop: Tensor | None = None) -> Tensor:
        """Text conditioning (B, L, D); rows where ``drop`` is set get the empty caption instead."""
        hidden = self.encode_captions(captions)
        if drop is not None:
            hidden = torch.where(drop[:, None, None], self.empty_hidden().to(hidden.dtype), hidden)
        return hidden

    # --- training --------------------------------------------------------------------------
    def diffusion_step(self, latents: Tensor, cond: Tensor, noise: Tensor | None = None, t: Tensor | None = None) -> Tensor:
        """One denoising loss on latents (B, C, h, w) with conditioning (B, L, D); the noise (B, C, h, w) and
        timesteps (B,) are drawn here unless given."""
        b = latents.shape[0]
        if noise is None:  # randn of the shape, not randn_like: the same noise whatever the memory format
            noise = offset_noise(torch.randn(latents.shape, device=latents.device), self.offset_noise)
        if t is None:
            t = sample_timesteps(b, self.scheduler_config["num_train_timesteps"], device=latents.device)
        ab = self.alpha_bar[t]  # (B,)
        x_t = add_noise(latents, noise, ab)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        model_output = self.unet(x_t, t, encoder_hidden_states=cond).sample
        weight = min_snr_weight(snr(ab), self.min_snr_gamma, self.prediction_type)
        return diffusion_loss(model_output, target(self.prediction_type, latents, noise, ab), weight)

    def training_condition(self, captions: Sequence[str], hidden: Tensor | None = None) -> Tensor:
        """Conditioning for training: each caption is replaced by the empty one with probability
        `diffusion.cfg_dropout` (classifier-free guidance training, Ho & Salimans 2022). The one place
        where caption dropout happens. ``hidden``: the captions' encodings when cached (B, L, D)."""
        drop = drop_mask(len(captions), self.cfg_dropout, self.device)
        if hidden is None:
            return self.condition(captions, drop)
        return torch.where(drop[:, None, None], self.empty_hidden().to(hidden.dtype), hidden)

    @staticmethod
    def cached_latents(batch: dict) -> Tensor:
        """A draw from the cached (already scaled) posterior: mean + std * eps, (B, C, h, w) float32."""
        mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
        return mean + std * torch.randn_like(mean)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if "latent_mean" in batch:  # cached latents and text encodings: no frozen encoder runs
            latents = self.cached_latents(batch)  # (B, C, h, w)
            if latents.shape[1:] != self.latent_shape:
                raise ValueError(f"cached latents are {tuple(latents.shape[1:])} but the U-Net takes "
                                 f"{self.latent_shape}: precompute them at the training resolution")  # fmt: skip
            cond = self.training_condition(batch["caption"], batch["text_hidden"].float())  # (B, L, D)
        else:
            latents = self.encode_images(batch["pixel_values"])  # (B, C, h, w)
            cond = self.training_condition(batch["caption"])  # (B, L, D)
        loss = self.diffusion_step(latents, cond)
        self.log("train/loss", loss, prog_bar=self.progress_bar, batch_size=latents.shape[0])
        return loss

    @torch.no_grad()
    def validation_loss(self, batch: dict, generator: torch.Generator) -> Tensor:
        """The training loss on a held-out image batch with every draw fixed (`ldm.callbacks.val_loss`): posterior
        samples and noise from ``generator`` (CPU), timesteps evenly spaced over the schedule, no caption dropout."""
        latents = self.encode_images(batch["pixel_values"], generator)  # (B, C, h, w)
        b, num_t = latents.shape[0], self.scheduler_config["num_train_timesteps"]
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        t = torch.linspace(0, num_t - 1, b).round().long().to(latents.device)  # (B,)
        return self.diffusion_step(latents, self.condition(batch["caption"]), noise=noise, t=t)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # EMA right after the update: a checkpoint saved at this step's end (callbacks run before the
        # module's on_train_batch_end) then holds the EMA of this step too, so resumed runs match. A step
        # whose gradients were dropped (non-finite loss) updated nothing, and neither does the EMA; nor does a
        # step a fused optimizer skipped on the device (`step_skipped`, set by NonFiniteLoss): no host sync.
        if self.ema is None:
            return
        # Under FSDP the EMA (whole on every rank) is updated from the gathered full weights (all ranks).
        skipped = self.step_skipped
        if skipped is None and all(p.grad is None for p in self.unet.parameters()):
            return  # gradients dropped: the step was skipped on the host
        with full_params(self.unet):
            self.ema.update(self.unet, keep=None if skipped is None else 1 - skipped)  # skipped: not counted

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer, because with fp16 such an
        # optimizer unscales the gradients itself. Under bf16 and fp32 nothing is scaled: clip here.
        if not gradient_clip_val or "16-mixed" == str(self.trainer.precision):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        elif isinstance(self.unet, FSDP):  # sharded (ldm/lightning/fsdp.py): the norm over all ranks' shards
            self.unet.clip_grad_norm_(gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_optimizers(self):
        return configure_optimizers(self.unet.parameters(), self.optimizer_factory, self.lr_scheduler_factory)

    # --- frozen parts stay out of checkpoints -------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if not self.checkpoint_frozen:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        if any(k.startswith(FROZEN_PREFIXES) for k in state):  # saved with checkpoint_frozen: load them too
            self.build_frozen()
        # Frozen weights come from their source, not from the checkpoint: put the loaded ones back.
        for key, value in self.state_dict().items():
            if key.startswith(FROZEN_PREFIXES) and key not in state:
                state[key] = value

    # --- sampling ----------------------------------------------------------------------------
    def sampling_unet(self, use_ema: bool = True) -> UNet2DConditionModel:
        if use_ema and self.ema is not None:
            return self.ema.module
        if isinstance(self.unet, FSDP):  # its forward is a collective: rank 0 sampling alone would wait forever
            raise RuntimeError("sampling with the raw U-Net is not possible while it is sharded by FSDP: sample "
                               "with the EMA (model.ema_decay), which every rank holds whole")  # fmt: skip
        return self.unet

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seed: int | Sequence[int] = 0,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        sampler: str | None = None,
        use_ema: bool = True,
        negative_prompt: str | Sequence[str] | None = None,
        init_image: Tensor | None = None,
        strength: float = 0.75,
    ) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] for ``prompts``; the same seed gives the same images.

        ``seed`` is one seed for the batch (as StableDiffusionPipeline's generator), or one per prompt,
        which makes each image independent of how prompts are batched or split across ranks.
        ``negative_prompt`` (one for all, or one per prompt; default `sampling.negative_prompt`): what the
        unconditional half of classifier-free guidance encodes instead of the empty caption.
        ``init_image`` (1 or B, 3, H, W) in [-1, 1]: img2img, as StableDiffusionImg2ImgPipeline: the image's
        latents, noised to the last ``strength`` of the sampler's steps, are denoised from there."""
        opts = self.sampling
        unet = self.sampling_unet(use_ema)
        was_training = unet.training
        unet.eval()
        scheduler = make_scheduler(sampler or opts["sampler"], self.scheduler_config)
        if isinstance(seed, int):
            generator = torch.Generator("cpu").manual_seed(seed)
        else:
            generator = [torch.Generator("cpu").manual_seed(int(s)) for s in seed]
        cond = self.encode_captions(prompts)
        negative_prompt = opts.get("negative_prompt") if negative_prompt is None else negative_prompt
        if negative_prompt is None:
            uncond = self.empty_hidden()  # (1, L, D)
        else:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt: {len(negatives)} negative prompts for {len(prompts)} prompts")
            uncond = self.encode_captions(negatives)  # (B, L, D)
        init_latents = None if init_image is None else self.encode_init_image(init_image, len(prompts), generator)
        latents = sample_latents(
            unet,
            scheduler,
            cond,
            uncond,
            guidance_scale=opts["guidance_scale"] if guidance_scale is None else guidance_scale,
            num_inference_steps=num_inference_steps or opts["num_inference_steps"],
            latent_shape=self.latent_shape,
            generator=generator,
            init_latents=init_latents,
            strength=strength,
        )
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
