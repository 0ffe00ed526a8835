"""At the end of fit, write what a stage trained in the format its users load: a diffusers pipeline (latent
diffusion), a `save_pretrained` VAE with its measured scaling factor, an open_clip directory (CLIP).

    Trainer(callbacks=[ExportPipeline("runs/x/pipeline")])   # conf/callbacks/export_pipeline.yaml
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from ldm.models.export import export_diffusers_lora, export_kohya, export_pipeline


class ExportPipeline(pl.Callback):
    """At the end of fit, write a diffusers `StableDiffusionPipeline` directory (EMA weights when on; a LoRA run's
    adapters merged into its base, as trained: under bf16 the base is the bf16 one, `python -m ldm.export` merges
    into the base reloaded from its source), and for a LoRA run its adapters in `lora_dir`: diffusers'
    `pytorch_lora_weights.safetensors` and a kohya `<run name>.safetensors`."""

    def __init__(self, out_dir: str, lora_dir: str | None = None):
        self.out_dir = out_dir
        self.lora_dir = lora_dir

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module):
        export_pipeline(pl_module, self.out_dir)
        rank_zero_info(f"exported diffusers pipeline -> {self.out_dir}")
        if self.lora_dir and getattr(pl_module, "adapter", None) is not None:
            export_diffusers_lora(pl_module, self.lora_dir)
            path = export_kohya(pl_module, self.lora_dir, steps=trainer.global_step)
            rank_zero_info(f"exported LoRA (diffusers, kohya) -> {self.lora_dir}/ ({path.name})")


class ExportVAE(pl.Callback):
    """At the end of fit, save the VAE with `save_pretrained` and its measured latent scaling factor."""

    def __init__(self, out_dir: str, max_batches: int = 20):
        self.out_dir = out_dir
        self.max_batches = max_batches

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module):
        pl_module.export(self.out_dir, trainer.datamodule.train_dataloader(), self.max_batches)
        rank_zero_info(f"exported VAE (scaling_factor={pl_module.vae.config.scaling_factor:.4f}) -> {self.out_dir}")


class ExportOpenCLIP(pl.Callback):
    """At the end of fit, write the CLIP as an open_clip directory (`open_clip_config.json` + safetensors)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module):
        pl_module.export(self.out_dir)
        rank_zero_info(f"exported open_clip model -> {self.out_dir} (open_clip: 'local-dir:{self.out_dir}')")
