"""FID through torchmetrics' `FrechetInceptionDistance` with the standard Inception (see `inception.py`).

    fid = make_fid()                                # states and result in float64
    fid.update(to_uint8(real), real=True)           # images (N, 3, H, W) in [0, 1] -> uint8, as saved PNGs
    fid.update(to_uint8(fake), real=False)
    fid.compute()                                   # under DDP, torchmetrics sums the states of all ranks

The real side is kept across `reset()` (reset_real_features=False): reference statistics are loaded once
(`ldm.metrics.reference`) and only the generated side is recomputed at each evaluation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance

from ldm.metrics.inception import FIDInception

REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def to_uint8(images: Tensor) -> Tensor:
    """(N, 3, H, W) float in [0, 1] -> uint8, rounded as when saving an 8-bit image."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def make_fid(network: str | Path | None = None, extractor: FIDInception | None = None) -> FrechetInceptionDistance:
    """torchmetrics FID over the standard FID Inception (``network``: its path; None: fid-helper's default_1.pt)."""
    extractor = extractor if extractor is not None else FIDInception(network)
    # the extractor returns float64 features, so states, covariances and the result stay in float64
    return FrechetInceptionDistance(feature=extractor, reset_real_features=False)


def real_states(fid: FrechetInceptionDistance) -> dict[str, Tensor]:
    """The real side's sum states (features sum (2048,), outer-product sum (2048, 2048), count), on CPU."""
    return {name: getattr(fid, name).detach().cpu().clone() for name in REAL_STATES}


def set_real_states(fid: FrechetInceptionDistance, states: dict[str, Tensor] | None) -> None:
    """Put the real side's sum states (None: zeros, e.g. on DDP ranks other than the one that holds them)."""
    for name in REAL_STATES:
        current = getattr(fid, name)
        value = torch.zeros_like(current) if states is None else states[name].to(current.device, current.dtype)
        setattr(fid, name, value)
