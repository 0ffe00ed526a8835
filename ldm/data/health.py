"""Counts of good and skipped samples, shared by the dataloader workers (the callback that logs them is
`ldm.callbacks.data_health.DataHealthMonitor`).

Workers cannot log, so each one adds to its own row of a shared-memory tensor; the main
process sums the rows. `DataHealth.check` stops training with a clear error when more than
`max_bad_fraction` of the samples read were bad; `DataHealthMonitor` logs the counts as
`data/skipped`, `data/too_small`, `data/shard_errors`, `data/bad_fraction` (all ranks summed).

    >>> from ldm.data.health import DataHealth
    >>> health = DataHealth(max_bad_fraction=0.5)
    >>> health.add("ok", 3); health.add("skipped")
    >>> health.totals()["skipped"], health.bad_fraction()
    (1, 0.25)
"""

import torch

FIELDS = ("ok", "skipped", "too_small", "shard_errors", "duplicates")
_SLOTS = 257  # row 0: the main process (num_workers=0); rows 1..: dataloader worker id + 1


class DataError(RuntimeError):
    """The data cannot feed training: too many bad samples, or none valid at all."""


class DataHealth:
    """Cumulative per-worker counters in shared memory (a worker writes only its own row: no locks).

    ok: samples delivered; skipped: bad samples (corrupt image, unreadable caption, lost in a
    truncated shard); too_small: left out because it would have to be upscaled (`upscale` off; not bad);
    shard_errors: shards that could not be opened, were truncated or held nothing; duplicates: samples
    whose key was seen before in the same pass (trained once; not bad, and no stall).
    """

    def __init__(self, max_bad_fraction: float = 0.05, min_samples: int = 200, stall_limit: int = 10_000):
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples  # below this many read, a fraction says little (checked at pass end)
        self.counts = torch.zeros(_SLOTS, len(FIELDS), dtype=torch.int64).share_memory_()  # (slots, fields)
        # a worker that reads this many bad samples or shards in a row raises: a resampled stream
        # over only broken shards would otherwise spin forever without a batch reaching `check`
        self.stall_limit = stall_limit
        self._in_a_row = 0  # per process: each worker has its own copy
        self.shards: dict[str, int] = {}  # url -> row of `bad_per_shard` (`track_shards`)
        self.bad_per_shard = torch.zeros(0, dtype=torch.int64)

    def track_shards(self, urls: list[str]) -> None:
        """Also count bad samples per shard of ``urls`` (call before dataloader workers start: they share it)."""
        self.shards = {url: i for i, url in enumerate(dict.fromkeys(urls))}
        self.bad_per_shard = torch.zeros(len(self.shards), dtype=torch.int64).share_memory_()

    def add(self, field: str, n: int = 1, shard: str | None = None) -> None:
        info = torch.utils.data.get_worker_info()
        row = 0 if info is None else 1 + info.id % (_SLOTS - 1)
        self.counts[row, FIELDS.index(field)] += n
        if field == "skipped" and shard in self.shards:
            self.bad_per_shard[self.shards[shard]] += n
        if field != "duplicates":
            self._in_a_row = 0 if field == "ok" else self._in_a_row + n
        if self._in_a_row >= self.stall_limit:
            where = "main process" if info is None else f"dataloader worker {info.id}"
            raise DataError(f"{where}: {self._in_a_row} bad samples or shards in a row and none valid; "
                            f"counts {dict(zip(FIELDS, self.counts[row].tolist()))}")  # fmt: skip

    def totals(self) -> dict[str, int]:
        return dict(zip(FIELDS, self.counts.sum(0).tolist()))

    def bad_fraction(self) -> float:
        totals = self.totals()
        read = totals["ok"] + totals["skipped"]
        return totals["skipped"] / read if read else 0.0

    def check(self, end_of_pass: bool = False, where: str = "") -> None:
        """Raise DataError when too many samples were bad, or a whole pass gave nothing valid."""
        totals = self.totals()
        read = totals["ok"] + totals["skipped"]
        if end_of_pass and totals["ok"] == 0:
            hint = (f"; {totals['too_small']} images were smaller than their target size (set data.upscale=true to "
                    f"upscale them, or lower data.resolution)" if totals["too_small"] else "")  # fmt: skip
            raise DataError(f"no valid samples in {where or 'the shards'}: {totals}; see the warnings above{hint}")
        if (end_of_pass or read >= self.min_samples) and self.bad_fraction() > self.max_bad_fraction:
            raise DataError(
                f"{totals['skipped']} of {read} samples of {where or 'the shards'} were bad "
                f"({self.bad_fraction():.1%} > max_bad_fraction {self.max_bad_fraction:.1%}){self.worst_shards()}; "
                f"the warnings (and train.log) name each shard and key"
            )

    def worst_shards(self, k: int = 3) -> str:
        """`; most in a.tar (9), b.tar (2)`: the shards with the most bad samples, or '' when none is known."""
        bad = [(int(n), url) for url, n in zip(self.shards, self.bad_per_shard.tolist()) if n]
        bad.sort(key=lambda item: -item[0])
        return "; most in " + ", ".join(f"{url} ({n})" for n, url in bad[:k]) if bad else ""
