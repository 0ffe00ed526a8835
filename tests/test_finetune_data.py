"""Fine-tuning inputs: tag captions, loss masks in shards, Hugging Face `datasets` directories, DreamBooth sizes.

    .venv/bin/python -m pytest tests/test_finetune_data.py -q
"""

from __future__ import annotations

import io
import json
import random
import runpy
import warnings
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ldm.data.captions import CaptionProcessor
from ldm.data.dreambooth import class_image_sizes
from ldm.data.shards import samples_from_folder, write_shards
from ldm.data.webdataset import make_shard_dataset

REPO = Path(__file__).resolve().parents[1]
TAGS = "portrait of a woman, red hair, smiling, outdoors, freckles, sunlight, bokeh"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- tag captions ---------------------------------------------------------------------------------------------


def test_tag_shuffling_keeps_the_first_keep_tokens():
    tags = [t.strip() for t in TAGS.split(",")]
    for keep in range(4):
        shuffle = CaptionProcessor(keep_tokens=keep, shuffle_tags=True)
        orders = set()
        for seed in range(40):
            out = shuffle(TAGS, random.Random(seed)).split(", ")
            assert out[:keep] == tags[:keep]  # the first keep_tokens stay in place
            assert sorted(out[keep:]) == sorted(tags[keep:])  # the rest: a permutation, nothing lost
            orders.add(tuple(out))
        assert len(orders) > 12  # and really shuffled (keep=3 leaves 4! = 24 orders)


def test_tag_dropout_drops_only_the_unkept_tags_at_its_rate_and_the_trigger_leads():
    drop = CaptionProcessor(keep_tokens=2, tag_dropout=0.3, trigger="sks")
    tags = [t.strip() for t in TAGS.split(",")]
    kept = Counter()
    n = 2000
    for seed in range(n):
        out = drop(TAGS, random.Random(seed)).split(", ")
        assert out[:3] == ["sks", *tags[:2]]  # trigger first, then the kept tags, never dropped
        assert out[3:] == [t for t in tags[2:] if t in out[3:]]  # no shuffle: order kept
        kept.update(out[3:])
    for tag in tags[2:]:  # each other tag survives with probability 0.7 (binomial: 5 sigma ~ 0.05)
        assert abs(kept[tag] / n - 0.7) < 0.05, (tag, kept[tag] / n)
    assert drop("sks, a photo", random.Random(0)).split(", ")[0] == "sks"  # not doubled
    assert CaptionProcessor(keep_tokens=1)("a sentence, with a comma", random.Random(0)) == "a sentence, with a comma"


def test_tag_captions_are_deterministic_per_seed_pass_and_key(tmp_path):
    write_shards([(f"k{i}", Image.new("RGB", (8, 8)), TAGS) for i in range(6)], tmp_path, image_format="png",
                 progress=False)  # fmt: skip

    def captions(seed: int, pass_index: int) -> dict[str, str]:
        dataset = make_shard_dataset(tmp_path, 8, seed=seed, shuffle_buffer=4,
                                     captions=CaptionProcessor(keep_tokens=1, shuffle_tags=True))  # fmt: skip
        for stage in dataset.pipeline:  # start at pass `pass_index`, as a resumed run does
            if hasattr(stage, "passes"):
                stage.passes = pass_index
        return {s["key"]: s["caption"] for s in dataset}

    first = captions(0, 0)
    assert captions(0, 0) == first  # the same visit: the same caption, whatever the order it is read in
    assert captions(0, 1) != first and captions(1, 0) != first  # another pass, another seed: other orders
    assert all(c.startswith("portrait of a woman, ") for c in first.values())


# --- masks ----------------------------------------------------------------------------------------------------


def test_masks_follow_the_image_through_resize_flip_and_crop(tmp_path):
    """A mask (white = learn) of another size than its image is resized to it, then resized, flipped and cropped
    exactly as the image: the image's left half is red, the mask's left half white, whatever the crop and flip."""
    image = Image.new("RGB", (80, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 40, 40))  # red left half
    mask = Image.new("L", (20, 10), 0)
    mask.paste(255, (0, 0, 10, 10))  # white left half, at a quarter of the image's size
    write_shards([("m", image, "masked", mask), ("plain", image, "no mask")], tmp_path, image_format="png",
                 progress=False)  # fmt: skip
    with wds.WebDataset(str(tmp_path / "000000.tar"), shardshuffle=False) as reader:
        assert "mask.png" in next(iter(reader))  # written as <key>.mask.png
    flips = set()
    for seed in range(12):
        samples = {s["key"]: s for s in make_shard_dataset(tmp_path, 32, seed=seed, center_crop=False, uint8=True)}
        m = samples["m"]
        red = m["pixel_values"][0].float() > 127  # (H, W): where the image is red
        learn = m["mask"][0].float() > 127
        assert m["mask"].shape == (1, 32, 32) and learn.shape == red.shape
        edge = (red != learn).float().mean()  # only the bilinear seam may disagree
        assert edge < 0.07, (seed, edge)
        flips.add(bool(red[:, 0].all()))
        assert "mask" not in samples["plain"]
    assert flips == {True, False}  # flipped and unflipped, the mask followed


def test_an_unreadable_mask_skips_the_sample_with_a_named_warning(tmp_path):
    good = png(Image.new("RGB", (8, 8)))
    with wds.TarWriter(str(tmp_path / "000000.tar"), encoder=False) as writer:
        writer.write({"__key__": "ok", "png": good, "txt": b"fine"})
        writer.write({"__key__": "bad", "png": good, "mask.png": b"garbage", "txt": b"broken mask"})
    dataset = make_shard_dataset(tmp_path, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [s["key"] for s in dataset]
    assert keys == ["ok"] and dataset.health.totals()["skipped"] == 1
    assert any("'bad'" in str(w.message) and "mask" in str(w.message) and "000000.tar" in str(w.message)
               for w in caught)  # fmt: skip


def test_folder_masks_and_one_caption_for_all(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (16, 12), "green").save(root / f"{name}.jpg")
    Image.new("L", (16, 12), 255).save(root / "a.mask.png")
    samples = list(samples_from_folder(root, caption="a photo of sks dog"))
    assert [s[0] for s in samples] == ["a", "b"] and all(s[2] == "a photo of sks dog" for s in samples)
    assert samples[0][3].name == "a.mask.png" and len(samples[1]) == 3  # the mask is not an image of its own


# --- Hugging Face datasets directories ------------------------------------------------------------------------


def _hf_images() -> list[Image.Image]:
    return [Image.new("RGB", (12 + 4 * i, 10), (40 * i, 200, 0)) for i in range(4)]


@pytest.mark.parametrize("layout", ["parquet", "imagefolder", "save_to_disk"])
def test_make_shards_reads_a_hugging_face_datasets_directory(tmp_path, layout):
    src, images = tmp_path / "hf", _hf_images()
    captions = [f"a picture number {i}" for i in range(4)]
    table = datasets.Dataset.from_dict({"image": images, "text": captions}).cast_column("image", datasets.Image())
    if layout == "parquet":
        (src / "data").mkdir(parents=True)
        table.to_parquet(str(src / "data" / "train-00000-of-00001.parquet"))
    elif layout == "imagefolder":
        src.mkdir()
        for i, image in enumerate(images):
            image.save(src / f"img{i}.png")
        (src / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"img{i}.png", "text": c}) + "\n"
                                                    for i, c in enumerate(captions)))  # fmt: skip
    else:
        table.save_to_disk(str(src))
    cli = runpy.run_path(str(REPO / "scripts" / "make_shards.py"), run_name="make_shards")["main"]
    cli([str(src), str(tmp_path / "out"), "--source", "hf", "--format", "png", "--no-progress"])
    read = {s["caption"]: s for s in make_shard_dataset(tmp_path / "out", 10, random_flip=False, uint8=True)}
    assert sorted(read) == captions
    for i, caption in enumerate(captions):  # lossless: the right image with the right caption
        assert read[caption]["original_size"] == (10, 12 + 4 * i)
        assert tuple(read[caption]["pixel_values"][:, 5, 5].tolist()) == (40 * i, 200, 0)
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())["shards"]["000000.tar"]["sizes"]
    assert sorted(map(tuple, sizes.values())) == [(12 + 4 * i, 10) for i in range(4)]


def test_hf_source_names_a_missing_column(tmp_path):
    from ldm.data.hf import samples_from_hf

    table = datasets.Dataset.from_dict({"image": _hf_images(), "label": [0, 1, 2, 3]})
    table.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match=r"no caption column found among \['image', 'label'\]"):
        list(samples_from_hf(tmp_path / "ds"))
    with pytest.raises(ValueError, match="no image column 'photo'"):
        list(samples_from_hf(tmp_path / "ds", image_column="photo", caption_column="label"))


# --- DreamBooth class image sizes -----------------------------------------------------------------------------


def test_class_images_go_to_the_instance_buckets_in_proportion():
    buckets = [(48, 80), (64, 64), (80, 48)]
    sizes = class_image_sizes(buckets, [6, 3, 0], 10)
    assert Counter(sizes) == {(48, 80): 7, (64, 64): 3}  # 10 * 6/9 = 6.67 -> 7, 10 * 3/9 = 3.33 -> 3
    topped_up = class_image_sizes(buckets, [6, 3, 0], 5, have=[8, 0, 0])  # 13 in all: 8.67 and 4.33 wanted
    assert Counter(topped_up) == {(48, 80): 1, (64, 64): 4}
    assert class_image_sizes(buckets, [1, 1, 1], 0) == []


def test_a_pass_of_only_too_small_images_says_how_to_take_them_in(tmp_path):
    from ldm.data.datamodule import ShardDataModule
    from ldm.data.health import DataError

    write_shards([(f"s{i}", Image.new("RGB", (8, 8)), "small") for i in range(4)], tmp_path, image_format="png",
                 progress=False)  # fmt: skip
    dm = ShardDataModule(str(tmp_path), None, resolution=16, batch_size=2, num_workers=0)  # upscale off by default
    with pytest.raises(DataError, match=r"4 images were smaller than their target size \(set data.upscale=true"):
        list(dm.train_dataloader())
    dm = ShardDataModule(str(tmp_path), None, resolution=16, batch_size=2, num_workers=0, upscale=True)
    assert sum(len(b["key"]) for b in dm.train_dataloader()) == 4
