"""Image preprocessing: any PIL image -> (3, H, W) tensor, resized to cover its target size and cropped.

    >>> from PIL import Image
    >>> from ldm.data.transforms import ImageTransform
    >>> ImageTransform(64)(Image.new("RGBA", (120, 80))).shape  # transparent -> white; square 64 x 64
    torch.Size([3, 64, 64])
    >>> pixels, geometry, _ = ImageTransform(64, random_flip=False).apply(Image.new("RGB", (120, 80)), (96, 64))
    >>> pixels.shape, geometry
    (torch.Size([3, 64, 96]), {'original_size': (80, 120), 'crop_top_left': (0, 12), 'target_size': (64, 96)})

The geometry is what SDXL conditions on, each (height, width) as diffusers orders it: the image's size before any
resizing (after EXIF rotation), the top-left corner of the crop in the resized (and, when flipped, mirrored) image,
and the size trained at.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.data.buckets import Size, cover_scale

# Modes that carry 16-bit greyscale (PNG/TIFF); PIL's own convert("L") clips them at 255.
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class ImageTooSmall(ValueError):
    """An image smaller than its target size (it would have to be upscaled), with upscaling off."""


def to_rgb(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Convert a PIL image of any mode to RGB, honouring EXIF rotation.

    Transparency (RGBA, LA, P with a transparent index) is composited on `background`;
    16-bit greyscale is scaled to 8 bits instead of being clipped.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        # (H, W) uint16 range -> (H, W) uint8
        grey = np.asarray(image, dtype=np.float32) / 257.0
        image = Image.fromarray(grey.round().clip(0, 255).astype(np.uint8), "L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def resized_size(size: Size, target: Size) -> Size:
    """(w, h) of an image of `size` resized to cover `target`: the side that binds gets its target exactly, the
    other is truncated as torchvision's Resize truncates (so a square target is Resize(R) exactly)."""
    (w, h), (tw, th) = size, target
    if tw / w >= th / h:
        return tw, max(th, int(h * tw / w))
    return max(tw, int(w * th / h)), th


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image (RGB or L) -> (C, H, W) uint8."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.reshape(*array.shape[:2], -1).copy()).permute(2, 0, 1).contiguous()


class ImageTransform:
    """PIL image -> (3, H, W) in [-1, 1] (or uint8 in [0, 255] with `uint8=True`) at the target size.

    Resized (bilinear, antialiased, aspect ratio kept) to cover the target: (resolution, resolution) unless a
    (width, height) is given per call. Then an optional random horizontal flip, then a centre or random crop.
    An image smaller than its target is upscaled (`upscale=True`) or refused with `ImageTooSmall` (the reader
    counts it as too small, not as bad). Random choices come from torch's global RNG, which the reader seeds per
    sample. `uint8=True` stops before the float conversion: a quarter of the bytes to collate, pass between
    processes and copy to the GPU; `to_model_range` finishes it on the device.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = True, upscale: bool = True,
                 uint8: bool = False):  # fmt: skip
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.upscale, self.uint8 = upscale, uint8

    def __call__(self, image: Image.Image, target: Size | None = None) -> torch.Tensor:
        return self.apply(image, target)[0]

    def apply(self, image: Image.Image, target: Size | None = None, mask: Image.Image | None = None,
              original_size: Size | None = None) -> tuple[torch.Tensor, dict, torch.Tensor | None]:  # fmt: skip
        """(pixels (3, H, W), geometry, mask (1, H, W) uint8 or None) for a target (width, height).

        `original_size` (w, h): the image's size before a reduced JPEG decode (`draft`), after EXIF rotation;
        the resize is computed from it, so the geometry does not depend on the decoder. `mask` (mode L, white =
        learn) gets the same resize, flip and crop; one of another size than the image is first resized to it."""
        target = target or (self.resolution, self.resolution)
        image = to_rgb(image)
        original = original_size or image.size
        if not self.upscale and cover_scale(original, target) > 1:
            raise ImageTooSmall(f"image {original[0]}x{original[1]} is smaller than {target[0]}x{target[1]}")
        size = resized_size(original, target)
        if mask is not None and mask.size != image.size:
            mask = mask.resize(image.size, Image.Resampling.BILINEAR)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
            mask = mask.resize(size, Image.Resampling.BILINEAR) if mask is not None else None
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mask is not None else None
        (w, h), (tw, th) = size, target
        if self.center_crop:  # torchvision's CenterCrop rounding
            top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        else:
            top, left = int(torch.randint(0, h - th + 1, ())), int(torch.randint(0, w - tw + 1, ()))
        box = (left, top, left + tw, top + th)
        pixels = to_tensor(image.crop(box))  # (3, H, W) uint8
        if not self.uint8:
            pixels = (pixels.float() / 255.0 - 0.5) / 0.5  # [-1, 1]
        geometry = {"original_size": (original[1], original[0]), "crop_top_left": (top, left),
                    "target_size": (th, tw)}  # fmt: skip
        return pixels, geometry, to_tensor(mask.crop(box)) if mask is not None else None

    def __repr__(self) -> str:
        return (f"ImageTransform(resolution={self.resolution}, center_crop={self.center_crop}, "
                f"random_flip={self.random_flip}, upscale={self.upscale}, uint8={self.uint8})")  # fmt: skip


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels as the data delivers them -> float in [-1, 1]: uint8 in [0, 255] is scaled (on whatever
    device it is now, usually the GPU), float is taken as already in [-1, 1]."""
    if pixels.dtype == torch.uint8:
        return pixels.float().div_(127.5).sub_(1.0)
    return pixels
