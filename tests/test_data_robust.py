"""Robust data path on real tar shards in tmp_path: writer sources and options, exactly-once
rank x worker reads, resampled epochs, and every kind of damage (skipped, warned, counted).

    .venv/bin/python -m pytest tests/test_data_robust.py -q
"""

import csv
import hashlib
import io
import json
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from ldm.data.datamodule import EpochLoader, ShardDataModule
from ldm.data.format import expand_urls, read_manifest, write_manifest
from ldm.data.health import DataError, DataHealth
from ldm.data.shards import samples_from_class_folders, samples_from_folder, samples_from_shards, write_shards
from ldm.data.webdataset import collate, make_shard_dataset


def image_bytes(color=(200, 30, 30), size=(12, 12), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def write_raw_shard(path: Path, samples: list[dict]) -> Path:
    """A shard written with the bare TarWriter, holding exactly the bytes a test needs."""
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write({k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()})
    return path


def good_shards(root: Path, counts: list[int], size=8) -> list[str]:
    """Shards of solid images, keys "s<shard>_<i>", written by write_shards (so with a manifest)."""
    samples = [(f"s{s}_{i}", Image.new("RGB", (size, size), (s * 40, i % 250, 9)), f"shard {s} image {i}")
               for s, n in enumerate(counts) for i in range(n)]  # fmt: skip
    out = root / "shards"
    # one shard per entry of counts: cut by samples_per_shard = the largest, then re-split by hand
    paths = []
    for s, n in enumerate(counts):
        part = write_shards(samples[sum(counts[:s]) : sum(counts[: s + 1])], root / f"part{s}",
                            samples_per_shard=max(n, 1), image_format="png", progress=False)  # fmt: skip
        out.mkdir(exist_ok=True)
        target = out / f"{s:06d}.tar"
        part[0].rename(target)
        paths.append(str(target))
    write_manifest(out)
    return paths


def read_keys(urls, **kw) -> list[str]:
    kw.setdefault("shuffle_buffer", 0)
    return [s["key"] for s in make_shard_dataset(urls, 8, random_flip=False, **kw)]


def caught_messages(fn) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


# --- writing -------------------------------------------------------------------------------------


def test_metadata_csv_and_class_folders(tmp_path):
    root = tmp_path / "hf"
    root.mkdir()
    with (root / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        for i in range(3):
            Image.new("RGB", (10, 10), (0, 80 * i, 0)).save(root / f"im{i}.jpg")
            writer.writerow([f"im{i}.jpg", f"a green one, {i}"])
    assert [(k, c) for k, _, c in samples_from_folder(root)] == [(f"im{i}", f"a green one, {i}") for i in range(3)]

    classes = tmp_path / "classes"
    for label in ("cat", "sports_car"):
        (classes / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (6, 6)).save(classes / label / f"{i:04d}.jpg")
    samples = list(samples_from_class_folders(classes, "a photo of a {label}"))
    assert [(k, c) for k, _, c in samples] == [
        ("cat_0000", "a photo of a cat"), ("cat_0001", "a photo of a cat"),
        ("sports_car_0000", "a photo of a sports car"), ("sports_car_0001", "a photo of a sports car"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="label"):
        list(samples_from_class_folders(classes, "no placeholder"))


def test_manifest_sizes_hashes_and_byte_cut(tmp_path):
    samples = [(f"{i:04d}", Image.effect_noise((32, 32), 60).convert("RGB"), f"noise {i}") for i in range(12)]
    paths = write_shards(samples, tmp_path, samples_per_shard=100, image_format="png", max_shard_bytes=8000,
                         progress=False)  # fmt: skip
    manifest = read_manifest(tmp_path)
    assert len(paths) > 1 and manifest["total"] == 12 and sum(s["count"] for s in manifest["shards"]) == 12
    for shard, path in zip(manifest["shards"], paths):
        data = path.read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    for shard in manifest["shards"][:-1]:  # cut once a shard reaches the limit, not much later
        assert 8000 <= shard["bytes"] < 8000 + 10240 + 5000  # + a tar record (10 kB) + one sample


def test_resize_long_side_and_format(tmp_path):
    write_shards([("big", Image.new("RGB", (300, 120), "blue"), "wide"), ("small", Image.new("RGB", (40, 50)), "s")],
                 tmp_path, image_format="webp", quality=80, max_size=100, progress=False)  # fmt: skip
    with tarfile.open(tmp_path / "000000.tar") as tar:
        sizes = {m.name: Image.open(tar.extractfile(m)).size for m in tar if m.name.endswith(".webp")}
    assert sizes == {"big.webp": (100, 40), "small.webp": (40, 50)}  # never upscaled


def test_crash_then_resume_writes_each_sample_once(tmp_path):
    def samples(crash_at=None):
        for i in range(10):
            if i == crash_at:
                raise KeyboardInterrupt
            yield f"{i:04d}", Image.new("RGB", (4, 4), (i, 0, 0)), f"c{i}"

    with pytest.raises(KeyboardInterrupt):
        write_shards(samples(crash_at=7), tmp_path, samples_per_shard=3, image_format="png", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.tar", "000001.tar"]
    (tmp_path / "000002.tar.tmp").write_bytes(b"half a shard")  # as a hard kill would leave it
    before = (tmp_path / "000000.tar").stat().st_mtime_ns

    write_shards(samples(), tmp_path, samples_per_shard=3, image_format="png", progress=False, resume=True)
    assert (tmp_path / "000000.tar").stat().st_mtime_ns == before  # kept, not rewritten
    assert not list(tmp_path.glob("*.tmp"))
    manifest = read_manifest(tmp_path)
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 3, 1] and manifest["total"] == 10
    assert Counter(read_keys(tmp_path)) == Counter(f"{i:04d}" for i in range(10))


def test_unreadable_source_image_is_skipped_and_counted(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bad.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (4, 4)).save(tmp_path / "src" / "good.jpg")
    samples = [("bad", tmp_path / "src" / "bad.jpg", "x"), ("good", tmp_path / "src" / "good.jpg", "y")]
    _, messages = caught_messages(lambda: write_shards(samples, tmp_path / "out", progress=False))
    assert any("bad" in m for m in messages)
    assert read_manifest(tmp_path / "out")["skipped"] == 1 and read_keys(tmp_path / "out") == ["good"]


def test_img2dataset_output_read_as_is_and_reshard(tmp_path):
    """img2dataset: 00000.tar with <key>.jpg/.txt/.json, plus _stats.json and .parquet beside it."""
    folder = tmp_path / "laion"
    folder.mkdir()
    for s in range(2):
        write_raw_shard(folder / f"{s:05d}.tar", [
            {"__key__": f"{s:05d}{i:04d}", "jpg": image_bytes(fmt="JPEG"), "txt": f"photo {s} {i}",
             "json": json.dumps({"caption": f"photo {s} {i}", "url": "http://x", "width": 12, "key": "k"})}
            for i in range(3)
        ])  # fmt: skip
        (folder / f"{s:05d}_stats.json").write_text("{}")
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1")
    manifest = write_manifest(folder)
    assert manifest["total"] == 6 and [s["name"] for s in manifest["shards"]] == ["00000.tar", "00001.tar"]
    assert sorted(read_keys(folder)) == sorted(f"{s:05d}{i:04d}" for s in range(2) for i in range(3))

    write_shards(samples_from_shards(folder), tmp_path / "resharded", samples_per_shard=4, progress=False)
    assert read_manifest(tmp_path / "resharded")["total"] == 6


def test_make_shards_cli_classes_and_manifest_only(tmp_path):
    import runpy

    classes = tmp_path / "classes"
    for label in ("dog", "frog"):
        (classes / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(classes / label / f"{i}.jpg")
    cli = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "make_shards.py"), run_name="x")["main"]
    cli([str(classes), str(tmp_path / "out"), "--samples-per-shard", "4", "--no-progress"])
    captions = {s["caption"] for s in make_shard_dataset(tmp_path / "out", 8)}
    assert captions == {"a photo of a dog", "a photo of a frog"}
    (tmp_path / "out" / "manifest.json").unlink()
    cli([str(tmp_path / "out"), "--manifest-only"])
    assert read_manifest(tmp_path / "out")["total"] == 6


# --- reading: urls, exactly once, resampled ------------------------------------------------------


def test_list_file_pipe_and_fsspec_urls(tmp_path):
    paths = good_shards(tmp_path, [3, 2])
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# my shards\nshards/000000.tar\n{paths[1]}\n")
    assert expand_urls(listing) == paths
    expected = sorted(f"s{s}_{i}" for s, n in enumerate([3, 2]) for i in range(n))
    assert sorted(read_keys(listing)) == expected
    assert sorted(read_keys([f"pipe:cat {p}" for p in paths])) == expected

    import fsspec

    memory = fsspec.filesystem("memory")
    for p in paths:
        memory.pipe(f"/test-shards/{Path(p).name}", Path(p).read_bytes())
    assert sorted(read_keys("memory://test-shards/{000000..000001}.tar")) == expected


@pytest.mark.parametrize("counts", [[5, 5, 5, 5, 5, 5, 5, 5], [7, 3, 5, 1, 4, 6, 2]])
def test_two_ranks_two_workers_see_every_sample_exactly_once(tmp_path, monkeypatch, counts):
    """Ranks simulated by env RANK/WORLD_SIZE (what webdataset and torchrun use); each rank a
    DataLoader with 2 worker processes. Uneven shards: every rank still gets the same batch count."""
    paths = good_shards(tmp_path, counts)
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen, batches_per_rank = Counter(), []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        dm = ShardDataModule(str(tmp_path / "shards"), None, resolution=8, batch_size=3, num_workers=2,
                             shuffle_buffer=4, seed=3)  # fmt: skip
        batches = list(dm.train_dataloader())
        batches_per_rank.append(len(batches))
        keys = [k for b in batches for k in b["key"]]
        rank_shards = paths[rank::2]
        own = [f"s{paths.index(p)}_{i}" for p in rank_shards for i in range(counts[paths.index(p)])]
        padding = len(keys) - len(own)  # a rank with fewer samples tops up with repeats of its own
        assert Counter(keys[: len(keys) - padding]) == Counter(own) and set(keys) <= set(own)
        seen.update(keys[: len(keys) - padding])
    assert seen == Counter(f"s{s}_{i}" for s, n in enumerate(counts) for i in range(n))  # each exactly once
    assert batches_per_rank[0] == batches_per_rank[1]


def test_dataset_level_exactly_once_with_worker_processes(tmp_path, monkeypatch):
    good_shards(tmp_path, [4, 4, 4, 4, 3])
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = Counter()
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        dataset = make_shard_dataset(tmp_path / "shards", 8, shuffle_buffer=5)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate)
        seen.update(k for batch in loader for k in batch["key"])
    assert sorted(seen.values()) == [1] * 19


def test_fewer_shards_than_ranks_or_workers(tmp_path, monkeypatch):
    good_shards(tmp_path, [4, 4, 4])
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="3 shards cannot feed 4 ranks"):
        ShardDataModule(str(tmp_path / "shards"), None, resolution=8, batch_size=2).train_dataloader()
    monkeypatch.setenv("WORLD_SIZE", "1")
    dm = ShardDataModule(str(tmp_path / "shards"), None, resolution=8, batch_size=2, num_workers=5)
    loader, messages = caught_messages(dm.train_dataloader)
    assert any("using 3 workers" in m for m in messages)
    assert sorted(k for b in loader for k in b["key"]) == sorted(f"s{s}_{i}" for s in range(3) for i in range(4))
    # at the dataset level, an idle worker warns and ends: no hang
    dataset = make_shard_dataset(tmp_path / "shards", 8)
    keys = [k for b in torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=4, collate_fn=collate)
            for k in b["key"]]  # fmt: skip
    assert len(keys) == 12


def test_exact_epochs_are_seeded_and_reshuffled(tmp_path):
    good_shards(tmp_path, [6, 6, 6, 6])

    def epochs(seed):
        dm = ShardDataModule(str(tmp_path / "shards"), None, resolution=8, batch_size=4, num_workers=2,
                             shuffle_buffer=8, seed=seed)  # fmt: skip
        loader = dm.train_dataloader()
        return [[k for b in loader for k in b["key"]] for _ in range(2)]

    first, second = epochs(0)
    assert sorted(first) == sorted(second) and first != second  # every sample each epoch, new order
    assert epochs(0) == [first, second]  # same seed, same order
    assert epochs(1)[0] != first


def test_resampled_mode_has_fixed_epochs_and_is_seeded(tmp_path):
    good_shards(tmp_path, [5, 5, 5])

    def run(seed):
        dm = ShardDataModule(str(tmp_path / "shards"), None, resolution=8, batch_size=4, num_workers=2,
                             shuffle_buffer=6, seed=seed, samples_per_epoch=30)  # fmt: skip
        loader = dm.train_dataloader()
        assert len(loader) == 30 // 4
        out = [[k for b in loader for k in b["key"]] for _ in range(3)]
        assert all(len(b["key"]) == 4 for b in loader)
        return out

    a = run(0)
    assert [len(epoch) for epoch in a] == [28, 28, 28]
    assert len(Counter(k for epoch in a for k in epoch)) > 10  # drawn from all shards, with repeats
    assert run(0) == a and run(1) != a


# --- transforms ----------------------------------------------------------------------------------


def test_small_images_upscaled_or_left_out(tmp_path):
    write_shards([("tiny", Image.new("RGB", (6, 10)), "t"), ("big", Image.new("RGB", (20, 16)), "b")], tmp_path,
                 image_format="png", progress=False)  # fmt: skip
    up = make_shard_dataset(tmp_path, 16)
    assert sorted(s["key"] for s in up) == ["big", "tiny"] and up.health.totals()["too_small"] == 0
    skip = make_shard_dataset(tmp_path, 16, upscale=False)
    samples, messages = caught_messages(lambda: list(skip))
    assert [s["key"] for s in samples] == ["big"] and skip.health.totals()["too_small"] == 1
    assert skip.health.totals()["skipped"] == 0  # a policy, not damage


def test_jpeg_draft_decodes_large_jpegs_small_but_covering(tmp_path):
    write_shards([("photo", Image.new("RGB", (1600, 1200), (10, 120, 240)), "p")], tmp_path, progress=False)
    fast = next(iter(make_shard_dataset(tmp_path, 128, jpeg_draft=True, random_flip=False)))
    full = next(iter(make_shard_dataset(tmp_path, 128, random_flip=False)))
    assert fast["pixel_values"].shape == (3, 128, 128)
    assert (fast["pixel_values"] - full["pixel_values"]).abs().max() < 0.05


# --- bad input -----------------------------------------------------------------------------------

GOOD = image_bytes()


def damaged_shards(root: Path) -> dict[str, Path]:
    root.mkdir(exist_ok=True)
    good = [{"__key__": f"ok{i}", "png": GOOD, "txt": f"fine {i}"} for i in range(4)]
    shards = {
        "corrupt": write_raw_shard(root / "corrupt.tar", [
            good[0],
            {"__key__": "garbage", "png": b"this is not an image", "txt": "x"},
            {"__key__": "halfimage", "png": GOOD[: len(GOOD) // 2], "txt": "x"},
        ]),
        "captions": write_raw_shard(root / "captions.tar", [
            good[1],
            {"__key__": "latin1", "png": GOOD, "txt": "caf\xe9".encode("latin-1")},
            {"__key__": "badjson", "png": GOOD, "json": b"{not json"},
            {"__key__": "numbers", "png": GOOD, "json": json.dumps({"caption": [1, 2]})},
            {"__key__": "emptylist", "png": GOOD, "json": json.dumps({"caption": []})},
            {"__key__": "nocaption", "png": GOOD},
            {"__key__": "noimage", "txt": "caption only"},
        ]),
        "empty": write_raw_shard(root / "empty.tar", []),
    }  # fmt: skip
    (root / "zero.tar").write_bytes(b"")
    shards["zero"] = root / "zero.tar"
    full = write_raw_shard(root / "full.tar", [good[2], {"__key__": "cut", "png": GOOD * 300, "txt": "x"}, good[3]])
    with tarfile.open(full) as tar:
        member = tar.getmember("cut.png")
    data = full.read_bytes()
    (root / "truncated.tar").write_bytes(data[: member.offset_data + member.size // 2])  # inside "cut.png"
    shards["truncated"] = root / "truncated.tar"
    full.unlink()
    return shards


EXPECTED_SKIPS = {  # shard -> keys that must be named in a warning
    "corrupt": ["garbage", "halfimage"],
    "captions": ["latin1", "badjson", "numbers", "emptylist", "nocaption", "noimage"],
    "empty": [],
    "zero": [],
    "truncated": ["cut"],
}


@pytest.mark.parametrize("kind", list(EXPECTED_SKIPS))
def test_each_kind_of_damage_is_skipped_named_and_counted(tmp_path, kind):
    shard = damaged_shards(tmp_path)[kind]
    dataset = make_shard_dataset(shard, 8, shuffle_buffer=0)
    samples, messages = caught_messages(lambda: list(dataset))
    assert all(s["key"].startswith("ok") for s in samples)
    assert any(str(shard) in m for m in messages), messages
    for key in EXPECTED_SKIPS[kind]:
        assert any(key in m and str(shard) in m for m in messages), (key, messages)
    totals = dataset.health.totals()
    assert totals["skipped"] == len(EXPECTED_SKIPS[kind]) and totals["ok"] == len(samples)
    assert totals["shard_errors"] == (kind in ("empty", "zero", "truncated"))


def test_truncated_on_a_member_boundary_is_caught_by_the_manifest(tmp_path):
    paths = write_shards([(f"k{i}", Image.new("RGB", (8, 8)), "c") for i in range(4)], tmp_path,
                         image_format="png", progress=False)  # fmt: skip
    with tarfile.open(paths[0]) as tar:
        offset = tar.getmembers()[4].offset  # header of the third sample: two whole samples before it
    paths[0].write_bytes(paths[0].read_bytes()[:offset])
    dataset = make_shard_dataset(tmp_path, 8, shuffle_buffer=0)
    samples, messages = caught_messages(lambda: list(dataset))
    assert [s["key"] for s in samples] == ["k0", "k1"]
    assert any("2 of 4" in m and str(paths[0]) in m for m in messages)
    assert dataset.health.totals()["skipped"] == 2


def test_damage_in_worker_processes_is_counted_in_the_main_process(tmp_path):
    damaged_shards(tmp_path / "d")
    dm = ShardDataModule(str(tmp_path / "d"), None, resolution=8, batch_size=2, num_workers=2, max_bad_fraction=1.0)
    keys = [k for b in dm.train_dataloader() for k in b["key"]]
    assert sorted(keys) == ["ok0", "ok1", "ok2"]
    totals = dm.train_health.totals()
    assert totals["skipped"] == sum(map(len, EXPECTED_SKIPS.values())) and totals["shard_errors"] == 3


def test_too_many_bad_samples_stop_training(tmp_path):
    damaged_shards(tmp_path / "d")
    dm = ShardDataModule(str(tmp_path / "d"), None, resolution=8, batch_size=2, num_workers=0, max_bad_fraction=0.5)
    with pytest.raises(DataError, match=r"9 of 12 samples.*were bad.*max_bad_fraction 50\.0%"):
        caught_messages(lambda: list(dm.train_dataloader()))


def test_nothing_valid_stops_training(tmp_path):
    write_raw_shard(tmp_path / "000000.tar", [{"__key__": f"bad{i}", "png": b"junk", "txt": "x"} for i in range(3)])
    health = DataHealth(max_bad_fraction=1.0)
    loader = EpochLoader(
        torch.utils.data.DataLoader(make_shard_dataset(tmp_path, 8, health=health), batch_size=2, collate_fn=collate),
        batch_size=2, samples=None, health=health, where="bad shards",
    )  # fmt: skip
    with pytest.raises(DataError, match="no valid samples in bad shards"):
        caught_messages(lambda: list(loader))


def test_health_monitor_logs_skips_in_a_lightning_run(tmp_path):
    import pytorch_lightning as pl

    from ldm.callbacks.data_health import DataHealthMonitor

    damaged_shards(tmp_path / "d")
    write_raw_shard(tmp_path / "d" / "more.tar", [{"__key__": f"more{i}", "png": GOOD, "txt": "m"} for i in range(40)])

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch["pixel_values"].mean((2, 3))).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ShardDataModule(str(tmp_path / "d"), None, resolution=8, batch_size=4, num_workers=0, max_bad_fraction=0.5)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[DataHealthMonitor(log_every_n_steps=1)])  # fmt: skip
    caught_messages(lambda: trainer.fit(Probe(), datamodule=dm))
    assert trainer.callback_metrics["data/skipped"].item() == 9
    assert trainer.callback_metrics["data/shard_errors"].item() == 3


def test_resampled_stream_over_only_broken_shards_raises_instead_of_spinning(tmp_path):
    write_raw_shard(tmp_path / "000000.tar", [{"__key__": f"bad{i}", "png": b"junk", "txt": "x"} for i in range(3)])
    write_raw_shard(tmp_path / "000001.tar", [])
    health = DataHealth(max_bad_fraction=1.0, stall_limit=50)
    dataset = make_shard_dataset(tmp_path, 8, resampled=True, health=health)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=collate)
    with pytest.raises(DataError, match="50 bad samples or shards in a row"):
        caught_messages(lambda: next(iter(loader)))
