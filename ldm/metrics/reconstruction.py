"""A VAE's reconstruction quality on held-out images: rFID (standard FID of reconstructions against the images'
reference statistics) and PSNR, as Rombach et al. 2022 (table 8) report it. Used by the stage-1 callback
(ldm/callbacks/reconstruction.py) and by `scripts/eval_rfid.py` on an exported VAE.

    fid = make_fid(network); set_real_states(fid, reference_states(fid, shards, 32, 10000, "data/fid_cache"))
    row, originals, reconstructions = reconstruction_quality(vae, fid, shards, 32, 10000, grid_images=8)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.metrics.fid import to_uint8
from ldm.metrics.reference import shard_images


@torch.no_grad()
def reconstruction_quality(vae, fid, shards, resolution: int, num_images: int, batch_size: int = 50,
                           grid_images: int = 0, device=None) -> tuple[dict, Tensor, Tensor]:  # fmt: skip
    """{"val/rfid", "val/rec_psnr"} over the first `num_images` of `shards` (posterior mode, decoded, clamped), plus
    the first `grid_images` originals and reconstructions in [-1, 1]. ``fid``: an FID metric whose real side is set;
    its generated side is reset here. The VAE is put in eval mode and back."""
    device = device if device is not None else next(vae.parameters()).device
    fid.reset()
    was_training = vae.training
    vae.eval()
    originals, reconstructions, squared_error, values = [], [], 0.0, 0
    for images in shard_images(shards, resolution, num_images, batch_size):  # uint8 (B, 3, R, R)
        x = images.to(device, torch.float32) / 127.5 - 1  # [-1, 1], as the data module gives
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        fid.update(to_uint8((rec + 1) / 2).to(fid.device), real=False)
        squared_error += float(((rec - x) ** 2).sum())
        values += x.numel()
        if sum(len(o) for o in originals) < grid_images:
            originals.append(x.cpu())
            reconstructions.append(rec.cpu())
    vae.train(was_training)
    mse = squared_error / values  # PSNR of the pooled mean squared error, range [-1, 1] (peak-to-peak 2)
    row = {"val/rfid": float(fid.compute()), "val/rec_psnr": 10 * math.log10(4.0 / max(mse, 1e-12))}
    empty = torch.empty(0)
    return row, (torch.cat(originals)[:grid_images] if originals else empty), \
        (torch.cat(reconstructions)[:grid_images] if reconstructions else empty)
