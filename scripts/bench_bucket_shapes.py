"""The bare U-Net training step per bucket shape, outside `ldm.train`: whether a bucketed run's slower pixels
(docs/benchmarks.md, "Session 10": 0.909x square at 512 px) come from the shapes themselves (kernels at 48x80 or
56x72 latents against 64x64) or from around them (loader, allocator). Prints ms/step and Mpx/s per shape, then a
shuffled mix of the shapes against the square alone, with the CUDA allocator's cudaMalloc/cudaFree calls.

    python scripts/bench_bucket_shapes.py --resolution 512 --batch-size 16            # SD-1.5-shaped U-Net, GPU
    python scripts/bench_bucket_shapes.py --tiny --resolution 64 --batch-size 2 --steps 2 --warmup 1   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch


def main() -> None:
    from bench_train import unet_config  # the SD-1.5-shaped U-Net (or --tiny's) that bench_train.py times

    from ldm.callbacks.throughput import allocator_counts
    from ldm.data.buckets import generate_buckets
    from ldm.data.synthetic import bucket_step
    from ldm.models.unet import build_unet

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=15, help="timed steps per shape (the mix: 5x this many)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    model = build_unet(**unet_config("sd15", args.resolution, args.tiny)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    width = model.config.cross_attention_dim
    buckets = generate_buckets(args.resolution**2, bucket_step(args.resolution), 2.0)
    shapes = [(h // 8, w // 8) for w, h in buckets]  # latents (h, w) of each (width, height) bucket
    square = (args.resolution // 8, args.resolution // 8)
    b = args.batch_size
    text = torch.randn(b, 77, width, device=device)
    inputs = {s: torch.randn(b, 4, *s, device=device) for s in shapes}

    def step(shape) -> None:
        x = inputs[shape]
        t = torch.randint(0, 1000, (b,), device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = torch.nn.functional.mse_loss(model(x, t, text).sample.float(), x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(sequence) -> tuple[float, dict]:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        before, t0 = allocator_counts(device) if device == "cuda" else {}, time.perf_counter()
        for s in sequence:
            step(s)
        sync()
        seconds, after = time.perf_counter() - t0, allocator_counts(device) if device == "cuda" else {}
        return seconds, {k: after[k] - before[k] for k in after}

    print(f"# {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, batch {b}, "
          f"{args.warmup} warm-up + {args.steps} timed steps per shape", flush=True)  # fmt: skip
    results = {}
    for s in shapes:
        timed([s] * args.warmup)
        seconds, alloc = timed([s] * args.steps)
        ms = 1000 * seconds / args.steps
        mpx = b * s[0] * s[1] * 64 * args.steps / seconds / 1e6
        results[s] = mpx
        print(f"latents {s[0]:3d}x{s[1]:<3d} ({s[1] * 8}x{s[0] * 8} px): {ms:8.1f} ms/step {mpx:8.2f} Mpx/s  "
              f"allocator {json.dumps(alloc)}", flush=True)  # fmt: skip
    rng = random.Random(0)
    mix = [rng.choice(shapes) for _ in range(5 * args.steps)]
    seconds, alloc = timed(mix)
    mix_mpx = sum(b * h * w * 64 for h, w in mix) / seconds / 1e6
    seconds_sq, alloc_sq = timed([square] * len(mix))
    square_mpx = b * square[0] * square[1] * 64 * len(mix) / seconds_sq / 1e6
    print(f"shuffled mix of the {len(shapes)} shapes: {mix_mpx:8.2f} Mpx/s, allocator {json.dumps(alloc)}")
    print(f"square alone, same steps:       {square_mpx:8.2f} Mpx/s, allocator {json.dumps(alloc_sq)}")
    print(f"mix / square: {mix_mpx / square_mpx:.3f}x; per-shape mean / square: "
          f"{sum(results.values()) / len(results) / results[square]:.3f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
