"""Data pipeline tests on real tar shards in tmp_path: writing, reading, transforms, DataModule, shapes.

    .venv/bin/python -m pytest tests/test_data.py -q
"""

import io
import json
import random
import runpy
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ldm.data.datamodule import ShardDataModule
from ldm.data.format import expand_urls
from ldm.data.shapes import main as shapes_main
from ldm.data.shapes import render, write_shapes_dataset
from ldm.data.shards import samples_from_folder, write_shards
from ldm.data.transforms import ImageTransform
from ldm.data.webdataset import collate, make_shard_dataset, read_captions

REPO = Path(__file__).resolve().parents[1]
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def to_uint8(pixel_values: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8, to compare against PIL colours."""
    return ((pixel_values.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def read_all(urls, resolution=16, **kw) -> list[dict]:
    kw.setdefault("shuffle_buffer", 4)
    return list(make_shard_dataset(urls, resolution, **kw))


@pytest.fixture
def sidecar_folder(tmp_path) -> tuple[Path, dict[str, tuple[str, tuple]]]:
    """7 solid-colour images with .txt captions (one in a subfolder, one with a dot in its name)."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    expected = {}
    names = ["a", "b", "c", "d", "e", "sub/f", "g.v2"]
    for i, name in enumerate(names):
        color = (30 * i, 255 - 30 * i, 100)
        Image.new("RGB", (24 + 4 * i, 20), color).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"caption number {i}\n")
        expected[name.replace("/", "_").replace(".", "_")] = (f"caption number {i}", color)
    return root, expected


def test_sidecar_folder_round_trip(sidecar_folder, tmp_path):
    root, expected = sidecar_folder
    out = tmp_path / "shards"
    paths = write_shards(samples_from_folder(root), out, samples_per_shard=3, image_format="jpg", progress=False)

    assert [p.name for p in paths] == ["000000.tar", "000001.tar", "000002.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "000001.tar", "000002.tar", "manifest.json",
                                                     "sizes.json"]  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 1] and manifest["total"] == 7
    # every image's (width, height), recorded as written: what bucket plans read instead of decoding
    sizes = {key: tuple(size) for shard in json.loads((out / "sizes.json").read_text())["shards"].values()
             for key, size in shard["sizes"].items()}  # fmt: skip
    assert sizes == {key: (24 + 4 * list(expected).index(key), 20) for key in expected}
    with tarfile.open(paths[0]) as tar:  # img2dataset layout: <key>.jpg + <key>.txt
        assert sorted(tar.getnames()) == ["a.jpg", "a.txt", "b.jpg", "b.txt", "c.jpg", "c.txt"]

    samples = read_all(str(out / "{000000..000002}.tar"), resolution=16)
    assert Counter(s["key"] for s in samples) == Counter(list(expected))  # every key exactly once
    for sample in samples:
        caption, color = expected[sample["key"]]
        assert sample["caption"] == caption
        assert sample["pixel_values"].shape == (3, 16, 16) and sample["pixel_values"].dtype == torch.float32
        assert sample["pixel_values"].min() >= -1 and sample["pixel_values"].max() <= 1
        assert np.abs(to_uint8(sample["pixel_values"]).astype(int) - color).max() <= 6  # jpg is lossy


def test_metadata_jsonl_round_trip(tmp_path):
    root = tmp_path / "hf"
    root.mkdir()
    lines = []
    for i in range(5):
        Image.new("RGB", (20, 30), (0, 0, 50 * i)).save(root / f"img{i}.png")
        key = "caption" if i == 3 else "text"  # both spellings are accepted
        lines.append(json.dumps({"file_name": f"img{i}.png", key: f"picture {i}", "extra": 1}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    write_shards(samples_from_folder(root), tmp_path / "out", samples_per_shard=2, image_format="png", progress=False)
    samples = read_all(tmp_path / "out", resolution=8)
    assert sorted((s["key"], s["caption"]) for s in samples) == [(f"img{i}", f"picture {i}") for i in range(5)]
    assert all(s["pixel_values"].shape == (3, 8, 8) for s in samples)
    # lossless png: exact colour
    blue = {s["key"]: int(to_uint8(s["pixel_values"])[..., 2].mean().round()) for s in samples}
    assert blue == {f"img{i}": 50 * i for i in range(5)}


def test_folder_errors_name_the_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*no images"):
        list(samples_from_folder(empty))
    no_caption = tmp_path / "no_caption"
    no_caption.mkdir()
    Image.new("RGB", (4, 4)).save(no_caption / "x.png")
    with pytest.raises(ValueError, match=r"no_caption.*x\.png"):
        list(samples_from_folder(no_caption))


def test_failed_write_leaves_only_complete_shards(tmp_path):
    def samples():
        for i in range(5):
            yield f"{i:09d}", Image.new("RGB", (4, 4)), "c"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(samples(), tmp_path, samples_per_shard=2, image_format="png", progress=False)
    # shards 0 and 1 were complete; the half-written shard 2 and the manifest are not published
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.tar", "000001.tar"]


def write_raw_shard(path: Path, samples: list[dict]) -> None:
    """A shard written with the bare TarWriter, to hold exactly the bytes a test needs."""
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write({k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()})


def test_json_caption_list_picks_one(tmp_path):
    image = png_bytes(Image.new("RGB", (8, 8), RED))
    samples = [
        {"__key__": f"{i:09d}", "png": image, "json": json.dumps({"caption": [f"{i} one", f"{i} two"], "url": "x"})}
        for i in range(30)
    ]
    samples.append({"__key__": "plain", "png": image, "json": json.dumps({"caption": "just this", "width": 8})})
    write_raw_shard(tmp_path / "000000.tar", samples)

    picked = {s["key"]: s["caption"] for s in read_all(tmp_path / "000000.tar", seed=1)}
    assert picked.pop("plain") == "just this"
    assert all(caption in (f"{int(key)} one", f"{int(key)} two") for key, caption in picked.items())
    assert {caption.split()[1] for caption in picked.values()} == {"one", "two"}  # not always the first
    again = {s["key"]: s["caption"] for s in read_all(tmp_path / "000000.tar", seed=1)}
    assert again == {**picked, "plain": "just this"}  # seeded


def mode_images() -> dict[str, tuple[Image.Image, tuple]]:
    """mode -> (image in that mode, RGB it must become)."""
    palette = Image.new("P", (8, 8))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 8, 8))  # palette index 1 = pure red
    transparent = Image.new("RGBA", (8, 8), (0, 0, 255, 0))  # fully transparent blue -> white background
    half = Image.new("RGBA", (8, 8), (255, 0, 0, 128))  # half-transparent red over white -> pink
    sixteen = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # mid-grey on a 0..65535 scale
    assert sixteen.mode == "I;16"
    return {
        "L": (Image.new("L", (8, 8), 77), (77, 77, 77)),
        "RGBA-transparent": (transparent, (255, 255, 255)),
        "RGBA-half": (half, (255, 127, 127)),
        "P": (palette, RED),
        "CMYK": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), RED),
        "I;16": (sixteen, (128, 128, 128)),
        "I;16-white": (Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)), (255, 255, 255)),
    }


@pytest.mark.parametrize("name", list(mode_images()))
def test_image_modes_become_correct_rgb(name):
    image, rgb = mode_images()[name]
    pixels = to_uint8(ImageTransform(8, random_flip=False)(image))
    assert np.abs(pixels.astype(int) - rgb).max() <= 1, (name, pixels[0, 0])


def test_image_modes_survive_shards(tmp_path):
    """Modes kept in the shard (format="keep") are converted by the reader, not clipped by a decoder."""
    images = {k.replace("-", "_").replace(";", "_"): v for k, v in mode_images().items() if k != "CMYK"}
    samples = [(key, png_bytes(image), key) for key, (image, _) in images.items()]
    write_shards(samples, tmp_path, image_format="keep", progress=False)
    for sample in read_all(tmp_path, resolution=8, random_flip=False):
        rgb = images[sample["key"]][1]
        assert np.abs(to_uint8(sample["pixel_values"]).astype(int) - rgb).max() <= 1, sample["key"]


def test_transform_resizes_shorter_side_and_center_crops():
    image = Image.new("RGB", (60, 20), BLUE)  # blue | red | green thirds
    image.paste(RED, (20, 0, 40, 20))
    image.paste(GREEN, (40, 0, 60, 20))
    pixels = to_uint8(ImageTransform(10, center_crop=True, random_flip=False)(image))
    assert pixels.shape == (10, 10, 3)
    assert (np.abs(pixels[:, 1:-1].astype(int) - RED) <= 2).all()  # only the middle third survives


def test_random_flip_and_random_crop():
    image = Image.new("RGB", (16, 16), RED)
    image.paste(BLUE, (8, 0, 16, 16))  # red left, blue right
    torch.manual_seed(0)
    lefts = {tuple(to_uint8(ImageTransform(16, random_flip=True)(image))[0, 0]) for _ in range(20)}
    assert lefts == {RED, BLUE}
    lefts = {tuple(to_uint8(ImageTransform(16, random_flip=False)(image))[0, 0]) for _ in range(20)}
    assert lefts == {RED}
    wide = Image.new("RGB", (32, 16), RED)
    wide.paste(BLUE, (16, 0, 32, 16))
    crops = {to_uint8(ImageTransform(16, center_crop=False, random_flip=False)(wide))[:, :, 0].mean() for _ in range(20)}
    assert len(crops) > 1  # the crop window moves


def test_corrupt_samples_are_skipped_with_a_warning(tmp_path):
    good = png_bytes(Image.new("RGB", (8, 8), GREEN))
    shard = tmp_path / "000000.tar"
    write_raw_shard(
        shard,
        [
            {"__key__": "000000000", "png": good, "txt": "fine"},
            {"__key__": "000000001", "png": b"this is not an image", "txt": "garbage"},
            {"__key__": "000000002", "png": good[: len(good) // 2], "txt": "truncated"},
            {"__key__": "000000003", "png": good},  # no caption
            {"__key__": "000000004", "jpg": good, "txt": "also fine"},  # wrong extension: PIL sniffs the content
        ],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = read_all(shard, resolution=8)
    assert sorted(s["key"] for s in samples) == ["000000000", "000000004"]
    messages = [str(w.message) for w in caught]
    for key in ("000000001", "000000002", "000000003"):
        assert any(key in m and str(shard) in m for m in messages), (key, messages)


def test_expand_urls(tmp_path):
    for i in range(3):
        write_raw_shard(tmp_path / f"{i:06d}.tar", [{"__key__": "k", "txt": "c"}])
    names = [str(tmp_path / f"{i:06d}.tar") for i in range(3)]
    assert expand_urls(str(tmp_path / "{000000..000002}.tar")) == names
    assert expand_urls(tmp_path) == names
    assert expand_urls(str(tmp_path / "*.tar")) == names
    assert expand_urls([names[2], str(tmp_path / "{000000..000001}.tar")]) == names[2:] + names[:2]
    with pytest.raises(FileNotFoundError, match=r"000003\.tar.*\{000000\.\.000003\}"):
        expand_urls(str(tmp_path / "{000000..000003}.tar"))
    with pytest.raises(FileNotFoundError, match=r"nothing.*\*\.tar"):
        expand_urls(str(tmp_path / "nothing*.tar"))


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, n_train=40, n_val=10, size=16, seed=0, samples_per_shard=10)
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_datamodule_batches(shapes_root, num_workers):
    dm = ShardDataModule(
        str(shapes_root / "train"), str(shapes_root / "val"), resolution=16, batch_size=8,
        num_workers=num_workers, shuffle_buffer=8,
    )  # fmt: skip
    # two epochs of exactly 40 // 8 full batches; with 2 workers a single pass would give only
    # 2 x (20 // 8) = 4, so this also checks that the stream repeats to fill the epoch
    loader = dm.train_dataloader()
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == 40 // 8
        for batch in batches:
            assert batch["pixel_values"].shape == (8, 3, 16, 16)
            assert len(batch["caption"]) == 8 and all(isinstance(c, str) for c in batch["caption"])

    val = [s for batch in dm.val_dataloader() for s in zip(batch["key"], batch["caption"])]
    assert sorted(key for key, _ in val) == [f"{i:09d}" for i in range(10)]
    assert read_captions(dm.val_shards, 4) == [caption for key, caption in sorted(val)][:4]


def test_datamodule_drives_a_lightning_epoch(shapes_root):
    import pytorch_lightning as pl

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["pixel_values"].shape)
            return self.layer(batch["pixel_values"].mean((2, 3))).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ShardDataModule(str(shapes_root / "train"), None, resolution=16, batch_size=8, num_workers=0)
    probe = Probe()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(probe, datamodule=dm)
    assert probe.seen == [(8, 3, 16, 16)] * (2 * 40 // 8)


# Independent of the palette in shapes.py: what each colour name must look like.
LOOKS_LIKE = {
    "red": lambda r, g, b: r > 150 and g < 90 and b < 90,
    "orange": lambda r, g, b: r > 200 and 90 < g < 190 and b < 70,
    "yellow": lambda r, g, b: r > 200 and g > 180 and b < 90,
    "green": lambda r, g, b: g > 120 and r < 90 and b < 110,
    "blue": lambda r, g, b: b > 170 and r < 90 and g < 130,
    "purple": lambda r, g, b: r > 100 and b > 140 and g < 90,
    "white": lambda r, g, b: min(r, g, b) > 230,
    "black": lambda r, g, b: max(r, g, b) < 30,
}


def test_shapes_render_is_deterministic():
    a = [render(random.Random(7), 32) for _ in range(2)]
    assert a[0][0].tobytes() == a[1][0].tobytes() and a[0][1] == a[1][1]
    different = {render(random.Random(seed), 32)[0].tobytes() for seed in range(5)}
    assert len(different) == 5


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_match_their_captions(size):
    rng = random.Random(123)
    seen = Counter()
    for _ in range(150):
        image, caption, attrs = render(rng, size)
        assert image.size == (size, size) and image.mode == "RGB"
        for attribute in ("shape", "color", "size"):
            assert attrs[attribute] in caption, (attribute, caption)
        assert all(word in caption for word in attrs["position"].split()), caption
        seen.update([attrs["shape"], attrs["color"], attrs["position"], attrs["size"]])

        pixels = np.asarray(image).astype(int)  # (H, W, 3)
        cx, cy = attrs["center"]
        assert LOOKS_LIKE[attrs["color"]](*pixels[int(cy), int(cx)]), (caption, pixels[int(cy), int(cx)])

        # locate the shape independently: pixels far from the most common (background) colour
        colors, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        background = colors[counts.argmax()]
        ys, xs = np.nonzero(np.abs(pixels - background).max(axis=2) > 60)
        column = "left" if xs.mean() < size / 3 else "right" if xs.mean() > 2 * size / 3 else "middle"
        row = "top" if ys.mean() < size / 3 else "bottom" if ys.mean() > 2 * size / 3 else "middle"
        expected_column = next((w for w in ("left", "right") if w in attrs["position"]), "middle")
        expected_row = next((w for w in ("top", "bottom") if w in attrs["position"]), "middle")
        assert (column, row) == (expected_column, expected_row), caption
        width = xs.max() - xs.min() + 1
        assert (width > 0.29 * size) == (attrs["size"] == "large"), (caption, width)
        # nothing is cut off at the border
        assert xs.min() > 0 and ys.min() > 0 and xs.max() < size - 1 and ys.max() < size - 1, caption
    assert len(seen) == 4 + 8 + 9 + 2  # every shape, colour, position and size occurs


def test_write_shapes_dataset_is_readable(shapes_root):
    assert sorted(p.name for p in (shapes_root / "train").glob("*.tar")) == [f"{i:06d}.tar" for i in range(4)]
    assert sorted(p.name for p in (shapes_root / "val").glob("*.tar")) == ["000000.tar"]
    samples = read_all(shapes_root / "train", resolution=16, random_flip=False)
    assert sorted(s["key"] for s in samples) == [f"{i:09d}" for i in range(40)]
    # the shards hold what render() draws from the same seed stream
    image, caption, _ = render(random.Random("shapes-0-val"), 16)
    first = next(iter(make_shard_dataset(shapes_root / "val", 16, shuffle_buffer=0, shardshuffle=False,
                                         random_flip=False)))  # fmt: skip
    assert first["caption"] == caption
    assert np.array_equal(to_uint8(first["pixel_values"]), np.asarray(image))


def shard_contents(folder: Path) -> dict[str, list[tuple[str, bytes]]]:
    """Each shard's members, name and bytes, in order (tar headers aside: they carry the writing time)."""
    out = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            out[path.name] = [(m.name, tar.extractfile(m).read()) for m in tar]
    return out


def test_shards_written_by_workers_hold_what_one_process_writes(tmp_path):
    """write_shards(workers=2): the same shards, manifest counts and sizes.json as in one process (the built-in data
    set as `python -m ldm.data.shapes` writes it, 4 shards, one short); a corrupt image skipped in a worker is counted."""
    write_shapes_dataset(tmp_path / "one", n_train=14, n_val=3, size=16, samples_per_shard=4)
    write_shapes_dataset(tmp_path / "two", n_train=14, n_val=3, size=16, samples_per_shard=4, workers=2)
    for split in ("train", "val"):
        one, two = tmp_path / "one" / split, tmp_path / "two" / split
        assert shard_contents(two) == shard_contents(one) and len(shard_contents(one)) == (4 if split == "train" else 1)
        manifests = [json.loads((d / "manifest.json").read_text()) for d in (one, two)]
        assert [[(r["name"], r["count"]) for r in m["shards"]] for m in manifests][0] == \
            [[(r["name"], r["count"]) for r in m["shards"]] for m in manifests][1]  # fmt: skip
        assert json.loads((two / "sizes.json").read_text()) == json.loads((one / "sizes.json").read_text())

    good = Image.new("RGB", (8, 8), GREEN)
    samples = [(f"{i:03d}", b"not an image" if i == 4 else good, f"c{i}") for i in range(7)]
    with pytest.warns(UserWarning, match="skipping sample 004"):
        paths = write_shards(samples, tmp_path / "skip", samples_per_shard=3, image_format="png", progress=False,
                             workers=2)  # fmt: skip
    manifest = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    assert [p.name for p in paths] == ["000000.tar", "000001.tar", "000002.tar"]
    assert [r["count"] for r in manifest["shards"]] == [3, 2, 1] and manifest["skipped"] == 1
    with pytest.raises(ValueError, match="workers > 1"):
        write_shards(samples, tmp_path / "bytes", max_shard_bytes=10_000, workers=2, progress=False)


def test_shapes_cli_skips_existing_output(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--n-train", "6", "--n-val", "2", "--size", "16", "--samples-per-shard", "4"]
    shapes_main(args)
    shard = tmp_path / "train" / "000000.tar"
    before = shard.stat().st_mtime_ns
    shapes_main(args)
    assert "skipping" in capsys.readouterr().out
    assert shard.stat().st_mtime_ns == before
    with pytest.raises(SystemExit, match="n_train"):
        shapes_main([*args[:2], "--n-train", "8"])


def test_make_shards_cli(sidecar_folder, tmp_path):
    root, expected = sidecar_folder
    make_shards = runpy.run_path(str(REPO / "scripts" / "make_shards.py"), run_name="make_shards")
    make_shards["main"]([str(root), str(tmp_path / "out"), "--samples-per-shard", "4", "--format", "webp"])
    samples = read_all(tmp_path / "out", resolution=8)
    assert sorted(s["key"] for s in samples) == sorted(expected)
    with tarfile.open(tmp_path / "out" / "000000.tar") as tar:
        assert all(name.endswith((".webp", ".txt")) for name in tar.getnames())


def test_collate_stacks():
    batch = collate([{"pixel_values": torch.zeros(3, 4, 4), "caption": f"c{i}", "key": str(i)} for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 4, 4) and batch["caption"] == ["c0", "c1", "c2"]


def test_uint8_pixels_scale_on_the_device_to_the_float_pipeline_values():
    """uint8 delivery (a quarter of the bytes through workers and to the GPU) gives the same model input."""
    from ldm.data.transforms import to_model_range

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    as_float = ImageTransform(12, random_flip=False)(image)
    as_uint8 = ImageTransform(12, random_flip=False, uint8=True)(image)
    assert as_uint8.dtype == torch.uint8 and as_uint8.shape == (3, 12, 12)
    assert torch.allclose(to_model_range(as_uint8), as_float, atol=1e-6)
    assert to_model_range(as_float) is as_float


def test_make_shards_shuffle_seed_mixes_class_folders_across_shards(tmp_path):
    # class folders are read class by class: unshuffled, each shard holds one class
    for label in ("cat", "dog", "frog"):
        (tmp_path / "src" / label).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(tmp_path / "src" / label / f"{i}.png")
    make_shards = runpy.run_path(str(REPO / "scripts" / "make_shards.py"), run_name="make_shards")
    args = ["--source", "classes", "--samples-per-shard", "8", "--no-progress"]

    def classes_per_shard(out):
        shards = sorted(out.glob("*.tar"))
        return [{s["caption"] for s in read_all(shard, resolution=8)} for shard in shards]

    make_shards["main"]([str(tmp_path / "src"), str(tmp_path / "plain"), *args])
    assert [len(c) for c in classes_per_shard(tmp_path / "plain")] == [1, 1, 1]
    for out in ("a", "b"):
        make_shards["main"]([str(tmp_path / "src"), str(tmp_path / out), *args, "--shuffle-seed", "0"])
    mixed = classes_per_shard(tmp_path / "a")
    assert all(len(c) >= 2 for c in mixed)
    a, b = (sorted(s["key"] for s in read_all(tmp_path / o / "000000.tar", resolution=8)) for o in ("a", "b"))
    assert a == b  # the same seed, the same order: --resume keeps working
    assert sorted(s["key"] for s in read_all(tmp_path / "a", resolution=8)) == sorted(
        s["key"] for s in read_all(tmp_path / "plain", resolution=8))  # every sample, once


def test_shard_members_have_no_pax_headers(tmp_path):
    """Shards are written with whole-second mtimes: webdataset's float mtime made tarfile give every member a PAX
    header, which every reader then parsed (docs/benchmarks.md: about 1.35x the loader's rate at 32 px)."""
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    write_shards([(f"{i:04d}", image, f"caption {i}") for i in range(3)], tmp_path, samples_per_shard=2,
                 image_format="png", progress=False)  # fmt: skip
    members = [m for path in sorted(tmp_path.glob("*.tar")) for m in tarfile.open(path).getmembers()]
    assert len(members) == 6 and all(not m.pax_headers and isinstance(m.mtime, int) for m in members)
