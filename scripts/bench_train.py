"""Training throughput through the real `ldm.train` (LightningModule, Trainer, data modules), against a
diffusers-example-style step measured in the same call.

`--model sd15` (the default): a random SD-1.5-shaped U-Net, VAE and CLIP-L-shaped text encoder saved in diffusers /
transformers format, synthetic JPEG shards and their cached latents. `--model cifar`: the small-model regime,
the CIFAR-scale U-Net (`model/unet=cifar`, 37 M parameters) on 8x8x4 latents of 32 px images from an f=4 VAE,
captions of ten classes (what `make cifar10` shards hold; the text encodings are cached, `model.text_cache_size`).
`--model shapes`: the built-in default's stage 2 exactly as `make train` runs it (`experiment=shapes`, fp32, eager,
its 1.1 M-parameter U-Net at batch 32), on freshly rendered shapes with untrained stage-0/1 exports; reported in
steps/s too. Models, shards and latents are built once under --work/<model>.

Each run is `python -m ldm.train` with cached latents or on-the-fly encoding (bf16, torch.compile, fused AdamW,
EMA on; `--compile-mode reduce-overhead` adds CUDA graphs), timed by the StepTimer callback after warm-up, plus
the baseline. Prints one line per run: img/s, step time, peak memory, MFU (U-Net forward+backward FLOPs per image,
torch's FLOP counter, over the GPU's dense bf16 peak; fp32 runs count against the same peak), and the ratio to
the baseline.

    python scripts/bench_train.py --resolution 512 256 --batch-size 32 128      # one GPU
    python scripts/bench_train.py --model cifar --batch-size 256 --runs baseline cached onthefly --steps 100 --warmup 30
    python scripts/bench_train.py --model shapes --runs eager --steps 200 --warmup 30
    python scripts/bench_train.py --resolution 32 --batch-size 2 --steps 2 --warmup 1 --tiny   # a CPU smoke run
    python scripts/bench_train.py --resolution 512 --batch-size 32 --devices 2 --runs cached   # DDP scaling

The baseline is what diffusers' examples/text_to_image/train_text_to_image.py does per step with
--mixed_precision bf16: VAE and CLIP in bf16 every step, fp32 U-Net under bf16 autocast, eager, foreach
AdamW, gradient clipping; it is fed GPU-resident batches (no data loading), so its figure is an upper bound
and the ratio a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, sample_size=512,
                scaling_factor=0.18215)  # fmt: skip
CLIP_L = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
TINY_VAE = dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=32)
TINY_CLIP = dict(hidden_size=32, num_layers=1, num_heads=2)
TINY_UNET = ["model.unet.block_out_channels=[32,32,32,32]", "+model.unet.norm_num_groups=8",
             "model.unet.attention_head_dim=2", "model.unet.cross_attention_dim=32", "model.unet.layers_per_block=1"]  # fmt: skip
CIFAR_VAE = dict(block_out_channels=[64, 128, 128], layers_per_block=2, norm_num_groups=32, sample_size=32)  # f=4
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TINY_CIFAR_UNET = ["model.unet.block_out_channels=[32,32,32]", "model.unet.norm_num_groups=8",
                   "model.unet.attention_head_dim=2", "model.unet.cross_attention_dim=32", "model.unet.layers_per_block=1"]  # fmt: skip
UNET_CONFIG = {"sd15": "sd15", "cifar": "cifar", "shapes": "shapes"}  # conf/model/unet/<this>.yaml
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, SXM


def setup(work: Path, model: str, resolutions: list[int], images: int, tiny: bool) -> None:
    """Models, image shards and latent shards under `work` (kept between calls)."""
    if model == "shapes":
        return setup_shapes(work, images)
    from ldm.data.latents import precompute_latents
    from ldm.data.synthetic import synthetic_shards
    from ldm.models.text_encoders import hf_clip_text_encoder, save_random_hf_clip
    from ldm.models.vae import build_vae, load_vae

    models = work / "models"
    if not (models / "vae" / "config.json").exists():
        if model == "cifar":  # f=4: 8x8 latents of 32 px images
            vae_config = {**(TINY_VAE if tiny else CIFAR_VAE), "sample_size": resolutions[0]}
            vae_config["block_out_channels"] = vae_config["block_out_channels"][:3]
        else:
            vae_config = TINY_VAE if tiny else SD15_VAE
        build_vae(**vae_config).save_pretrained(models / "vae")
    if not (models / "clip" / "text_encoder" / "config.json").exists():
        save_random_hf_clip(models / "clip", **(TINY_CLIP if tiny else CLIP_L))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for r in resolutions:
        shards = class_shards(work, r, images) if model == "cifar" else synthetic_shards(work, r, images)
        if not (work / f"latents{r}" / "latents.json").exists():
            t0 = time.perf_counter()
            vae = load_vae(str(models / "vae"), subfolder=None).to(device)
            text_encoder = hf_clip_text_encoder(str(models / "clip")).to(device)
            precompute_latents(shards, work / f"latents{r}", vae, text_encoder, resolution=r, batch_size=256 if model == "cifar" else 32,
                               samples_per_shard=max(1, images // 32), num_workers=8, progress=False)  # fmt: skip
            print(f"# precomputed {images} latents at {r} px in {time.perf_counter() - t0:.1f} s", flush=True)


def class_shards(work: Path, resolution: int, n: int) -> Path:
    """n photo-like JPEGs at `resolution` with CIFAR-10's class captions in turn, under work/classes<resolution>."""
    import numpy as np

    from ldm.data.format import read_manifest
    from ldm.data.shards import write_shards
    from ldm.data.synthetic import photo_like

    out = work / f"classes{resolution}"
    if read_manifest(out) is None or read_manifest(out)["total"] != n:
        rng = np.random.default_rng(resolution)
        samples = ((f"{i:07d}", photo_like(rng, resolution, resolution), f"a photo of a {CIFAR_CLASSES[i % 10]}")
                   for i in range(n))  # fmt: skip
        write_shards(samples, out, samples_per_shard=max(1, n // 32), image_format="jpg", quality=90, total=n)
    return out


def setup_shapes(work: Path, images: int) -> None:
    """The default's data (rendered shapes) and untrained stage-0 CLIP and stage-1 VAE exports of its configs."""
    from hydra.utils import instantiate

    from ldm.data.shapes import write_shapes_dataset
    from ldm.models.clip import save_open_clip_dir

    if not (work / "shapes" / "train" / "manifest.json").exists():
        write_shapes_dataset(work / "shapes", n_train=images, n_val=max(64, images // 20))
    if not (work / "models" / "clip-shapes" / "open_clip_config.json").exists():
        save_open_clip_dir(*instantiate(compose(["experiment=shapes_clip"]).model.clip, _convert_="all"), work / "models" / "clip-shapes")
    if not (work / "models" / "vae-shapes" / "config.json").exists():
        instantiate(compose(["experiment=shapes_vae"]).model.vae, _convert_="all").save_pretrained(work / "models" / "vae-shapes")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def unet_flops(model: str, resolution: int, tiny: bool) -> float:
    """Forward + backward FLOPs of the U-Net per image (torch.utils.flop_counter), batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.models.unet import build_unet

    device = "cuda" if torch.cuda.is_available() else "cpu"  # on CUDA the flash-attention FLOPs are counted too
    unet = build_unet(**unet_config(model, resolution, tiny)).to(device)
    size = unet.config.sample_size
    x = torch.randn(1, 4, size, size, device=device)
    tokens = 16 if model == "shapes" else 77  # the text tower's context: the shapes CLIP's 16, CLIP's 77
    cond = torch.randn(1, tokens, unet.config.cross_attention_dim, device=device)
    with FlopCounterMode(display=False) as counter, torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
        unet(x, torch.tensor([500], device=device), encoder_hidden_states=cond).sample.float().square().mean().backward()
    del unet, x, cond
    if device == "cuda":  # give the memory back: the timed runs are other processes on the same GPU
        torch.cuda.empty_cache()
    return counter.get_total_flops()


def unet_overrides(model: str, resolution: int, tiny: bool) -> list[str]:
    if model == "shapes":
        return []  # experiment=shapes picks its U-Net
    tiny_unet = TINY_CIFAR_UNET if model == "cifar" else TINY_UNET
    return [f"model/unet={UNET_CONFIG[model]}", f"model.unet.sample_size={resolution // (4 if model == 'cifar' else 8)}",
            *(tiny_unet if tiny else [])]  # fmt: skip


def unet_config(model: str, resolution: int, tiny: bool) -> dict:
    from omegaconf import OmegaConf

    experiment = ["experiment=shapes"] if model == "shapes" else []
    cfg = compose([*experiment, *unet_overrides(model, resolution, tiny)])
    config = OmegaConf.to_container(cfg.model.unet, resolve=True)
    config.pop("_target_")
    return config


def ldm_train(work: Path, model: str, resolution: int, batch: int, mode: str, steps: int, warmup: int, workers: int,
              devices: int, tiny: bool, compile_: bool | str, extra: list[str], log_dir: str | None = None,
              strategy: str = "ddp") -> dict:  # fmt: skip
    """One timed run of `python -m ldm.train`; returns StepTimer's JSON."""
    out = work / "results" / f"{model}-{mode}{resolution}-b{batch}-d{devices}-{int(time.time())}.json"
    gpu = torch.cuda.is_available()
    if model == "shapes":  # the default's stage 2 as `make train` runs it: its precision, loader, callbacks' cadence
        overrides = ["experiment=shapes", f"paths.data_dir={work}", f"paths.models_dir={work}/models",
                     f"data.batch_size={batch}", "data.samples_per_epoch=100000000"]  # fmt: skip
    else:
        images = f"{work}/{'classes' if model == 'cifar' else 'photos'}{resolution}"
        data = (["data=latents", f"data.train_shards={work}/latents{resolution}"] if mode == "cached"
                else ["data=shards", f"data.train_shards={images}", f"data.resolution={resolution}"])  # fmt: skip
        compile_value = (f"{{mode:{compile_},dynamic:false}}" if isinstance(compile_, str) else str(compile_))
        overrides = [
            *data, f"data.batch_size={batch}", f"data.num_workers={workers}", "data.samples_per_epoch=100000000",
            "data.val_shards=null", *unet_overrides(model, resolution, tiny),
            f"model.vae.path={work}/models/vae", "model.vae.subfolder=null", f"model.text_encoder.path={work}/models/clip",
            f"model.compile={compile_value}", "+trainer.benchmark=true",  # cuDNN picks its fastest conv algorithms (+3 %)
            f"trainer.precision={'bf16-mixed' if gpu else '32-true'}", "model.text_cache_size=64",
        ]  # fmt: skip
    if model != "shapes":  # make train shows one; a shown progress bar reads the loss back every step
        overrides.append("trainer.enable_progress_bar=false")
    overrides += [
        f"trainer.devices={devices}",
        f"trainer.max_steps={warmup + steps}", "trainer.enable_model_summary=false", "+trainer.enable_checkpointing=false",
        "trainer.log_every_n_steps=1000000", "logger=none", "~callbacks.fid", "~callbacks.sample_grid", "~callbacks.export",
        "~callbacks.checkpoint", "~callbacks.data_health", "~callbacks.val_loss",
        "+callbacks.timer._target_=ldm.callbacks.throughput.StepTimer", f"+callbacks.timer.warmup={warmup}",
        f"+callbacks.timer.out={out}", f"hydra.run.dir={work}/runs/{out.stem}", f"name=bench-{model}-{mode}{resolution}",
        *([f"+trainer/strategy={strategy}"] if devices > 1 else []), *extra,
    ]  # fmt: skip
    log = (Path(log_dir) if log_dir else out.parent) / f"{out.stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:  # streamed, so a run cut off by a time limit still shows how far it got
        code = subprocess.run([sys.executable, "-m", "ldm.train", *overrides], cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT).returncode  # fmt: skip
    if code != 0 or not out.exists():
        tail = "\n".join(log.read_text().splitlines()[-25:])
        return {"error": f"exit {code}:\n{tail}"}
    print(f"# {out.stem}: {time.perf_counter() - t0:.0f} s in all (start-up, compilation, warm-up, timed steps)")
    return json.loads(out.read_text())


def baseline(work: Path, model: str, resolution: int, batch: int, steps: int, warmup: int, tiny: bool) -> dict:
    """The diffusers example script's step (see the module docstring), on GPU-resident batches."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from ldm.models.text_encoders import hf_clip_text_encoder
    from ldm.models.unet import build_unet
    from ldm.models.vae import load_vae

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    vae = load_vae(str(work / "models" / "vae"), subfolder=None).to(device, dtype)
    text = hf_clip_text_encoder(str(work / "models" / "clip"))
    text_model, tokenizer = text.text_encoder.to(device, dtype), text.tokenizer
    unet = build_unet(**unet_config(model, resolution, tiny)).to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pixels = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    ids = tokenizer([f"a photo of a {CIFAR_CLASSES[i % 10]}" if model == "cifar" else f"synthetic photo {i}"
                     for i in range(batch)], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)  # fmt: skip

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            latents = vae.encode(pixels.to(dtype)).latent_dist.sample() * vae.config.scaling_factor
            hidden = text_model(ids, return_dict=False)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (batch,), device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            pred = unet(noisy, t, hidden, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - t0
    return {"images_per_sec": batch * steps / elapsed, "step_seconds": elapsed / steps, "steps": steps,
            "batch_size": batch, "world_size": 1,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}  # fmt: skip


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def line(name: str, r: dict, flops: float, peak: float | None, base: float | None) -> str:
    if "error" in r:
        return f"{name:<34} FAILED {r['error']}"
    ips = r["images_per_sec"]
    mem = f"{r['peak_memory_gib']:5.1f} GiB" if r.get("peak_memory_gib") is not None else "   - GiB"
    per_gpu = ips / r["world_size"]
    mfu = f"{per_gpu * flops / (peak * 1e12):5.1%}" if peak else "  -  "
    ratio = f"{ips / base:5.2f}x" if base else "  -  "
    return (f"{name:<34} {ips:8.1f} img/s ({per_gpu:7.1f}/GPU)  {1000 * r['step_seconds']:7.1f} ms/step "
            f"({1 / r['step_seconds']:6.1f} steps/s)  batch "
            f"{r['batch_size']:>3}x{r['world_size']}  peak {mem}  MFU {mfu}  vs baseline {ratio}")  # fmt: skip


DEFAULTS = {"sd15": ([512, 256], [32, 128]), "cifar": ([32], [256]), "shapes": ([32], [32])}  # resolutions, batches


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", choices=sorted(DEFAULTS),
                        help="sd15: SD-1.5-shaped; cifar: the CIFAR-scale U-Net on 8x8 latents; shapes: the default's stage 2")
    parser.add_argument("--resolution", type=int, nargs="+", default=None, help="default: 512 256 (sd15), 32 (others)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=None,
                        help="one per resolution (default: 32 128 for sd15, 256 for cifar, 32 for shapes)")
    parser.add_argument("--baseline-batch-size", type=int, nargs="+", default=None,
                        help="one per resolution (default: as --batch-size)")
    parser.add_argument("--runs", nargs="+", default=None, choices=["cached", "onthefly", "baseline", "eager"],
                        help="default: cached onthefly baseline (shapes: eager, as make train runs it)")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode of the compiled runs, e.g. reduce-overhead (CUDA graphs); default: the default mode")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--workers", type=int, default=8, help="dataloader workers per GPU")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"],
                        help="with --devices > 1: conf/trainer/strategy/<this>.yaml (fsdp runs eager: --runs eager)")
    parser.add_argument("--images", type=int, default=None,
                        help="synthetic images per resolution (default: 1024; cifar 16384; shapes 20000 as make train)")
    parser.add_argument("--work", default="data/bench_train", help="models, shards, results (kept; <work>/<model> "
                        "for cifar and shapes)")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke test of the script)")
    parser.add_argument("--extra", nargs="*", default=[], help="more ldm.train overrides for our runs")
    parser.add_argument("--log-dir", default=None, help="where each run's log is streamed (default: --work/results)")
    parser.add_argument("--baseline-only", nargs=3, type=int, metavar=("RES", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    resolutions = args.resolution or DEFAULTS[args.model][0]
    batches = args.batch_size or DEFAULTS[args.model][1]
    runs = args.runs or (["eager"] if args.model == "shapes" else ["cached", "onthefly", "baseline"])
    images = args.images or {"sd15": 1024, "cifar": 16384, "shapes": 20000}[args.model]
    work = Path(args.work).resolve() / ("" if args.model == "sd15" else args.model)

    if args.baseline_only:  # the child process of a baseline run
        r, b, s = args.baseline_only
        print(json.dumps(baseline(work, args.model, r, b, s, args.warmup, args.tiny)))
        return

    setup(work, args.model, resolutions, images, args.tiny)
    peak = peak_tflops()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"# {device}, torch {torch.__version__}, peak bf16 {peak} TFLOP/s; model {args.model}; steps {args.steps} "
          f"after {args.warmup} warm-up; {args.workers} workers/GPU", flush=True)  # fmt: skip
    base_batches = args.baseline_batch_size or batches
    for resolution, batch, base_batch in zip(resolutions, batches, base_batches):
        flops = unet_flops(args.model, resolution, args.tiny)
        print(f"# {resolution} px: U-Net forward+backward {flops / 1e9:.3f} GFLOP/image", flush=True)
        base = None
        if "baseline" in runs:
            if args.model == "shapes":
                raise SystemExit("--model shapes has no baseline run: its figure is steps/s against the issue's goal")
            proc = subprocess.run([sys.executable, __file__, "--work", args.work, "--model", args.model,
                                   "--warmup", str(min(args.warmup, 5)), *(["--tiny"] if args.tiny else []),
                                   "--baseline-only", str(resolution), str(base_batch), str(args.steps)],
                                  capture_output=True, text=True, cwd=ROOT)  # fmt: skip
            result = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                      else {"error": proc.stderr[-2000:]})  # fmt: skip
            base = result.get("images_per_sec")
            print(line(f"{resolution}px diffusers-style baseline", result, flops, peak, base), flush=True)
        for mode in [m for m in runs if m != "baseline"]:
            data_mode = "cached" if mode == "eager" else mode
            compile_ = mode != "eager" and torch.cuda.is_available() and (args.compile_mode or True)
            result = ldm_train(work, args.model, resolution, batch, data_mode, args.steps, args.warmup, args.workers,
                               args.devices, args.tiny, compile_, args.extra, args.log_dir, args.strategy)  # fmt: skip
            name = {"cached": "ldm cached latents", "onthefly": "ldm on-the-fly encode", "eager": "ldm cached, eager"}[mode]
            if args.model == "shapes":
                name = "ldm experiment=shapes (make train)"
            elif compile_ and args.compile_mode:
                name += f", {args.compile_mode}"
            print(line(f"{resolution}px {name}", result, flops, peak, base), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
