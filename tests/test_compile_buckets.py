"""torch.compile with bucket shapes: a bounded number of graphs, none falling back to eager (CPU, dynamo's
CompileCounter backend counts the graphs it is handed; nothing is really compiled).

    .venv/bin/python -m pytest tests/test_compile_buckets.py -q
"""

from __future__ import annotations

import torch
from data_parallel import UNET
from torch._dynamo.testing import CompileCounter

from ldm.models.unet import build_unet
from ldm.training.compile import allow_recompiles

BUCKETS = [(3, 10, 6), (3, 8, 8), (3, 6, 10), (3, 12, 4), (2, 8, 8)]  # latent (B, h, w); the last a short batch


def test_the_unet_over_bucket_shapes_compiles_a_few_graphs_then_none():
    torch._dynamo.reset()
    unet = build_unet(**UNET)
    counter = CompileCounter()
    unet.compile(backend=counter)  # dynamic=None, as model.compile=true
    frames = []
    for _ in range(2):
        for b, h, w in BUCKETS:
            out = unet(torch.randn(b, 4, h, w), torch.randint(0, 1000, (b,)), encoder_hidden_states=torch.randn(b, 7, 32))
            out.sample.mean().backward()
        frames.append(counter.frame_count)
    assert frames[0] <= 3 and frames[1] == frames[0]  # a static graph, then dynamic ones; nothing new next round


class Convs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.nn.functional.silu(self.conv(x)).mean()


def _static_graphs(shapes) -> int:
    torch._dynamo.reset()
    counter = CompileCounter()
    model = torch.compile(Convs(), backend=counter, dynamic=False)
    for _ in range(2):
        for h, w in shapes:
            model(torch.randn(2, 4, h, w))
    return counter.frame_count


def test_static_graphs_per_bucket_stay_compiled_beyond_dynamos_default_limit():
    shapes = [(8 + 2 * i, 16 - i) for i in range(12)]  # 12 buckets: more than dynamo's default 8 graphs
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    previous = getattr(config, name)
    try:
        setattr(config, name, 8)
        assert _static_graphs(shapes) == 8  # the default: 4 buckets would run eagerly, every step
        assert allow_recompiles(len(shapes)) >= 12
        assert _static_graphs(shapes) == 12  # one graph per bucket, each compiled once
    finally:
        setattr(config, name, previous)
        torch._dynamo.reset()
