"""Turn images with captions into WebDataset shards (+ manifest.json with counts, sizes, sha256).

Sources (--source, default: guessed from the folder):
    folder      `img.png` + `img.txt` pairs, or images + metadata.jsonl / metadata.csv (HF imagefolder)
    classes     `<src>/<label>/*.jpg`, captioned by --template "a photo of a {label}"
    shards      existing shards (img2dataset output), re-sharded / re-encoded
An img2dataset folder can also be used as is: `--manifest-only` just writes its manifest.

    python scripts/make_shards.py my_images/ data/mine --samples-per-shard 1000 --format jpg
    python scripts/make_shards.py cifar10/train data/cifar10/train --source classes --resume
    python scripts/make_shards.py laion_shards/ --manifest-only
"""

import argparse
import random
import sys
from pathlib import Path

from ldm.data.format import write_manifest
from ldm.data.shards import (
    IMAGE_FORMATS,
    samples_from_class_folders,
    samples_from_folder,
    samples_from_shards,
    write_shards,
)

SOURCES = ("auto", "folder", "classes", "shards")


def _guess_source(src: Path) -> str:
    if src.is_file() or any(src.glob("*.tar")):
        return "shards"
    if (src / "metadata.jsonl").exists() or (src / "metadata.csv").exists() or any(src.glob("*.txt")):
        return "folder"
    if any(p.is_dir() for p in src.iterdir()) and not any(src.rglob("*.txt")):
        return "classes"
    return "folder"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="image folder, class folders, or existing shards")
    parser.add_argument("out", nargs="?", help="output folder for 000000.tar, ... and manifest.json")
    parser.add_argument("--source", choices=SOURCES, default="auto")
    parser.add_argument("--template", default="a photo of a {label}", help="caption of class folders")
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
    if args.manifest_only:
        manifest = write_manifest(src)
        print(f"{src}: manifest of {len(manifest['shards'])} shards, {manifest['total']} samples")
        return
    if args.out is None:
        parser.error("out is required unless --manifest-only")
    source = _guess_source(src) if args.source == "auto" else args.source
    samples = {
        "folder": lambda: samples_from_folder(src),
        "classes": lambda: samples_from_class_folders(src, args.template),
        "shards": lambda: samples_from_shards(str(src)),
    }[source]()
    samples = list(samples) if source != "shards" else samples  # paths only: cheap, and gives the bar a total
    if args.shuffle_seed is not None:
        if source == "shards":
            parser.error("--shuffle-seed: shards are read as a stream; shuffle when writing them first")
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
    main()
