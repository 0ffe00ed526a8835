"""Prompt following of a model trained on the built-in shapes: generate for random held-out captions
and read colour, position, size and shape back from the pixels (ldm.metrics.shape_following).

    uv run python scripts/eval_shapes.py runs/shapes/<run>/checkpoints/last.ckpt --prompts 64
    uv run python scripts/eval_shapes.py --ground-truth     # the reader on rendered images (its ceiling)

Prints one line per attribute: the fraction of images that show what the caption says, and chance.
"""

from __future__ import annotations

import json
import random
import sys

import numpy as np

from ldm.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, caption_for, render
from ldm.metrics.shape_following import agreement
from ldm.utils.cli import ArgumentParser, run_command

CHANCE = {"color": 1 / len(COLORS), "position": 1 / len(POSITIONS), "size": 1 / len(SIZES),
          "shape": 1 / len(SHAPES)}
CHANCE["all"] = float(np.prod(list(CHANCE.values())))


def held_out_attrs(n: int, seed: int) -> list[dict]:
    rng = random.Random(f"held-out-{seed}")  # not the training stream's seeds
    return [{"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "position": rng.choice(list(POSITIONS)),
             "size": rng.choice(list(SIZES)), "template": rng.randrange(4)} for _ in range(n)]


def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--ground-truth", action="store_true", help="score rendered images instead of a model")
    args = p.parse_args(argv)
    attrs = held_out_attrs(args.prompts, args.seed)
    if args.ground_truth:
        rng = random.Random(args.seed)
        rendered = [render(rng, 32) for _ in range(args.prompts)]
        images, attrs = [np.asarray(img) for img, _, _ in rendered], [a for _, _, a in rendered]
    else:
        from ldm.stages.load import load_module

        module = load_module(args.checkpoint)
        prompts = [caption_for(a["shape"], a["color"], a["position"], a["size"], a["template"]) for a in attrs]
        images = []
        for i in range(0, len(prompts), 32):
            batch = module.generate(prompts[i:i + 32], seed=list(range(args.seed + i, args.seed + i + len(prompts[i:i + 32]))),
                                    guidance_scale=args.guidance_scale, num_inference_steps=args.steps)
            images += [(x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for x in batch]
    result = agreement(images, attrs)
    for k, v in result.items():
        print(f"{k:9s} {v:6.1%}   (chance {CHANCE[k]:.1%})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(run_command(main))
