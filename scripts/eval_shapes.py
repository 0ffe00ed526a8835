"""Prompt following of a model trained on the built-in shapes: generate for random held-out captions
and read colour, position, size and shape back from the pixels (ldm.metrics.shape_following).

    uv run python scripts/eval_shapes.py runs/shapes/<run>/checkpoints/last.ckpt --prompts 64
    uv run python scripts/eval_shapes.py --ground-truth     # the reader on rendered images (its ceiling)
    uv run python scripts/eval_shapes.py --reconstruct data/models/vae-shapes   # through the VAE: its ceiling
    uv run python scripts/eval_shapes.py CKPT --sampler euler --steps 50 --guidance-scale 7.5   # sampling options

Prints one line per attribute: the fraction of images that show what the caption says, and chance, then the
shape's by size (small shapes are where an f=4 VAE loses it), then which shapes are read as which (rows: the
caption's, columns: read back).
"""

from __future__ import annotations

import json
import random
import sys

import numpy as np

from ldm.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, caption_for, render
from ldm.metrics.shape_following import agreement, agreement_by, read_attributes
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
    p.add_argument("--sampler", default=None, help="a sampler name (ldm.diffusion.SCHEDULERS); default: the run's")
    p.add_argument("--ground-truth", action="store_true", help="score rendered images instead of a model")
    p.add_argument("--reconstruct", metavar="VAE_DIR", help="score rendered images after a VAE's encode + decode")
    args = p.parse_args(argv)
    attrs = held_out_attrs(args.prompts, args.seed)
    if args.ground_truth or args.reconstruct:
        rng = random.Random(args.seed)
        rendered = [render(rng, 32) for _ in range(args.prompts)]
        images, attrs = [np.asarray(img) for img, _, _ in rendered], [a for _, _, a in rendered]
        if args.reconstruct:
            images = reconstruct(images, args.reconstruct)
    else:
        from ldm.stages.load import load_module

        module = load_module(args.checkpoint)
        prompts = [caption_for(a["shape"], a["color"], a["position"], a["size"], a["template"]) for a in attrs]
        images = []
        for i in range(0, len(prompts), 32):
            batch = module.generate(prompts[i:i + 32], seed=list(range(args.seed + i, args.seed + i + len(prompts[i:i + 32]))),
                                    guidance_scale=args.guidance_scale, num_inference_steps=args.steps,
                                    sampler=args.sampler)
            images += [(x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for x in batch]
    result = agreement(images, attrs)
    for k, v in result.items():
        print(f"{k:9s} {v:6.1%}   (chance {CHANCE[k]:.1%})")
    by_size = agreement_by(images, attrs, "size", "shape")
    print("shape by size: " + "  ".join(f"{k} {v:.1%} of {n}" for k, (v, n) in by_size.items()))
    read = [(read_attributes(image) or {}).get("shape", "none") for image in images]
    print("shape read as: " + " ".join(f"{s:>8s}" for s in (*SHAPES, "none")))
    for want in SHAPES:
        row = [sum(1 for r, a in zip(read, attrs) if a["shape"] == want and r == got) for got in (*SHAPES, "none")]
        print(f"{want:>13s}: " + " ".join(f"{n:8d}" for n in row))
    print(json.dumps(result))
    return result


def reconstruct(images: list[np.ndarray], vae_dir: str) -> list[np.ndarray]:
    """Images (H, W, 3) uint8 through a VAE's encoder (posterior mode) and decoder."""
    import torch

    from ldm.models.vae import load_vae

    vae = load_vae(vae_dir, subfolder=None)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W) in [-1, 1]
    with torch.no_grad():
        out = torch.cat([vae.decode(vae.encode(b).latent_dist.mode()).sample for b in x.split(64)])
    return list(((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


if __name__ == "__main__":
    sys.exit(run_command(main))
