"""CLIP score via torchmetrics' `CLIPScore`: max(100 * mean cos(image, text), 0) (Hessel et al. 2021, w = 100).

    clip = make_clip_score("models/clip-vit-large-patch14")   # a local HF CLIPModel + CLIPProcessor directory
    clip = make_clip_score("data/models/clip-shapes")         # or an open_clip directory (open_clip_config.json)
    clip.update(images_uint8, captions)                       # (N, 3, H, W) uint8, N captions
    clip.compute()                                            # summed over DDP ranks by torchmetrics

torchmetrics resolves only hub names itself; a local directory (the offline case) is loaded here and handed
over as a loader, so nothing is downloaded. An open_clip model is wrapped to look like a HF CLIP to
torchmetrics: open_clip's own image preprocessing and tokenizer, `encode_image` / `encode_text` embeddings.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from torchmetrics.multimodal.clip_score import CLIPScore

from ldm.models.clip import is_open_clip_dir, load_open_clip_dir


def _embedding(output) -> Tensor:
    # transformers >= 5 returns a BaseModelOutputWithPooling (projected embeddings in pooler_output) where
    # transformers 4, which torchmetrics 1.9 expects, returned the tensor itself
    return output if isinstance(output, Tensor) else output.pooler_output


class CLIPFeatures(nn.Module):
    """A CLIPModel whose `get_image_features` / `get_text_features` return the projected embeddings (N, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> Tensor:
        return _embedding(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> Tensor:
        return _embedding(self.model.get_text_features(*args, **kwargs))


class OpenCLIPFeatures(nn.Module):
    """An open_clip model behind the two calls torchmetrics makes: projected embeddings (N, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = SimpleNamespace()  # torchmetrics reads config.text_config only when it exists

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model.encode_text(input_ids)  # causal tower pooled at end-of-text: padding is never seen


class OpenCLIPProcessor:
    """open_clip's preprocessing transform and tokenizer behind the `CLIPProcessor` call torchmetrics makes.

    Images already at the model's input size (``image_size``, (H, W)), the common case of in-training scores, go
    through the transform as one batch on ``model``'s device: its resize and crop leave them as they are, as they
    do the per-image PIL path, so the pixels are the same (10,000 PIL conversions took ~2 s a FID-10k evaluation
    on the H200 machine). Other sizes take open_clip's PIL path, image by image."""

    def __init__(self, preprocess, tokenizer, image_size: tuple[int, int] | None = None, model: nn.Module | None = None):
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.model = model

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True) -> dict[str, Tensor]:
        from torchvision.transforms.functional import to_pil_image

        if images is not None:
            if self.image_size is not None and all(tuple(im.shape[-2:]) == self.image_size for im in images):
                device = next(self.model.parameters()).device if self.model is not None else None
                batch = torch.stack(list(images)).to(device)  # (N, 3, H, W) uint8
                return {"pixel_values": self.preprocess(batch.float().div(255))}  # what ToTensor makes of each
            return {"pixel_values": torch.stack([self.preprocess(to_pil_image(image)) for image in images])}
        ids = self.tokenizer(list(text))
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def make_clip_score(model_name_or_path: str | Path) -> CLIPScore:
    """CLIPScore over an open_clip directory (open_clip_config.json), else a HF CLIP directory or hub id."""
    path = str(model_name_or_path)
    if is_open_clip_dir(path):
        def load():
            model, preprocess, tokenizer = load_open_clip_dir(path)
            size = model.visual.image_size
            size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
            return (OpenCLIPFeatures(model.requires_grad_(False)),
                    OpenCLIPProcessor(preprocess, tokenizer, image_size=size, model=model))
    else:  # a HF CLIP directory, or a hub id where the network allows
        def load():
            from transformers import CLIPModel, CLIPProcessor

            model = CLIPModel.from_pretrained(path).eval().requires_grad_(False)
            return CLIPFeatures(model), CLIPProcessor.from_pretrained(path)
    return CLIPScore(model_name_or_path=load)
