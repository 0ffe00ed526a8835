"""Image preprocessing: any PIL image -> square float tensor in [-1, 1].

    >>> from PIL import Image
    >>> from ldm.data.transforms import ImageTransform
    >>> ImageTransform(64)(Image.new("RGBA", (120, 80))).shape  # transparent -> white
    torch.Size([3, 64, 64])
"""

import numpy as np
import torch
from PIL import Image, ImageOps

# Modes that carry 16-bit greyscale (PNG/TIFF); PIL's own convert("L") clips them at 255.
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
SMALL_IMAGE_POLICIES = ("upscale", "skip")


class ImageTooSmall(ValueError):
    """An image whose short side is below the training resolution, under `small_images="skip"`."""


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


class ImageTransform:
    """PIL image -> FloatTensor (3, resolution, resolution) in [-1, 1].

    Shorter side resized to `resolution` (bilinear, antialiased), then a centre or
    random square crop, then an optional random horizontal flip. An image whose shorter
    side is below `resolution` is upscaled (`small_images="upscale"`) or refused with
    `ImageTooSmall` (`"skip"`; the reader counts it as too small, not as bad).
    `uint8=True` stops before the float conversion: (3, R, R) uint8, a quarter of the bytes to
    collate, pass between processes and copy to the GPU; `to_model_range` finishes it on the device.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = True,
                 small_images: str = "upscale", uint8: bool = False):  # fmt: skip
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if small_images not in SMALL_IMAGE_POLICIES:
            raise ValueError(f"small_images must be one of {SMALL_IMAGE_POLICIES}, got {small_images!r}")
        self.small_images = small_images
        # imported here: torchvision takes seconds to import and shard writing needs only to_rgb
        from torchvision.transforms import v2

        self.resolution = resolution
        crop = v2.CenterCrop(resolution) if center_crop else v2.RandomCrop(resolution)
        flip = [v2.RandomHorizontalFlip(p=0.5)] if random_flip else []
        self.pipeline = v2.Compose(
            [
                v2.Resize(resolution, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
                crop,
                *flip,
                v2.PILToTensor(),  # (3, R, R) uint8
                *([] if uint8 else [
                    v2.ToDtype(torch.float32, scale=True),  # [0, 1]
                    v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),  # [-1, 1]
                ]),
                v2.ToPureTensor(),
            ]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.small_images == "skip" and min(image.size) < self.resolution:
            raise ImageTooSmall(f"image {image.size[0]}x{image.size[1]} is smaller than {self.resolution}")
        return self.pipeline(to_rgb(image))

    def __repr__(self) -> str:
        return f"ImageTransform({self.pipeline})"


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels as the data delivers them -> float in [-1, 1]: uint8 in [0, 255] is scaled (on whatever
    device it is now, usually the GPU), float is taken as already in [-1, 1]."""
    if pixels.dtype == torch.uint8:
        return pixels.float().div_(127.5).sub_(1.0)
    return pixels
