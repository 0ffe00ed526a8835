"""Read a rank's planned batches (`ldm.data.plan`): one bucket per batch, samples fetched by key from local tars.

    dataset = PlannedBatches(chain, rank, convert, health, collate)      # one rank's batches, pass after pass
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)

Worker w of n reads the rank's batches w, w + n, ... of each pass; the DataLoader takes one from each worker in
turn, so the batches arrive in the plan's order whatever the number of workers. `set_position` starts the next
pass at a given pass, carried set and batch (exact resume: batches already trained on are not read again).

A sample is read by seeking to its members in its tar (`KeyReader` indexes each tar's member offsets once per
process), so bucketed reading needs local (or mounted) shards. A sample that cannot be read or decoded is skipped
with a warning naming shard and key and counted in `DataHealth`; a batch that lost every sample arrives empty
(the epoch loader keeps the rank's step count).
"""

from __future__ import annotations

import tarfile
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch

from ldm.data.format import split_name
from ldm.data.health import DataHealth
from ldm.data.plan import Batch, PlanChain, Record
from ldm.data.transforms import ImageTooSmall
from ldm.data.webdataset import SampleError, ToTrainingSample, is_read_file, warn_and_skip, worker_and_count


class KeyReader:
    """Members of a sample by (url, key) from local tars; each tar's index (key -> {extension: (offset, size)}) is
    read from its headers on first use, file handles kept open (the `max_open` most recent)."""

    def __init__(self, select: Callable[[str], bool] = is_read_file, max_open: int = 16):
        self.select, self.max_open = select, max_open
        self._index: dict[str, dict[str, dict[str, tuple[int, int]]]] = {}
        self._files: OrderedDict = OrderedDict()
        self.broken: dict[str, str] = {}  # url -> why its index stops early

    def __getstate__(self):  # workers get a fresh reader: open files and indexes are per process
        return {"select": self.select, "max_open": self.max_open, "_index": {}, "_files": OrderedDict(), "broken": {}}

    def index(self, url: str) -> dict[str, dict[str, tuple[int, int]]]:
        if url not in self._index:
            entries: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with tarfile.open(url) as tar:
                    for member in tar:
                        parts = split_name(member.name) if member.isreg() and self.select(member.name) else None
                        if parts is not None:
                            entries.setdefault(parts[0], {})[parts[1].lower()] = (member.offset_data, member.size)
            except (OSError, tarfile.TarError) as error:  # keep what was indexed before the damage
                self.broken[url] = repr(error)
            self._index[url] = entries
        return self._index[url]

    def _file(self, url: str):
        if url in self._files:
            self._files.move_to_end(url)
            return self._files[url]
        if len(self._files) >= self.max_open:
            self._files.popitem(last=False)[1].close()
        handle = self._files[url] = open(url, "rb")
        return handle

    def read(self, url: str, key: str) -> dict:
        """{"__key__", "__url__", extension: bytes, ...}; KeyError when the tar does not hold the key."""
        members = self.index(url).get(key)
        if members is None:
            broken = f" (the tar is unreadable from some point: {self.broken[url]})" if url in self.broken else ""
            raise KeyError(f"key {key!r} is not in the shard{broken}")
        handle = self._file(url)
        sample = {"__key__": key, "__url__": url}
        for extension, (offset, size) in members.items():
            handle.seek(offset)
            data = handle.read(size)
            if len(data) != size:
                raise OSError(f"member {key}.{extension}: {len(data)} of {size} bytes (truncated)")
            sample[extension] = data
        return sample


class PlannedBatches(torch.utils.data.IterableDataset):
    """One rank's batches, pass after pass, in the order `chain` plans them; each batch collated by `collate`.

    `records` / `class_records` are the planner's; `convert` turns a raw sample into a training sample (the
    planner's bucket size is its target, the visit's pass seeds its augmentation). Class samples (DreamBooth)
    carry `class_weight` as their loss weight, instance samples 1 (only when there are class samples)."""

    def __init__(self, chain: PlanChain, rank: int, convert: ToTrainingSample, health: DataHealth,
                 collate: Callable[[list[dict]], dict], reader: KeyReader | None = None,
                 class_weight: float = 1.0):  # fmt: skip
        super().__init__()
        self.chain, self.rank, self.convert, self.health, self.collate = chain, rank, convert, health, collate
        self.reader = reader or KeyReader()
        self.class_weight = class_weight
        self.passes = 0
        self.start_batch = 0

    @property
    def planner(self):
        return self.chain.planner

    def set_position(self, pass_index: int, carried=(), start_batch: int = 0) -> None:
        """Start the next pass at `pass_index` with `carried` visits, skipping its first `start_batch` batches of
        this rank. Call before dataloader workers start: they copy the dataset."""
        self.chain = PlanChain(self.planner, pass_index, carried)
        self.passes, self.start_batch = pass_index, start_batch

    def __iter__(self):
        worker, num_workers = worker_and_count()
        pass_index, self.passes = self.passes, self.passes + 1
        start, self.start_batch = self.start_batch, 0
        plan = self.chain.plan(pass_index)
        if worker == 0:
            self._count_left_out()
        batches = plan.rank_batches(self.rank)
        for j in range(start + worker, len(batches), num_workers):
            yield self.read_batch(batches[j])

    def _count_left_out(self) -> None:
        """This rank's share of the records the plan leaves out (too small, unreadable), once per pass."""
        world = self.planner.world_size
        too_small = sum(1 for i in self.planner.too_small if i % world == self.rank)
        unreadable = sum(1 for i in self.planner.unreadable if i % world == self.rank)
        if too_small:
            self.health.add("too_small", too_small)
        if unreadable:
            self.health.add("skipped", unreadable)

    def _sample(self, record: Record, visit_pass: int, size, kind: str) -> dict | None:
        try:
            try:
                raw = self.reader.read(record.url, record.key)
            except (KeyError, OSError) as error:
                raise SampleError(record.url, record.key, str(error)) from error
            raw.update({"__pass__": visit_pass, "__size__": size, "__kind__": kind})
            if kind == "class":
                raw["__weight__"] = self.class_weight
            elif self.planner.class_records:
                raw["__weight__"] = 1.0
            sample = self.convert(raw)
        except ImageTooSmall:
            self.health.add("too_small")
            return None
        except SampleError as error:
            self.health.add("skipped")
            warn_and_skip(error)
            return None
        self.health.add("ok")
        return sample

    def read_batch(self, batch: Batch) -> dict:
        size = self.planner.buckets[batch.bucket]
        samples = [self._sample(self.planner.records[i], p, size, "instance") for i, p in batch.visits]
        samples += [self._sample(self.planner.class_records[i], p, size, "class") for i, p in batch.classes]
        samples = [s for s in samples if s is not None]
        if not samples:
            warnings.warn(f"a planned batch of bucket {size[0]}x{size[1]} lost every sample", stacklevel=2)
            return {"caption": [], "key": []}
        return self.collate(samples)
