"""Export a training checkpoint as a diffusers `StableDiffusionPipeline` directory (safetensors).

    python -m ldm.export runs/shapes/.../checkpoints/last.ckpt exported/
    python -c "from diffusers import StableDiffusionPipeline as P; P.from_pretrained('exported')('a red circle')"

A mistake (no such checkpoint, a damaged or untrusted one) is one line, `error: ...`, exit code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ldm.run.schema import SAMPLERS
from ldm.utils.cli import ArgumentParser, existing_file, run_command, silence_notices


def main(argv=None) -> Path:
    p = ArgumentParser(prog="python -m ldm.export", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=existing_file, help="a .ckpt written by ldm.train")
    p.add_argument("out_dir", help="the pipeline directory to write")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="the pipeline's scheduler")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    args = p.parse_args(argv)
    # imported only now: torch and the model libraries take 10-40 s to import, a mistaken argument is said before
    from ldm.models.export import export_pipeline
    from ldm.stages.load import load_module

    out = export_pipeline(load_module(args.checkpoint), args.out_dir, sampler=args.sampler, use_ema=not args.no_ema)
    print(f"wrote {out}")
    return out


def cli() -> None:
    silence_notices()
    sys.exit(run_command(main))


if __name__ == "__main__":
    cli()
