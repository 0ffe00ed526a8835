"""Which of PyTorch's scaled_dot_product_attention kernels is fastest for the U-Nets' attention shapes, forward +
backward in bf16 (what a training step runs): cuDNN, flash and memory-efficient, each forced with
`torch.nn.attention.sdpa_kernel`, against the one SDPA picks by itself.

    python scripts/bench_attention.py                     # SD-1.5 at 512 px, batch 16; SDXL at 1024 px, batch 4
    python scripts/bench_attention.py --device cpu --steps 2 --shapes 1,2,64,8    # a CPU smoke run

Shapes are batch,heads,tokens,head_dim; the defaults are SD-1.5's self-attention at its 64x64 and 32x32 levels
(8 heads of 40 and 80) and SDXL's at 64x64 and 32x32 (10 and 20 heads of 64). FLOPs: 4 * B * H * N^2 * d forward,
2.5x that backward (flash attention recomputes the scores), against the GPU's dense bf16 peak.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.utils.cli import ArgumentParser, run_command

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import peak_tflops, timed  # noqa: E402

SHAPES = {"sd15 64x64": (16, 8, 4096, 40), "sd15 32x32": (16, 8, 1024, 80),
          "sdxl 64x64": (4, 10, 4096, 64), "sdxl 32x32": (4, 20, 1024, 64)}  # fmt: skip


def time_backend(shape: tuple[int, ...], backend, device: str, steps: int, warmup: int) -> float | None:
    """Seconds per forward + backward with ``backend`` (None: SDPA's own choice); None when it cannot run."""
    from torch.nn.attention import sdpa_kernel

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=dtype)

    def step():
        out = F.scaled_dot_product_attention(q, k, v)
        out.backward(grad)

    try:
        with sdpa_kernel(backend) if backend is not None else torch.enable_grad():
            return timed(step, device, steps, warmup)
    except RuntimeError:  # no kernel of this backend for the shape / dtype / device
        return None


def main(argv=None) -> None:
    from torch.nn.attention import SDPBackend

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--shapes", nargs="*", default=None, help="batch,heads,tokens,head_dim (default: the U-Nets')")
    args = parser.parse_args(argv)
    shapes = ({s: tuple(int(x) for x in s.split(",")) for s in args.shapes} if args.shapes else SHAPES)
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}  # fmt: skip
    peak = peak_tflops()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# {device}, torch {torch.__version__}", flush=True)
    for name, shape in shapes.items():
        b, h, n, d = shape
        flops = 4 * b * h * n * n * d * 3.5  # forward + 2.5x backward
        for label, backend in backends.items():
            seconds = time_backend(shape, backend, args.device, args.steps, args.warmup)
            if seconds is None:
                print(f"{name:<12} {label:<9} -- no kernel", flush=True)
                continue
            tflops = flops / seconds / 1e12
            mfu = f"  {tflops / peak:5.1%} of peak" if peak else ""
            print(f"{name:<12} {label:<9} {1000 * seconds:8.3f} ms  {tflops:7.1f} TFLOP/s{mfu}", flush=True)


if __name__ == "__main__":
    sys.exit(run_command(main))
