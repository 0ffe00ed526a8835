"""torch.compile for the stages: `model.compile` as options, compiled in place, and aspect-ratio buckets kept compiled.

    options = compile_options(True)                    # model.compile: false -> None, true -> {}, a mapping -> itself
    compile_in_place([unet, vae.encoder], options, "cuda")
    options = with_inductor_options(options, force_layout_optimization=True)   # model.channels_last: NHWC convs
    allow_recompiles(n_shapes)     # before training on n differently shaped batches
    with eager_stance(): ...       # a short evaluation: compiled modules run their eager code

`model.compile={backend: cudagraphs}` traces each module with AOTAutograd and replays its eager kernels as CUDA
graphs: the launch overhead of a small model goes, as with Inductor's `mode: reduce-overhead`, without Inductor's
code generation (seconds of tracing instead of minutes of compiling; no fused kernels). It has nothing to capture
off a CUDA device, so there `compile_in_place` leaves the modules eager and says so. Its graphs are static: one per
shape (`dynamic: false` is its default here). On a GPU it runs as `cudagraphs_static_parameters`: parameters are
read in place, not copied into the graphs before every replay.

By default torch.compile (dynamic=None) compiles the first shape statically and, at the first other shape,
recompiles with those dimensions dynamic: a bucketed run compiles two or three graphs, then none (measured on the
tiny U-Net: 3 graphs for 5 shapes, 0 more on a second round; tests/test_compile_buckets.py). `model.compile=
{dynamic: false}` instead compiles one static graph per shape (per bucket, and per batch size of short batches):
fastest kernels, a compilation per bucket. Dynamo keeps at most `recompile_limit` graphs per function (8) and
runs the rest eagerly, silently: with more buckets than that a static run would fall back to eager for good.
`allow_recompiles` raises the limit so that every shape of the data keeps its graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn


def compile_options(value: bool | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """`model.compile` as torch.compile's keyword arguments: None (not compiled) for false, {} for true. The cudagraphs
    backend gets `dynamic: false` unless set: it replays graphs captured at fixed shapes, and a graph made dynamic
    after a second shape fails at the next one (session 22, one H200: the CLIP stage's short last validation batch,
    "size of tensor a (128) must match the size of tensor b (104)")."""
    if not value:
        return None
    options = {} if value is True else dict(value)
    if options.get("backend") == "cudagraphs":
        options.setdefault("dynamic", False)
    return options


def with_inductor_options(options: Mapping[str, Any] | None, **inductor: Any) -> dict[str, Any] | None:
    """``options`` (torch.compile's keyword arguments) with Inductor config entries added (`options=`); torch.compile
    takes no `mode` beside `options`, so a mode becomes the entries it stands for. Other backends: unchanged."""
    if options is None or options.get("backend", "inductor") != "inductor":
        return None if options is None else dict(options)
    options = dict(options)
    from torch._inductor import list_mode_options

    mode = options.pop("mode", None)
    options["options"] = {**(list_mode_options(mode, options.get("dynamic")) if mode else {}),
                          **(options.get("options") or {}), **inductor}  # fmt: skip
    return options


def makes_cuda_graphs(options: Mapping[str, Any] | None) -> bool:
    """Whether torch.compile with these options captures CUDA graphs (the cudagraphs backend, Inductor's
    reduce-overhead modes): such a module cannot run inside another capture."""
    if options is None:
        return False
    inductor = options.get("options") or {}
    return (options.get("backend") == "cudagraphs" or "reduce-overhead" in str(options.get("mode") or "")
            or bool(inductor.get("triton.cudagraphs")))  # fmt: skip


def compile_in_place(modules: Iterable[nn.Module], options: Mapping[str, Any] | None, device_type: str) -> bool:
    """`module.compile(**options)` for each module (in place: parameter names, and so checkpoints, unchanged);
    returns whether anything was compiled. The cudagraphs backend is skipped off a CUDA device (nothing to capture)."""
    if options is None:
        return False
    if options.get("backend") == "cudagraphs" and device_type != "cuda":
        rank_zero_info(f"model.compile: the cudagraphs backend needs a CUDA device; on {device_type} the modules run "
                       "eagerly")  # fmt: skip
        return False
    if options.get("backend") == "cudagraphs":
        options = {**options, "backend": cudagraphs_static_parameters}
    for module in modules:
        module.compile(**options)
    return True


def cudagraphs_static_parameters(graph: torch.fx.GraphModule, example_inputs: list) -> Any:
    """torch.compile's `cudagraphs` backend, with the module's parameters and buffers kept in place as static inputs
    of its forward graphs. The stock backend counts static inputs as those AOTAutograd lifts, which it no longer does
    (dynamo passes a module's parameters as graph inputs), so every replay first copied each parameter into the
    graph's own memory: ~300 copies a step for the default's U-Net (one H200, session 23: its stage-2 step took
    30.4 ms with the stock backend, 29.2 ms with this one). Here the forward graphs take the static inputs that
    AOTAutograd records for Inductor's own CUDA graphs (`fw_metadata.static_input_indices`, what
    `mode="reduce-overhead"` uses): parameters are read where they are, and a graph is recorded again should one move.
    The backward graphs are the stock backend's (all but their gradient inputs static already)."""
    from torch._dynamo.backends.cudagraphs import cudagraphs
    from torch._guards import TracingContext
    from torch._inductor import cudagraph_trees

    stock = cudagraph_trees.cudagraphify_impl  # what the backend looks up when it compiles a forward graph

    def with_static_parameters(model, inputs, static_input_idxs, *args, **kwargs):
        context = TracingContext.try_get()
        metadata = getattr(context, "fw_metadata", None)
        if not kwargs.get("is_backward") and metadata is not None:
            static_input_idxs = sorted(set(static_input_idxs) | set(getattr(metadata, "static_input_indices", ())))
        return stock(model, inputs, static_input_idxs, *args, **kwargs)

    cudagraph_trees.cudagraphify_impl = with_static_parameters
    try:  # the forward graph is compiled inside this call; the backward, later, by the stock function
        return cudagraphs(graph, example_inputs)
    finally:
        cudagraph_trees.cudagraphify_impl = stock


def allow_recompiles(n_shapes: int, margin: int = 8) -> int:
    """Raise dynamo's per-function graph limit to at least `n_shapes + margin`; returns the limit now in force."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
    limit = max(getattr(config, name), n_shapes + margin)
    setattr(config, name, limit)
    return limit


def eager_stance():
    """A context (or, called alone, a switch until `torch.compiler.set_stance("default")`) in which compiled modules
    run their eager code. For evaluations of a few batches: each new batch size, and the no-grad graph of a module
    compiled for training, would be compiled (and captured as a CUDA graph) for a handful of calls. Session 22, one
    H200, the default with the cudagraphs backend: the CLIP stage's first validation took 9 s, the VAE's 7 s, later
    ones under 1 s."""
    return torch.compiler.set_stance("force_eager")
