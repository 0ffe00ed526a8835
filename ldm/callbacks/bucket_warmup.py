"""Tries the largest bucket first: one forward and backward at the largest batch the data can make, right after
the first training step, so that a run that does not fit in memory fails at once, not hours later when that
bucket first comes up (and, with model.compile, its graph is compiled up front).

    Trainer(callbacks=[LargestBucketWarmup()])     # conf/callbacks/bucket_warmup.yaml

After the first step of a fit (the optimizer's state exists by then, so the memory is what a later step at that
bucket needs): random pixels (or, on cached latents, random latents) of the largest bucket's size, as many as a
batch holds, go through the stage's own encode, U-Net, loss and backward, under the trainer's precision. The
gradients of the real step are put back and the RNG states restored: the run trains exactly as without it
(tests/test_bucket_callbacks.py). Nothing without buckets, or with a single bucket (every step is that size).
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch

from ldm.models.vae import downsample_factor

log = logging.getLogger(__name__)


class LargestBucketWarmup(pl.Callback):
    def __init__(self):
        self.done = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.done:
            return
        self.done = True
        datamodule = trainer.datamodule
        buckets = getattr(datamodule, "bucket_sizes", None) or []
        if len(buckets) < 2:
            return
        width, height = max(buckets, key=lambda size: size[0] * size[1])
        samples = datamodule.batch_size * (2 if getattr(datamodule, "dreambooth", None) is not None else 1)
        params = [p for p in pl_module.parameters() if p.requires_grad]
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), trainer.precision_plugin.train_step_context():
            cond = {k: v.expand(samples, *v.shape[1:]) for k, v in pl_module.empty_condition().items()}  # (B, ...)
            if getattr(datamodule, "cached_encodings", False):
                factor = datamodule.factor
                latents = torch.randn(samples, pl_module.unet.config.in_channels, height // factor, width // factor,
                                      device=pl_module.device)  # fmt: skip
            else:
                pixels = torch.randint(0, 256, (samples, 3, height, width), dtype=torch.uint8, device=pl_module.device)
                latents = pl_module.encode_images(pixels)  # (B, C, H/f, W/f)
                factor = downsample_factor(pl_module.vae)
            size = torch.tensor([[height, width]], device=pl_module.device).expand(samples, 2)
            geometry = {"original_size": size, "crop_top_left": torch.zeros_like(size), "target_size": size}
            cond.update(pl_module.added_conditions(geometry, latents))  # SDXL's time ids
            loss = pl_module.diffusion_step(latents, cond)
        loss.backward()
        for p, grad in zip(params, grads):
            p.grad = grad
        peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30 if devices else None
        if trainer.is_global_zero:
            log.info(f"largest bucket {width}x{height} (latents {height // factor}x{width // factor}) tried with a "
                     f"batch of {samples}: it fits" + (f", peak memory {peak:.1f} GiB" if peak is not None else ""))  # fmt: skip
