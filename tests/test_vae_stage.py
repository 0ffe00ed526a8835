"""Stage 1: the VAE experiment trains an AutoencoderKL with the real Trainer on real shards and exports a
diffusers directory whose scaling factor maps latents to unit variance, loadable by the diffusion stage."""

from __future__ import annotations

import torch

from ldm.data.webdataset import collate, make_shard_dataset
from ldm.lightning.autoencoder import latent_scaling_factor, psnr
from ldm.models.vae import build_vae, load_vae
from ldm.train import train
from tiny import compose_config, make_tiny_root


def test_vae_experiment_trains_and_exports_with_scaling_factor(tmp_path):
    root = make_tiny_root(tmp_path / "tiny")
    export_dir = tmp_path / "vae_out"
    overrides = [
        "logger=csv", "data.resolution=16", "data.batch_size=8", "data.shuffle_buffer=8",
        "model.vae.block_out_channels=[8,16]", "model.vae.norm_num_groups=4", "model.vae.sample_size=16",
        "trainer.accelerator=cpu", "trainer.max_steps=3", "trainer.enable_progress_bar=false",
        "optim.warmup_steps=1", f"callbacks.export.out_dir={export_dir}", "+callbacks.export.max_batches=2",
    ]
    cfg = compose_config(root, tmp_path / "run", overrides, experiment="shapes_vae", tiny=False)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    vae = load_vae(str(export_dir), subfolder=None)  # the path the diffusion stage loads
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    scale = vae.config.scaling_factor
    assert scale != 1.0
    # the exported factor is 1/std of posterior samples on the training data
    batches = list(torch.utils.data.DataLoader(make_shard_dataset(root / "shapes" / "train", 16, random_flip=False),
                                               batch_size=8, collate_fn=collate))
    torch.manual_seed(0)
    again = latent_scaling_factor(vae, batches, max_batches=len(batches))
    assert abs(again - scale) / scale < 0.1


def test_latent_scaling_factor_gives_unit_variance():
    vae = build_vae(block_out_channels=[8, 16], norm_num_groups=4, sample_size=16).eval()
    torch.manual_seed(0)
    batches = [{"pixel_values": torch.rand(8, 3, 16, 16) * 2 - 1} for _ in range(4)]
    scale = latent_scaling_factor(vae, batches)
    with torch.no_grad():
        z = torch.cat([vae.encode(b["pixel_values"]).latent_dist.sample() for b in batches]) * scale
    assert abs(z.std().item() - 1.0) < 0.05


def test_psnr_closed_form():
    x = torch.zeros(2, 3, 4, 4)
    assert torch.isclose(psnr(x, x + 0.2), torch.tensor(10 * torch.log10(torch.tensor(4 / 0.04))))
