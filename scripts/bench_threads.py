"""CPU threads against other processes: the default's training step (its 1.1 M-parameter U-Net, batch 32, AdamW)
timed with 1 thread and with N, alternating in one process so both see the same machine. Run it on a quiet
machine, then beside a busy process, to see what the thread count does to the step when the cores are shared.

    python scripts/bench_threads.py                        # 1 vs all cores, 4 rounds of 15 steps each
    python scripts/bench_threads.py --busy 1               # the same with one busy process started beside it
    OMP_WAIT_POLICY=PASSIVE python scripts/bench_threads.py --busy 1   # threads that sleep instead of spinning

Prints ms/step per round for each thread count, and what other processes used meanwhile (ldm/utils/cpu.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import torch

from ldm.utils.cpu import CPUSample, available_cores

BUSY = "while True: pass"


def start_detached(code: str) -> int:
    """A Python process running ``code``, not a child of this one (its CPU time counts as another process's)."""
    out = subprocess.run(["sh", "-c", f'"{sys.executable}" -c "{code}" >/dev/null 2>&1 & echo $!'],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return int(out.stdout.strip())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1 and all cores")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--busy", type=int, default=0, help="busy processes to start beside the benchmark")
    args = p.parse_args(argv)
    from ldm.models.unet import build_unet

    unet = build_unet(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64],
                      down_block_types=["CrossAttnDownBlock2D"] * 2, up_block_types=["CrossAttnUpBlock2D"] * 2,
                      layers_per_block=1, attention_head_dim=4, cross_attention_dim=64, norm_num_groups=16)  # fmt: skip
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x, cond, t = torch.randn(32, 4, 8, 8), torch.randn(32, 16, 64), torch.randint(0, 1000, (32,))

    def step():
        unet(x, t, encoder_hidden_states=cond).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    busy = [start_detached(BUSY) for _ in range(args.busy)]
    try:
        for _ in range(3):
            step()
        counts = args.threads or [1, available_cores()]
        times: dict[int, list[float]] = {n: [] for n in counts}
        start = CPUSample.now()
        for _ in range(args.rounds):
            for n in counts:
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[n].append((time.perf_counter() - t0) / args.steps * 1000)
        others = start.others_busy(CPUSample.now()) if start else float("nan")
    finally:
        for pid in busy:
            os.kill(pid, signal.SIGKILL)
    print(f"# {available_cores()} cores; {args.busy} busy processes started; others (incl. those) busy on "
          f"{others:.1f} cores on average; torch {torch.__version__}")
    for n, ms in times.items():
        print(f"{n} thread(s): " + " ".join(f"{v:7.1f}" for v in ms) + " ms/step")


if __name__ == "__main__":
    main()
