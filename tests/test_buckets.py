"""Aspect-ratio buckets on a real mixed-aspect shard set (portraits, landscapes, squares, tiny and huge images):
bucket math, the planned epochs over 2 ranks x 2 workers, geometry kept for SDXL, exact resume mid-epoch.

    .venv/bin/python -m pytest tests/test_buckets.py -q
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import webdataset as wds
from PIL import Image

from ldm.data.buckets import BucketError, assign_bucket, check_multiple, generate_buckets, parse_buckets
from ldm.data.datamodule import ShardDataModule
from ldm.data.shards import write_shards
from ldm.data.sizes import sample_sizes

# generated for a 64 x 64 pixel area, step 8, aspect ratio at most 2 (worked out by hand):
BUCKETS = [(48, 80), (56, 72), (64, 64), (72, 56), (80, 48)]
SPEC = {"area": 64 * 64, "step": 8, "max_aspect": 2.0}
SIZES = {  # (width, height) -> how many
    (60, 100): 7, (70, 90): 5, (50, 80): 3,  # portraits
    (100, 60): 9, (90, 70): 4,  # landscapes
    (64, 64): 6, (100, 100): 5,  # squares
    (30, 40): 3, (20, 20): 2,  # tiny: too small for any bucket
    (1600, 1200): 2, (700, 1400): 2,  # huge (JPEG, decoded at a reduced scale)
}  # fmt: skip


def nearest_bucket(size) -> tuple[int, int]:
    """The reference: the bucket whose aspect ratio is nearest (log space), by brute force over BUCKETS."""
    return min(BUCKETS, key=lambda b: abs(math.log(size[0] / size[1]) - math.log(b[0] / b[1])))


def fits(size) -> bool:
    bucket = nearest_bucket(size)
    return size[0] >= bucket[0] and size[1] >= bucket[1]


def gradient(w: int, h: int, seed: int) -> Image.Image:
    """A smooth image whose every pixel differs from its neighbours (so a crop is recognisable), compressible."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), np.full_like(x, 40 * seed % 256)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, dict[str, tuple[int, int]]]:
    """~48 captioned images of every kind in 7 uneven shards (PNG, the huge ones JPEG)."""
    root = tmp_path_factory.mktemp("mixed")
    samples, sizes = [], {}
    i = 0
    for size, n in SIZES.items():
        for _ in range(n):
            key = f"img{i:03d}"
            sizes[key] = size
            image = gradient(*size, seed=i)
            if max(size) > 500:
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                image = buffer.getvalue()
            samples.append((key, image, f"picture {i}, {size[0]}x{size[1]}"))
            i += 1
    order = np.random.default_rng(0).permutation(len(samples))  # kinds spread over the shards
    write_shards([samples[j] for j in order], root / "shards", samples_per_shard=8, image_format="keep",
                 progress=False)  # fmt: skip
    return root / "shards", sizes


# --- bucket math ----------------------------------------------------------------------------------------------


def test_generated_buckets_closed_form():
    assert generate_buckets(64 * 64, step=8, max_aspect=2.0) == BUCKETS
    assert parse_buckets(SPEC, resolution=512) == BUCKETS
    area = 1024 * 1024
    buckets = generate_buckets(area, step=64, max_aspect=2.0)
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= area and max(w, h) / min(w, h) <= 2.0
        assert (max(w, h) + 64) * min(w, h) > area  # for its short side, the long side is as long as the area allows
        assert (h, w) in buckets  # both orientations
    assert (1024, 1024) in buckets and (1152, 896) in buckets and (1344, 768) in buckets  # SDXL's own
    assert parse_buckets({"max_aspect": 2.0}, resolution=1024) == buckets  # area defaults to resolution^2, step 64
    assert parse_buckets(None, 512) is None and parse_buckets("off", 512) is None


@pytest.mark.parametrize("spec,message", [
    ({"max_aspect": 0.5}, r"max_aspect=0\.5 is below 1"),
    ([[512, 768], [512]], r"\[512\] is not a \[width, height\] pair"),
    ([], "empty list"),
    ([[64, 64], [64, 64]], "lists a size twice"),
    ({"ratio": 2}, "unknown keys"),
])  # fmt: skip
def test_bad_bucket_specs_are_one_line_errors(spec, message):
    with pytest.raises(BucketError, match=message) as error:
        parse_buckets(spec, resolution=64)
    assert "\n" not in str(error.value)


def test_bucket_sides_must_be_multiples_of_the_vae_factor():
    check_multiple([(512, 768)], 8)
    with pytest.raises(BucketError, match="500x768 is not a multiple of the VAE's downsampling factor 8"):
        check_multiple(parse_buckets([[512, 768], [500, 768]], 512), 8)


def test_assignment_nearest_aspect_ratio_largest_covered_never_upscaled():
    assert assign_bucket((3000, 2000), BUCKETS) == BUCKETS.index((80, 48))  # 1.5: nearer 1.67 than 1.29 (log)
    assert assign_bucket((600, 1200), BUCKETS) == BUCKETS.index((48, 80))
    assert assign_bucket((47, 80), BUCKETS) is None  # would need 2 % upscaling
    assert assign_bucket((47, 80), BUCKETS, upscale=True) == BUCKETS.index((48, 80))
    sizes = [(256, 256), (512, 512), (512, 768)]  # several sizes of one aspect ratio
    assert assign_bucket((300, 300), sizes) == 0  # the largest it covers
    assert assign_bucket((600, 600), sizes) == 1
    assert assign_bucket((200, 200), sizes) is None
    assert assign_bucket((200, 200), sizes, upscale=True) == 0  # the least upscaling
    for size in [(60, 100), (1600, 1200), (700, 1400), (90, 70)]:  # against the brute-force reference
        assert BUCKETS[assign_bucket(size, BUCKETS)] == nearest_bucket(size)


# --- sizes ----------------------------------------------------------------------------------------------------


def test_sizes_are_read_from_headers_once_with_exif_rotation(tmp_path):
    photo = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed as 30 wide, 50 high
    Image.new("RGB", (50, 30), "red").save(photo, format="JPEG", exif=exif)
    with wds.TarWriter(str(tmp_path / "000000.tar"), encoder=False) as writer:  # written elsewhere: no sizes.json
        writer.write({"__key__": "rotated", "jpg": photo.getvalue(), "txt": b"r"})
        writer.write({"__key__": "plain", "png": _png(Image.new("RGB", (7, 9))), "txt": b"p"})
        writer.write({"__key__": "broken", "png": b"not an image", "txt": b"b"})
    url = str(tmp_path / "000000.tar")
    assert sample_sizes([url]) == {url: {"rotated": (30, 50), "plain": (7, 9), "broken": None}}
    cached = json.loads((tmp_path / "sizes.json").read_text())["shards"]["000000.tar"]
    assert cached["sizes"] == {"rotated": [30, 50], "plain": [7, 9], "broken": None}
    cached["sizes"]["plain"] = [1, 1]  # the cache is what is read next time ...
    (tmp_path / "sizes.json").write_text(json.dumps({"shards": {"000000.tar": cached}}))
    assert sample_sizes([url])[url]["plain"] == (1, 1)
    with open(url, "ab") as f:  # ... until the shard changes
        f.write(b"\0" * 1024)
    assert sample_sizes([url])[url]["plain"] == (7, 9)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- planned epochs over 2 ranks x 2 workers ------------------------------------------------------------------


def rank_epochs(shards, monkeypatch, rank: int, epochs: int, state: dict | None = None, **kw) -> tuple[list, dict]:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    kw = {"resolution": 64, "batch_size": 3, "num_workers": 2, "buckets": SPEC, "seed": 5, "uint8": True, **kw}
    dm = ShardDataModule(str(shards), None, **kw)
    if state is not None:
        dm.load_state_dict(state)
    loader = dm.train_dataloader()
    out = []
    for _ in range(epochs):
        out.append(list(loader))
    return out, dm


def test_one_bucket_per_batch_every_sample_once_per_pass_across_ranks_and_workers(mixed, monkeypatch):
    shards, sizes = mixed
    fitting = {k for k, s in sizes.items() if fits(s)}
    per_bucket = Counter(nearest_bucket(sizes[k]) for k in fitting)
    epochs = {rank: rank_epochs(shards, monkeypatch, rank, epochs=2, center_crop=False, random_flip=False)
              for rank in range(2)}  # fmt: skip
    dm = epochs[0][1]
    assert len(epochs[0][0][0]) == len(epochs[1][0][0]) and len(epochs[0][0][1]) == len(epochs[1][0][1])

    trained = [Counter(), Counter()]
    for rank in range(2):
        for e, batches in enumerate(epochs[rank][0]):
            for batch in batches:
                h, w = batch["pixel_values"].shape[-2:]
                assert (batch["target_size"] == torch.tensor([h, w])).all()  # one bucket per batch
                for key, original, top_left in zip(batch["key"], batch["original_size"].tolist(),
                                                   batch["crop_top_left"].tolist()):  # fmt: skip
                    assert (w, h) == nearest_bucket(sizes[key]), key  # its aspect ratio's bucket
                    assert original == [sizes[key][1], sizes[key][0]]  # (height, width) before any resizing
                    scale = max(w / original[1], h / original[0])
                    assert scale <= 1 + 1e-9, key  # never upscaled
                    top, left = top_left
                    assert 0 <= top and top + h <= original[0] * scale + 1e-6  # the crop lies inside the image
                    assert 0 <= left and left + w <= original[1] * scale + 1e-6
                trained[e].update(batch["key"])
    assert not set(trained[0]) - fitting and not set(trained[1]) - fitting  # tiny images: left out ...
    too_small = len(sizes) - len(fitting)
    assert dm.train_health.totals()["too_small"] + epochs[1][1].train_health.totals()["too_small"] == 2 * too_small

    # pass 0: every fitting image once, but those of part-filled buckets (and of whole batches that would leave
    # the ranks uneven), which wait for pass 1; their number follows from the bucket counts alone
    report = dm.bucket_report(0)
    assert report["counts"] == [per_bucket[b] for b in BUCKETS]
    full_batches = sum(n // 3 for n in per_bucket.values())
    expected_carried = sum(n % 3 for n in per_bucket.values()) + 3 * (full_batches % 2)
    assert report["carried"] == expected_carried
    assert max(trained[0].values()) == 1 and len(trained[0]) == len(fitting) - expected_carried
    # over two passes, every image is trained twice, less the visits carried into pass 2 (none waits longer)
    carried2 = Counter(key for (url, key, p) in _carried(dm, 2))
    for key in fitting:
        assert trained[0][key] + trained[1][key] + carried2[key] == 2, key


def _carried(dm: ShardDataModule, pass_index: int) -> list:
    records = dm._planner.records
    return [(records[i].url, records[i].key, p) for i, p in dm._chain.carried_in(pass_index)]


def test_crops_are_the_pixels_of_the_image_where_the_batch_says(mixed, monkeypatch):
    """The geometry in the batch is the truth: cropping PIL's own resize of the original at crop_top_left gives
    the batch's pixels (random crops, no flip; JPEGs decoded in full: jpeg_draft is off)."""
    shards, sizes = mixed
    (batches,), _ = rank_epochs(shards, monkeypatch, 0, epochs=1, center_crop=False, random_flip=False,
                                num_workers=0)  # fmt: skip
    from ldm.data.bucketed import KeyReader

    reader = KeyReader()
    urls = {k: url for url, keys in sample_sizes(sorted(str(p) for p in shards.glob("*.tar"))).items() for k in keys}
    checked = 0
    for batch in batches:
        h, w = batch["pixel_values"].shape[-2:]
        for key, pixels, (top, left) in zip(batch["key"], batch["pixel_values"], batch["crop_top_left"].tolist()):
            raw = reader.read(urls[key], key)
            image = Image.open(io.BytesIO(raw.get("png") or raw["jpg"])).convert("RGB")
            ow, oh = image.size
            scale = max(w / ow, h / oh)
            size = (w, max(h, int(oh * w / ow))) if w / ow >= h / oh else (max(w, int(ow * h / oh)), h)
            reference = np.asarray(image.resize(size, Image.Resampling.BILINEAR).crop((left, top, left + w, top + h)))
            assert scale <= 1 and np.array_equal(pixels.permute(1, 2, 0).numpy(), reference), key
            checked += 1
    assert checked > 12  # this rank's share


def test_resume_mid_epoch_gives_the_same_batches(mixed, monkeypatch):
    """A fresh data module told the position (pass, batches trained, visits carried into the pass) continues
    with exactly the batches, pixels and crops of the uninterrupted stream, on both ranks, with 2 workers."""
    shards, _ = mixed
    for rank in range(2):
        (e0, e1, e2), dm = rank_epochs(shards, monkeypatch, rank, epochs=3, center_crop=False)
        state = {"epoch_start_pass": 1, "batches": 4, "carried": [list(v) for v in _carried(dm, 1)]}
        assert state["carried"]  # the position really holds carried visits
        (r1, r2), _ = rank_epochs(shards, monkeypatch, rank, epochs=2, state=state, center_crop=False)
        for expected, got in [(e1[4:], r1), (e2, r2)]:
            assert [b["key"] for b in got] == [b["key"] for b in expected]
            for a, b in zip(expected, got):
                assert torch.equal(a["pixel_values"], b["pixel_values"])
                assert torch.equal(a["crop_top_left"], b["crop_top_left"]) and a["caption"] == b["caption"]


class Probe(pl.LightningModule):
    """Records the keys and shape of every training batch."""

    def __init__(self, log_path: Path):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.log_path = log_path

    def training_step(self, batch, batch_idx):
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"step": self.global_step, "keys": batch["key"],
                                "shape": list(batch["pixel_values"].shape)}) + "\n")  # fmt: skip
        return self.layer(batch["pixel_values"].float().mean((2, 3))).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_resume_from_a_checkpoint_mid_epoch(mixed, tmp_path):
    """A real Trainer: stopped after step 9 (mid-epoch 1, with visits carried from pass 0), resumed from the
    checkpoint in a new Trainer and data module: the same batches as the uninterrupted run, step for step."""
    shards, _ = mixed
    kw = dict(resolution=64, batch_size=5, num_workers=2, buckets=SPEC, seed=1, uint8=True, center_crop=False)

    def fit(log: Path, max_steps: int, ckpt_path=None):
        trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=[pl.callbacks.ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=1,
                                                                     save_top_k=-1)])  # fmt: skip
        trainer.fit(Probe(log), datamodule=ShardDataModule(str(shards), None, **kw), ckpt_path=ckpt_path)

    fit(tmp_path / "reference.jsonl", 12)
    (tmp_path / "ckpt").rename(tmp_path / "ckpt-reference")
    fit(tmp_path / "first.jsonl", 9)
    checkpoint = tmp_path / "ckpt" / "epoch=1-step=9.ckpt"
    position = torch.load(checkpoint, weights_only=True)["ShardDataModule"]
    assert position["epoch_start_pass"] == 1 and position["batches"] > 0 and position["carried"]  # mid-epoch
    fit(tmp_path / "resumed.jsonl", 12, ckpt_path=str(checkpoint))
    rows = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    reference, resumed = rows("reference.jsonl"), rows("resumed.jsonl")
    assert [r["step"] for r in resumed] == [9, 10, 11]
    assert resumed == reference[9:]
    assert len({tuple(r["shape"][-2:]) for r in reference}) > 1  # several buckets


def test_batch_larger_than_every_bucket_can_fill_is_a_one_line_error(mixed, monkeypatch):
    shards, _ = mixed
    with pytest.raises(ValueError, match=r"data.batch_size=64 is larger than every bucket can fill") as error:
        rank_epochs(shards, monkeypatch, 0, epochs=0, batch_size=64)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="no image fits a bucket.*data.upscale=true"):
        rank_epochs(shards, monkeypatch, 0, epochs=0, buckets=[[4096, 4096]])


def test_upscale_takes_the_small_images_in(mixed, monkeypatch):
    shards, sizes = mixed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (batches,), dm = rank_epochs(shards, monkeypatch, 0, epochs=1, upscale=True, num_workers=0)
    report = dm.bucket_report(0)
    assert report["too_small"] == 0 and sum(report["counts"]) == len(sizes)
    tiny = [k for k, s in sizes.items() if not fits(s)]
    seen = {k for b in batches for k in b["key"]}
    assert set(tiny) & seen  # this rank's share holds some of them, upscaled into their bucket


def test_config_check_names_a_batch_no_bucket_can_fill_in_seconds(mixed):
    """The same verdict from the run's check (`ldm.run.data_check`, right after the imports, before anything is
    built; image sizes from sizes.json)."""
    import time

    from omegaconf import OmegaConf

    from ldm.run.data_check import check_buckets
    from ldm.utils.rules import ConfigError

    shards, _ = mixed
    data = {"train_shards": str(shards), "resolution": 64, "batch_size": 16, "buckets": SPEC, "upscale": False}
    counts = Counter(nearest_bucket(size) for size in sizes_of(mixed) if fits(size))
    listed = ", ".join(f"{w}x{h}: {counts[(w, h)]}" for w, h in BUCKETS)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"^data.batch_size=16 is larger than every bucket can fill \(the fullest "
                                          rf"holds {max(counts.values())}: {listed}\)"):  # fmt: skip
        check_buckets(OmegaConf.create({"data": data}))
    assert time.monotonic() - start < 10
    check_buckets(OmegaConf.create({"data": {**data, "batch_size": max(counts.values())}}))


def sizes_of(mixed) -> list:
    return list(mixed[1].values())


def test_a_batch_that_lost_every_sample_keeps_the_ranks_step_count(tmp_path, monkeypatch):
    """Truncated JPEGs whose headers still give their size (so they are planned into a batch of their own bucket)
    fail when decoded: each is skipped with a warning naming it, and the batch left empty is replaced by a repeat,
    so the rank runs its planned number of steps (DDP ranks would otherwise wait for each other forever)."""
    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "000000.tar"), encoder=False) as writer:
        for i in range(6):
            writer.write({"__key__": f"g{i}", "png": _png(gradient(64, 64, i)), "txt": b"square"})
        for i in range(3):
            buffer = io.BytesIO()
            gradient(48, 80, i).save(buffer, format="JPEG")
            writer.write({"__key__": f"b{i}", "jpg": buffer.getvalue()[:700], "txt": b"portrait, truncated"})
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    dm = ShardDataModule(str(tmp_path / "shards"), None, resolution=64, batch_size=3, num_workers=0, buckets=SPEC,
                         max_bad_fraction=0.5)  # fmt: skip
    assert dm.bucket_report(0)["counts"] == [3, 0, 6, 0, 0]  # the truncated ones planned (their sizes are known)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(dm.train_dataloader())
    assert len(batches) == 3  # 2 square batches + the portrait batch, replaced by a repeat
    assert all(len(b["key"]) == 3 and all(k.startswith("g") for k in b["key"]) for b in batches)
    assert dm.train_health.totals()["skipped"] == 3
    assert all(any(f"'b{i}'" in str(w.message) for w in caught) for i in range(3))


def test_a_key_in_two_shards_is_planned_once_with_a_warning(tmp_path):
    from ldm.data.sizes import plan_records

    for name, colour in (("a", "red"), ("b", "blue")):
        write_shards([("same", Image.new("RGB", (64, 64), colour), name), (f"own_{name}", Image.new("RGB", (64, 64)), name)],
                     tmp_path / name, image_format="png", progress=False)  # fmt: skip
    urls = [str(tmp_path / "a" / "000000.tar"), str(tmp_path / "b" / "000000.tar")]
    with pytest.warns(UserWarning, match=r"1 keys name samples in several shards, e\.g\. 'same' in .*a/000000\.tar"):
        records = plan_records(urls)
    assert [(Path(r.url).parent.name, r.key) for r in records] == [("a", "same"), ("a", "own_a"), ("b", "own_b")]
