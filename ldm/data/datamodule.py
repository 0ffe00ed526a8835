"""LightningDataModule over image-caption WebDataset shards.

    >>> from ldm.data.datamodule import ShardDataModule
    >>> dm = ShardDataModule("data/shapes/train", "data/shapes/val", resolution=32, batch_size=4)
    >>> batch = next(iter(dm.train_dataloader()))  # doctest: +SKIP
    >>> batch["pixel_values"].shape, len(batch["caption"])  # doctest: +SKIP
    (torch.Size([4, 3, 32, 32]), 4)

Two ways to cut the train stream into epochs:
  exact (default)  an epoch is one pass: every sample is seen exactly once across all ranks
                   and workers (the last batch may be short). With several ranks, every rank
                   yields the same number of batches, so none waits at the end of an epoch: a
                   rank with fewer samples (counts from manifest.json, else tar headers) tops up
                   from the start of a new pass of its own shards, like DistributedSampler's padding.
  resampled        `samples_per_epoch=N`: shards drawn with replacement forever, each rank
                   yielding N // (batch_size * world_size) full batches per epoch. For large corpora.
Validation is not split across ranks: every rank sees all of the (small) val set.

Exact resume: an epoch's data is a function of the pass it starts at (shard order, shuffle and
augmentation are seeded by (seed, pass, ...)), so checkpoints store that pass and the batches of the
epoch already trained on (`ShardDataModule.state_dict`); a resumed run starts the same pass and drops
that many batches (it reads them again: resuming costs at most one epoch of data loading).

Aspect-ratio buckets (`buckets`, see ldm.data.buckets) and DreamBooth (`dreambooth`) read planned batches
instead (ldm.data.plan, ldm.data.bucketed): the order of a pass is decided up front from each image's size, every
batch holds one bucket, and part-filled buckets carry into the next pass; the data position then also holds the
visits carried into the epoch's pass, and a resumed run starts at its batch without reading the ones before.

Fewer train shards than ranks is an error; fewer than ranks x num_workers lowers num_workers
(with a warning) so that no worker idles. Skipped samples are counted in `train_health`
(logged by `ldm.data.health.DataHealthMonitor`); more than `max_bad_fraction` bad, or a pass
with nothing valid, stops training with `DataError`.
"""

import logging
import math
import os
import warnings

import pytorch_lightning as pl
import torch
import webdataset as wds

from ldm.data.bucketed import KeyReader, PlannedBatches
from ldm.data.buckets import describe, parse_buckets
from ldm.data.captions import caption_processor
from ldm.data.dreambooth import DreamBooth
from ldm.data.format import expand_urls, sample_counts
from ldm.data.health import DataHealth
from ldm.data.plan import BucketPlanner, PlanChain, Record
from ldm.data.sizes import plan_records
from ldm.data.transforms import ImageTransform
from ldm.data.webdataset import (
    ToTrainingSample,
    collate,
    is_read_file,
    make_shard_dataset,
    rank_and_world_size,
    set_pass,
)
from ldm.data.workers import WorkerLoaders

log = logging.getLogger(__name__)


def _cat(batches: list[dict]) -> dict:
    """Concatenate collated batches."""
    if len(batches) == 1:
        return batches[0]
    return {
        name: torch.cat([b[name] for b in batches]) if torch.is_tensor(first) else [x for b in batches for x in b[name]]
        for name, first in batches[0].items()
    }


def _split(batch: dict, n: int) -> tuple[dict, dict]:
    head = {name: value[:n] for name, value in batch.items()}
    tail = {name: value[n:] for name, value in batch.items()}
    return head, tail


def _keep_count(batches):
    """Planned batches as they come; one that lost every sample (all corrupt) is replaced by a repeat of the one
    before (or, at the start, of the next), so that every rank still runs the planned number of steps."""
    last, owed = None, 0
    for batch in batches:
        if not batch["caption"]:
            if last is None:
                owed += 1
                continue
            batch = last
        yield batch
        last = batch
        for _ in range(owed):
            yield batch
        owed = 0


class EpochLoader:
    """Main-process view of a loader of per-worker batches: batches of exactly `batch_size`
    (the last of an epoch may be short) and `samples` samples per epoch.

    samples=None: an epoch is one pass of `loader`. Otherwise an epoch holds exactly
    `samples` samples: from one pass, topped up from further passes if it falls short
    (`restart=True`, exact mode), or from a stream that goes on across epochs (`restart=False`).
    After every batch `health.check` may stop training; a pass with nothing valid always does.
    `passes` counts the passes of `loader` started; `epoch_start_pass` is the one the current epoch began at.
    """

    def __init__(self, loader, batch_size: int, samples: int | None, health: DataHealth, restart: bool = True,
                 where: str = "", planned: bool = False):  # fmt: skip
        self.loader, self.batch_size, self.samples = loader, batch_size, samples
        self.health, self.restart, self.where = health, restart, where
        self.planned = planned  # batches come as planned (one bucket each): passed on as they are, never re-cut
        self._stream = None
        self.passes = 0
        self.epoch_start_pass = 0
        self._skip = 0

    def resume(self, epoch_start_pass: int, batches: int, carried=()) -> None:
        """Continue mid-epoch in a fresh process: the epoch began at data pass `epoch_start_pass` and
        `batches` of its batches were trained on already (planned batches: `carried`, the visits carried into that
        pass). Call before the first iteration."""
        self.passes = self.epoch_start_pass = epoch_start_pass
        if self.planned:  # the planned dataset starts at that batch itself: nothing is read twice
            self.loader.dataset.set_position(epoch_start_pass, carried, batches)
            return
        set_pass(self.loader, epoch_start_pass)
        self._skip = batches

    def __len__(self) -> int:
        if self.samples is None:
            raise TypeError("an exact single-rank epoch has no length known ahead")
        return math.ceil(self.samples / self.batch_size)

    def _pass(self):
        """One pass of the loader; DataError if it gives nothing."""
        got = 0
        self.passes += 1
        for batch in self.loader:
            got += len(batch["caption"])
            self.health.check(where=self.where)
            yield batch
        self.health.check(end_of_pass=True, where=self.where)
        if got == 0:
            raise RuntimeError(f"{self.where}: a pass gave no samples")  # unreachable when health counts

    def _forever(self):
        while True:
            yield from self._pass()

    def __iter__(self):
        skip, self._skip = self._skip, 0
        for i, batch in enumerate(self._batches()):
            if i >= skip:  # resuming: the first `skip` batches were trained on before
                yield batch

    def _batches(self):
        if self.restart or self._stream is None:
            self.epoch_start_pass = self.passes
            self._stream = self._pass() if self.samples is None else self._forever()
        if self.planned:
            yield from _keep_count(self._stream)
            self._stream = None
            return
        stream, left = self._stream, self.samples
        pending, n_pending = [], 0
        for batch in stream:
            if left is not None:
                batch = _split(batch, left)[0] if len(batch["caption"]) > left else batch
                left -= len(batch["caption"])
            pending.append(batch)
            n_pending += len(batch["caption"])
            while n_pending >= self.batch_size:
                full, rest = _split(_cat(pending), self.batch_size)
                yield full
                n_pending -= self.batch_size
                pending = [rest] if n_pending else []
            if left == 0:
                break
        if n_pending:
            yield _cat(pending)
        if self.restart:
            self._stream = None  # exact mode: the next epoch starts a new pass


def default_workers() -> int:
    """Loader workers when `data.num_workers` is null: none without a GPU (a worker process would take a core from
    the training step on a small CPU machine), else half the cores up to 8 (the main process feeds the GPU)."""
    if not torch.cuda.is_available():
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 2))


class ShardDataModule(pl.LightningDataModule):
    def __init__(
        self,
        train_shards: str,
        val_shards: str | None,
        resolution: int,
        batch_size: int,
        num_workers: int | None = 2,
        center_crop: bool = True,
        random_flip: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        upscale: bool = False,
        max_bad_fraction: float = 0.05,
        jpeg_draft: bool = False,
        uint8: bool = False,
        buckets=None,
        captions: dict | None = None,
        dreambooth: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch
        self.upscale = upscale
        self.max_bad_fraction = max_bad_fraction
        self.jpeg_draft = jpeg_draft
        self.uint8 = uint8
        self.captions = caption_processor(captions)
        self.dreambooth = DreamBooth(**dreambooth) if dreambooth else None
        # bucket sizes (width, height); DreamBooth alone plans square batches: one bucket
        self.bucket_sizes = parse_buckets(buckets, resolution)
        if self.bucket_sizes is None and self.dreambooth is not None:
            self.bucket_sizes = [(resolution, resolution)]
        self.planned = self.bucket_sizes is not None
        if self.planned and samples_per_epoch is not None:
            raise ValueError("data.samples_per_epoch with data.buckets or data.dreambooth: planned epochs are exact "
                             "passes; set data.samples_per_epoch=null")  # fmt: skip
        self.train_health = DataHealth(max_bad_fraction)
        self.val_health = DataHealth(max_bad_fraction)
        self._train_loader: EpochLoader | None = None
        self._resume: dict | None = None
        self._planner: BucketPlanner | None = None
        self._chain: PlanChain | None = None
        self._worker_loaders = WorkerLoaders()  # every loader made here: teardown stops their workers

    def teardown(self, stage: str) -> None:
        """End of fit (after on_fit_end's exports): the loaders' workers are stopped now, not joined 5 s each at
        interpreter exit (ldm.data.workers)."""
        stopped = self._worker_loaders.stop()
        if stopped:
            log.debug(f"stopped {stopped} data loader workers")

    def state_dict(self) -> dict:
        """The train stream's position, saved in checkpoints: the pass the current epoch started at and
        how many of its batches were trained on (the trainer's count: the loader has read ahead); planned
        batches add the visits carried into that pass, as [url, key, pass]."""
        if self._train_loader is None or self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        if progress.is_last_batch:  # the epoch is over: a resumed run starts the next one, at the next pass
            state = {"epoch_start_pass": self._train_loader.passes, "batches": 0}
        else:
            state = {"epoch_start_pass": self._train_loader.epoch_start_pass, "batches": progress.current.processed}
        if self._chain is not None:
            records = self._planner.records
            state["carried"] = [[records[i].url, records[i].key, p]
                                for i, p in self._chain.carried_in(state["epoch_start_pass"])]  # fmt: skip
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = dict(state_dict) or None

    # --- planned batches: buckets, DreamBooth ---------------------------------------------------------------
    def planner(self, world_size: int) -> BucketPlanner:
        """The bucket planner of the train shards for `world_size` ranks (image sizes read once)."""
        if self._planner is None or self._planner.world_size != world_size:
            class_records = []
            if self.dreambooth is not None:
                class_records = self.class_records()
                if not class_records:
                    raise ValueError(f"data.dreambooth.class_shards={self.dreambooth.class_shards}: no class images; "
                                     f"ldm.train generates them before training (or write shards there)")  # fmt: skip
            self._planner = BucketPlanner(plan_records(expand_urls(self.train_shards)), self.bucket_sizes,
                                          self.batch_size, world_size, self.seed, self.upscale, class_records)  # fmt: skip
        return self._planner

    def class_records(self) -> list[Record]:
        """The DreamBooth class images there are now ([] when none yet)."""
        try:
            urls = expand_urls(self.dreambooth.class_shards)
        except FileNotFoundError:
            return []
        return plan_records(urls)

    def bucket_report(self, pass_index: int | None = None) -> dict | None:
        """What the planner makes of the train data: buckets, images per bucket, class images per bucket, images
        left out (too small, unreadable), and a pass's (default: the current epoch's) carried visits, repeats and
        short batches."""
        if not self.planned:
            return None
        planner = self.planner(self._rank_and_world_size()[1])
        if pass_index is None:
            pass_index = self._train_loader.epoch_start_pass if self._train_loader is not None else 0
        first = (self._chain or PlanChain(planner)).plan(pass_index)
        return {"buckets": [list(b) for b in planner.buckets], "counts": planner.counts(),
                "class_counts": planner.class_counts() if planner.class_records else None,
                "too_small": len(planner.too_small), "unreadable": len(planner.unreadable),
                "carried": len(first.carried), "repeated": first.repeated, "short": first.short,
                "batches": len(first.batches)}  # fmt: skip

    def _planned_loader(self, rank: int, world_size: int) -> EpochLoader:
        planner = self.planner(world_size)
        resume = dict(self._resume or {})
        index = {(r.url, r.key): i for i, r in enumerate(planner.records)}
        carried = [(index[(url, key)], p) for url, key, p in resume.get("carried", []) if (url, key) in index]
        if len(carried) < len(resume.get("carried", [])):
            warnings.warn(f"{len(resume['carried']) - len(carried)} carried samples of the checkpoint are not in "
                          f"{self.train_shards} any more; resuming without them")  # fmt: skip
        self._chain = PlanChain(planner, resume.get("epoch_start_pass", 0), carried)
        dataset = PlannedBatches(PlanChain(planner), rank, self.sample_converter(), self.train_health, self.collate,
                                 reader=KeyReader(select=self.read_select),
                                 class_weight=self.dreambooth.prior_loss_weight if self.dreambooth else 1.0)  # fmt: skip
        loader = self._worker_loaders.add(torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available()))  # fmt: skip
        if rank == 0:
            report = self.bucket_report(resume.get("epoch_start_pass", 0))
            log.info(f"buckets of {self.train_shards} (width x height: images): "
                     f"{describe(planner.buckets, report['counts'])}; {report['too_small']} too small for any bucket"
                     f"{' (upscaling off)' if not self.upscale else ''}, {report['unreadable']} unreadable; first pass:"
                     f" {report['batches']} batches, {report['carried']} samples carried into the next pass, "
                     f"{report['repeated']} batches repeated to even out {world_size} ranks")  # fmt: skip
        epochs = EpochLoader(loader, self.batch_size, None, self.train_health, where=str(self.train_shards),
                             planned=True)  # fmt: skip
        if self._resume:
            epochs.resume(resume["epoch_start_pass"], resume["batches"], carried)
            self._resume = None
        return epochs

    read_select = staticmethod(is_read_file)  # the tar members a sample is read from (subclasses: others)

    def sample_converter(self) -> ToTrainingSample:
        """Raw sample -> training sample, for planned batches (a subclass reading other shards replaces it)."""
        return ToTrainingSample(self.transform(), seed=self.seed, jpeg_draft=self.jpeg_draft, captions=self.captions)

    def transform(self) -> ImageTransform:
        return ImageTransform(self.resolution, center_crop=self.center_crop, random_flip=self.random_flip,
                              upscale=self.upscale, uint8=self.uint8)  # fmt: skip

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return rank_and_world_size()

    def _loader(self, dataset, num_workers: int) -> wds.WebLoader:
        """Workers collate their own batches (the last of a pass may be short); EpochLoader re-cuts them."""
        return self._worker_loaders.add(wds.WebLoader(
            dataset.compose(wds.batched(self.batch_size, collation_fn=self.collate, partial=True)),
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        ))

    def _rank_samples(self, urls: list[str], world_size: int) -> list[int]:
        """Samples each rank reads in one exact pass (shard i -> rank i % world_size)."""
        try:
            counts = sample_counts(urls, strict=True)
        except ValueError as error:
            raise ValueError(f"{error}; exact epochs over {world_size} ranks need one, or set "
                             f"data.samples_per_epoch") from None  # fmt: skip
        return [sum(counts[url] for url in urls[rank::world_size]) for rank in range(world_size)]

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """A batch's tensors to the device; its lists of captions and keys stay as they are (Lightning's default
        walks every string of every batch, one by one: milliseconds per step at batch 256)."""
        if isinstance(batch, dict) and all(isinstance(v, (torch.Tensor, list, tuple)) for v in batch.values()):
            non_blocking = device.type not in ("cpu", "mps")  # as Lightning's default (pinned memory: asynchronous)
            return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()}  # fmt: skip
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    collate = staticmethod(collate)  # samples -> batch (workers collate; subclasses with other samples replace it)

    def train_dataset(self, urls: list[str], resampled: bool, rank: int, world_size: int):
        """The training pipeline of one rank (a subclass reading other shards overrides this)."""
        return make_shard_dataset(
            urls,
            self.resolution,
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            resampled=resampled,
            upscale=self.upscale,
            jpeg_draft=self.jpeg_draft,
            uint8=self.uint8,
            health=self.train_health,
            rank=rank,
            world_size=world_size,
            captions=self.captions,
        )

    def train_dataloader(self) -> EpochLoader:
        rank, world_size = self._rank_and_world_size()
        if self.planned:
            self._train_loader = self._planned_loader(rank, world_size)
            return self._train_loader
        urls = expand_urls(self.train_shards)
        resampled = self.samples_per_epoch is not None
        num_workers = self.num_workers
        if not resampled:
            if len(urls) < world_size:
                raise ValueError(f"{self.train_shards}: {len(urls)} shards cannot feed {world_size} ranks; "
                                 f"write more (smaller) shards or set data.samples_per_epoch")  # fmt: skip
            fewest = len(urls) // world_size  # shards of the rank with the fewest
            if num_workers > fewest:
                warnings.warn(f"{self.train_shards}: {len(urls)} shards over {world_size} ranks leave some of "
                              f"{num_workers} workers without a shard; using {fewest} workers")  # fmt: skip
                num_workers = fewest
        dataset = self.train_dataset(urls, resampled, rank, world_size)
        if resampled:
            batches = self.samples_per_epoch // (self.batch_size * world_size)
            if batches == 0:
                raise ValueError(f"samples_per_epoch {self.samples_per_epoch} < batch_size {self.batch_size} "
                                 f"x {world_size} ranks")  # fmt: skip
            samples = batches * self.batch_size
        else:
            samples = max(self._rank_samples(urls, world_size)) if world_size > 1 else None
        # every epoch restarts the stream at a new pass (resampled too), so an epoch is a function of its pass
        loader = EpochLoader(self._loader(dataset, num_workers), self.batch_size, samples, self.train_health,
                             where=str(self.train_shards))  # fmt: skip
        if self._resume:
            loader.resume(**self._resume)
            self._resume = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> EpochLoader | list:
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
            upscale=True,  # every validation image, as the FID reference statistics read them
            uint8=self.uint8,
            health=self.val_health,
        )
        num_workers = min(self.num_workers, len(expand_urls(self.val_shards)))
        return EpochLoader(self._loader(dataset, num_workers), self.batch_size, None, self.val_health,
                           where=str(self.val_shards))  # fmt: skip
