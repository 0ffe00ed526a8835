"""ldm: a latent-diffusion training pipeline for text-to-image models."""

__version__ = "0.1.0"
