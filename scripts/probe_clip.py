"""Which attributes of the built-in shapes can a CLIP tell apart? Zero-shot, per attribute, on held-out images.

For each rendered image and each attribute (colour, position, size, shape), the CLIP ranks the captions that
differ from the true one only in that attribute (same template, the other three attributes kept); a hit is the
true caption ranked first. Chance is one over the attribute's number of values.

    uv run python scripts/probe_clip.py data/models/clip-shapes --images 500

Prints one line per attribute (accuracy and chance) and a JSON line.
"""

from __future__ import annotations

import json
import random
import sys

import torch

from ldm.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, caption_for, render
from ldm.utils.cli import ArgumentParser, run_command

VALUES = {"color": list(COLORS), "position": list(POSITIONS), "size": list(SIZES), "shape": list(SHAPES)}


@torch.no_grad()
def attribute_accuracy(clip_dir: str, n_images: int, seed: int = 0) -> dict[str, float]:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    model.eval()
    rng = random.Random(f"probe-{seed}")  # not the training stream's seeds
    rendered = [render(rng, size=32) for _ in range(n_images)]
    images = torch.stack([preprocess(image) for image, _, _ in rendered])
    image_features = model.encode_image(images, normalize=True)  # (N, E)
    hits = {}
    for attribute, values in VALUES.items():
        captions = []  # N * len(values), image-major
        for _, _, attrs in rendered:
            keep = {k: attrs[k] for k in ("shape", "color", "position", "size")}
            captions += [caption_for(**{**keep, attribute: v}, template=attrs["template"]) for v in values]
        text_features = model.encode_text(tokenizer(captions), normalize=True).view(n_images, len(values), -1)
        scores = torch.einsum("ne,nve->nv", image_features, text_features)
        truth = torch.tensor([values.index(attrs[attribute]) for _, _, attrs in rendered])
        hits[attribute] = float((scores.argmax(1) == truth).float().mean())
    return hits


def main(argv=None) -> dict[str, float]:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("clip_dir", help="an open_clip directory (what stage 0 exports)")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    result = attribute_accuracy(args.clip_dir, args.images, args.seed)
    for k, v in result.items():
        print(f"{k:9s} {v:6.1%}   (chance {1 / len(VALUES[k]):.1%})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(run_command(main))
