"""Cached latents: precomputed shards give the same training loss as on-the-fly encoding, and a run on
them trains without building the frozen encoders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from ldm.data.latents import LatentShardDataModule, make_latent_dataset, precompute_latents, read_meta
from ldm.data.webdataset import collate, make_shard_dataset
from ldm.models.text_encoders import hf_clip_text_encoder
from ldm.models.vae import load_vae
from ldm.run.fit import train
from ldm.stages.latent_diffusion import LatentDiffusion
from tests.tiny import compose_config, make_tiny_root


def latent_samples(urls):
    """Every sample of latent shards in shard order, unflipped (captions chosen as in training)."""
    return iter(make_latent_dataset(urls, random_flip=False, shuffle_buffer=0, shardshuffle=False))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = make_tiny_root(tmp_path_factory.mktemp("latents"))
    vae = load_vae(str(root / "models" / "vae-shapes"), subfolder=None)
    vae.config.scaling_factor = 0.7  # a non-trivial scale, so that a missing or double scaling shows
    text_encoder = hf_clip_text_encoder(str(root / "models" / "clip-tiny"))
    precompute_latents(root / "shapes" / "train", root / "latents", vae, text_encoder, resolution=16,
                       batch_size=8, samples_per_shard=16, num_workers=0, progress=False)  # fmt: skip
    return root


def frozen_parts(root: Path):
    vae = load_vae(str(root / "models" / "vae-shapes"), subfolder=None)
    vae.config.scaling_factor = 0.7
    return vae, hf_clip_text_encoder(str(root / "models" / "clip-tiny"))


def test_cached_batch_gives_the_on_the_fly_loss_within_fp16_tolerance(root):
    vae, text_encoder = frozen_parts(root)
    cfg = compose_config(root, root / "unused")
    unet = instantiate(cfg.model.unet)
    module = LatentDiffusion(unet, vae, text_encoder, diffusion={"cfg_dropout": 0.5})
    images = collate(list(make_shard_dataset(root / "shapes" / "train", 16, random_flip=False, shuffle_buffer=0,
                                             shardshuffle=False, split_by_node=False, uint8=True))[:8])  # fmt: skip
    cached = list(latent_samples(root / "latents"))[:8]
    assert [s["key"] for s in cached] == images["key"]
    cached = {name: torch.stack([s[name] for s in cached]) for name in ("latent_mean", "latent_std", "text_hidden")}
    cached["caption"] = images["caption"]

    losses = []
    for batch in (images, cached):
        torch.manual_seed(0)  # the same posterior noise, dropout mask, timesteps and noise on both paths
        losses.append(module.training_step(batch, 0).item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-3)

    # what is cached: the scaled posterior of the image and of its mirror, the text encodings, the empty caption
    with torch.no_grad():
        posterior = vae.encode(images["pixel_values"].float() / 127.5 - 1).latent_dist
        flipped = vae.encode(images["pixel_values"].flip(-1).float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(cached["latent_mean"].float(), posterior.mean * 0.7, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cached["latent_std"].float(), posterior.std * 0.7, atol=2e-3, rtol=2e-3)
    first = next(latent_samples(root / "latents"))
    assert first["latent_mean"].dtype == torch.float16
    raw = list(make_latent_raw(root))[0]
    torch.testing.assert_close(torch.from_numpy(raw["flip_mean.npy"]).float(), flipped.mean[0] * 0.7,
                               atol=2e-3, rtol=2e-3)  # fmt: skip
    torch.testing.assert_close(cached["text_hidden"].float(), text_encoder.encode(images["caption"]),
                               atol=2e-3, rtol=2e-3)  # fmt: skip
    dm = LatentShardDataModule(str(root / "latents"), None, batch_size=4, num_workers=0)
    torch.testing.assert_close(dm.empty_hidden.float(), text_encoder.encode([""]), atol=2e-3, rtol=2e-3)
    assert read_meta(root / "latents")["scaling_factor"] == 0.7


def make_latent_raw(root: Path):
    from ldm.data.format import expand_urls
    from ldm.data.health import DataHealth
    from ldm.data.latents import is_latent_file, load_npy
    from ldm.data.webdataset import ReadShards

    reader = ReadShards(DataHealth(), select=is_latent_file)
    for sample in reader({"url": u} for u in expand_urls(root / "latents")):
        yield {k: load_npy(v) for k, v in sample.items() if k.endswith(".npy")}


def test_training_on_latents_never_builds_the_frozen_encoders(root, tmp_path):
    cfg = compose_config(root, tmp_path / "run", [
        "data=latents", f"data.train_shards={root / 'latents'}", "data.batch_size=4", "logger=csv",
        "~callbacks.fid", "~callbacks.sample_grid", "~callbacks.export",
    ])  # fmt: skip
    built = []
    original = LatentDiffusion.__getattr__

    def spy(self, name):
        if name in self.__dict__.get("_frozen_factories", {}):
            built.append(name)
        return original(self, name)

    LatentDiffusion.__getattr__ = spy
    try:
        metrics = train(cfg)
    finally:
        LatentDiffusion.__getattr__ = original
    assert np.isfinite(metrics["train/loss"]) and metrics["train/images_seen"] == 8
    assert built == []


def test_latents_at_another_resolution_are_refused(root):
    with pytest.raises(ValueError, match="data.resolution=32 .* encoded at 16"):
        LatentShardDataModule(str(root / "latents"), None, batch_size=4, resolution=32)
    with pytest.raises(FileNotFoundError, match="no latents.json"):
        LatentShardDataModule(str(root / "shapes" / "train"), None, batch_size=4)
