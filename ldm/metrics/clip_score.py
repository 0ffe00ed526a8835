"""CLIP score via torchmetrics' `CLIPScore`: max(100 * mean cos(image, text), 0) (Hessel et al. 2021, w = 100).

    clip = make_clip_score("models/clip-vit-large-patch14")   # a local HF CLIPModel + CLIPProcessor directory
    clip.update(images_uint8, captions)                       # (N, 3, H, W) uint8, N captions
    clip.compute()                                            # summed over DDP ranks by torchmetrics

torchmetrics resolves only hub names itself; a local directory (the offline case) is loaded here with
`from_pretrained` and handed over as a loader, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn
from torchmetrics.multimodal.clip_score import CLIPScore


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


def make_clip_score(model_name_or_path: str | Path) -> CLIPScore:
    from transformers import CLIPModel, CLIPProcessor

    path = str(model_name_or_path)

    def load():
        return CLIPFeatures(CLIPModel.from_pretrained(path).eval()), CLIPProcessor.from_pretrained(path)

    return CLIPScore(model_name_or_path=load)
