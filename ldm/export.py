"""Export a training checkpoint as a diffusers `StableDiffusionPipeline` directory (safetensors).

    python -m ldm.export runs/shapes/.../checkpoints/last.ckpt exported/
    python -c "from diffusers import StableDiffusionPipeline as P; P.from_pretrained('exported')('a red circle')"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.diffusion import SCHEDULERS
from ldm.models.export import export_pipeline
from ldm.stages.load import load_module


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="python -m ldm.export", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a .ckpt written by ldm.train")
    p.add_argument("out_dir", help="the pipeline directory to write")
    p.add_argument("--sampler", choices=sorted(SCHEDULERS), default=None, help="the pipeline's scheduler")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    args = p.parse_args(argv)
    out = export_pipeline(load_module(args.checkpoint), args.out_dir, sampler=args.sampler, use_ema=not args.no_ema)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
