"""The built-in dataset: one coloured shape on a plain grey background, with a caption.

Every caption names shape, colour, position and size ("a small red circle at the top
left"), so a text-conditioned model has to read all four to get the image right.

    python -m ldm.data.shapes --out data/shapes --n-train 2000 --n-val 100 --size 32

    >>> import random
    >>> from ldm.data.shapes import render
    >>> image, caption, attrs = render(random.Random(0), size=32)
    >>> image.size, attrs["shape"] in caption
    ((32, 32), True)
"""

import argparse
import json
import math
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

from ldm.data.format import read_manifest
from ldm.data.shards import write_shards

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 20),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "purple": (140, 40, 190),
    "white": (255, 255, 255),
    "black": (10, 10, 10),
}
# name -> (phrase, x centre, y centre) as fractions of the image side
POSITIONS = {
    "top left": ("at the top left", 0.27, 0.27),
    "top": ("at the top", 0.5, 0.27),
    "top right": ("at the top right", 0.73, 0.27),
    "left": ("on the left", 0.27, 0.5),
    "center": ("in the center", 0.5, 0.5),
    "right": ("on the right", 0.73, 0.5),
    "bottom left": ("at the bottom left", 0.27, 0.73),
    "bottom": ("at the bottom", 0.5, 0.73),
    "bottom right": ("at the bottom right", 0.73, 0.73),
}
# size name -> half-width of the shape as a fraction of the image side
SIZES = {"small": 0.11, "large": 0.19}  # margins keep every shape inside the image
TEMPLATES = (
    "a {size} {color} {shape} {position}",
    "a {size} {shape} in {color} {position}",
    "{position}, a {size} {color} {shape}",
    "a picture of a {size} {color} {shape} {position}",
)
LIGHT_BACKGROUNDS = range(190, 236)  # grey levels
DARK_BACKGROUNDS = range(35, 81)
SUPERSAMPLE = 4  # draw at 4x, box-downsample: anti-aliased edges


def caption_for(shape: str, color: str, position: str, size: str, template: int = 0) -> str:
    phrase = POSITIONS[position][0]
    return TEMPLATES[template].format(size=size, color=color, shape=shape, position=phrase)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape centred at (cx, cy) with half-width r (pixels)."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # pointing up, circumradius r * 1.15 so its area is close to the others'
        return [(cx + 1.15 * r * math.sin(a), cy - 1.15 * r * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if shape == "cross":  # a plus sign with arms one third of the width
        t = r / 3
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(rng: random.Random, size: int = 32) -> tuple[Image.Image, str, dict]:
    """Draw one random shape; return (RGB image of size x size, caption, attributes).

    attrs: shape, color, position, size, template (caption template index),
    background (grey level), center (x, y in pixels), radius (half-width in pixels).
    """
    shape = rng.choice(SHAPES)
    color = rng.choice(list(COLORS))
    position = rng.choice(list(POSITIONS))
    size_name = rng.choice(list(SIZES))
    template = rng.randrange(len(TEMPLATES))
    # white shapes only on dark grounds, black ones only on light grounds; others on either
    dark = {"white": True, "black": False}.get(color, rng.random() < 0.5)
    background = rng.choice(DARK_BACKGROUNDS if dark else LIGHT_BACKGROUNDS)
    # small jitter keeps the attribute unambiguous but the pixels varied
    _, fx, fy = POSITIONS[position]
    cx = (fx + rng.uniform(-0.02, 0.02)) * size
    cy = (fy + rng.uniform(-0.02, 0.02)) * size
    r = SIZES[size_name] * rng.uniform(0.92, 1.08) * size

    big = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), (background,) * 3)
    draw = ImageDraw.Draw(big)
    s = SUPERSAMPLE
    if shape == "circle":
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=COLORS[color])
    else:
        draw.polygon([(x * s, y * s) for x, y in _outline(shape, cx, cy, r)], fill=COLORS[color])
    image = big.reduce(SUPERSAMPLE)  # box filter average: (size, size)

    attrs = {
        "shape": shape,
        "color": color,
        "position": position,
        "size": size_name,
        "template": template,
        "background": background,
        "center": (cx, cy),
        "radius": r,
    }
    return image, caption_for(shape, color, position, size_name, template), attrs


def _samples(n: int, size: int, rng: random.Random):
    for index in range(n):
        image, caption, _ = render(rng, size)
        yield f"{index:09d}", image, caption


def write_shapes_dataset(
    out_dir,
    n_train: int = 20000,
    n_val: int = 1000,
    size: int = 32,
    seed: int = 0,
    samples_per_shard: int = 2000,
    workers: int = 1,
) -> dict[str, list[Path]]:
    """Write out_dir/train/NNNNNN.tar and out_dir/val/NNNNNN.tar (PNG); return their paths. `workers` processes
    encode and write shards at once (the images are drawn here, in order: the same data for any count)."""
    out_dir = Path(out_dir)
    paths = {}
    # val first: train/manifest.json (what `make` checks) then appears only once both are complete
    for split, n in (("val", n_val), ("train", n_train)):
        rng = random.Random(f"shapes-{seed}-{split}")  # independent, reproducible streams
        paths[split] = write_shards(_samples(n, size, rng), out_dir / split, samples_per_shard, image_format="png",
                                    workers=workers)
    params = {"n_train": n_train, "n_val": n_val, "size": size, "seed": seed}
    (out_dir / "shapes.json").write_text(json.dumps(params, indent=1))
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Render the built-in shapes dataset as WebDataset shards.")
    parser.add_argument("--out", default="data/shapes", help="output folder (gets train/ and val/)")
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-val", type=int, default=1000)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes encoding and writing shards at once (default: the cores, up to 8)")
    parser.add_argument("--samples-per-shard", type=int, default=2000)
    args = parser.parse_args(argv)

    out = Path(args.out)
    wanted = {"n_train": args.n_train, "n_val": args.n_val, "size": args.size, "seed": args.seed}
    params_file = out / "shapes.json"
    if read_manifest(out / "train") and read_manifest(out / "val") and params_file.exists():
        existing = json.loads(params_file.read_text())
        if existing == wanted:
            print(f"{out}: shapes dataset already exists ({existing}); skipping")
            return
        raise SystemExit(f"{out}: holds a shapes dataset made with {existing}, not {wanted}; delete it or pick another --out")
    write_shapes_dataset(out, args.n_train, args.n_val, args.size, args.seed, args.samples_per_shard, args.workers)
    print(f"{out}: wrote {args.n_train} train and {args.n_val} val images of {args.size}px")


if __name__ == "__main__":
    main()
