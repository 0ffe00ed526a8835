"""Cached latents: precomputed shards give the same training loss as on-the-fly encoding, and a run on
them trains without building the frozen encoders."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from ldm.data.bucketed import KeyReader
from ldm.data.format import expand_urls
from ldm.data.health import DataHealth
from ldm.data.latents import (
    LatentShardDataModule,
    is_latent_file,
    load_npy,
    make_latent_dataset,
    precompute_latents,
    read_meta,
)
from ldm.data.sizes import sample_sizes
from ldm.data.transforms import ImageTransform
from ldm.data.webdataset import ReadShards, ToTrainingSample, collate, make_shard_dataset
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
    torch.testing.assert_close(dm.empty_condition["encoder_hidden_states"].float(), text_encoder.encode([""]), atol=2e-3, rtol=2e-3)
    assert read_meta(root / "latents")["scaling_factor"] == 0.7


def make_latent_raw(root: Path):
    reader = ReadShards(DataHealth(), select=is_latent_file)
    for sample in reader({"url": u} for u in expand_urls(root / "latents")):
        yield {k: load_npy(v) for k, v in sample.items() if k.endswith(".npy")}


def train_noting_frozen_builds(cfg) -> tuple[dict, list[str]]:
    """`train(cfg)`'s metrics and the frozen parts (vae, text_encoder) the stage built from their factories."""
    built = []
    original = LatentDiffusion.__getattr__

    def spy(self, name):
        if name in self.__dict__.get("_frozen_factories", {}):
            built.append(name)
        return original(self, name)

    LatentDiffusion.__getattr__ = spy
    try:
        return train(cfg), built
    finally:
        LatentDiffusion.__getattr__ = original


def test_training_on_latents_never_builds_the_frozen_encoders(root, tmp_path):
    cfg = compose_config(root, tmp_path / "run", [
        "data=latents", f"data.train_shards={root / 'latents'}", "data.batch_size=4", "logger=csv",
        "data.text_states=true", "~callbacks.fid", "~callbacks.sample_grid", "~callbacks.export",
    ])  # fmt: skip
    metrics, built = train_noting_frozen_builds(cfg)
    assert np.isfinite(metrics["train/loss"]) and metrics["train/images_seen"] == 8
    assert built == []


@pytest.mark.parametrize("cache_size", [0, "fits", "one short"])
def test_text_states_auto_reads_them_unless_every_caption_fits_the_stages_memo(root, tmp_path, cache_size):
    """`data.text_states: auto` (the default): latents.json counts the distinct captions written; a fit reads the
    cached states unless they and the empty caption all fit `model.text_cache_size` (then the stage encodes each
    once, and builds the text encoder for it); outside a trainer, auto reads them."""
    distinct = {s["caption"] for s in latent_samples(root / "latents")}  # one caption a sample here
    assert read_meta(str(root / "latents"))["distinct_captions"] == len(distinct) > 1
    size = {0: 0, "fits": len(distinct) + 1, "one short": len(distinct)}[cache_size]
    cfg = compose_config(root, tmp_path / "run", [
        "data=latents", f"data.train_shards={root / 'latents'}", "data.batch_size=4", "logger=csv",
        f"model.text_cache_size={size}", "~callbacks.fid", "~callbacks.sample_grid", "~callbacks.export",
    ])  # fmt: skip
    assert cfg.data.text_states == "auto"
    metrics, built = train_noting_frozen_builds(cfg)
    assert np.isfinite(metrics["train/loss"])
    assert built == (["text_encoder"] if cache_size == "fits" else [])
    module = LatentShardDataModule(str(root / "latents"), None, batch_size=4, num_workers=0)
    assert module.text_states == "auto" and module.carries_text_states
    assert "text_hidden" in next(iter(module.train_dataloader()))


def test_latents_without_text_states_train_on_the_stages_own_encodings(root, tmp_path):
    """data.text_states=false: batches carry no text states, the stage encodes (and memoises) the captions, and the
    loss is the cached states' loss within fp16 tolerance; a real run builds the text encoder, not the VAE, and may
    use another text encoder than the latents were written with (here shapes' own, 77 tokens against 16): the
    unconditional input then comes from that encoder too, not from the shards."""
    batches = [next(iter(LatentShardDataModule(str(root / "latents"), None, batch_size=8, num_workers=0,
                                               text_states=states).train_dataloader()))
               for states in (True, False)]  # fmt: skip
    with_states, without = batches
    assert "text_hidden" not in without and without["key"] == with_states["key"]
    assert torch.equal(without["latent_mean"], with_states["latent_mean"])
    vae, text_encoder = frozen_parts(root)
    unet = instantiate(compose_config(root, root / "unused").model.unet)
    module = LatentDiffusion(unet, vae, text_encoder, diffusion={"cfg_dropout": 0.5}, text_cache_size=16)
    losses = []
    for batch in batches:
        torch.manual_seed(0)
        losses.append(module.training_step(batch, 0).item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-3)
    assert set(module._text_cache) == set(without["caption"])

    cfg = compose_config(root, tmp_path / "run", [
        "data=latents", f"data.train_shards={root / 'latents'}", "data.batch_size=4", "data.text_states=false",
        "model.text_cache_size=16", "logger=csv", "~callbacks.fid", "~callbacks.sample_grid", "~callbacks.export",
    ])  # fmt: skip
    metrics, built = train_noting_frozen_builds(cfg)
    assert np.isfinite(metrics["train/loss"]) and metrics["train/images_seen"] == 8
    assert set(built) == {"text_encoder"}


def test_latents_at_another_resolution_are_refused(root):
    with pytest.raises(ValueError, match="data.resolution=32 .* encoded at 16"):
        LatentShardDataModule(str(root / "latents"), None, batch_size=4, resolution=32)
    with pytest.raises(FileNotFoundError, match="no latents.json"):
        LatentShardDataModule(str(root / "shapes" / "train"), None, batch_size=4)


# --- buckets ------------------------------------------------------------------------------------------------------
LATENT_BUCKETS = {"area": 32 * 32, "step": 8, "max_aspect": 2.0}  # -> 24x40, 32x32, 40x24 (by hand)


@pytest.fixture(scope="module")
def bucketed(root) -> Path:
    """Mixed-aspect images (two too small) with one masked portrait, encoded at their buckets."""
    from PIL import Image

    from ldm.data.shards import write_shards

    rng = np.random.default_rng(0)
    sizes = [(30, 50), (50, 30), (40, 40), (36, 60), (64, 40), (10, 10), (20, 30)] * 2
    samples = [(f"k{i:02d}", Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), f"caption {i}")
               for i, (w, h) in enumerate(sizes)]  # fmt: skip
    mask = Image.new("L", (30, 50), 0)
    mask.paste(255, (0, 0, 15, 50))  # left half
    samples[0] = (*samples[0], mask)
    write_shards(samples, root / "mixed", samples_per_shard=5, image_format="png", progress=False)
    vae, text_encoder = frozen_parts(root)
    precompute_latents(root / "mixed", root / "mixed-latents", vae, text_encoder, resolution=32, batch_size=3,
                       samples_per_shard=4, num_workers=0, progress=False, buckets=LATENT_BUCKETS)  # fmt: skip
    return root / "mixed-latents"


def test_latents_are_written_at_their_bucket_with_the_flipped_twin(root, bucketed):
    meta = read_meta(bucketed)
    assert meta["buckets"] == [[24, 40], [32, 32], [40, 24]] and meta["too_small"] == 4 and meta["factor"] == 2
    vae, _ = frozen_parts(root)
    images = {s["key"]: s for s in make_shard_dataset(root / "mixed", 32, random_flip=False, shuffle_buffer=0,
                                                      shardshuffle=False, split_by_node=False)}  # fmt: skip
    raw = {s["__key__"]: s for s in ReadShards(DataHealth(), select=is_latent_file)({"url": u}
                                                                                    for u in expand_urls(bucketed))}
    assert sorted(raw) == sorted(k for k in images if min(images[k]["original_size"]) >= 24)  # 10 fit, 4 too small
    source_url = {key: url for url, keys in sample_sizes(expand_urls(root / "mixed")).items() for key in keys}
    convert = ToTrainingSample(ImageTransform(32, random_flip=False, upscale=False, uint8=True))
    for key, sample in raw.items():
        h, w = images[key]["original_size"]
        bucket = min([(24, 40), (32, 32), (40, 24)], key=lambda b: abs(np.log(w / h) - np.log(b[0] / b[1])))
        record = json.loads(sample["json"])
        assert record["target_size"] == [bucket[1], bucket[0]] and record["original_size"] == [h, w]
        mean = load_npy(sample["mean.npy"])
        assert mean.shape[-2:] == (bucket[1] // 2, bucket[0] // 2)  # (h, w) / VAE factor 2
        # the VAE's posterior of the centre crop at that bucket, and of its mirror image
        source = KeyReader().read(source_url[key], key)
        pixels = convert({**source, "__size__": bucket})["pixel_values"][None].float() / 127.5 - 1
        with torch.no_grad():
            expected = vae.encode(pixels).latent_dist.mean[0] * 0.7
            mirrored = vae.encode(pixels.flip(-1)).latent_dist.mean[0] * 0.7
        torch.testing.assert_close(torch.from_numpy(mean).float(), expected, atol=3e-3, rtol=3e-3)
        torch.testing.assert_close(torch.from_numpy(load_npy(sample["flip_mean.npy"])).float(), mirrored,
                                   atol=3e-3, rtol=3e-3)  # fmt: skip
    mask = load_npy(raw["k00"]["mask.npy"])  # 24x40 bucket at factor 2: (1, 20, 12), left half ones
    assert mask.shape == (1, 20, 12) and mask[0, :, :5].min() == 1 and mask[0, :, 7:].max() == 0
    assert np.array_equal(load_npy(raw["k00"]["flip_mask.npy"]), mask[..., ::-1])


def test_training_on_bucketed_latents_keeps_one_bucket_per_batch(bucketed, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = Counter()
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        dm = LatentShardDataModule(str(bucketed), None, batch_size=2, num_workers=2, seed=3)
        assert dm.planned
        batches = list(dm.train_dataloader())
        for batch in batches:
            h, w = batch["latent_mean"].shape[-2:]
            assert (batch["target_size"] == torch.tensor([h * 2, w * 2])).all()  # one bucket per batch
            assert batch["text_hidden"].shape[0] == len(batch["key"])
            if "k00" in batch["key"]:
                assert batch["mask"].shape == (len(batch["key"]), 1, h, w)
            seen.update(batch["key"])
        carried = dm.bucket_report(0)["carried"]
    assert max(seen.values()) == 1 and len(seen) + carried == 10  # each once per pass, or carried into the next


def test_tag_captions_on_latents_are_encoded_per_visit(bucketed):
    dm = LatentShardDataModule(str(bucketed), None, batch_size=2, num_workers=0, captions={"trigger": "sks"})
    batch = next(iter(dm.train_dataloader()))
    assert "text_hidden" not in batch and all(c.startswith("sks, caption ") for c in batch["caption"])


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.float16).reshape(2, 3, 4), np.ones((4, 8, 8), np.float32), np.asfortranarray(np.eye(3)),
    np.array(3.5), np.zeros((0, 5), np.int64), np.arange(6, dtype=">i4").reshape(2, 3),
])  # fmt: skip
def test_load_npy_is_numpys(array):
    """load_npy (the header parsed once per distinct header) gives what np.load gives, writable, for format 1.0 and
    2.0 headers; truncated data and pickled objects are refused as np.load refuses them."""
    import io

    for version in ((1, 0), (2, 0)):
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array, version=version)
        data = buffer.getvalue()
        for _ in range(2):  # the second load takes the cached header
            loaded = load_npy(data)
            expected = np.load(io.BytesIO(data), allow_pickle=False)
            assert loaded.dtype == expected.dtype and loaded.shape == expected.shape and loaded.flags.writeable
            assert loaded.flags.f_contiguous == expected.flags.f_contiguous
            np.testing.assert_array_equal(loaded, expected)
        if array.size:
            with pytest.raises(ValueError):
                load_npy(data[:-1])
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_npy(buffer.getvalue())
    with pytest.raises(ValueError):
        load_npy(b"not an npy file at all")
