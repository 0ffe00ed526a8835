"""A whole training step (forward, backward, gradient clipping, optimizer, EMA) replayed as one CUDA graph.

    graph = StepGraph(step, params, warmup=3)      # step(inputs: dict[str, Tensor]) -> tensors (all device work)
    outputs = graph(inputs)                        # eager for `warmup` calls, then captured once, then replayed

A small model's step is bound by its host, not its GPU: Lightning's loop, autograd's engine, the optimizer's and
the compiled module's Python launch thousands of kernels that each take microseconds (session 23, one H200: the
default's stage-2 step took 27.6 ms of which the GPU was busy 5.6). Captured whole, a step is one launch.

What the captured function may do, and what replaying it assumes (torch's "whole network capture"):
- its inputs are copied into the tensors it was captured with before each replay: only their values may change.
  A call whose inputs have other shapes or dtypes (a short last batch, another bucket) runs eagerly, and the
  captured gradients are kept for the replays that follow;
- its random draws (noise, timesteps, caption dropout) come from the default CUDA generator, which replays read at
  their current seed and offset: `torch.manual_seed` before a step (`ldm.callbacks.step_seed`) seeds the replay;
- every tensor it updates (weights, optimizer moments and step counts, the EMA, counters) is updated in place, and
  every number it reads from the host (the learning rate, a decay) is a device tensor it reads, not a Python float
  baked in at capture: the optimizer must be capturable, and its learning rates tensors while it is captured
  (`capturing`; `fill_lr` copies the LR scheduler's values into them before each replay);
- no host syncs (`.item()`, Python branches on device values) inside: capturing one fails at once;
- gradients are None when it starts (it sets them so itself), so its backward writes them, not accumulates.

The first `warmup` calls run eagerly on a side stream (torch's recipe: cuBLAS and cuDNN handles, autograd's streams
and the optimizer's lazily created state are made before capture); they are real steps. Off a CUDA device every
call is eager: the same function, the same results, no graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map


def _key(inputs: Mapping[str, Tensor]) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in sorted(inputs.items()))


class StepGraph:
    def __init__(self, step: Callable[[dict[str, Tensor]], Any], params: Sequence[torch.nn.Parameter], warmup: int = 3,
                 capture_context: Callable[[], contextlib.AbstractContextManager] | None = None):  # fmt: skip
        if warmup < 1:
            raise ValueError(f"step graph warm-up must be at least 1 eager step, got {warmup}")
        self.step, self.params, self.warmup = step, list(params), warmup
        self.capture_context = capture_context or contextlib.nullcontext  # around the capture (`capturing`)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.replays = 0
        self._eager_calls = 0
        self._key: tuple | None = None
        self._static_inputs: dict[str, Tensor] = {}
        self._static_outputs: Any = None

    def __call__(self, inputs: dict[str, Tensor]) -> Any:
        on_cuda = all(t.is_cuda for t in inputs.values()) and torch.cuda.is_available()
        if not on_cuda:
            return self.step(inputs)
        key = _key(inputs)
        if self.graph is not None and key == self._key:
            for name, tensor in inputs.items():
                self._static_inputs[name].copy_(tensor, non_blocking=True)
            self.graph.replay()
            self.replays += 1
            return self._static_outputs
        if self.graph is not None:  # another shape: eager, the graph's gradient tensors put back afterwards
            grads = [p.grad for p in self.params]
            try:
                return self._eager(inputs)
            finally:
                for p, g in zip(self.params, grads, strict=True):
                    p.grad = g
        if key != self._key:  # the warm-up counts calls of one shape
            self._key, self._eager_calls = key, 0
        if self._eager_calls < self.warmup:
            self._eager_calls += 1
            return self._eager(inputs)
        return self._capture_and_replay(inputs, key)

    def _eager(self, inputs: dict[str, Tensor]) -> Any:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self.step(inputs)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def _capture_and_replay(self, inputs: dict[str, Tensor], key: tuple) -> Any:
        self._static_inputs = {name: t.clone() for name, t in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        # thread_local: CUDA calls of other threads (the data loader's pin-memory thread) go on during the capture
        with self.capture_context(), torch.cuda.graph(graph, capture_error_mode="thread_local"), _capture_autocast():
            outputs = self.step(self._static_inputs)  # recorded, not run
        self.graph, self._key = graph, key
        self._static_outputs = outputs
        graph.replay()  # this call's step
        self.replays += 1
        return outputs


def _capture_autocast():
    """Under mixed precision (the step runs inside Lightning's autocast), the same autocast with its weight-cast cache
    off: a cast cached before the capture would be freed when that autocast exits, under the graph's feet."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def lr_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """One 0-dim float32 tensor per parameter group, on its parameters' device: the learning rates a captured step
    reads (`capturing`), refreshed from the groups' own rates by `fill_lr` before every replay."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            raise ValueError(f"model.step_graph: {type(optimizer).__name__} cannot be captured in a CUDA graph (no "
                             "`capturable` option); use optim=adamw")  # fmt: skip
    return [torch.tensor(float(g["lr"]), dtype=torch.float32, device=g["params"][0].device) for g in optimizer.param_groups]


def fill_lr(optimizer: torch.optim.Optimizer, rates: Sequence[Tensor]) -> None:
    """Copy each group's learning rate (a Python float, as the LR scheduler sets it) into its captured tensor."""
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        rate.fill_(float(group["lr"]))


@contextlib.contextmanager
def capturing(optimizer: torch.optim.Optimizer, rates: Sequence[Tensor]):
    """While a step is captured: the optimizer `capturable`, its groups' learning rates the tensors ``rates``. Both
    are put back afterwards, so that the rest of the run (the LR scheduler, checkpoints, eager steps) sees the
    optimizer as it was: checkpoints of graphed and eager runs are alike and either resumes the other."""
    saved = [(group["lr"], group["capturable"]) for group in optimizer.param_groups]
    fill_lr(optimizer, rates)
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group.update(lr=rate, capturable=True)
    try:
        yield
    finally:
        for group, (lr, capturable) in zip(optimizer.param_groups, saved, strict=True):
            group.update(lr=lr, capturable=capturable)


def detached(outputs: Any) -> Any:
    """Copies of a replay's outputs that the next replay does not overwrite."""
    return tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, outputs)
