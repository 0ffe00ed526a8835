"""DreamBooth: batches of instance and class samples with their loss weights; class images generated with the base
model when missing or short, written as shards and reused.

    .venv/bin/python -m pytest tests/test_dreambooth.py -q
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_helpers import read_losses
from hydra.utils import instantiate
from PIL import Image
from tiny import compose_config, make_tiny_root

from ldm.data.datamodule import ShardDataModule
from ldm.data.format import read_manifest
from ldm.data.shards import write_shards
from ldm.data.webdataset import make_shard_dataset
from ldm.run.class_images import ensure_class_images
from ldm.run.fit import train

BUCKETS = [[48, 80], [64, 64], [80, 48]]


def photos(n: int, sizes, prefix: str, caption: str) -> list:
    rng = np.random.default_rng(len(prefix))
    return [(f"{prefix}{i:03d}", Image.fromarray(rng.integers(0, 255, (sizes[i % len(sizes)][1],
                                                                         sizes[i % len(sizes)][0], 3), dtype=np.uint8)),
             caption) for i in range(n)]  # fmt: skip


def test_batches_hold_instance_and_class_samples_of_one_bucket_with_their_weights(tmp_path, monkeypatch):
    write_shards(photos(11, [(60, 100), (100, 60), (70, 70)], "sks", "a photo of sks dog"), tmp_path / "instance",
                 samples_per_shard=4, image_format="png", progress=False)  # fmt: skip
    write_shards(photos(9, [(48, 80), (80, 48), (64, 64)], "class", "a photo of a dog"), tmp_path / "class",
                 samples_per_shard=5, image_format="png", progress=False)  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")
    instance_seen, class_seen = Counter(), Counter()
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        dm = ShardDataModule(str(tmp_path / "instance"), None, resolution=64, batch_size=2, num_workers=2,
                             buckets=BUCKETS, captions={"trigger": "sks"}, uint8=True,
                             dreambooth={"class_prompt": "a photo of a dog", "class_shards": str(tmp_path / "class"),
                                         "num_class_images": 9, "prior_loss_weight": 0.3})  # fmt: skip
        batches = list(dm.train_dataloader())
        assert batches
        for batch in batches:
            kinds = ["class" if k.startswith("class") else "instance" for k in batch["key"]]
            assert kinds == ["instance", "instance", "class", "class"]  # batch_size of each kind
            assert batch["loss_weight"].tolist() == pytest.approx([1.0, 1.0, 0.3, 0.3])
            assert len({tuple(t) for t in batch["target_size"].tolist()}) == 1  # one bucket for both kinds
            for key, caption in zip(batch["key"], batch["caption"]):  # the trigger only on instance captions
                assert caption == ("sks, a photo of sks dog" if key.startswith("sks") else "a photo of a dog")
            instance_seen.update(batch["key"][:2])
            class_seen.update(batch["key"][2:])
        carried = dm.bucket_report(0)["carried"]
    assert max(instance_seen.values()) == 1 and len(instance_seen) + carried == 11  # each once per pass (or carried)
    assert len(class_seen) > 3


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_root(tmp_path_factory.mktemp("tiny"))


FAST = ["logger=none", "callbacks.fid=null", "callbacks.export=null", "callbacks.sample_grid=null",
        "callbacks.checkpoint=null", "data.batch_size=2", "trainer.max_steps=2"]  # fmt: skip


def test_class_images_are_generated_once_with_the_base_model_and_reused(tiny_root, tmp_path):
    classes = tmp_path / "class_images"
    dreambooth = f"data.dreambooth={{class_prompt: 'a small red circle', class_shards: {classes}, num_class_images: 5}}"
    losses = tmp_path / "losses.jsonl"
    cfg = compose_config(tiny_root, tmp_path / "run", [*FAST, dreambooth, "+callbacks.record._target_="
                                                       "fault_helpers.RecordLoss", f"+callbacks.record.path={losses}"])
    train(cfg)
    manifest = read_manifest(classes)
    assert manifest["total"] == 5
    generated = list(make_shard_dataset(classes, 16, random_flip=False, shuffle_buffer=0, uint8=True))
    assert sorted(s["key"] for s in generated) == [f"class_{i:06d}" for i in range(5)]
    assert {s["caption"] for s in generated} == {"a small red circle"} and all(s["original_size"] == (16, 16)
                                                                              for s in generated)  # fmt: skip
    rows = read_losses(losses)
    assert len(rows) == 2 and all(sum(k.startswith("class_") for k in r["keys"]) == 2 and len(r["keys"]) == 4
                                  for r in rows)  # 2 instance + 2 class samples a step  # fmt: skip

    # the base model made them: the same seeds through the stage as built from the config give the same images
    module = instantiate(cfg.model, _convert_="all")
    module.build_frozen()
    again = module.generate(["a small red circle"] * 2, seed=[0, 1], use_ema=False, size=(16, 16))
    stored = torch.stack([s["pixel_values"] for s in generated[:2]]).float() / 255
    assert (again - stored).abs().max() <= 1 / 255 + 1e-6

    # the next run reuses them; a larger num_class_images adds only the missing ones, in a new shard
    datamodule = instantiate(cfg.data, _convert_="all")
    first_shard = (classes / "000000.tar").stat().st_mtime_ns
    assert ensure_class_images(datamodule, module) == 0
    more = instantiate(compose_config(tiny_root, tmp_path / "run", [*FAST, dreambooth.replace("5}", "7}")]).data,
                       _convert_="all")  # fmt: skip
    assert ensure_class_images(more, module) == 2
    assert read_manifest(classes)["total"] == 7 and (classes / "000000.tar").stat().st_mtime_ns == first_shard
    assert json.loads((classes / "sizes.json").read_text())["shards"]["000001.tar"]["sizes"] == {
        "class_000005": [16, 16], "class_000006": [16, 16]}  # fmt: skip

    # a class set of another prompt is refused, not overwritten
    other = instantiate(compose_config(tiny_root, tmp_path / "run", [*FAST, dreambooth.replace(
        "a small red circle", "a blue square").replace("5}", "9}")]).data, _convert_="all")  # fmt: skip
    with pytest.raises(ValueError, match="holds images of 'a small red circle', not of class_prompt 'a blue square'"):
        ensure_class_images(other, module)
    assert read_manifest(classes)["total"] == 7



def test_dreambooth_with_lora_generates_class_images_with_the_base_pipeline(tiny_root, tmp_path):
    """LoRA on a "pretrained" pipeline directory: the class images are the base pipeline's own images (diffusers'
    StableDiffusionPipeline, one seed each), the adapters untouched by them; then the adapters train on instance
    and class samples."""
    from diffusers import StableDiffusionPipeline
    from test_lora import lora_config, save_base_pipeline

    base = save_base_pipeline(tiny_root, tmp_path / "sd-tiny")
    classes = tmp_path / "class_images"
    losses = tmp_path / "losses.jsonl"
    cfg = lora_config(tiny_root, base, tmp_path / "run", [
        *FAST, f"data.dreambooth={{class_prompt: 'a small red circle', class_shards: {classes}, num_class_images: 3}}",
        "+callbacks.record._target_=fault_helpers.RecordLoss", f"+callbacks.record.path={losses}"])  # fmt: skip
    train(cfg)
    stored = {s["key"]: s["pixel_values"].float() / 255
              for s in make_shard_dataset(classes, 16, random_flip=False, shuffle_buffer=0, uint8=True)}  # fmt: skip
    pipe = StableDiffusionPipeline.from_pretrained(base)
    for i in range(3):
        image = pipe(["a small red circle"], height=16, width=16, num_inference_steps=cfg.sampling.num_inference_steps,
                     guidance_scale=cfg.sampling.guidance_scale, output_type="pt",
                     generator=torch.Generator().manual_seed(i)).images[0].float()  # fmt: skip
        assert (image - stored[f"class_{i:06d}"]).abs().max() <= 1 / 255 + 2e-4, i
    rows = read_losses(losses)
    assert len(rows) == 2 and all(sum(k.startswith("class_") for k in r["keys"]) == 2 for r in rows)
    assert all(np.isfinite(r["loss"]) for r in rows)
