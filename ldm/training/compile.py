"""torch.compile with aspect-ratio buckets: every bucket a shape, none falling back to eager.

    allow_recompiles(n_shapes)     # before training on n differently shaped batches

By default torch.compile (dynamic=None) compiles the first shape statically and, at the first other shape,
recompiles with those dimensions dynamic: a bucketed run compiles two or three graphs, then none (measured on the
tiny U-Net: 3 graphs for 5 shapes, 0 more on a second round; tests/test_compile_buckets.py). `model.compile=
{dynamic: false}` instead compiles one static graph per shape (per bucket, and per batch size of short batches):
fastest kernels, a compilation per bucket. Dynamo keeps at most `recompile_limit` graphs per function (8) and
runs the rest eagerly, silently: with more buckets than that a static run would fall back to eager for good.
`allow_recompiles` raises the limit so that every shape of the data keeps its graph.
"""

from __future__ import annotations

import torch


def allow_recompiles(n_shapes: int, margin: int = 8) -> int:
    """Raise dynamo's per-function graph limit to at least `n_shapes + margin`; returns the limit now in force."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
    limit = max(getattr(config, name), n_shapes + margin)
    setattr(config, name, limit)
    return limit
