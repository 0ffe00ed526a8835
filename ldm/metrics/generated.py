"""Feed generated images into the metrics, each rank its own disjoint share.

    captions, seeds = rank_share(all_captions, base_seed=0, rank=r, world_size=w)   # images r, r+w, r+2w, ...
    first = update_generated(generate, captions, seeds, fid, clip, batch_size=50, keep=16)

Image i of an evaluation always gets caption i and seed base_seed + i, so the set of images is the same
whatever the number of ranks or the batch size (with per-image seeds, see `LatentDiffusion.generate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ldm.metrics.fid import to_uint8

Generate = Callable[[list[str], list[int]], Tensor]  # (captions, seeds) -> (B, 3, H, W) in [0, 1]


def cycle_to(captions: Sequence[str], n: int) -> list[str]:
    """``n`` captions, repeating ``captions`` in order when there are fewer."""
    if not captions:
        raise ValueError("no captions to generate from")
    return [captions[i % len(captions)] for i in range(n)]


def rank_share(captions: Sequence[str], base_seed: int, rank: int, world_size: int) -> tuple[list[str], list[int]]:
    """This rank's captions and per-image seeds: images rank, rank + world_size, ..."""
    idx = range(rank, len(captions), world_size)
    return [captions[i] for i in idx], [base_seed + i for i in idx]


def update_generated(generate: Generate, captions: Sequence[str], seeds: Sequence[int], fid, clip=None,
                     batch_size: int = 50, keep: int = 0) -> Tensor | None:
    """Generate in batches, update FID (fake side) and CLIP score; return the first ``keep`` images (uint8)."""
    kept = []
    for start in range(0, len(captions), batch_size):
        prompts = list(captions[start:start + batch_size])
        images = to_uint8(generate(prompts, list(seeds[start:start + batch_size])))  # (B, 3, H, W)
        fid.update(images.to(fid.device), real=False)
        if clip is not None:
            clip.update(images.to(clip.device), prompts)
        if sum(len(k) for k in kept) < keep:
            kept.append(images.cpu())
    return torch.cat(kept)[:keep] if kept else None
