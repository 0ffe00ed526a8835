"""Generate images for prompts from a training checkpoint.

    python -m ldm.sample runs/shapes/.../checkpoints/last.ckpt --prompt "a large red circle in the center" \
        --seed 0 --steps 25 --guidance-scale 5 --out samples.png

    python -m ldm.sample CKPT --prompt "a photo of a cat" --negative-prompt "a photo of a dog"
    python -m ldm.sample CKPT --prompt "a photo of a ship" --init-image photo.png --strength 0.75   # img2img

Writes a captioned grid (`--out`) and, with `--out-dir`, one PNG per image. img2img gives the images
diffusers' StableDiffusionImg2ImgPipeline gives on the export (`ldm.export`) for the same seed; the init image
is resized to the model's resolution first (diffusers' VaeImageProcessor, as the pipeline preprocesses).
A mistake (no such checkpoint, a damaged or untrusted one) is one line, `error: ...`, exit code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ldm.run.schema import GUIDANCE_INTERVAL, KEYS, SAMPLERS, STRENGTH
from ldm.utils.cli import ArgumentParser, check_interval, existing_file, rule_type, run_command, silence_notices


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ldm.sample", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=existing_file, help="a .ckpt written by ldm.train")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    # numeric options: the rules of the config keys they stand for (a mistake is one line, before any import)
    p.add_argument("--seed", type=rule_type(KEYS["seed"]), default=0)
    p.add_argument("--steps", type=rule_type(KEYS["sampling.num_inference_steps"]), default=None,
                   help="sampler steps (default: the run's sampling config)")
    p.add_argument("--guidance-scale", type=rule_type(KEYS["sampling.guidance_scale"]), default=None)
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None)
    p.add_argument("--guidance-interval", nargs=2, metavar=("LOW", "HIGH"), default=None,
                   type=rule_type(GUIDANCE_INTERVAL.item),
                   help="guidance only at noise levels sigma in (LOW, HIGH] (default: the run's sampling config)")
    p.add_argument("--negative-prompt", default=None,
                   help="what guidance steers away from (default: the run's sampling.negative_prompt, or none)")
    p.add_argument("--init-image", type=existing_file, default=None,
                   help="img2img: start from this image (any size; resized)")
    p.add_argument("--strength", type=rule_type(STRENGTH), default=0.75,
                   help="img2img: how much of the sampler's schedule runs (0: the image back, 1: from noise)")
    p.add_argument("--no-ema", action="store_true", help="sample with the raw weights, not the EMA")
    p.add_argument("--out", default="samples.png", help="captioned grid PNG")
    p.add_argument("--out-dir", default=None, help="also write one PNG per image here")
    return p


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    check_interval(p, args.guidance_interval)
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    # imported only now: torch and the model libraries take 10-40 s to import, a mistaken argument is said before
    from ldm.stages.load import load_module
    from ldm.utils.images import captioned_grid, to_pil

    module = load_module(args.checkpoint)
    init_image = None
    if args.init_image:
        from diffusers.image_processor import VaeImageProcessor
        from PIL import Image

        r, factor = module.resolution, module.resolution // module.latent_shape[-1]
        with Image.open(args.init_image) as image:  # [-1, 1], (1, 3, r, r)
            init_image = VaeImageProcessor(vae_scale_factor=factor).preprocess(image.convert("RGB"), height=r, width=r)
    images = module.generate(
        args.prompt,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.steps,
        sampler=args.sampler,
        use_ema=not args.no_ema,
        negative_prompt=args.negative_prompt,
        init_image=init_image,
        strength=args.strength,
        guidance_interval=args.guidance_interval,
    )  # (B, 3, H, W) in [0, 1]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    captioned_grid(images, args.prompt).save(out)
    if args.out_dir:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(to_pil(images)):
            image.save(Path(args.out_dir) / f"{i:04d}.png")
    print(f"wrote {out}")
    return out


def cli() -> None:
    silence_notices()
    sys.exit(run_command(main))


if __name__ == "__main__":
    cli()
