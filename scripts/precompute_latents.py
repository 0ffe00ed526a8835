"""Encode image shards once with the frozen VAE and text encoder of a training config -> latent shards.

The VAE, text encoder, image shards and resolution are those the same Hydra overrides give `ldm.train`,
so the cached latents match what on-the-fly training would compute (see ldm/data/latents.py):

    python scripts/precompute_latents.py data/shapes-latents experiment=shapes          # CPU, seconds
    python scripts/precompute_latents.py /data/laion-latents --device cuda --batch-size 64 \\
        data=shards data.train_shards='/data/laion/{000000..000999}.tar' data.resolution=512 \\
        model/vae=pretrained model.vae.path=stabilityai/sd-vae-ft-mse model.vae.subfolder=null
    python -m ldm.train experiment=shapes data=latents data.train_shards=data/shapes-latents \\
        data.val_shards=data/shapes/val

With `data.buckets` set (as for training on images), each image is encoded at the bucket of its aspect ratio (and
flipped); training on the result (`data=latents`) keeps one bucket per batch:

    python scripts/precompute_latents.py data/mine-latents --device cuda data=shards data.train_shards=data/mine \\
        data.resolution=1024 data.buckets='{max_aspect: 2.0}' model/vae=pretrained model.vae.path=...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.data.latents import precompute_latents
from ldm.utils.cli import ArgumentParser, run_command

CONF = Path(__file__).resolve().parents[1] / "conf"


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="where the latent shards, latents.json and empty_text.npy go")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml, as for ldm.train")
    parser.add_argument("--split", choices=["train", "val"], default="train", help="which shards of the data config")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--no-flip", action="store_true", help="do not also encode the flipped image")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=args.overrides)
    shards = cfg.data.train_shards if args.split == "train" else cfg.data.val_shards
    vae = instantiate(cfg.model.vae, _partial_=False).to(args.device)  # the stage builds it lazily; here now
    text_encoder = instantiate(cfg.model.text_encoder, _partial_=False).to(args.device)
    manifest = precompute_latents(
        shards,
        args.out_dir,
        vae,
        text_encoder,
        resolution=cfg.data.resolution,
        batch_size=args.batch_size,
        flip=not args.no_flip,
        samples_per_shard=args.samples_per_shard,
        num_workers=args.num_workers,
        buckets=cfg.data.get("buckets"),
        upscale=cfg.data.get("upscale", False),
        source={"vae": OmegaConf.to_container(cfg.model.vae, resolve=True),
                "text_encoder": OmegaConf.to_container(cfg.model.text_encoder, resolve=True)},
    )
    print(f"{manifest['total']} samples in {len(manifest['shards'])} shards -> {args.out_dir}")


if __name__ == "__main__":
    sys.exit(run_command(main))
