"""Image helpers: tensors to PIL, and a captioned grid for sample sheets.

    grid = captioned_grid(images, prompts, columns=4)   # images: (B, 3, H, W) in [0, 1]
    grid.save("samples.png")
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) floats in [0, 1] -> RGB PIL images."""
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


def captioned_grid(
    images: torch.Tensor, captions: Sequence[str], columns: int = 4, cell: int = 128, caption_lines: int = 3
) -> Image.Image:
    """A grid of images, each upscaled (nearest) to ``cell`` px with its caption written under it."""
    pils = to_pil(images)
    rows = (len(pils) + columns - 1) // columns
    font = ImageFont.load_default()
    line_h, chars = 11, max(8, cell // 6)
    text_h = caption_lines * line_h + 4
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, caption) in enumerate(zip(pils, captions)):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        sheet.paste(img.resize((cell, cell), Image.NEAREST), (x, y))
        for j, line in enumerate(textwrap.wrap(caption, chars)[:caption_lines]):
            draw.text((x + 2, y + cell + 2 + j * line_h), line, fill="black", font=font)
    return sheet
