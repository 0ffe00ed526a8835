"""A key that names two samples (twice in a shard, or in two shards) is trained once per pass, by every rank and
worker layout, named in a warning and counted as `data/duplicates`; make_shards refuses to write duplicates, and
`--manifest-only` records them (and names a damaged shard in one line instead of a traceback)."""

from __future__ import annotations

import io
import json
import runpy
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import webdataset as wds
from PIL import Image

from ldm.callbacks.data_health import DataHealthMonitor
from ldm.data.datamodule import ShardDataModule
from ldm.data.format import duplicate_keys, expand_urls, read_manifest, tar_keys, write_manifest
from ldm.data.webdataset import make_shard_dataset
from ldm.utils.cli import run_command

MAKE_SHARDS = Path(__file__).resolve().parents[1] / "scripts" / "make_shards.py"


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def shard(path: Path, keys: list[str]) -> str:
    with wds.TarWriter(str(path), encoder=False) as writer:
        for i, key in enumerate(keys):
            writer.write({"__key__": key, "png": png((i * 20 % 255, 9, 9)), "txt": f"{key} copy {i}".encode()})
    return str(path)


@pytest.fixture
def duplicated(tmp_path) -> Path:
    """`a` twice in shard 0, `b` in shards 0 and 2, `c` in shards 1 and 3; 12 distinct keys, 15 samples."""
    folder = tmp_path / "shards"
    folder.mkdir()
    shard(folder / "000000.tar", ["a", "b", "k0", "a"])
    shard(folder / "000001.tar", ["c", "k1", "k2", "k3"])
    shard(folder / "000002.tar", ["k4", "b", "k5"])
    shard(folder / "000003.tar", ["k6", "c", "k7", "k8", "k9"])
    return folder


DISTINCT = {"a", "b", "c", *(f"k{i}" for i in range(10))}


def test_the_header_scan_finds_every_duplicate_and_the_manifest_records_them(duplicated):
    urls = sorted(str(p) for p in duplicated.glob("*.tar"))
    assert tar_keys(urls[0]) == ["a", "b", "k0", "a"]
    found = duplicate_keys(urls)
    assert found == {"a": [urls[0], urls[0]], "b": [urls[0], urls[2]], "c": [urls[1], urls[3]]}
    manifest = write_manifest(duplicated)
    assert manifest["duplicates"] == {"a": ["000000.tar", "000000.tar"], "b": ["000000.tar", "000002.tar"],
                                      "c": ["000001.tar", "000003.tar"]}  # fmt: skip
    assert duplicate_keys(urls) == found  # read from the manifest now
    assert duplicate_keys(urls[1:3]) == {}  # a subset of the shards holds none of them twice


def test_a_pass_trains_each_key_once_and_names_every_extra_copy(duplicated):
    dataset = make_shard_dataset(duplicated, 8, shuffle_buffer=0, shardshuffle=False, split_by_node=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = list(dataset)
    assert Counter(s["key"] for s in samples) == Counter(DISTINCT)
    captions = {s["key"]: s["caption"] for s in samples}
    assert captions["a"] == "a copy 0" and captions["b"] == "b copy 1" and captions["c"] == "c copy 0"  # first copies
    assert dataset.health.totals()["duplicates"] == 3 and dataset.health.totals()["skipped"] == 0
    messages = sorted(str(w.message) for w in caught if "duplicate key" in str(w.message))
    assert messages == [
        f"duplicate key 'a' in shard {duplicated}/000000.tar: trained once (the first copy, in "
        f"{duplicated}/000000.tar), this copy skipped",
        f"duplicate key 'b' in shards {duplicated}/000000.tar and {duplicated}/000002.tar: trained once (the first "
        f"copy, in {duplicated}/000000.tar), this copy skipped",
        f"duplicate key 'c' in shards {duplicated}/000001.tar and {duplicated}/000003.tar: trained once (the first "
        f"copy, in {duplicated}/000001.tar), this copy skipped",
    ]  # fmt: skip


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (1, 2), (2, 2)])
def test_every_rank_and_worker_layout_trains_each_key_once(duplicated, monkeypatch, world_size, num_workers):
    """Copies of `b` and `c` sit in shards that different ranks / workers read: they agree on the one they keep."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    seen, duplicates = Counter(), 0
    for rank in range(world_size):
        monkeypatch.setenv("RANK", str(rank))
        dm = ShardDataModule(str(duplicated), None, resolution=8, batch_size=3, num_workers=num_workers,
                             shuffle_buffer=4, seed=1, samples_per_epoch=None)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches = list(dm.train_dataloader())
        keys = [k for b in batches for k in b["key"]]
        if world_size > 1:  # a rank with fewer samples tops up with repeats of its own pass: count that pass once
            keys = list(dict.fromkeys(keys))
        seen.update(keys)
        duplicates += dm.train_health.totals()["duplicates"]
    assert seen == Counter(DISTINCT)
    assert duplicates == 3 if world_size == 1 else duplicates >= 3  # a rank topping up reads its copies again


class Probe(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["pixel_values"].float().mean((2, 3))).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_one_pass(train_shards, batch_size: int) -> pl.Trainer:
    dm = ShardDataModule(train_shards, None, resolution=8, batch_size=batch_size, num_workers=0)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[DataHealthMonitor(log_every_n_steps=1)])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Probe(), datamodule=dm)
    return trainer


def test_duplicates_are_logged_in_a_lightning_run(duplicated):
    trainer = _fit_one_pass(str(duplicated), 4)
    assert trainer.callback_metrics["data/duplicates"].item() == 3
    assert trainer.global_step == 4  # 13 distinct samples in batches of 4


# --- the same keys in two shard folders (a shard set copied, or downloaded twice) ------------------------------
@pytest.fixture
def two_folders(tmp_path) -> tuple[Path, Path]:
    """`good` and `good2` both hold `a`, `b` (shard 0) and `c` (shard 1); each has one key of its own."""
    folders = tmp_path / "good", tmp_path / "good2"
    for folder, own in zip(folders, ("g1", "g2")):
        folder.mkdir()
        shard(folder / "000000.tar", ["a", "b", own])
        shard(folder / "000001.tar", ["c"])
    return folders


def _write_manifests(folders, which: str) -> None:
    for folder in {"both": folders, "first": folders[:1], "second": folders[1:], "none": ()}[which]:
        assert write_manifest(folder)["duplicates"] == {}  # each folder alone holds every key once


@pytest.mark.parametrize("manifests", ["both", "first", "second", "none"])
def test_a_key_in_two_shard_folders_is_read_once_named_and_counted(two_folders, manifests):
    """A manifest knows only its own folder's keys: with two folders every tar's headers are compared."""
    good, good2 = two_folders
    _write_manifests(two_folders, manifests)
    urls = expand_urls([str(good), str(good2)])
    assert duplicate_keys(urls) == {"a": [f"{good}/000000.tar", f"{good2}/000000.tar"],
                                    "b": [f"{good}/000000.tar", f"{good2}/000000.tar"],
                                    "c": [f"{good}/000001.tar", f"{good2}/000001.tar"]}  # fmt: skip
    dataset = make_shard_dataset([str(good), str(good2)], 8, shuffle_buffer=0, shardshuffle=False,
                                 split_by_node=False)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = list(dataset)
    assert Counter(s["key"] for s in samples) == Counter(["a", "b", "c", "g1", "g2"])
    assert {s["key"]: s["caption"] for s in samples}["a"] == "a copy 0"  # the first copy: good's
    assert dataset.health.totals()["duplicates"] == 3 and dataset.health.totals()["skipped"] == 0
    messages = sorted(str(w.message) for w in caught if "duplicate key" in str(w.message))
    assert messages == [f"duplicate key {key!r} in shards {good}/{name} and {good2}/{name}: trained once (the first "
                        f"copy, in {good}/{name}), this copy skipped"
                        for key, name in [("a", "000000.tar"), ("b", "000000.tar"), ("c", "000001.tar")]]  # fmt: skip


def test_a_run_over_two_shard_folders_trains_each_key_once_and_logs_the_count(two_folders):
    _write_manifests(two_folders, "both")
    trainer = _fit_one_pass([str(f) for f in two_folders], 1)
    assert trainer.callback_metrics["data/duplicates"].item() == 3
    assert trainer.global_step == 5  # a, b, c, g1, g2: one step each


# --- make_shards ---------------------------------------------------------------------------------------------
def _make_shards(argv, capsys) -> tuple[int, list[str]]:
    main = runpy.run_path(str(MAKE_SHARDS), run_name="make_shards")["main"]
    code = run_command(main, argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_make_shards_refuses_two_images_with_one_key(tmp_path, capsys):
    src = tmp_path / "images"
    (src / "a").mkdir(parents=True)
    for path in (src / "a" / "b.png", src / "a_b.png"):  # both become key "a_b"
        Image.new("RGB", (8, 8)).save(path)
        path.with_suffix(".txt").write_text("a caption")
    code, err = _make_shards([str(src), str(tmp_path / "out"), "--no-progress"], capsys)
    assert code == 1
    assert err == [f"error: two samples have the key 'a_b' ({src}/a/b.png and {src}/a_b.png); keys must be unique: "
                   f"nothing was written"]  # fmt: skip
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_make_shards_refuses_to_reshard_duplicates_and_manifest_only_records_them(duplicated, tmp_path, capsys):
    code, err = _make_shards([str(duplicated), str(tmp_path / "out"), "--no-progress"], capsys)
    assert code == 1 and len(err) == 1
    assert err[0].startswith(f"error: {duplicated}: 3 keys name several samples, e.g. 'a' in ") and \
        err[0].endswith("keys must be unique: nothing was written")  # fmt: skip
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.tar"))
    main = runpy.run_path(str(MAKE_SHARDS), run_name="make_shards")["main"]
    main([str(duplicated), "--manifest-only"])  # adopted as is: recorded, and the reader trains each once
    assert set(read_manifest(duplicated)["duplicates"]) == {"a", "b", "c"}


def test_make_shards_refuses_keys_that_two_source_folders_share(two_folders, tmp_path, capsys):
    good, good2 = two_folders
    _write_manifests(two_folders, "both")
    listed = tmp_path / "both.txt"  # a list file: the shard specs of both folders
    listed.write_text(f"{good}\n{good2}\n")
    code, err = _make_shards([str(listed), str(tmp_path / "out"), "--no-progress"], capsys)
    assert code == 1
    assert err == [f"error: {listed}: 3 keys name several samples, e.g. 'a' in {good}/000000.tar, "
                   f"{good2}/000000.tar; keys must be unique: nothing was written"]  # fmt: skip
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.tar"))


def test_manifest_only_names_a_damaged_shard_in_one_line_and_writes_nothing(duplicated, capsys):
    damaged = duplicated / "000002.tar"
    damaged.write_bytes(damaged.read_bytes()[:700])  # cut inside the first member: "unexpected end of data"
    code, err = _make_shards([str(duplicated), "--manifest-only"], capsys)
    assert code == 1 and len(err) == 1
    assert err[0].startswith(f"error: {damaged}: not a readable tar (") and "nothing was written" in err[0]
    assert not (duplicated / "manifest.json").exists()


def test_a_key_repeated_inside_one_sample_run_is_two_samples(tmp_path):
    """`a.png a.txt a.png a.txt` (the same key twice in a row) is two samples, not one whose members overwrite."""
    path = tmp_path / "000000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.png", png("red")), ("a.txt", b"first"), ("a.png", png("blue")), ("a.txt", b"second")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert tar_keys(path) == ["a", "a"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = list(make_shard_dataset(tmp_path, 8, shuffle_buffer=0, split_by_node=False))
    assert [(s["key"], s["caption"]) for s in samples] == [("a", "first")]
    assert any("duplicate key 'a'" in str(w.message) for w in caught)
    assert json.loads(json.dumps(duplicate_keys([str(path)]))) == {"a": [str(path), str(path)]}
