"""LightningDataModule over image-caption WebDataset shards.

    >>> from ldm.data.datamodule import ShardDataModule
    >>> dm = ShardDataModule("data/shapes/train", "data/shapes/val", resolution=32, batch_size=4)
    >>> batch = next(iter(dm.train_dataloader()))  # doctest: +SKIP
    >>> batch["pixel_values"].shape, len(batch["caption"])  # doctest: +SKIP
    (torch.Size([4, 3, 32, 32]), 4)

With a manifest.json beside the train shards (written by `write_shards`), the train
stream repeats and every DDP rank gets exactly total // (batch_size * world_size) batches
per epoch, so ranks never wait on each other at the end of an epoch. Validation is not
split across ranks: every rank sees all of the (small) val set.
"""

import pytorch_lightning as pl
import torch
import webdataset as wds

from ldm.data.webdataset import collate, count_samples, expand_urls, make_shard_dataset, read_captions


class ShardDataModule(pl.LightningDataModule):
    def __init__(
        self,
        train_shards: str,
        val_shards: str | None,
        resolution: int,
        batch_size: int,
        num_workers: int = 2,
        center_crop: bool = True,
        random_flip: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed

    def _world_size(self) -> int:
        if self.trainer is not None:
            return self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return 1

    def _loader(self, dataset, drop_last: bool) -> wds.WebLoader:
        return wds.WebLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=collate,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> wds.WebLoader:
        urls = expand_urls(self.train_shards)
        world_size = self._world_size()
        if len(urls) < world_size:
            raise ValueError(f"{self.train_shards}: {len(urls)} shards cannot feed {world_size} ranks; write more shards")
        dataset = make_shard_dataset(
            urls,
            self.resolution,
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
        )
        loader = self._loader(dataset, drop_last=True)
        total = count_samples(urls)
        if total is not None:
            batches = total // (self.batch_size * world_size)
            if batches == 0:
                raise ValueError(f"{self.train_shards}: {total} samples < batch_size {self.batch_size} x {world_size} ranks")
            loader = loader.with_epoch(batches)  # repeat the stream, cut every epoch at `batches`
        return loader

    def val_dataloader(self) -> wds.WebLoader | list:
        if self.val_shards is None:
            return []
        dataset = make_shard_dataset(
            self.val_shards,
            self.resolution,
            center_crop=True,
            random_flip=False,
            shuffle_buffer=0,
            shardshuffle=False,
            split_by_node=False,
        )
        return self._loader(dataset, drop_last=False)

    def val_captions(self, n: int) -> list[str]:
        """The first n captions of the val shards, in shard order (fewer if the set is smaller)."""
        if self.val_shards is None:
            raise ValueError("val_captions needs val_shards, which is None")
        return read_captions(self.val_shards, n)
