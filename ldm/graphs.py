"""CUDA graphs: work on tensors of fixed shapes recorded once and replayed, so that a step costs one
launch instead of one per kernel. At the batch sizes of DreamBooth (1 + 1 images) and sampling
(one image) Stable Diffusion on a large GPU is bound by launching kernels, not by the GPU.

What a graph reads and writes are fixed addresses: inputs are copied into static buffers before a
replay, outputs are overwritten by the next replay, and the weights are read in place (an
optimizer step or `copy_` into them is seen; replacing a parameter tensor is not).

UNVERIFIED: no GPU has run this code yet. `scripts/gpu_check.sh` is the check (README, "Memory
and speed"); until it has run, the switches that use it (`train.capture`, `--capture`) are off by
default, and on a machine without CUDA they fall back to eager code.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def no_autocast_cache() -> Iterator[None]:
    """Autocast's cache of cast weights off: a cast cached outside a recording would be read by
    every replay, also after the cache is cleared and its memory reused. Autocast contexts
    entered inside take this setting (their `cache_enabled` defaults to the current one)."""
    previous = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(previous)


@contextmanager
def side_stream() -> Iterator[None]:
    """Run the block on a fresh stream ordered after, and before, the current one. Warm-up calls
    before a capture run there (as PyTorch's CUDA graph notes require), so that the lazy set-up
    they trigger (library handles, optimizer state, autotuning) happens outside the capture."""
    current = torch.cuda.current_stream()
    stream = torch.cuda.Stream()
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


def record(fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """Record one call of `fn` (already warmed up) as a graph; returns (graph, fn's output).
    The call is recorded, not run: replay the graph to run it."""
    graph = torch.cuda.CUDAGraph()
    with no_autocast_cache(), torch.cuda.graph(graph):
        out = fn()
    return graph, out


class GraphedCall:
    """`fn(*inputs)` for inputs of one set of shapes and dtypes, replayed from a CUDA graph.

    Made from example inputs: `warmup` eager calls on a side stream, then the recording. Each
    call copies its inputs into the static buffers and replays; the output it returns is the
    graph's own tensor, overwritten by the next call (copy it to keep it)."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: tuple, warmup: int = 2):
        self.inputs = tuple(x.clone() for x in inputs)
        with no_autocast_cache(), side_stream():
            for _ in range(warmup):
                fn(*self.inputs)
        self.graph, self.output = record(lambda: fn(*self.inputs))

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, x in zip(self.inputs, inputs, strict=True):
            static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.output


def signature(*tensors: torch.Tensor | None) -> tuple:
    """Shapes and dtypes of some tensors (None for a missing one): what a graph is made for."""
    return tuple(None if t is None else (tuple(t.shape), t.dtype) for t in tensors)
