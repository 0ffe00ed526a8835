"""Turn images with captions into WebDataset shards (+ manifest.json with counts, sizes, sha256).

Sources (--source, default: guessed from the folder):
    folder      `img.png` + `img.txt` pairs, or images + metadata.jsonl / metadata.csv (HF imagefolder);
                `img.mask.png` beside an image is its loss mask (white = learn); --caption captions them all
    classes     `<src>/<label>/*.jpg`, captioned by --template "a photo of a {label}"
    shards      existing shards (img2dataset output), re-sharded / re-encoded
    hf          a Hugging Face `datasets` directory through the datasets library: parquet with an image and a
                text column, an imagefolder with metadata.jsonl, or a save_to_disk directory
An img2dataset folder can also be used as is: `--manifest-only` just writes its manifest.

    python scripts/make_shards.py my_images/ data/mine --samples-per-shard 1000 --format jpg
    python scripts/make_shards.py cifar10/train data/cifar10/train --source classes --resume
    python scripts/make_shards.py laion_shards/ --manifest-only
    python scripts/make_shards.py my_hf_dataset/ data/mine --source hf --caption-column text
    python scripts/make_shards.py dog_photos/ data/sks --caption "a photo of sks dog"      # DreamBooth instances
"""

import random
import sys
from pathlib import Path

from ldm.data.format import duplicate_keys, expand_urls, write_manifest
from ldm.data.hf import samples_from_hf
from ldm.data.shards import (
    IMAGE_FORMATS,
    samples_from_class_folders,
    samples_from_folder,
    samples_from_shards,
    write_shards,
)
from ldm.utils.cli import ArgumentParser, run_command

SOURCES = ("auto", "folder", "classes", "shards", "hf")


def _guess_source(src: Path) -> str:
    if src.is_file() or any(src.glob("*.tar")):
        return "shards"
    if any(src.glob("*.parquet")) or any(src.glob("*/*.parquet")) or (src / "dataset_dict.json").exists() \
            or (src / "state.json").exists():
        return "hf"
    if (src / "metadata.jsonl").exists() or (src / "metadata.csv").exists() or any(src.glob("*.txt")):
        return "folder"
    if any(p.is_dir() for p in src.iterdir()) and not any(src.rglob("*.txt")):
        return "classes"
    return "folder"


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="image folder, class folders, or existing shards")
    parser.add_argument("out", nargs="?", help="output folder for 000000.tar, ... and manifest.json")
    parser.add_argument("--source", choices=SOURCES, default="auto")
    parser.add_argument("--template", default="a photo of a {label}", help="caption of class folders")
    parser.add_argument("--caption", default=None, help="folder source: this caption for every image (no .txt needed)")
    parser.add_argument("--split", default="train", help="hf source: the split to read")
    parser.add_argument("--image-column", default=None, help="hf source: the image column (default: found)")
    parser.add_argument("--caption-column", default=None, help="hf source: the caption column (default: found)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-shard-bytes", type=float, default=None, help="also cut shards at this size")
    parser.add_argument("--format", choices=IMAGE_FORMATS, default="jpg", help="image encoding in the shards")
    parser.add_argument("--quality", type=int, default=95, help="jpg/webp quality")
    parser.add_argument("--max-size", type=int, default=None, help="shrink the long side of larger images")
    parser.add_argument("--resume", action="store_true", help="keep complete shards of an interrupted run")
    parser.add_argument("--shuffle-seed", type=int, default=None,
                        help="write the samples in a seeded random order (class folders are read class by class: "
                             "otherwise each shard holds one class, and a loader that streams shards gives batches "
                             "of one or two classes)")  # fmt: skip
    parser.add_argument("--manifest-only", action="store_true", help="write manifest.json for shards in src")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    src = Path(args.src)
    if not src.exists():
        parser.error(f"no such file or directory: {src}")
    if args.manifest_only:
        manifest = write_manifest(src)
        twice = manifest["duplicates"]
        note = f"; {len(twice)} keys name several samples (each is trained once), e.g. {next(iter(twice))!r} in " \
               f"{', '.join(twice[next(iter(twice))])}" if twice else ""
        print(f"{src}: manifest of {len(manifest['shards'])} shards, {manifest['total']} samples{note}")
        return
    if args.out is None:
        parser.error("out is required unless --manifest-only")
    source = _guess_source(src) if args.source == "auto" else args.source
    samples = {
        "folder": lambda: samples_from_folder(src, caption=args.caption),
        "classes": lambda: samples_from_class_folders(src, args.template),
        "shards": lambda: samples_from_shards(str(src)),
        "hf": lambda: samples_from_hf(src, args.split, args.image_column, args.caption_column),
    }[source]()
    samples = list(samples) if source in ("folder", "classes") else samples  # paths only: cheap, gives a total
    if source == "shards":  # a stream: its keys come from the tar headers, before anything is written
        twice = duplicate_keys(expand_urls(str(src)))
        if twice:
            key = next(iter(twice))
            raise ValueError(f"{src}: {len(twice)} keys name several samples, e.g. {key!r} in "
                             f"{', '.join(twice[key])}; keys must be unique: nothing was written")  # fmt: skip
    if args.shuffle_seed is not None:
        if source not in ("folder", "classes"):
            parser.error("--shuffle-seed: shards and datasets are read as a stream; shuffle when writing them first")
        random.Random(args.shuffle_seed).shuffle(samples)
    paths = write_shards(
        samples,
        args.out,
        args.samples_per_shard,
        args.format,
        args.quality,
        progress=not args.no_progress,
        max_shard_bytes=int(args.max_shard_bytes) if args.max_shard_bytes else None,
        max_size=args.max_size,
        resume=args.resume,
    )
    print(f"{args.out}: {len(paths)} shards from {source} source {src}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_command(main))
