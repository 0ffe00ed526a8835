"""Training throughput through the real `ldm.train` (LightningModule, Trainer, data modules), against a
diffusers-example-style step measured in the same call.

`--model sd15` (the default): a random SD-1.5-shaped U-Net, VAE and CLIP-L-shaped text encoder saved in diffusers /
transformers format, synthetic JPEG shards and their cached latents. `--model cifar`: the small-model regime,
the CIFAR-scale U-Net (`model/unet=cifar`, 37 M parameters) on 8x8x4 latents of 32 px images from an f=4 VAE,
captions of ten classes (what `make cifar10` shards hold; the text encodings are cached, `model.text_cache_size`).
`--model shapes`: the built-in default's stage 2 exactly as `make train` runs it (`experiment=shapes`, fp32, eager,
its 1.1 M-parameter U-Net at batch 32), on freshly rendered shapes with untrained stage-0/1 exports; reported in
steps/s too (`--compile-mode reduce-overhead`: the same stage with CUDA graphs). `--model sdxl` (issue 20): a
random SDXL-base-shaped model in the StableDiffusionXLPipeline layout
(`ldm.models.sdxl.save_random_sdxl`: the 2.567 B-parameter U-Net, CLIP-L and OpenCLIP-bigG-shaped text encoders, an
SD-shaped VAE with scaling 0.13025; about 14 GB of fp32 weights written once), 1024 px by default at batch 4, our
runs `model=sdxl` on latents cached with both encoders' states, bigG's pooled embedding and each image's size and
crop; its baseline is train_text_to_image_sdxl.py's step, which trains on precomputed latents and embeddings too.
Models, shards and latents are built once under --work/<model> (sd15: --work itself).

Each run is `python -m ldm.train` with cached latents or on-the-fly encoding (bf16, torch.compile, fused AdamW,
EMA on; `--compile-mode reduce-overhead` adds CUDA graphs), timed by the StepTimer callback after warm-up, plus
the baseline. Prints one line per run: img/s, step time, peak memory, MFU (U-Net forward+backward FLOPs per image,
torch's FLOP counter, over the GPU's dense bf16 peak; fp32 runs count against the same peak), and the ratio to
the baseline.

LoRA (`--runs lora-cached lora-onthefly lora-baseline`): `python -m ldm.train ... model/adapter=lora` at each of
`--lora-ranks` (alpha = rank, q/k/v/out of every attention) on the same random SD-1.5-shaped base, against a step in
the style of diffusers' examples/text_to_image/train_text_to_image_lora.py: the U-Net, VAE and CLIP frozen in bf16,
fp32 LoRA of rank `--lora-baseline-rank` on to_q/to_k/to_v/to_out.0 (peft, gaussian init), bf16 autocast, eager,
foreach AdamW, clipping; `lora-baseline` encodes images and captions every step as that script does,
`lora-baseline-cached` is its bare U-Net step on cached inputs. MFU counts the adapted U-Net's FLOPs (no weight
gradients for the frozen base).

    python scripts/bench_train.py --resolution 512 256 --batch-size 32 128      # one GPU
    python scripts/bench_train.py --model cifar --batch-size 256 --runs baseline cached onthefly --steps 100 --warmup 30
    python scripts/bench_train.py --model shapes --runs eager --steps 200 --warmup 30
    python scripts/bench_train.py --model shapes --runs eager --steps 300 --warmup 50 --compile-mode reduce-overhead
    python scripts/bench_train.py --resolution 32 --batch-size 2 --steps 2 --warmup 1 --tiny   # a CPU smoke run
    python scripts/bench_train.py --resolution 512 --batch-size 32 --devices 2 --runs cached   # DDP scaling
    python scripts/bench_train.py --resolution 512 --batch-size 16 --lora-ranks 4 16 64 \
        --runs lora-baseline-cached lora-cached                                            # LoRA, cached latents
    python scripts/bench_train.py --resolution 32 --batch-size 2 --steps 2 --warmup 1 --tiny --lora-ranks 2 \
        --runs lora-baseline lora-baseline-cached lora-cached lora-onthefly                # LoRA CPU smoke run
    python scripts/bench_train.py --resolution 512 --batch-size 32 --runs onthefly bucketed cached bucketed-cached
    python scripts/bench_train.py --model sdxl --runs baseline cached --steps 10 --warmup 5   # SDXL, 1024 px, batch 4
    python scripts/bench_train.py --model sdxl --batch-size 1 --runs lora-cached --lora-ranks 16 --steps 10 --warmup 5 \
        --extra model.gradient_checkpointing=true              # SDXL LoRA, batch 1: the 24 GiB consumer-GPU case
    python scripts/bench_train.py --model sdxl --tiny --resolution 64 --batch-size 2 --steps 2 --warmup 1 \
        --images 8 --workers 0 --runs baseline cached eager lora-cached --lora-ranks 2   # SDXL CPU smoke run

Bucketed runs (`bucketed`, `bucketed-cached`) train on a mixed-aspect set spread evenly over the aspect-ratio
buckets of resolution^2 pixels (data.buckets={max_aspect: 2.0, step: 64}; images 1/8 larger than their bucket),
one epoch long enough for the whole timed window (planned epochs are exact passes). Their buckets hold up to
resolution^2 pixels (a bit fewer off the square), so throughput is compared in pixels per second: each line
prints Mpx/s, and a bucketed line its ratio to the square run of the same kind (onthefly, cached) measured in
the same call. `recompiles` and `graph breaks` count torch.compile's recompilations and graph breaks in the run's
log (TORCH_LOGS=recompiles,graph_breaks): each is 0 in a run whose compiled step is whole and warm.

The baseline is what diffusers' examples/text_to_image/train_text_to_image.py does per step with
--mixed_precision bf16: VAE and CLIP in bf16 every step, fp32 U-Net under bf16 autocast, eager, foreach
AdamW, gradient clipping; it is fed GPU-resident batches (no data loading), so its figure is an upper bound
and the ratio a lower bound. For sdxl, train_text_to_image_sdxl.py's step on cached inputs (GPU-resident latents,
prompt embeddings (B, 77, 2048), pooled (B, 1280), add_time_ids (B, 6)); its LoRA baselines are
train_text_to_image_lora_sdxl.py's step (the VAE in bf16 on the fly, as that script runs it with a
--pretrained_vae_model_name_or_path; without one it keeps the VAE in fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from ldm.utils.cli import ArgumentParser, run_command

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


def bucket_spec(resolution: int) -> str:
    from ldm.data.synthetic import bucket_step

    return f"{{max_aspect:2.0,step:{bucket_step(resolution)}}}"


def mean_bucket_pixels(resolution: int) -> float:
    """Pixels per image of the mixed-aspect set: its images are spread evenly over the buckets."""
    from ldm.data.buckets import generate_buckets
    from ldm.data.synthetic import bucket_step

    buckets = generate_buckets(resolution * resolution, bucket_step(resolution), 2.0)
    return sum(w * h for w, h in buckets) / len(buckets)


def setup(work: Path, model: str, resolutions: list[int], images: int, tiny: bool, bucket_images: int = 0) -> None:
    """Models, image shards and latent shards under `work` (kept between calls); with `bucket_images`, also a
    mixed-aspect set of that many images and its bucketed latents."""
    if model == "shapes":
        return setup_shapes(work, images)
    from ldm.data.latents import precompute_latents
    from ldm.data.synthetic import bucket_step, synthetic_bucket_shards, synthetic_shards

    save_models(work / "models", model, resolutions[0], tiny)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch_size = {"cifar": 256, "sdxl": 8}.get(model, 32)  # VAE batch (sdxl: 1024 px images in fp32)
    for r in resolutions:
        shards = class_shards(work, r, images) if model == "cifar" else synthetic_shards(work, r, images)
        if not (work / f"latents{r}" / "latents.json").exists():
            t0 = time.perf_counter()
            precompute_latents(shards, work / f"latents{r}", *frozen_encoders(work, model, device), resolution=r,
                               batch_size=batch_size, samples_per_shard=max(1, images // 32), num_workers=8,
                               progress=False)  # fmt: skip
            print(f"# precomputed {images} latents at {r} px in {time.perf_counter() - t0:.1f} s", flush=True)
        if not bucket_images:
            continue
        mixed = synthetic_bucket_shards(work, r, bucket_images)
        meta = work / f"latents-mixed{r}" / "latents.json"
        if not meta.exists() or json.loads(meta.read_text()).get("source", {}).get("images") != bucket_images:
            t0 = time.perf_counter()
            precompute_latents(mixed, work / f"latents-mixed{r}", *frozen_encoders(work, model, device), resolution=r,
                               batch_size=batch_size, samples_per_shard=max(1, bucket_images // 32), num_workers=8,
                               progress=False, buckets={"max_aspect": 2.0, "step": bucket_step(r)},
                               source={"images": bucket_images})  # fmt: skip
            print(f"# precomputed {bucket_images} bucketed latents at {r} px in {time.perf_counter() - t0:.1f} s",
                  flush=True)  # fmt: skip


def save_models(models: Path, model: str, resolution: int, tiny: bool) -> None:
    """The random frozen parts under `models`, written once: sdxl a whole StableDiffusionXLPipeline directory
    (models/sdxl, written to a temporary folder and renamed, so a cut-off write is not taken for a model; full
    size: about 14 GB of fp32 weights, 10.3 GB of them the U-Net's; the time it took is printed), the others a VAE
    (models/vae) and a CLIP text encoder (models/clip)."""
    from ldm.models.sdxl import save_random_sdxl
    from ldm.models.text_encoders import save_random_hf_clip
    from ldm.models.vae import build_vae

    if model == "sdxl":
        if not (models / "sdxl").is_dir():
            t0 = time.perf_counter()
            partial = save_random_sdxl(models / "sdxl.partial", tiny=tiny,
                                       vae_block_out_channels=TINY_VAE["block_out_channels"])  # tiny: f=8 too
            partial.rename(models / "sdxl")
            print(f"# wrote a random SDXL-shaped model in {time.perf_counter() - t0:.1f} s", flush=True)
        return
    if not (models / "vae" / "config.json").exists():
        if model == "cifar":  # f=4: 8x8 latents of 32 px images
            vae_config = {**(TINY_VAE if tiny else CIFAR_VAE), "sample_size": resolution}
            vae_config["block_out_channels"] = vae_config["block_out_channels"][:3]
        else:
            vae_config = TINY_VAE if tiny else SD15_VAE
        build_vae(**vae_config).save_pretrained(models / "vae")
    if not (models / "clip" / "text_encoder" / "config.json").exists():
        save_random_hf_clip(models / "clip", **(TINY_CLIP if tiny else CLIP_L))


def frozen_encoders(work: Path, model: str, device: str, dtype: torch.dtype | None = None):
    """The frozen VAE and text encoder that `save_models` wrote (sdxl: SDXL's pair, `SDXLTextEncoders`), on
    `device` in `dtype` (None: as saved, fp32)."""
    from ldm.models.sdxl import sdxl_text_encoders
    from ldm.models.text_encoders import hf_clip_text_encoder
    from ldm.models.vae import load_vae

    models = work / "models"
    if model == "sdxl":
        vae, text_encoder = load_vae(str(models / "sdxl")), sdxl_text_encoders(models / "sdxl")
    else:
        vae, text_encoder = load_vae(str(models / "vae"), subfolder=None), hf_clip_text_encoder(str(models / "clip"))
    return vae.to(device, dtype), text_encoder.to(device, dtype)


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


def unet_flops(model: str, resolution: int, tiny: bool, lora_rank: int | None = None) -> float:
    """Forward + backward FLOPs of the U-Net per image (torch.utils.flop_counter), batch 1; with ``lora_rank``, of
    the adapted U-Net whose frozen base gets no weight gradients. SDXL's U-Net gets its added conditions
    (`text_embeds` (1, 1280), `time_ids` (1, 6)) and 2048-wide text states. The U-Net is built on the meta device
    and given uninitialised memory (the count does not depend on the values; SDXL's random init would take a
    minute); on the meta device itself attention would run as plain matmuls, counted without the recomputation
    that flash attention's backward does."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.models.adapters import LoRA
    from ldm.models.sdxl import TIME_IDS
    from ldm.models.unet import build_unet

    device = "cuda" if torch.cuda.is_available() else "cpu"  # both count flash attention (CPU: its CPU kernel)
    config = unet_config(model, resolution, tiny)
    with torch.device("meta"):
        unet = build_unet(**config)
        if lora_rank:
            LoRA(rank=lora_rank, alpha=lora_rank).attach_unet(unet)
    unet = unet.to_empty(device=device)
    size = unet.config.sample_size
    x = torch.randn(1, 4, size, size, device=device)
    tokens = 16 if model == "shapes" else 77  # the text tower's context: the shapes CLIP's 16, CLIP's 77
    cond = torch.randn(1, tokens, unet.config.cross_attention_dim, device=device)
    added = None
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text embedding + micro-conditioning
        pooled = config["projection_class_embeddings_input_dim"] - TIME_IDS * config["addition_time_embed_dim"]
        added = {"text_embeds": torch.randn(1, pooled, device=device),
                 "time_ids": torch.randn(1, TIME_IDS, device=device)}
    with FlopCounterMode(display=False) as counter, torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
        out = unet(x, torch.tensor([500], device=device), encoder_hidden_states=cond, added_cond_kwargs=added).sample
        out.float().square().mean().backward()
    del unet, x, cond, added, out
    if device == "cuda":  # give the memory back: the timed runs are other processes on the same GPU
        torch.cuda.empty_cache()
    return counter.get_total_flops()


def unet_overrides(model: str, resolution: int, tiny: bool) -> list[str]:
    if model == "shapes":
        return []  # experiment=shapes picks its U-Net
    tiny_unet = TINY_CIFAR_UNET if model == "cifar" else TINY_UNET
    return [f"model/unet={UNET_CONFIG[model]}", f"model.unet.sample_size={resolution // (4 if model == 'cifar' else 8)}",
            *(tiny_unet if tiny else [])]  # fmt: skip


def model_overrides(work: Path, model: str, resolution: int, tiny: bool) -> list[str]:
    """ldm.train's model overrides for the models `save_models` wrote: sdxl the SDXL directory (`model=sdxl` reads
    U-Net, VAE and both text encoders from it), the others their U-Net config and the separate VAE and CLIP."""
    if model == "sdxl":
        return ["model=sdxl", f"model.unet.path={work}/models/sdxl"]
    return [*unet_overrides(model, resolution, tiny), f"model.vae.path={work}/models/vae", "model.vae.subfolder=null",
            f"model.text_encoder.path={work}/models/clip"]  # fmt: skip


def unet_config(model: str, resolution: int, tiny: bool) -> dict:
    """`UNet2DConditionModel`'s keyword arguments of the benchmarked U-Net (sdxl: the shape `save_models` wrote)."""
    from omegaconf import OmegaConf

    from ldm.models.sdxl import SDXL_UNET, TINY_SDXL_UNET

    if model == "sdxl":
        return {**(TINY_SDXL_UNET if tiny else SDXL_UNET), "sample_size": resolution // 8}
    experiment = ["experiment=shapes"] if model == "shapes" else []
    cfg = compose([*experiment, *unet_overrides(model, resolution, tiny)])
    config = OmegaConf.to_container(cfg.model.unet, resolve=True)
    config.pop("_target_")
    return config


def ldm_train(work: Path, model: str, resolution: int, batch: int, mode: str, steps: int, warmup: int, workers: int,
              devices: int, tiny: bool, compile_: bool | str, extra: list[str], log_dir: str | None = None,
              strategy: str = "ddp", lora_rank: int | None = None, exit_grace: float = 30.0) -> dict:  # fmt: skip
    """One timed run of `python -m ldm.train` (``lora_rank``: LoRA of that rank, alpha = rank); returns StepTimer's
    JSON. A run still alive ``exit_grace`` seconds after its timing was written is stopped (see
    `wait_or_stop_after_timing`)."""
    tag = f"{model}-{mode}{resolution}-b{batch}-d{devices}" + (f"-lora{lora_rank}" if lora_rank else "")
    out = work / "results" / f"{tag}-{int(time.time())}.json"
    lora = (["model/adapter=lora", f"model.adapter.rank={lora_rank}", f"model.adapter.alpha={lora_rank}"]
            if lora_rank else [])  # fmt: skip
    gpu = torch.cuda.is_available()
    if model == "shapes":  # the default's stage 2 as `make train` runs it: its precision, loader, callbacks' cadence
        overrides = ["experiment=shapes", f"paths.data_dir={work}", f"paths.models_dir={work}/models",
                     f"data.batch_size={batch}", "data.samples_per_epoch=100000000"]  # fmt: skip
        if isinstance(compile_, str):  # --compile-mode: the same stage compiled (CUDA graphs with reduce-overhead)
            overrides.append(f"model.compile={{mode:{compile_},dynamic:false}}")
    else:
        images = f"{work}/{'classes' if model == 'cifar' else 'photos'}{resolution}"
        data = {
            "cached": ["data=latents", f"data.train_shards={work}/latents{resolution}", "data.samples_per_epoch=100000000"],
            "onthefly": ["data=shards", f"data.train_shards={images}", f"data.resolution={resolution}",
                         "data.samples_per_epoch=100000000"],
            "bucketed-cached": ["data=latents", f"data.train_shards={work}/latents-mixed{resolution}"],
            "bucketed": ["data=shards", f"data.train_shards={work}/mixed{resolution}", f"data.resolution={resolution}",
                         f"data.buckets={bucket_spec(resolution)}"],
        }[mode]  # fmt: skip
        compile_value = (f"{{mode:{compile_},dynamic:false}}" if isinstance(compile_, str) else str(compile_))
        overrides = [
            *data, f"data.batch_size={batch}", f"data.num_workers={workers}",
            "data.val_shards=null", *model_overrides(work, model, resolution, tiny),
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
        *([f"+trainer/strategy={strategy}"] if devices > 1 else []), *lora, *extra,
    ]  # fmt: skip
    log = (Path(log_dir) if log_dir else out.parent) / f"{out.stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = {**os.environ, "TORCH_LOGS": os.environ.get("TORCH_LOGS", "recompiles,graph_breaks"),
           "LDM_EXIT_STACKS": os.environ.get("LDM_EXIT_STACKS", "10")}  # a slow exit's stacks in the run's log
    with open(log, "w") as f:  # streamed, so a run cut off by a time limit still shows how far it got
        proc = subprocess.Popen([sys.executable, "-m", "ldm.train", *overrides], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
        code = wait_or_stop_after_timing(proc, out, exit_grace, f)
    if code != 0 or not out.exists():
        tail = "\n".join(log.read_text().splitlines()[-25:])
        return {"error": f"exit {code}:\n{tail}"}
    print(f"# {out.stem}: {time.perf_counter() - t0:.0f} s in all (start-up, compilation, warm-up, timed steps)")
    result = json.loads(out.read_text())
    result.update(compile_events(log.read_text()))
    result["pixels_per_image"] = mean_bucket_pixels(resolution) if mode.startswith("bucketed") else resolution**2
    return result


def compile_events(log: str) -> dict[str, int]:
    """torch.compile's recompilations and graph breaks in a run's log, as TORCH_LOGS=recompiles,graph_breaks writes
    them: "Graph break in user code at f.py:12", or "Graph break (user stack suppressed due to duplicate graph break)
    in user code at ..." for a break met again. A break counts once per compilation that meets it."""
    lines = log.splitlines()
    graph_break = re.compile(r"Graph break( \(.*\))? in user code at")
    return {"recompiles": sum("Recompiling function" in line for line in lines),
            "graph_breaks": sum(graph_break.search(line) is not None for line in lines)}


def wait_or_stop_after_timing(proc: subprocess.Popen, timing: Path, grace: float, log) -> int:
    """Wait for a run's exit; once its timing file exists, at most ``grace`` seconds more. A run still alive then is
    stopped with its process group (loader workers included) and its exit code counts as 0, the timing being
    written; its log holds the LDM_EXIT_STACKS dumps of where it waited and a line saying how long it lingered.
    (Session 12 found the main thread joining loader workers, 5 s each: `ldm.data.workers` now stops them.)"""
    import signal

    written = None
    while (code := proc.poll()) is None:
        time.sleep(0.5)
        if written is None and timing.exists():
            written = time.monotonic()
        if written is not None and time.monotonic() - written >= grace:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.flush()
            print(f"# bench_train: still running {grace:.0f} s after its timing was written: stopped", file=log,
                  flush=True)  # fmt: skip
            return 0
    if written is not None:
        print(f"# bench_train: exited {time.monotonic() - written:.0f} s after its timing was written", file=log,
              flush=True)  # fmt: skip
    return code


def baseline_unet(work: Path, model: str, resolution: int, tiny: bool):
    """The baseline's fp32 U-Net: sdxl's loaded from the saved SDXL directory (as the SDXL examples load it; a
    2.567 B-parameter random init would take longer), the others built from their config."""
    from ldm.models.unet import build_unet, load_unet

    if model == "sdxl":
        return load_unet(str(work / "models" / "sdxl"))
    return build_unet(**unet_config(model, resolution, tiny))


def text_condition(text_encoder, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token ids -> the U-Net's text inputs as the examples compute them: CLIP's last hidden states; SDXL's pair
    both encoders' penultimate states (B, L, 2048) and bigG's pooled projection `text_embeds` (B, 1280)."""
    from ldm.models.sdxl import SDXLTextEncoders

    if isinstance(text_encoder, SDXLTextEncoders):
        return text_encoder.encode_ids(ids)
    return {"encoder_hidden_states": text_encoder(ids)}


def baseline(work: Path, model: str, resolution: int, batch: int, steps: int, warmup: int, tiny: bool,
             lora_rank: int | None = None, cached: bool = False) -> dict:  # fmt: skip
    """The diffusers example script's step (see the module docstring), on GPU-resident batches. ``lora_rank``:
    train_text_to_image_lora.py's step instead (frozen bf16 U-Net, fp32 LoRA); ``cached``: the bare U-Net step on
    GPU-resident latents and text states (no VAE, no CLIP). sdxl: train_text_to_image_sdxl.py's and
    train_text_to_image_lora_sdxl.py's, whose U-Net also takes bigG's pooled embedding and the micro-conditioning
    `time_ids` (original size, crop, target size: here the square image, uncropped)."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from ldm.models.sdxl import time_ids

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    vae, text = frozen_encoders(work, model, device, dtype)
    unet = baseline_unet(work, model, resolution, tiny)
    if lora_rank:  # as train_text_to_image_lora.py: the base frozen in the weight dtype, the adapters in fp32
        unet.requires_grad_(False)
        unet.to(device, dtype)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))  # fmt: skip
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    unet = unet.to(device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pixels = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    ids = text.tokenize([f"a photo of a {CIFAR_CLASSES[i % 10]}" if model == "cifar" else f"synthetic photo {i}"
                         for i in range(batch)]).to(device)  # fmt: skip
    size = torch.tensor([[resolution, resolution]], device=device).expand(batch, -1)
    add_time_ids = time_ids(size, torch.zeros_like(size), size)  # (B, 6), used by SDXL's U-Net only
    if cached:
        with torch.no_grad():
            cached_latents = vae.encode(pixels.to(dtype)).latent_dist.sample().float() * vae.config.scaling_factor
            cached_cond = {k: v.float() for k, v in text_condition(text, ids).items()}
        del vae, text
        if device == "cuda":
            torch.cuda.empty_cache()

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            if cached:
                latents, cond = cached_latents, cached_cond
            else:
                latents = vae.encode(pixels.to(dtype)).latent_dist.sample() * vae.config.scaling_factor
                cond = text_condition(text, ids)
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (batch,), device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            added = {"text_embeds": cond["text_embeds"], "time_ids": add_time_ids} if "text_embeds" in cond else None
            pred = unet(noisy, t, cond["encoder_hidden_states"], added_cond_kwargs=added, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_seconds = timed(step, device, steps, warmup)
    return {"images_per_sec": batch / step_seconds, "step_seconds": step_seconds, "steps": steps,
            "batch_size": batch, "world_size": 1,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None}  # fmt: skip


def timed(fn, device: str, steps: int, warmup: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls (synchronised at the window's two ends on a GPU, where the
    memory peaks are reset as the window opens)."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def line(name: str, r: dict, flops: float, peak: float | None, base: float | None, square: dict | None = None) -> str:
    if "error" in r:
        return f"{name:<44} FAILED {r['error']}"
    ips = r["images_per_sec"]
    mem = f"{r['peak_memory_gib']:5.1f} GiB" if r.get("peak_memory_gib") is not None else "   - GiB"
    if r.get("peak_reserved_gib") is not None:  # what the process holds (CUDA graphs' pools are reserved, not allocated)
        mem += f" (reserved {r['peak_reserved_gib']:.1f})"
    per_gpu = ips / r["world_size"]
    mfu = f"{per_gpu * flops / (peak * 1e12):5.1%}" if peak else "  -  "
    ratio = f"{ips / base:5.2f}x" if base else "  -  "
    text = (f"{name:<44} {ips:8.1f} img/s ({per_gpu:7.1f}/GPU)  {1000 * r['step_seconds']:7.1f} ms/step "
            f"({1 / r['step_seconds']:6.1f} steps/s)  batch "
            f"{r['batch_size']:>3}x{r['world_size']}  peak {mem}  MFU {mfu}  vs baseline {ratio}")  # fmt: skip
    if "pixels_per_image" in r:  # our runs: pixels per second, and a bucketed run against its square counterpart
        mpx = ips * r["pixels_per_image"] / 1e6
        text += f"  {mpx:8.2f} Mpx/s  recompiles {r['recompiles']}  graph breaks {r['graph_breaks']}"
        if r.get("allocator"):  # cudaMalloc/cudaFree calls and retries in the timed window: 0 once shapes are warm
            a = r["allocator"]
            text += f"  cudaMalloc/free/retries {a['num_device_alloc']}/{a['num_device_free']}/{a['num_alloc_retries']}"
        if square is not None and "error" not in square:
            text += f"  vs square {mpx / (square['images_per_sec'] * square['pixels_per_image'] / 1e6):6.3f}x (Mpx/s)"
    return text


LORA_RUNS = {"lora-cached": "cached", "lora-onthefly": "onthefly"}  # run -> data mode
BASELINES = ("baseline", "lora-baseline", "lora-baseline-cached")
NAMES = {"cached": "ldm cached latents", "onthefly": "ldm on-the-fly encode", "eager": "ldm cached, eager",
         "bucketed": "ldm bucketed, on-the-fly", "bucketed-cached": "ldm bucketed, cached",
         "lora-cached": "ldm LoRA cached latents", "lora-onthefly": "ldm LoRA on-the-fly encode",
         "baseline": "diffusers-style baseline", "lora-baseline": "diffusers-style LoRA baseline",
         "lora-baseline-cached": "diffusers-style LoRA, cached inputs"}  # fmt: skip


def cached_baseline(name: str, model: str) -> bool:
    """Whether a baseline run trains on cached inputs: the *-cached ones, and sdxl's full fine-tune baseline
    (train_text_to_image_sdxl.py precomputes the VAE latents and text embeddings before training)."""
    return name.endswith("cached") or (model == "sdxl" and name == "baseline")


def run_baseline(work: Path, name: str, resolution: int, batch: int, args) -> dict:
    """One baseline in a fresh process (its own CUDA context and peak memory)."""
    lora = [] if name == "baseline" else ["--baseline-lora-rank", str(args.lora_baseline_rank)]
    proc = subprocess.run([sys.executable, __file__, "--work", args.work, "--model", args.model,
                           "--warmup", str(min(args.warmup, 5)),
                           *(["--tiny"] if args.tiny else []), *lora, *(["--baseline-cached"] if cached_baseline(name, args.model) else []),
                           "--baseline-only", str(resolution), str(batch), str(args.steps)],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-2000:]}


DEFAULTS = {"sd15": ([512, 256], [32, 128]), "cifar": ([32], [256]), "shapes": ([32], [32]),
            "sdxl": ([1024], [4])}  # resolutions, batches


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", choices=sorted(DEFAULTS),
                        help="sd15: SD-1.5-shaped; sdxl: SDXL-base-shaped (model=sdxl, 2.567 B-parameter U-Net, "
                        "both text encoders); cifar: the CIFAR-scale U-Net on 8x8 latents; shapes: the default's stage 2")
    parser.add_argument("--resolution", type=int, nargs="+", default=None,
                        help="default: 512 256 (sd15), 1024 (sdxl), 32 (others)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=None,
                        help="one per resolution (default: 32 128 for sd15, 4 for sdxl, 256 for cifar, 32 for shapes)")
    parser.add_argument("--baseline-batch-size", type=int, nargs="+", default=None,
                        help="one per resolution (default: as --batch-size)")
    parser.add_argument("--runs", nargs="+", default=None,
                        choices=["cached", "onthefly", "eager", "bucketed", "bucketed-cached", *LORA_RUNS, *BASELINES],
                        help="default: cached onthefly baseline (sdxl: baseline cached; shapes: eager, as make train runs it)")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode of the compiled runs, e.g. reduce-overhead (CUDA graphs); default: the default mode")
    parser.add_argument("--lora-ranks", type=int, nargs="+", default=[4, 16, 64], help="ranks of the lora-* runs")
    parser.add_argument("--lora-baseline-rank", type=int, default=4, help="the LoRA baselines' rank")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--workers", type=int, default=8, help="dataloader workers per GPU")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"],
                        help="with --devices > 1: conf/trainer/strategy/<this>.yaml (fsdp runs eager: --runs eager)")
    parser.add_argument("--images", type=int, default=None,
                        help="synthetic images per resolution (default: 1024; sdxl 128; cifar 16384; shapes 20000 as make train)")
    parser.add_argument("--work", default="data/bench_train", help="models, shards, results (kept; <work>/<model> "
                        "for the models other than sd15)")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke test of the script)")
    parser.add_argument("--extra", nargs="*", default=[], help="more ldm.train overrides for our runs")
    parser.add_argument("--log-dir", default=None, help="where each run's log is streamed (default: --work/results)")
    parser.add_argument("--exit-grace", type=float, default=30.0,
                        help="seconds a run may live on after writing its timing before it is stopped")
    parser.add_argument("--baseline-only", nargs=3, type=int, metavar=("RES", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--baseline-lora-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--baseline-cached", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    resolutions = args.resolution or DEFAULTS[args.model][0]
    batches = args.batch_size or DEFAULTS[args.model][1]
    runs = args.runs or {"shapes": ["eager"], "sdxl": ["baseline", "cached"]}.get(args.model, ["cached", "onthefly", "baseline"])
    images = args.images or {"sd15": 1024, "sdxl": 128, "cifar": 16384, "shapes": 20000}[args.model]
    work = Path(args.work).resolve() / ("" if args.model == "sd15" else args.model)

    if args.baseline_only:  # the child process of a baseline run
        r, b, s = args.baseline_only
        print(json.dumps(baseline(work, args.model, r, b, s, args.warmup, args.tiny, args.baseline_lora_rank,
                                  args.baseline_cached)))  # fmt: skip
        return

    bucketed = any(m.startswith("bucketed") for m in runs)
    # one exact epoch covers warm-up and timed steps of the largest batch (planned epochs are not resampled)
    bucket_images = (args.warmup + args.steps + 10) * max(batches) * args.devices if bucketed else 0
    setup(work, args.model, resolutions, images, args.tiny, bucket_images)
    peak = peak_tflops()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"# {device}, torch {torch.__version__}, peak bf16 {peak} TFLOP/s; model {args.model}; steps {args.steps} "
          f"after {args.warmup} warm-up; {args.workers} workers/GPU", flush=True)  # fmt: skip
    base_batches = args.baseline_batch_size or batches
    lora = any(r.startswith("lora") for r in runs)
    for resolution, batch, base_batch in zip(resolutions, batches, base_batches):
        flops = unet_flops(args.model, resolution, args.tiny)
        print(f"# {resolution} px: U-Net forward+backward {flops / 1e9:.3f} GFLOP/image", flush=True)
        lora_flops = ({r: unet_flops(args.model, resolution, args.tiny, r) for r in {*args.lora_ranks, args.lora_baseline_rank}}
                      if lora else {})  # fmt: skip
        for r, f in sorted(lora_flops.items()):
            print(f"# {resolution} px: rank-{r} LoRA U-Net forward+backward {f / 1e9:.3f} GFLOP/image", flush=True)
        bases = {}
        for name in [b for b in BASELINES if b in runs]:
            if args.model == "shapes":
                raise SystemExit("--model shapes has no baseline run: its figure is steps/s against the issue's goal")
            result = run_baseline(work, name, resolution, base_batch, args)
            bases[name] = result.get("images_per_sec")
            count = flops if name == "baseline" else lora_flops[args.lora_baseline_rank]
            label = NAMES[name] + ("" if name == "baseline" else f", rank {args.lora_baseline_rank}")
            label += ", cached inputs" if name == "baseline" and cached_baseline(name, args.model) else ""
            print(line(f"{resolution}px {label}", result, count, peak, bases[name]), flush=True)
        results = {}
        for mode in [m for m in runs if m in ("cached", "onthefly", "eager", "bucketed", "bucketed-cached")]:
            data_mode = "cached" if mode == "eager" else mode
            compile_ = mode != "eager" and torch.cuda.is_available() and (args.compile_mode or True)
            if args.model == "shapes":  # eager as make train runs it, unless --compile-mode asks
                compile_ = args.compile_mode if torch.cuda.is_available() else False
            result = results[mode] = ldm_train(work, args.model, resolution, batch, data_mode, args.steps, args.warmup,
                                               args.workers, args.devices, args.tiny, compile_, args.extra,
                                               args.log_dir, args.strategy, exit_grace=args.exit_grace)  # fmt: skip
            name = NAMES[mode]
            if args.model == "shapes":
                name = "ldm experiment=shapes (make train)" + (f", {compile_}" if compile_ else "")
            elif compile_ and args.compile_mode:
                name += f", {args.compile_mode}"
            square = {"bucketed": results.get("onthefly"), "bucketed-cached": results.get("cached")}.get(mode)
            print(line(f"{resolution}px {name}", result, flops, peak, bases.get("baseline"), square), flush=True)
        for mode in [m for m in runs if m in LORA_RUNS]:
            # cached runs against the baseline's bare step on cached inputs when measured; on the fly against the
            # baseline that encodes every step
            base = bases.get("lora-baseline-cached") if mode == "lora-cached" else None
            base = base or bases.get("lora-baseline")
            for rank in args.lora_ranks:
                compile_ = torch.cuda.is_available() and (args.compile_mode or True)
                result = ldm_train(work, args.model, resolution, batch, LORA_RUNS[mode], args.steps, args.warmup,
                                   args.workers, args.devices, args.tiny, compile_, args.extra,
                                   args.log_dir, args.strategy, lora_rank=rank, exit_grace=args.exit_grace)  # fmt: skip
                label = f"{resolution}px {NAMES[mode]}, rank {rank}" + (f", {compile_}" if isinstance(compile_, str) else "")
                print(line(label, result, lora_flops[rank], peak, base), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(run_command(main))
