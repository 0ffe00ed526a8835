"""Where an SD-1.5-shaped U-Net training step spends its GPU time, and what each speed option buys.

Times the U-Net step alone (bf16 autocast forward + backward, gradient clipping, fused AdamW) on GPU-resident
latents, one variant after another in one process, with CUDA events around the timed steps; optionally
profiles one variant and sums its kernels by kind (convolution, matrix product, attention, fused elementwise
/ normalisation, optimizer, ...). `scripts/bench_train.py` then measures the chosen options through the real
`ldm.train`; this script is for choosing them.

    python scripts/bench_unet.py --resolution 512 --batch-size 32 --variants compiled compiled+channels_last --profile compiled
    python scripts/bench_unet.py --model cifar --batch-size 256 --steps 200 --warmup 30 \
        --variants graphs+fwdbwd graphs+noclip graphs graphs+ema --profile graphs+ema   # where a small step's host time goes
    python scripts/bench_unet.py --resolution 32 --batch-size 2 --tiny --variants eager --steps 2 --warmup 1   # CPU smoke

`--model` picks the U-Net as `scripts/bench_train.py` does (sd15: SD-1.5's shape, 64x64 latents at 512 px; cifar:
the CIFAR-scale U-Net on 8x8 latents of 32 px; shapes: the default's). Variants (composable with '+', e.g.
'compiled+channels_last+b48'): eager, compiled, graphs (compiled with CUDA graphs, mode=reduce-overhead, as
`model.compile={mode:reduce-overhead,dynamic:false}`), fuse_qkv (diffusers' fused q/k/v projections), channels_last
(U-Net weights and input in NHWC), bN (batch N instead of --batch-size); what a step does: fwdbwd (forward and
backward only), noclip (no gradient clipping), ema (also the EMA update `ldm.train` does after each optimizer step,
`ldm.training.ema.EMA` with the warm-up). Each variant runs its own timed steps; the profile of one (--profile) sums
its GPU kernels by kind and says how busy the GPU was: the rest of the step is the host's.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from ldm.callbacks.profile import kind_of
from ldm.utils.cli import ArgumentParser, run_command

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import PEAK_BF16_TFLOPS, unet_config, unet_flops  # noqa: E402

def parse_variant(spec: str, batch: int) -> dict:
    opts = {"compile": None, "fuse_qkv": False, "channels_last": False, "batch": batch, "fwdbwd": False,
            "noclip": False, "ema": False}  # fmt: skip
    for part in spec.split("+"):
        if part == "compiled":
            opts["compile"] = {}
        elif part == "graphs":
            opts["compile"] = {"mode": "reduce-overhead", "dynamic": False}
        elif part in ("fuse_qkv", "channels_last", "fwdbwd", "noclip", "ema"):
            opts[part] = True
        elif part.startswith("b") and part[1:].isdigit():
            opts["batch"] = int(part[1:])
        elif part != "eager":
            raise SystemExit(f"unknown variant part {part!r} in {spec!r}")
    return opts


def run_variant(spec: str, args, device: str) -> dict:
    from ldm.models.unet import build_unet
    from ldm.training.ema import EMA

    opts = parse_variant(spec, args.batch_size)
    unet = build_unet(**unet_config(args.model, args.resolution, args.tiny)).to(device).train()
    b, s = opts["batch"], unet.config.sample_size
    tokens = 16 if args.model == "shapes" else 77  # the text tower's context, as unet_flops counts it
    if opts["fuse_qkv"]:
        unet.fuse_qkv_projections()
    fmt = torch.channels_last if opts["channels_last"] else torch.contiguous_format
    unet.to(memory_format=fmt)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")
    ema = EMA(unet, decay=0.9995, warmup=True) if opts["ema"] else None
    if opts["compile"] is not None:
        unet.compile(**opts["compile"])
    graphs = opts["compile"] is not None and opts["compile"].get("mode") == "reduce-overhead"
    gen = torch.Generator(device).manual_seed(0)
    batches = [(torch.randn(b, 4, s, s, device=device, generator=gen).contiguous(memory_format=fmt),
                torch.randn(b, tokens, unet.config.cross_attention_dim, device=device, generator=gen),
                torch.randint(0, 1000, (b,), device=device, generator=gen)) for _ in range(3)]  # fmt: skip

    def step(i: int) -> None:
        if graphs:  # a new training iteration for the cudagraph trees (the last step's outputs are dead)
            torch.compiler.cudagraph_mark_step_begin()
        x, cond, t = batches[i % len(batches)]
        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            pred = unet(x, t, encoder_hidden_states=cond).sample
        torch.nn.functional.mse_loss(pred.float(), x).backward()
        if opts["fwdbwd"]:
            optimizer.zero_grad(set_to_none=True)
            return
        if not opts["noclip"]:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(unet)

    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    warm_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    host_s = time.perf_counter() - t0  # issuing the steps: about the step time when the host is the limit
    if device == "cuda":
        end.record()
    sync()
    seconds = (start.elapsed_time(end) / 1000 if device == "cuda" else time.perf_counter() - t0) / args.steps
    result = {"variant": spec, "batch": b, "step_s": seconds, "img_s": b / seconds, "warmup_s": warm_s,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
              "host_ms": host_s * 1000 / args.steps}  # fmt: skip
    if spec == args.profile:
        result["kinds"] = profile(step, device)
    del unet, optimizer, batches, ema
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def profile(step, device: str, n: int = 3) -> list[tuple[str, float, int]]:
    """GPU time per step by kernel kind: [(kind, ms per step, kernels per step)], largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with torch_profile(activities=activities) as prof:
        for i in range(n):
            step(i)
        if device == "cuda":
            torch.cuda.synchronize()
    per_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    top: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        if device == "cuda" and evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = evt.device_time if device == "cuda" else evt.cpu_time
        per_kind[kind_of(evt.name)][0] += us
        per_kind[kind_of(evt.name)][1] += 1
        top[evt.name] += us
    print("# top kernels (ms per step):")
    for name, us in sorted(top.items(), key=lambda kv: -kv[1])[:25]:
        print(f"#   {us / n / 1000:8.2f}  {kind_of(name):<12} {name[:110]}")
    return sorted(((k, v[0] / n / 1000, v[1] // n) for k, v in per_kind.items()), key=lambda r: -r[1])


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["sd15", "cifar", "shapes"], default="sd15")
    parser.add_argument("--resolution", type=int, default=None, help="default: 512 for sd15, 32 for cifar and shapes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=["eager", "compiled"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--profile", default=None, help="a variant (as spelled in --variants) to profile too")
    parser.add_argument("--tiny", action="store_true", help="a tiny U-Net (CPU smoke test)")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (512 if args.model == "sd15" else 32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    flops = unet_flops(args.model, args.resolution, args.tiny)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), None) if device == "cuda" else None
    print(f"# {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}; "
          f"{args.model}, {args.resolution} px, U-Net forward+backward {flops / 1e12:.4f} TFLOP/image", flush=True)  # fmt: skip
    results = []
    for spec in args.variants:
        try:
            r = run_variant(spec, args, device)
        except Exception as e:  # one failing variant should not cost the others
            print(f"# {spec}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        mfu = f"{r['img_s'] * flops / (peak * 1e12):6.1%}" if peak else "   -  "
        mem = f"{r['peak_gib']:5.1f} GiB" if r["peak_gib"] is not None else "  -"
        r["line"] = (f"{spec:<28} batch {r['batch']:>3}  {1000 * r['step_s']:7.1f} ms/step  {r['img_s']:8.1f} img/s  "
                     f"MFU {mfu}  peak {mem}  host {r['host_ms']:6.1f} ms/step to issue  "
                     f"(warm-up {r['warmup_s']:.0f} s)")  # fmt: skip
        print(r["line"], flush=True)
        if "kinds" in r:
            total = sum(ms for _, ms, _ in r["kinds"])
            busy = f", the GPU busy {total / (1000 * r['step_s']):.0%} of the step" if device == "cuda" else ""
            print(f"# {spec}: GPU time by kernel kind, {total:.1f} ms per step in kernels{busy}")
            for kind, ms, count in r["kinds"]:
                print(f"#   {kind:<34} {ms:8.2f} ms  {ms / total:6.1%}  {count:6d} kernels")
        results.append(r)
    print("\n".join(["# summary"] + [r["line"] for r in results]))


if __name__ == "__main__":
    sys.exit(run_command(main))
