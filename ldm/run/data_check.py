"""The data checks that need each image's size: a batch some bucket can fill, some image fitting a bucket.

    check_buckets(cfg)   # ConfigError("data.batch_size=16 is larger than every bucket can fill (the fullest ...)")

Called by `ldm.run.fit` after `ldm.run.validate` (which checks the bucket spec, the tag-caption and DreamBooth
settings before anything heavy is imported). The sizes come from `sizes.json` beside the shards, or are read once
from the image headers and cached there (`ldm.data.sizes`); the verdict is the planner's own (`ldm.data.plan`).
Remote shards are left to the data module, which refuses them for buckets.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ldm.data.buckets import parse_buckets
from ldm.data.format import expand_urls, is_remote
from ldm.data.plan import BucketPlanner
from ldm.data.sizes import plan_records
from ldm.utils.rules import ConfigError


def check_buckets(cfg: DictConfig) -> None:
    """ConfigError (one line) when no batch of the image-shard data can fill a bucket, or no image fits one."""
    data = OmegaConf.to_container(cfg.get("data") or {}, resolve=True)
    if "buckets" not in data:  # latent shards: their buckets were checked when they were written
        return
    buckets = parse_buckets(data.get("buckets"), data.get("resolution") or 0)
    if buckets is None and data.get("dreambooth") is not None:
        buckets = [(data["resolution"], data["resolution"])]
    if buckets is None:
        return
    urls = expand_urls(data["train_shards"])
    if any(is_remote(url) for url in urls):
        return
    try:
        BucketPlanner(plan_records(urls), buckets, data["batch_size"], upscale=bool(data.get("upscale")))
    except ValueError as error:
        raise ConfigError(str(error).splitlines()[0]) from None
