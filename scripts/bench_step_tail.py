"""Host time of the training step's tail, by parameter layout: the gradient norm (NonFiniteLoss), clipping, AdamW
(foreach and fused) and the EMA update over a U-Net's parameter list, against the same work on one flat tensor of
the same size. A small model's step is host-bound (docs/benchmarks.md, "Session 17"): this says how much of that a
flat parameter buffer would remove. Tiny widths keep the arithmetic negligible, so what is timed is the per-tensor
work of Python and the dispatcher.

    python scripts/bench_step_tail.py --model cifar            # the CIFAR-scale U-Net's structure, CPU, one thread
    python scripts/bench_step_tail.py --model shapes --device cuda
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ldm.utils.cli import ArgumentParser, run_command

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import timed, unet_config  # noqa: E402


def main(argv=None) -> dict[str, float]:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["cifar", "shapes", "sd15"], default="cifar")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    from diffusers import UNet2DConditionModel

    from ldm.training.ema import EMA

    torch.set_num_threads(1)
    resolution = {"cifar": 32, "shapes": 32, "sd15": 512}[args.model]
    unet = UNet2DConditionModel(**unet_config(args.model, resolution, tiny=True)).to(args.device)
    params = list(unet.parameters())
    for q in params:
        q.grad = torch.randn_like(q)
    flat = torch.zeros(sum(q.numel() for q in params), device=args.device, requires_grad=True)
    flat.grad = torch.randn_like(flat)
    print(f"{args.model} U-Net (tiny widths): {len(params)} parameter tensors, {flat.numel():,} numbers, {args.device}")
    ema = EMA(unet, 0.999, warmup=True)
    averaged = flat.detach().clone()
    rows = {
        "gradient norm (get_total_norm)": lambda: torch.nn.utils.get_total_norm([q.grad for q in params]),
        "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
        "AdamW foreach": torch.optim.AdamW(params, lr=1e-4, foreach=True).step,
        "AdamW fused": torch.optim.AdamW(params, lr=1e-4, fused=True).step,
        "EMA update (ldm.training.ema)": lambda: ema.update(unet),
        "one flat tensor: clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_([flat], 1.0),
        "one flat tensor: AdamW fused": torch.optim.AdamW([flat], lr=1e-4, fused=True).step,
        "one flat tensor: EMA lerp": lambda: averaged.lerp_(flat.detach(), 1e-3),
    }
    result = {name: timed(fn, args.device, args.steps, warmup=20) * 1e3 for name, fn in rows.items()}  # ms
    for name, ms in result.items():
        print(f"{name:36s} {ms:7.3f} ms")
    return result


if __name__ == "__main__":
    run_command(main)
