"""Does an image of the built-in shapes data show what its caption says? A measurement, not a model.

Each image is read back into (colour, position, size, shape): the background is the median border
colour, the shape is every pixel far from it; colour is the nearest palette colour to the shape's core
pixels, position the nearest of the 9 anchors to its centroid, size from its half-extent, shape from
its fill ratio and vertical balance (nearest centre among features measured on rendered ground truth).

    python scripts/eval_shapes.py runs/shapes/<run>/checkpoints/last.ckpt --prompts 64
"""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np

from ldm.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, render

ATTRIBUTES = ("color", "position", "size", "shape")


def _features(image: np.ndarray) -> dict | None:
    """image: (H, W, 3) uint8. None when no shape stands out from the background."""
    img = image.astype(np.float32)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = np.median(border, axis=0)
    dist = np.linalg.norm(img - background, axis=-1)  # (H, W)
    if dist.max() < 40:
        return None
    mask = dist > 0.5 * dist.max()
    core = dist > 0.8 * dist.max()
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return {
        "rgb": img[core].mean(axis=0),
        "centroid": ((xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h),
        "half_extent": max(x1 - x0, y1 - y0) / (2 * max(w, h)),
        "shape": np.array([mask.sum() / ((x1 - x0) * (y1 - y0)), (ys.mean() + 0.5 - (y0 + y1) / 2) / (y1 - y0)]),
    }


@lru_cache(maxsize=4)
def _shape_centres(size: int) -> dict[str, np.ndarray]:
    """Mean shape features of each shape over rendered ground truth at this size."""
    rng, feats = random.Random(1234), {s: [] for s in SHAPES}
    for _ in range(400):
        image, _, attrs = render(rng, size)
        f = _features(np.asarray(image))
        if f is not None:
            feats[attrs["shape"]].append(f["shape"])
    return {s: np.mean(v, axis=0) for s, v in feats.items()}


def read_attributes(image: np.ndarray) -> dict[str, str] | None:
    """The (colour, position, size, shape) an image shows, or None if it shows no shape."""
    f = _features(image)
    if f is None:
        return None
    nearest = lambda table, x: min(table, key=lambda k: float(np.sum((np.asarray(table[k]) - x) ** 2)))
    positions = {k: (fx, fy) for k, (_, fx, fy) in POSITIONS.items()}
    threshold = (SIZES["small"] + SIZES["large"]) / 2
    return {
        "color": nearest({k: np.array(v, np.float32) for k, v in COLORS.items()}, f["rgb"]),
        "position": nearest(positions, np.array(f["centroid"])),
        "size": "large" if f["half_extent"] > threshold else "small",
        "shape": nearest(_shape_centres(image.shape[0]), f["shape"]),
    }


def agreement(images: list[np.ndarray], attrs: list[dict]) -> dict[str, float]:
    """Fraction of images whose read-back attribute equals the caption's, per attribute and all four."""
    hits = {a: 0 for a in ATTRIBUTES}
    hits["all"] = 0
    for image, want in zip(images, attrs):
        got = read_attributes(image) or {}
        ok = [got.get(a) == want[a] for a in ATTRIBUTES]
        for a, o in zip(ATTRIBUTES, ok):
            hits[a] += o
        hits["all"] += all(ok)
    return {k: v / max(len(images), 1) for k, v in hits.items()}


def agreement_by(images: list[np.ndarray], attrs: list[dict], group: str = "size",
                 attribute: str = "shape") -> dict[str, tuple[float, int]]:
    """Per value of the caption's `group` (e.g. small / large): the fraction of its images whose read-back
    `attribute` equals the caption's, and how many images it holds. Where a model falls short by group, against
    the same breakdown of a VAE's reconstructions (`eval_shapes.py --reconstruct`), says which stage limits it."""
    hits: dict[str, list[int]] = {}
    for image, want in zip(images, attrs):
        h = hits.setdefault(want[group], [0, 0])
        h[0] += (read_attributes(image) or {}).get(attribute) == want[attribute]
        h[1] += 1
    return {k: (right / n, n) for k, (right, n) in sorted(hits.items())}
