"""CIFAR-10 train vs test FID: ours (torchmetrics + the standard Inception) against fid-helper-pytorch's own
folder-to-folder FID on the same files, with runtimes.

    python scripts/bench_fid.py --data /work/shared/datasets/cifar10 --n 2000     # a seeded random subset per side
    python scripts/bench_fid.py --n 0 --device cuda                                # all 50k train vs 10k test

The published CIFAR-10 train-vs-test FID with the full sets is about 3.1; a subset of n images per side adds a
bias that grows as n shrinks, so compare the two implementations with each other, not with that number.
"""

from __future__ import annotations

import json
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from ldm.metrics.evaluation import fid_between
from ldm.utils.cli import ArgumentParser, run_command


def subset(tar_gz: Path, workdir: Path, n: int, seed: int) -> Path:
    """Extract a .tar.gz of JPEG class folders; link a seeded random ``n`` of its images into one folder."""
    with tarfile.open(tar_gz) as tar:
        tar.extractall(workdir / "all", filter="data")
    images = sorted(p for p in (workdir / "all").rglob("*.jpg"))
    chosen = random.Random(seed).sample(images, n) if 0 < n < len(images) else images
    out = workdir / "subset"
    out.mkdir()
    for i, path in enumerate(chosen):
        (out / f"{i:06d}.jpg").symlink_to(path)
    return out


def main(argv=None) -> dict:
    p = ArgumentParser()
    p.add_argument("--data", default="/work/shared/datasets/cifar10")
    p.add_argument("--n", type=int, default=2000, help="images per side (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-reference", action="store_true", help="do not run fid-helper-pytorch")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = []
        for split, seed in (("train", args.seed), ("test", args.seed + 1)):
            (tmp / split).mkdir()
            folders.append(subset(Path(args.data) / f"{split}.tar.gz", tmp / split, args.n, seed))
        ours = fid_between(*map(str, folders), batch_size=args.batch_size, device=args.device)
        result = {"n": args.n, "ours": ours}
        if not args.skip_reference:
            from fid_helper_pytorch import FidHelper

            t0 = time.perf_counter()
            theirs = FidHelper(device=args.device).compute_fid_score_from_dir(
                str(folders[0]), str(folders[1]), batch_size=args.batch_size)
            result["fid_helper"] = {"fid": float(theirs), "seconds": time.perf_counter() - t0}
            result["relative_difference"] = abs(ours["fid"] - float(theirs)) / float(theirs)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(run_command(main))
