"""Export a training checkpoint in the formats other tools load.

    python -m ldm.export runs/shapes/.../checkpoints/last.ckpt exported/                      # diffusers pipeline dir
    python -m ldm.export CKPT lora/ --format diffusers-lora        # pytorch_lora_weights.safetensors (LoRA runs)
    python -m ldm.export CKPT my_lora.safetensors --format kohya   # ComfyUI / Automatic1111 LoRA (LoRA runs)
    python -m ldm.export CKPT model.safetensors --format single-file --dtype float16   # original-layout checkpoint

A LoRA run's `pipeline` and `single-file` exports hold its adapters merged into the base.
    python -c "from diffusers import StableDiffusionPipeline as P; P.from_pretrained('exported')('a red circle')"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ldm.diffusion import SCHEDULERS
from ldm.models.export import EXPORTS
from ldm.stages.load import load_module

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="python -m ldm.export", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a .ckpt written by ldm.train")
    p.add_argument("out", help="the directory (pipeline, diffusers-lora) or .safetensors file (kohya, single-file)")
    p.add_argument("--format", choices=sorted(EXPORTS), default="pipeline", help="what to write (default: pipeline)")
    p.add_argument("--sampler", choices=sorted(SCHEDULERS), default=None, help="the pipeline's scheduler")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="kohya, single-file: cast the weights")
    args = p.parse_args(argv)
    module = load_module(args.checkpoint)
    out = EXPORTS[args.format](module, args.out, sampler=args.sampler, use_ema=not args.no_ema,
                               dtype=DTYPES.get(args.dtype))  # fmt: skip
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
