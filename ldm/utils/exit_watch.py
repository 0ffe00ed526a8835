"""Where a process spends the time after its work: every thread's stack while it is still alive.

    LDM_EXIT_STACKS=15 python -m ldm.train ...     # 15 s after the fit returns, then every 15 s: all stacks

On the GPU host every `ldm.train` process lived on 45-82 s after its last step (docs/benchmarks.md, sessions 10
and 11; 3 s on a 2-core CPU), eager and compiled alike: loader workers joined with a timeout each, pinned-memory
threads, CUDA teardown are candidates. `watch_exit()` arms `faulthandler`, which writes from its own C thread, so
it reports during interpreter shutdown too; nothing happens unless the variable is set. In a multirun whose
jobs share one process, a later job's stacks are written too (each fit re-arms it).
The stacks of session 12 found the cause: the main thread joining data-loader workers, 5 s each
(`ldm.data.workers`). (A SIGUSR1-triggered dump does not work in a fit: Lightning re-installs the default handlers
at the end of fit, and the signal then kills the process.)
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time
from collections.abc import Mapping

ENV = "LDM_EXIT_STACKS"


def watch_exit(environ: Mapping[str, str] | None = None, file=None) -> float | None:
    """With ``LDM_EXIT_STACKS=<seconds>`` set: note the time, then write every thread's stack to stderr (or
    ``file``) each <seconds> while the process lives; returns the interval, or None when unset."""
    value = (os.environ if environ is None else environ).get(ENV, "").strip()
    if not value:
        return None
    file = sys.stderr if file is None else file
    try:
        seconds = float(value)
    except ValueError:  # called where a run's own error may be on its way: never raise over it
        print(f"{ENV}={value!r} ignored: give the seconds between stack dumps, e.g. {ENV}=15", file=file, flush=True)
        return None
    print(f"{ENV}: work done at {time.strftime('%H:%M:%S')}; every thread's stack each {seconds:g} s from now "
          "while this process lives", file=file, flush=True)  # fmt: skip
    faulthandler.dump_traceback_later(seconds, repeat=True, file=file)
    return seconds
