"""Turn a folder of images with captions into WebDataset shards.

The folder holds `img.png` + `img.txt` pairs, or images plus a Hugging Face
`metadata.jsonl` (`{"file_name": "img.png", "text": "..."}` per line).

    python scripts/make_shards.py my_images/ data/mine --samples-per-shard 1000 --format jpg
"""

import argparse

from ldm.data.shards import IMAGE_FORMATS, samples_from_folder, write_shards


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="folder of images with .txt sidecars or a metadata.jsonl")
    parser.add_argument("out", help="output folder for 000000.tar, ... and manifest.json")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--format", choices=IMAGE_FORMATS, default="jpg", help="image encoding in the shards")
    parser.add_argument("--quality", type=int, default=95, help="jpg/webp quality")
    args = parser.parse_args(argv)

    paths = write_shards(samples_from_folder(args.src), args.out, args.samples_per_shard, args.format, args.quality)
    print(f"{args.out}: wrote {len(paths)} shards")


if __name__ == "__main__":
    main()
