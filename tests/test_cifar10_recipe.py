"""The CIFAR-10 recipe's configs, end to end on the CPU at toy sizes: `experiment=cifar10_vae` trains and exports an
f=2 VAE (rFID and val/loss logged), the recipe's text tower (as `make cifar10-text` writes it) tells the ten class
captions apart, and `experiment=cifar10` trains the U-Net on that VAE's 16x16 latents, logs FID on class captions
in equal shares and exports a pipeline. The real sizes and the GPU settings are the recipe's own; only what a CPU
cannot run in seconds is shrunk (widths, steps, image counts, precision, compile, the clock)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tiny import CONF

from ldm.callbacks.metrics_log import read_metrics
from ldm.data.shards import write_shards
from ldm.data.synthetic import photo_like
from ldm.models.text_encoders import hf_clip_text_encoder
from ldm.models.vae import downsample_factor, load_vae
from ldm.run.fit import train

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CPU = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_time=null", "trainer.max_steps=2",
       "trainer.enable_model_summary=false", "trainer.benchmark=false", "data.batch_size=10", "data.num_workers=0",
       "data.samples_per_epoch=20", "data.shuffle_buffer=10", "logger=none", "callbacks.val_loss.every_n_steps=1",
       "callbacks.val_loss.num_samples=10", "callbacks.val_loss.batch_size=5"]  # fmt: skip


def compose(experiment: str, root, run_dir, overrides=()):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=[f"experiment={experiment}", f"paths.data_dir={root}",
                                                             f"paths.output_dir={run_dir}", *overrides])  # fmt: skip


def text_tower_from_makefile(out_dir) -> None:
    """`make cifar10-text`, as the Makefile writes it (the recipe's text tower is that command, not a copy of it)."""
    recipe = subprocess.run(["make", "-n", "cifar10-text", "DATA=DATA", "UV=uv"], cwd=CONF.parent, check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    code = recipe.split('python -c "', 1)[1].rsplit('"', 1)[0].replace("\\\n", "").replace("DATA/models/clip-cifar10", str(out_dir))
    exec(code, {})  # noqa: S102 - the Makefile's own line


def warm_up_overrides() -> list[str]:
    """The overrides of stage 2's compile warm-up, as the Makefile gives them (`make -n cifar10-vae`)."""
    recipe = subprocess.run(["make", "-n", "-B", "cifar10-vae", "DATA=DATA", "UV=uv"], cwd=CONF.parent, check=True,
                            capture_output=True, text=True).stdout.replace("\\\n", " ")  # fmt: skip
    line = next(line for line in recipe.splitlines() if "experiment=cifar10 " in line)
    words = line.split("-m ldm.train ", 1)[1].split(">", 1)[0].split()
    return [w for w in words if not w.startswith("hydra.")]


def test_the_warm_up_compiles_what_stage_2_compiles(tmp_path):
    """Inductor's cache serves stage 2 only if the warm-up builds the same graphs: the same U-Net, batch, precision,
    compile options and latent shapes; its VAE is stage 1's architecture, untrained; it writes no checkpoint."""
    warm = compose("cifar10", tmp_path, tmp_path / "warm", warm_up_overrides()[1:])
    real = compose("cifar10", tmp_path, tmp_path / "real")
    stage1 = compose("cifar10_vae", tmp_path, tmp_path / "vae")
    for key in ("model.unet", "model.compile", "model.channels_last", "model.vae_bf16", "data.batch_size",
                "data.resolution", "trainer.precision", "trainer.accelerator", "model.text_encoder", "diffusion"):
        assert OmegaConf.select(warm, key) == OmegaConf.select(real, key), key
    vae = OmegaConf.to_container(warm.model.vae)
    assert vae.pop("frozen") is True and vae.pop("_partial_") is True
    assert vae == OmegaConf.to_container(stage1.model.vae)
    assert warm.trainer.max_steps == 3 and warm.trainer.max_time is None and warm.trainer.enable_checkpointing is False
    assert not any(warm.callbacks[name] for name in ("fid", "export", "checkpoint", "sample_grid", "val_loss"))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 20)):  # class captions in turn, as `make cifar10` writes them
        samples = ((f"{i:06d}", photo_like(rng, 32, 32), f"a photo of a {CLASSES[i % 10]}") for i in range(n))
        write_shards(samples, root / "cifar10" / split, samples_per_shard=n // 2, image_format="jpg", total=n)
    return root


@pytest.mark.slow
def test_the_recipe_trains_both_stages_on_class_captions(root, tmp_path):
    # stage 1: the recipe's VAE at a toy width, f=2 as the recipe sets it
    vae_run = tmp_path / "vae"
    cfg = compose("cifar10_vae", root, vae_run, [*CPU, "model.vae.block_out_channels=[8,16]", "model.vae.norm_num_groups=4",
                                                   "callbacks.reconstructions.num_images=10",
                                                   "callbacks.reconstructions.batch_size=5", "+callbacks.export.max_batches=2"])  # fmt: skip
    assert cfg.model.vae.block_out_channels == [8, 16] and cfg.model.vae.latent_channels == 4
    metrics = train(cfg)
    assert np.isfinite(metrics["val/rfid"]) and np.isfinite(metrics["val/loss"])
    vae = load_vae(str(root / "models" / "vae-cifar10"), subfolder=None)
    assert downsample_factor(vae) == 2 and vae.config.scaling_factor != 1.0

    # the text tower: distinct encodings for the ten captions and the empty one
    text_tower_from_makefile(root / "models" / "clip-cifar10")
    encoder = hf_clip_text_encoder(str(root / "models" / "clip-cifar10"))
    hidden = encoder.encode([f"a photo of a {c}" for c in CLASSES] + [""]).flatten(1)  # (11, L * D)
    assert encoder.max_length == 16 and encoder.hidden_size == compose("cifar10", root, tmp_path).model.unet.cross_attention_dim
    distance = torch.cdist(hidden, hidden)
    assert distance[~torch.eye(11, dtype=torch.bool)].min() > 0.1 * hidden.norm(dim=1).mean()

    # stage 2's warm-up (the Makefile's overrides; toy widths): trains on an untrained VAE of stage 1's shapes
    toy_unet = ["model.unet.block_out_channels=[16,32,32]", "model.unet.norm_num_groups=8", "model.unet.attention_head_dim=2"]
    warm = tmp_path / "warm"
    cpu = [o for o in CPU if not o.startswith("callbacks.val_loss")]  # the warm-up has no val_loss
    train(compose("cifar10", root, warm, [*warm_up_overrides()[1:], *cpu, "model.compile=false", *toy_unet,
                                          "model.vae.block_out_channels=[8,16]", "model.vae.norm_num_groups=4"]))  # fmt: skip
    assert [r["step"] for r in read_metrics(warm / "metrics.jsonl")][-1] == 2 and not list(warm.rglob("*.ckpt"))

    # stage 2: the U-Net (toy width) on the VAE's 16x16 latents, FID on the test captions, pipeline export
    run = tmp_path / "ldm"
    cfg = compose("cifar10", root, run, [*CPU, "model.compile=false", *toy_unet,
                                         "callbacks.fid.cpu_num_images=10", "callbacks.fid.batch_size=10",
                                         "callbacks.fid.every_n_images=10", "sampling.num_inference_steps=2"])  # fmt: skip
    assert cfg.model.unet.sample_size * 2 == cfg.data.resolution == 32
    train(cfg)
    history = json.loads((run / "fid" / "history.json").read_text())
    assert [row["step"] for row in history] == [1, 2] and all(np.isfinite(row["val/fid"]) for row in history)
    assert (run / "fid_curve.png").is_file() and (run / "pipeline" / "model_index.json").is_file()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "val/loss" in r] == [1, 2]
