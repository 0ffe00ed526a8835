"""How busy the machine's CPU cores are with other processes, and how many threads this process should use.

torch runs its CPU kernels on an OpenMP team of one thread per core. Each parallel region is split evenly over the
team, and threads spin while they wait at the region's end. When another process holds one of the cores, the
thread that shares it finishes last, and the spinning threads take time from it: measured on the 2-core machine
under load, the default recipe's training step went from 0.26-0.43 s with 1 thread to 2.9-6.7 s with 2
(docs/benchmarks.md). So the thread count follows the cores the other processes leave free.

    cores = available_cores()                      # this process's CPU affinity
    sample = CPUSample.now()
    ...                                            # some time later
    others = sample.others_busy(CPUSample.now())   # cores' worth of CPU the other processes used in between
    torch.set_num_threads(threads_for(cores, others))

Linux only (/proc); elsewhere `CPUSample.now()` is None and nothing is measured.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def available_cores() -> int:
    """The cores this process may run on (its affinity mask; the machine's count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine spent not idle since boot, over all cores (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS  # steal: held by the hypervisor, not free


def _process_seconds(pid: int | str) -> float:
    """utime + stime of one process (all its threads), 0 when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def own_busy_seconds() -> float:
    """CPU seconds of this process and its live children (dataloader workers), all threads."""
    total = _process_seconds("self")
    for task in Path("/proc/self/task").glob("*/children"):
        try:
            children = task.read_text().split()
        except OSError:
            continue
        total += sum(_process_seconds(pid) for pid in children)
    return total


@dataclass(frozen=True)
class CPUSample:
    wall: float  # time.monotonic()
    machine: float  # busy CPU seconds of the machine since boot
    own: float  # busy CPU seconds of this process tree

    @classmethod
    def now(cls) -> CPUSample | None:
        machine = _machine_busy_seconds()
        if machine is None:
            return None
        return cls(time.monotonic(), machine, own_busy_seconds())

    def others_busy(self, later: CPUSample) -> float:
        """Cores' worth of CPU that processes other than this one used between this sample and ``later``."""
        wall = later.wall - self.wall
        if wall <= 0:
            return 0.0
        return max(0.0, (later.machine - self.machine) - (later.own - self.own)) / wall


def threads_for(cores: int, others_busy: float) -> int:
    """Threads for the cores the other processes leave: one per free core, rounded to the nearest, at least one."""
    return max(1, min(cores, math.floor(cores - others_busy + 0.5)))
