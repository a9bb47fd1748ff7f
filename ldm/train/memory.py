"""Memory: frozen modules parked off the device between uses, and the peak a run should reach.

Parking. With latents and prompt embeddings cached, the training step never runs the VAE or the
frozen text encoder; they are needed only for validation and sample grids (class images are
sampled before training). `FrozenParking` keeps them on the meta device, which holds no memory,
and their weights in a host copy (the CPU tensors themselves when training on the CPU); `unparked()`
puts them back on the device for a use. Values are copied, never recomputed, so parking changes no
number; a parked module used by mistake fails loudly (meta tensors have no data).

Expected peak. `expected_peak` counts, from parameter counts and dtypes, what the device holds in
a step: weights, optimizer state and EMA all the time; the activations autograd keeps for backward
(counted by running the UNet on the meta device: no memory, no compute; plus the copies autocast
makes of float32 weights, which backward keeps too) at the end of the forward; the gradients (all
of them, or a couple of buckets with fused backward) and the 8-bit step's scratch at the end of
the backward. `peak_bytes` takes the larger of the two moments.
"""

from contextlib import contextmanager
from unittest.mock import patch

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.train.adamw8bit import state_bytes, window_numel
from ldm.train.optim import FusedBackwardOptimizer
from ldm.train.trainable import text_encoder_trains
from ldm.util import instantiate_from_config, precision_dtype

META = torch.device("meta")


class FrozenParking:
    """Frozen modules kept on the meta device between uses (see the module docstring)."""

    def __init__(self, modules: list[nn.Module], device: torch.device):
        self.modules, self.device = modules, device
        self.home: list[dict[str, torch.Tensor]] = []

    def park(self) -> None:
        if not self.home:  # frozen: one host copy serves every later use
            pin = self.device.type == "cuda"
            self.home = [
                {
                    name: (t.detach().cpu().pin_memory() if pin else t.detach().cpu())
                    for name, t in (*m.named_parameters(), *m.named_buffers())
                }
                for m in self.modules
            ]
        for m in self.modules:
            m.to(META)

    @contextmanager
    def unparked(self):
        for module, home in zip(self.modules, self.home):
            for name, tensor in home.items():
                owner_name, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_name)
                value = tensor.to(self.device, non_blocking=True)
                if leaf in owner._parameters:
                    value = nn.Parameter(value, requires_grad=False)
                setattr(owner, leaf, value)
        try:
            yield
        finally:
            self.park()


def parked_modules(model, train_cfg, latents_cached: bool) -> list[nn.Module]:
    """The frozen modules the step does not run: the VAE when latents are cached, the text
    encoder when it is frozen and the prompts are cached."""
    if not train_cfg.offload_frozen:
        return []
    parked = [model.first_stage_model] if latents_cached else []
    if not text_encoder_trains(train_cfg.trainable) and train_cfg.cache_text:
        parked.append(model.cond_stage_model)
    return parked


class _FusedAttentionSaves(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention on the meta device, saving what the fused
    kernels (flash, memory-efficient) save: q, k, v, the output and a float32 logsumexp per query.
    On meta, torch takes the math path, which would count the whole attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("a stand-in for counting saved tensors; it has no backward")


def activation_bytes(
    unet_cfg,
    latent_shape: tuple[int, int, int],
    batch: int,
    dtype: torch.dtype,
    checkpointing: bool,
    cast: frozenset[str] = frozenset(),
) -> int:
    """Bytes autograd saves for backward in one UNet forward of `batch` latents, weights not
    counted: the UNet run on the meta device in the autocast dtype (autocast does not run on
    meta; the norms upcast to float32 as they do under it). `cast`: the names of the UNet's
    float32 weights that autocast casts to `dtype` for its matrix products and convolutions;
    those copies are saved for backward too (SD v1 in bf16: 1.7 GB), except inside the blocks
    that checkpointing recomputes."""
    with torch.device(META):
        unet = instantiate_from_config(unet_cfg).to(dtype)
    unet.set_gradient_checkpointing(checkpointing)
    blocks = unet.checkpointed_blocks() if checkpointing else []
    recomputed = {id(p) for block in blocks for p in block.parameters()}
    casts = sum(
        p.numel() * dtype.itemsize
        for name, p in unet.named_parameters()
        if name in cast and p.dim() >= 2 and id(p) not in recomputed
    )
    weights = {id(p) for p in unet.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if id(t._base if t._is_view() else t) not in weights:  # weights are saved by reference
            total += t.numel() * t.element_size()
        return t

    context_dim = unet_cfg.params.context_dim
    context_dim = context_dim[0] if hasattr(context_dim, "__len__") else context_dim
    x = torch.zeros(batch, *latent_shape, device=META, dtype=dtype)
    t = torch.zeros(batch, dtype=torch.long, device=META)
    context = torch.zeros(batch, 77, context_dim, device=META, dtype=dtype)
    with (
        patch.object(F, "scaled_dot_product_attention", _FusedAttentionSaves.apply),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        unet(x, t, context)
    return total + casts


def expected_peak(model, cfg, parked: list[nn.Module], batch: int, device) -> dict[str, int]:
    """Bytes the device holds at the peak of a step, by part (see the module docstring). Parked
    modules count on the CPU only, where their host copy is the training copy. The text encoder's
    activations (77 tokens) are left out."""
    tc = cfg.train
    trained = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trained)
    parked_ids = {id(p) for m in parked for p in m.parameters()}
    weights = sum(
        p.numel() * p.element_size()
        for p in model.parameters()
        if id(p) not in parked_ids or device.type == "cpu"
    )
    grads = 4 * n
    if tc.fused_backward:  # about two buckets' gradients are in flight at a time
        largest = max((p.numel() for p in trained), default=0)
        grads = 4 * min(n, 2 * max(FusedBackwardOptimizer.BUCKET_NUMEL, largest))
    scratch = 0
    if tc.optimizer == "adamw8bit":
        optimizer = state_bytes(trained)
        scratch = 9 * 4 * min(n, window_numel(device))  # fp32 buffers of one window, in a step
    else:
        optimizer = 8 * n + 4 * len(trained)
    dtype = precision_dtype(tc.precision) or torch.float32
    latent_shape = model.latent_shape(cfg.data.size, cfg.data.size)
    unet_cfg = cfg.model.params.unet_config
    cast = frozenset(
        name
        for name, p in model.model.diffusion_model.named_parameters()
        if dtype != torch.float32 and p.requires_grad and p.dtype == torch.float32
    )
    parts = {
        "weights": weights,
        "gradients": grads,
        "optimizer state": optimizer,
        "activations": activation_bytes(
            unet_cfg, latent_shape, batch, dtype, tc.gradient_checkpointing, cast
        ),
    }
    if scratch:
        parts["step scratch"] = scratch
    if tc.ema.enabled:
        parts["EMA"] = 4 * n
    return parts


MOMENTARY = ("activations", "gradients", "step scratch")


def peak_bytes(parts: dict[str, int]) -> int:
    """What is always held, plus the larger of the forward's end (activations) and the
    backward's end (gradients and the step's scratch)."""
    held = sum(v for k, v in parts.items() if k not in MOMENTARY)
    after_backward = parts["gradients"] + parts.get("step scratch", 0)
    return held + max(parts["activations"], after_backward)


def describe_peak(parts: dict[str, int], cfg, parked: list[nn.Module]) -> str:
    """The start-up line: the profile, its switches and the expected peak."""
    tc = cfg.train
    gib = 2**30
    switches = [tc.optimizer]
    if tc.gradient_checkpointing:
        switches.append("gradient checkpointing")
    if tc.fused_backward:
        switches.append("fused backward")
    if parked:
        switches.append(f"{len(parked)} frozen module(s) parked")
    held = " + ".join(f"{k} {v / gib:.2f}" for k, v in parts.items() if k not in MOMENTARY)
    later = " + ".join(f"{k} {parts[k] / gib:.2f}" for k in MOMENTARY[1:] if k in parts)
    return (
        f"memory profile {tc.memory_profile} ({', '.join(switches)}): expected peak "
        f"{peak_bytes(parts) / gib:.2f} GiB = {held} + max(activations "
        f"{parts['activations'] / gib:.2f}, {later}) (an estimate from parameter counts, dtypes "
        f"and a meta-device forward)"
    )
