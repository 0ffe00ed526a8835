"""Stage 1: the VAE experiment trains an AutoencoderKL with the real Trainer on real shards and exports a
diffusers directory whose scaling factor maps latents to unit variance, loadable by the diffusion stage; it
logs reconstructions, their PSNR and rFID (checked against torchmetrics' FID computed here on the exported
VAE's reconstructions); the optional patch discriminator's gradients reach only the network they are for."""

from __future__ import annotations

import copy
import json
import runpy
from pathlib import Path

import pytest
import torch
from tiny import compose_config, make_tiny_root
from wandb_offline import history, run_files

from ldm.data.webdataset import collate, make_shard_dataset
from ldm.metrics.fid import make_fid, to_uint8
from ldm.metrics.reference import shard_images
from ldm.models.vae import build_vae, load_vae
from ldm.run.fit import train
from ldm.stages.autoencoder import AutoencoderModule, PatchDiscriminator, hinge_d_loss, latent_scaling_factor, psnr

REPO = Path(__file__).resolve().parents[1]
VAE_TINY = ["data.resolution=16", "data.batch_size=8", "data.shuffle_buffer=8", "model.vae.block_out_channels=[8,16]",
            "model.vae.norm_num_groups=4", "model.vae.sample_size=16", "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false", "optim.warmup_steps=1", "+callbacks.export.max_batches=2",
            "callbacks.reconstructions.num_images=8", "callbacks.reconstructions.batch_size=4",
            "callbacks.reconstructions.grid_images=4"]


def test_vae_experiment_trains_and_exports_with_scaling_factor(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = make_tiny_root(tmp_path / "tiny")
    export_dir = tmp_path / "vae_out"
    run_dir = tmp_path / "run"
    overrides = [*VAE_TINY, "logger=wandb", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
                 f"paths.vae_dir={export_dir}", "callbacks.reconstructions.every_n_steps=2"]
    cfg = compose_config(root, run_dir, overrides, experiment="shapes_vae", tiny=False)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    vae = load_vae(str(export_dir), subfolder=None)  # the path the diffusion stage loads

    # quality: held-out PSNR and rFID at step 2 and at the end, with a grid of originals and reconstructions
    (run_file,) = run_files(run_dir)
    rows = [r for r in history(run_file) if "val/rfid" in r]
    assert [r["trainer/global_step"] for r in rows] == [2, 3]
    assert (run_dir / "reconstructions" / "step_000003.png").is_file()
    val = root / "shapes" / "val"
    originals = torch.cat(list(shard_images(val, 16, 8, 4)))
    with torch.no_grad():
        x = originals.float() / 127.5 - 1
        reconstructions = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    fid = make_fid()
    fid.update(originals, real=True)
    fid.update(to_uint8((reconstructions + 1) / 2), real=False)
    assert metrics["val/rfid"] == pytest.approx(float(fid.compute()), rel=1e-3)
    assert metrics["val/rec_psnr"] == pytest.approx(float(psnr(reconstructions, x)), abs=1e-3)
    # scripts/eval_rfid.py gives the exported VAE the same figures after the fact
    eval_rfid = runpy.run_path(str(REPO / "scripts" / "eval_rfid.py"), run_name="eval_rfid")["main"]
    eval_rfid([str(export_dir), str(val), "--resolution", "16", "--n", "8", "--batch-size", "4",
               "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["images"] == 8 and row["val/rfid"] == pytest.approx(metrics["val/rfid"], rel=1e-3)
    assert row["val/rec_psnr"] == pytest.approx(metrics["val/rec_psnr"], abs=1e-3)
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


def test_discriminator_gradients_reach_only_their_own_network():
    torch.manual_seed(0)
    vae = build_vae(block_out_channels=[8, 16], norm_num_groups=4, sample_size=16)
    module = AutoencoderModule(vae, discriminator=PatchDiscriminator(channels=8, num_layers=2), disc_weight=0.5)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    rec_loss = torch.nn.functional.mse_loss(rec, x)
    module.adversarial_loss(x, rec, rec_loss).backward(retain_graph=True)
    d_grads = {n: p.grad.clone() for n, p in module.discriminator.named_parameters()}
    vae_grads = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}

    # reference, by hand: the discriminator's hinge loss alone on a detached reconstruction ...
    disc = copy.deepcopy(module.discriminator)
    disc.zero_grad()
    hinge_d_loss(disc(x), disc(rec.detach())).backward()
    for name, p in disc.named_parameters():
        torch.testing.assert_close(d_grads[name], p.grad, msg=name)
    # ... and the generator's term through a discriminator that does not train, with the adaptive weight
    vae.zero_grad()
    disc.requires_grad_(False)
    g_loss = -disc(rec).mean()
    last = vae.decoder.conv_out.weight
    weight = 0.5 * (torch.autograd.grad(rec_loss, last, retain_graph=True)[0].norm()
                    / (torch.autograd.grad(g_loss, last, retain_graph=True)[0].norm() + 1e-4))
    (weight.detach() * g_loss).backward()
    for name, p in vae.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(vae_grads[name], p.grad, msg=name)


def test_discriminator_starts_after_warm_up(tmp_path):
    root = make_tiny_root(tmp_path / "tiny")
    overrides = [*VAE_TINY, "logger=csv", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
                 f"paths.vae_dir={tmp_path / 'vae'}", "model/discriminator=patch", "model.discriminator.channels=8",
                 "model.discriminator.num_layers=2", "model.disc_start=2"]
    cfg = compose_config(root, tmp_path / "run", overrides, experiment="shapes_vae", tiny=False)
    train(cfg)
    import csv

    (metrics_file,) = (tmp_path / "run").glob("csv/*/metrics.csv")
    steps = [int(r["step"]) for r in csv.DictReader(metrics_file.open()) if r.get("train/d_loss")]
    assert steps == [2, 3]


@pytest.mark.gpu
def test_reconstruction_quality_on_the_gpu_is_the_cpus(tmp_path):
    """rFID and PSNR with the VAE and the FID Inception on CUDA (the callback and scripts/eval_rfid.py on a GPU) are
    the CPU's figures: images reach the metric on its device."""
    from ldm.metrics.fid import set_real_states
    from ldm.metrics.reconstruction import reconstruction_quality
    from ldm.metrics.reference import reference_states

    val = make_tiny_root(tmp_path / "tiny") / "shapes" / "val"
    torch.manual_seed(0)
    vae = build_vae(block_out_channels=[8, 16], norm_num_groups=4, sample_size=16).eval()
    rows = []
    for device in ("cpu", "cuda"):
        fid = make_fid().to(device)
        set_real_states(fid, reference_states(fid, val, 16, 8, tmp_path / f"cache-{device}", None, 4))
        rows.append(reconstruction_quality(vae.to(device), fid, val, 16, 8, batch_size=4)[0])
    assert rows[1]["val/rfid"] == pytest.approx(rows[0]["val/rfid"], rel=1e-3)
    assert rows[1]["val/rec_psnr"] == pytest.approx(rows[0]["val/rec_psnr"], abs=1e-2)
