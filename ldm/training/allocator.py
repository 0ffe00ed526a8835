"""The CUDA caching allocator's settings for a training process: expandable segments unless the user chose.

    default_allocator_settings()     # before the process's first CUDA allocation (ldm.run.fit.train calls it)

With aspect-ratio buckets every batch shape needs differently sized blocks. The default allocator splits its
fixed-size segments for one shape and allocates new ones (`cudaMalloc`, a wait for the GPU) for the next;
`expandable_segments:True` grows segments in place instead. Measured on one H200 (SD-1.5-shaped U-Net, 512 px,
batch 16, five buckets, eager; docs/benchmarks.md "Session 11"): bucketed pixels per second were 0.909x the
square's with the default allocator (session 10) and 0.990x with expandable segments, at the same 36.4 GiB peak;
the bare U-Net step on a shuffled mix of the shapes allocated 44 new segments in its timed window, the square 0.

A value the user set (`PYTORCH_CUDA_ALLOC_CONF`, or torch >= 2.9's `PYTORCH_ALLOC_CONF`), even an empty one, is
left alone. The setting is read when the allocator starts, at the first CUDA allocation: once CUDA is
initialised (a second run in the same process) nothing is changed. Processes this one starts inherit it (DDP
ranks, loader workers). On a CPU it does nothing.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

ENV_NAMES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
DEFAULT = "expandable_segments:True"


def default_allocator_settings(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Set ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` where the user set no allocator settings and CUDA
    has not started; returns the value set, or None where it left things as they were."""
    import torch

    environ = os.environ if environ is None else environ
    if any(name in environ for name in ENV_NAMES) or torch.cuda.is_initialized():
        return None
    environ["PYTORCH_CUDA_ALLOC_CONF"] = DEFAULT
    return DEFAULT
