"""Memory-saving switches: each must leave the maths as it was."""

import pytest
import torch

from ldm.train.config import ConfigError

from .conftest import build_tiny
from .train_helpers import base_checkpoint, run, small_config, weights


def saved_activation_bytes(fn, module) -> int:
    """Bytes autograd keeps for backward while `fn` runs, the module's own weights (which are
    saved by reference, at no cost) left out: the activation memory."""
    total = 0
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in weights:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_gradient_checkpointing_saves_activation_memory():
    unet = build_tiny("v1").model.diffusion_model.train()
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([3, 900]), torch.randn(2, 77, 32)
    forward = lambda: unet(x, t, ctx).square().mean()  # noqa: E731
    unet.set_gradient_checkpointing(False)
    plain = saved_activation_bytes(forward, unet)
    unet.set_gradient_checkpointing(True)
    try:
        checkpointed = saved_activation_bytes(forward, unet)
    finally:
        unet.set_gradient_checkpointing(False)
    assert checkpointed < 0.5 * plain, (checkpointed, plain)


def test_fused_backward_step_gives_the_plain_step_weights(tmp_path):
    class_root = tmp_path / "class"
    base = base_checkpoint(tmp_path / "base.ckpt", small_config(class_root))
    common = (
        "train.grad_clip=0",
        "train.max_steps=2",
        f"train.actual_resume={base}",
        "train.lr=1e-3",
    )
    _, plain = run(small_config(class_root, *common), tmp_path / "plain")
    _, fused = run(
        small_config(class_root, *common, "train.fused_backward=true"), tmp_path / "fused"
    )
    a, b = weights(plain.last), weights(fused.last)
    unet = [k for k in a if k.startswith("model.diffusion_model.")]
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in unet)
    assert any(not torch.equal(a[k], weights(base)[k]) for k in unet)


def test_fused_backward_refuses_what_it_cannot_do(tmp_path):
    for extra in ("train.grad_clip=1.0", "train.accumulate_grad_batches=2", "train.precision=16"):
        with pytest.raises(ConfigError, match="fused_backward"):
            small_config(tmp_path, "train.fused_backward=true", "train.grad_clip=0", extra)
