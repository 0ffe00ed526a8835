"""Export a training checkpoint in the formats other tools load.

    python -m ldm.export runs/shapes/.../checkpoints/last.ckpt exported/                      # diffusers pipeline dir
    python -m ldm.export CKPT lora/ --format diffusers-lora        # pytorch_lora_weights.safetensors (LoRA runs)
    python -m ldm.export CKPT my_lora.safetensors --format kohya   # ComfyUI / Automatic1111 LoRA (LoRA runs)
    python -m ldm.export CKPT model.safetensors --format single-file --dtype float16   # original-layout checkpoint
                                                                   # (SD 1.x, 2.x or SDXL, as the model is)

A LoRA run's `pipeline` and `single-file` exports hold its adapters merged into the base.
    python -c "from diffusers import StableDiffusionPipeline as P; P.from_pretrained('exported')('a red circle')"

A mistake (no such checkpoint, a damaged or untrusted one) is one line, `error: ...`, exit code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ldm.run.schema import SAMPLERS
from ldm.utils.cli import ArgumentParser, existing_file, run_command, silence_notices

FORMATS = ("diffusers-lora", "kohya", "pipeline", "single-file")  # ldm.models.export.EXPORTS (a test compares)
DTYPES = ("bfloat16", "float16", "float32")


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ldm.export", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=existing_file, help="a .ckpt written by ldm.train")
    p.add_argument("out", help="the directory (pipeline, diffusers-lora) or .safetensors file (kohya, single-file)")
    p.add_argument("--format", choices=FORMATS, default="pipeline", help="what to write (default: pipeline)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="the pipeline's scheduler")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="kohya, single-file: cast the weights")
    return p


def main(argv=None) -> Path:
    args = parser().parse_args(argv)
    # imported only now: torch and the model libraries take 10-40 s to import, a mistaken argument is said before
    import torch

    from ldm.models.export import EXPORTS
    from ldm.stages.load import load_module

    module = load_module(args.checkpoint)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = EXPORTS[args.format](module, args.out, sampler=args.sampler, use_ema=not args.no_ema, dtype=dtype)
    print(f"wrote {out}")
    return out


def cli() -> None:
    silence_notices()
    sys.exit(run_command(main))


if __name__ == "__main__":
    cli()
