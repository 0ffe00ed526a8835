"""The order of a bucketed epoch, decided up front from each image's size: every batch one bucket, every sample
once per pass across ranks and workers, leftovers carried into the next pass, the same on every rank.

    >>> planner = BucketPlanner(records, buckets, batch_size=4, world_size=2, seed=0)   # doctest: +SKIP
    >>> plan = planner.plan(pass_index=0, carried=[])                                   # doctest: +SKIP
    >>> plan.rank_batches(rank=1)[0]         # Batch(bucket=3, visits=((17, 0), (4, 0), ...), classes=())  # doctest: +SKIP
    >>> plan.carried                         # visits of part-filled buckets: first in the next pass  # doctest: +SKIP

A visit is (record index, pass): the pass a sample's visit belongs to, which also seeds its augmentation, so a
visit carried into the next pass is the same crop and flip it would have been. A pass, given the visits carried
into it:

1. every record whose image fits a bucket (`ldm.data.buckets.assign_bucket`) is visited once; records too small
   for every bucket (upscaling off) or without a readable image are left out and counted;
2. per bucket, the carried visits come first, then this pass's visits shuffled (seeded by seed, pass, bucket), cut
   into batches of `batch_size`; a part-filled last batch is carried into the next pass, unless it holds a visit
   carried already, which then trains now as a short batch (no visit waits more than one pass);
3. the batches are shuffled (seed, pass) and dealt round-robin to the ranks; when their number is not a multiple
   of the world size, the last few whole batches holding no carried visit are carried too (so all ranks run the
   same number of steps); only when there are not enough such batches are the first batches repeated (counted).

DreamBooth: each instance batch is joined by as many class ("regularisation") samples of the same bucket, drawn
from the class records of that bucket in an order shuffled per (seed, pass, bucket) and cycled; a bucket without
class images borrows those of the nearest aspect ratio (resized to cover it: the one case where images are
upscaled without `upscale`).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from ldm.data.buckets import Size, assign_bucket, describe

Visit = tuple[int, int]  # (record index, pass it belongs to)


@dataclass(frozen=True)
class Record:
    """One sample the planner can place: where it is and its image's (width, height) (None: unreadable)."""

    url: str
    key: str
    size: Size | None


@dataclass(frozen=True)
class Batch:
    bucket: int
    visits: tuple[Visit, ...]  # instance (or plain) samples
    classes: tuple[Visit, ...] = ()  # DreamBooth class samples (indices into the class records)
    repeat: bool = False  # a repeat, only so that every rank runs the same number of steps


@dataclass
class Plan:
    batches: list[Batch]  # all ranks' batches in order; rank r takes r, r + world_size, ...
    carried: list[Visit]  # visits carried into the next pass
    world_size: int
    repeated: int = 0  # batches repeated to even out the ranks
    short: int = 0  # part-filled batches trained now (they held a carried visit)

    def rank_batches(self, rank: int) -> list[Batch]:
        return self.batches[rank :: self.world_size]


@dataclass
class BucketPlanner:
    records: list[Record]
    buckets: list[Size]
    batch_size: int
    world_size: int = 1
    seed: int = 0
    upscale: bool = False
    class_records: list[Record] = field(default_factory=list)

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"data.batch_size={self.batch_size} must be positive")
        self.assigned: list[int | None] = [
            assign_bucket(r.size, self.buckets, self.upscale) if r.size else None for r in self.records
        ]
        self.members: list[list[int]] = [[] for _ in self.buckets]
        for i, bucket in enumerate(self.assigned):
            if bucket is not None:
                self.members[bucket].append(i)
        self.unreadable = [i for i, r in enumerate(self.records) if r.size is None]
        self.too_small = [i for i, (r, b) in enumerate(zip(self.records, self.assigned)) if r.size and b is None]
        counts = self.counts()
        if not any(counts):
            raise ValueError(f"no image fits a bucket: {len(self.too_small)} too small for every bucket "
                             f"({'upscaling off: set data.upscale=true to upscale them' if not self.upscale else ''}), "
                             f"{len(self.unreadable)} unreadable")  # fmt: skip
        if max(counts) < self.batch_size:
            raise ValueError(f"data.batch_size={self.batch_size} is larger than every bucket can fill (the fullest "
                             f"holds {max(counts)}: {describe(self.buckets, counts)}); lower the batch size or use "
                             f"fewer buckets")  # fmt: skip
        self.class_pools = self._class_pools() if self.class_records else []

    def counts(self) -> list[int]:
        """Images per bucket (one pass's visits)."""
        return [len(m) for m in self.members]

    def class_counts(self) -> list[int]:
        """Class images per bucket (by their own size; upscaling allowed: class images fill in, never dropped)."""
        counts = [0] * len(self.buckets)
        for r in self.class_records:
            if r.size:
                counts[assign_bucket(r.size, self.buckets, upscale=True)] += 1
        return counts

    def _class_pools(self) -> list[list[int]]:
        """Per bucket, the class records that join its batches (its own, else the nearest aspect ratio's)."""
        own: list[list[int]] = [[] for _ in self.buckets]
        for i, r in enumerate(self.class_records):
            if r.size:
                own[assign_bucket(r.size, self.buckets, upscale=True)].append(i)
        if not any(own):
            raise ValueError("the DreamBooth class set holds no readable image")
        pools = []
        for b, (w, h) in enumerate(self.buckets):
            if own[b] or not self.members[b]:
                pools.append(own[b])
                continue
            donor = min((d for d in range(len(self.buckets)) if own[d]),
                        key=lambda d: abs(math.log(w / h) - math.log(self.buckets[d][0] / self.buckets[d][1])))  # fmt: skip
            warnings.warn(f"bucket {w}x{h} has no class image; its batches take those of "
                          f"{self.buckets[donor][0]}x{self.buckets[donor][1]} (resized to cover it)", stacklevel=2)  # fmt: skip
            pools.append(own[donor])
        return pools

    def plan(self, pass_index: int, carried: Sequence[Visit] = ()) -> Plan:
        """The batches of pass `pass_index`, given the visits carried into it (see the module docstring)."""
        carried = [tuple(v) for v in carried if 0 <= v[0] < len(self.records) and self.assigned[v[0]] is not None]
        carried_in = set(carried)
        batches: list[Batch] = []
        carried_out: list[Visit] = []
        short = 0
        for bucket, members in enumerate(self.members):
            order = list(members)
            random.Random(f"plan-{self.seed}-{pass_index}-{bucket}").shuffle(order)
            visits = [v for v in carried if self.assigned[v[0]] == bucket] + [(i, pass_index) for i in order]
            full = len(visits) // self.batch_size * self.batch_size
            batches += [Batch(bucket, tuple(visits[j : j + self.batch_size])) for j in range(0, full, self.batch_size)]
            rest = visits[full:]
            if rest and carried_in.intersection(rest):
                batches.append(Batch(bucket, tuple(rest)))  # carried once already: trains now, short
                short += 1
            else:
                carried_out += rest
        random.Random(f"plan-{self.seed}-{pass_index}").shuffle(batches)
        batches, carried_out, repeated = self._even_out(batches, carried_out, carried_in)
        if self.class_pools:
            batches = self._add_classes(batches, pass_index)
        return Plan(batches, carried_out, self.world_size, repeated, short)

    def _even_out(self, batches: list[Batch], carried_out: list[Visit], carried_in: set) -> tuple[list, list, int]:
        """Make the number of batches a multiple of the world size: carry the last batches holding no carried
        visit into the next pass, or, when there are not enough of them, repeat the first batches."""
        extra = len(batches) % self.world_size
        if not extra:
            return batches, carried_out, 0
        movable = [j for j in reversed(range(len(batches))) if not carried_in.intersection(batches[j].visits)]
        if len(movable) >= extra:
            moved = set(movable[:extra])
            carried_out = carried_out + [v for j in sorted(moved) for v in batches[j].visits]
            return [b for j, b in enumerate(batches) if j not in moved], carried_out, 0
        missing = self.world_size - extra
        repeats = [Batch(b.bucket, b.visits, b.classes, repeat=True) for b in (batches * self.world_size)[:missing]]
        return batches + repeats, carried_out, missing

    def _add_classes(self, batches: list[Batch], pass_index: int) -> list[Batch]:
        orders: dict[int, list[int]] = {}
        cursor: dict[int, int] = {}
        out = []
        for batch in batches:
            pool = self.class_pools[batch.bucket]
            if batch.bucket not in orders:
                orders[batch.bucket] = list(pool)
                random.Random(f"classes-{self.seed}-{pass_index}-{batch.bucket}").shuffle(orders[batch.bucket])
                cursor[batch.bucket] = 0
            order, start = orders[batch.bucket], cursor[batch.bucket]
            picked = tuple((order[(start + k) % len(order)], pass_index) for k in range(len(batch.visits)))
            cursor[batch.bucket] = start + len(batch.visits)
            out.append(Batch(batch.bucket, batch.visits, picked, batch.repeat))
        return out


class PlanChain:
    """The carried visits of pass after pass, from a known starting point (pass 0 with none carried, or where a
    resumed run's checkpoint says): `plan(p)` for any later pass p, each carried set computed once."""

    def __init__(self, planner: BucketPlanner, start_pass: int = 0, carried: Sequence[Visit] = ()):
        self.planner = planner
        self._carried: dict[int, list[Visit]] = {start_pass: [tuple(v) for v in carried]}
        self._last: tuple[int, Plan] | None = None

    def carried_in(self, pass_index: int) -> list[Visit]:
        known = max((p for p in self._carried if p <= pass_index), default=None)
        if known is None:
            raise ValueError(f"pass {pass_index} is before the first known pass {min(self._carried)}")
        while known < pass_index:
            self._carried[known + 1] = self.plan(known).carried
            known += 1
        return self._carried[pass_index]

    def plan(self, pass_index: int) -> Plan:
        if self._last is None or self._last[0] != pass_index:
            self._last = (pass_index, self.planner.plan(pass_index, self.carried_in(pass_index)))
        return self._last[1]
