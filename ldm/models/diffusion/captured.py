"""Samplers with their guided UNet call replayed from a CUDA graph (`--capture`, `train.capture`).

A DDIM or DPM-Solver++ step is one batched UNet forward of [uncond, cond] plus a few elementwise
operations. The forward is hundreds of small kernels: at batch 1 on a large GPU, launching them
costs more than running them. Here the guided call (cat, UNet, chunk, e_u + s (e_c - e_u)) is
recorded once per batch shape and replayed at every step; the sampler's update around it stays
as it is.

Graphs are kept per model (one per shape, dtype, scale and precision) until `release_graphs`:
a graph reads the weights in place, so it follows training, but keeps its own activation memory.

UNVERIFIED on a GPU (see `ldm.graphs`); without CUDA, `make_sampler` gives the plain sampler.
"""

import torch

from ldm.graphs import GraphedCall, signature
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler

# `sampler` in configs and on command lines: the update rule around the same guided UNet call.
SAMPLERS = {"ddim": DDIMSampler, "dpmpp_2m": DPMSolverSampler}

# The model's attribute that holds its graphs: they live and die with its weights (the graphs
# refer to the model, so a cache beside it would keep it alive).
GRAPHS = "_ddim_graphs"


class Captured:
    """Put before a sampler class: its `guided_model_output` replays a graph per (inputs'
    shapes, scale, precision)."""

    def __init__(self, model, precision: str):
        super().__init__(model)
        self.precision = precision
        self.graphs = model.__dict__.setdefault(GRAPHS, {})  # not a module, buffer or parameter

    def guided_model_output(
        self, x: torch.Tensor, t: torch.Tensor, c, scale: float, uc
    ) -> torch.Tensor:
        if uc is None or scale == 1.0:
            uc, scale = None, 1.0  # one forward, no guidance: one graph whatever uc was
        inputs = (x, t, c) if uc is None else (x, t, c, uc)
        key = (signature(*inputs), float(scale), self.precision)
        call = self.graphs.get(key)
        if call is None:
            call = self.graphs[key] = GraphedCall(self._eager(scale), inputs)
        return call(*inputs).clone()  # the graph's output is overwritten by the next step

    def _eager(self, scale: float):
        def guided(x, t, c, uc=None):
            return DDIMSampler.guided_model_output(self, x, t, c, scale, uc)

        return guided


# Each sampler's graphed twin (CapturedDDIMSampler, CapturedDPMSolverSampler).
CAPTURED = {
    kind: type(f"Captured{cls.__name__}", (Captured, cls), {}) for kind, cls in SAMPLERS.items()
}


def make_sampler(model, kind: str = "ddim", capture: bool = False, precision: str = "full"):
    """The `kind` sampler of SAMPLERS; with `capture` on CUDA its graphed twin (elsewhere the
    plain one: same results, no graphs)."""
    if kind not in SAMPLERS:
        raise ValueError(f"sampler {kind!r}: choose one of {', '.join(SAMPLERS)}")
    if capture and model.betas.device.type == "cuda":
        return CAPTURED[kind](model, precision)
    return SAMPLERS[kind](model)


def release_graphs(model) -> None:
    """Free the model's sampling graphs and their memory (e.g. after the class images)."""
    model.__dict__.pop(GRAPHS, None)
