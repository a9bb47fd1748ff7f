"""Optimizer and learning-rate schedule from the `train` config."""

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(
    groups: list[dict], train_cfg, lr: float, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (fused), or bitsandbytes' 8-bit AdamW when `optimizer: adamw8bit`; with
    `fused_backward`, one of those per parameter, stepped inside backward."""
    kwargs = dict(
        lr=lr,
        betas=tuple(train_cfg.betas),
        eps=train_cfg.eps,
        weight_decay=train_cfg.weight_decay,
    )
    if train_cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RuntimeError(
                "train.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes "
                "(or pip install -e '.[bnb]')"
            ) from None

        def make(param_groups):
            return bnb.optim.AdamW8bit(param_groups, **kwargs)
    else:
        # One fused kernel per step (CUDA and, since torch 2.4, the CPU); elsewhere foreach.
        fused = device.type in ("cuda", "cpu")

        def make(param_groups):
            return torch.optim.AdamW(param_groups, fused=fused, foreach=not fused, **kwargs)

    if train_cfg.fused_backward:
        return FusedBackwardOptimizer([{**g, "lr": lr} for g in groups], make)
    return make(groups)


def lr_lambda(train_cfg):
    """Multiplier of the base lr at a step: linear warm-up, then constant or cosine decay."""
    warmup, total = train_cfg.warmup_steps, train_cfg.max_steps
    floor = train_cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if train_cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg) -> LambdaLR:
    return LambdaLR(optimizer, lr_lambda(train_cfg))


def set_schedule(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, lr: float, step: int):
    """Put the schedule at `step` with base lr `lr`: a resume from a checkpoint without
    scheduler state, or with another effective lr (another lr, or processes with scale_lr)."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    scheduler.last_epoch = step
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def effective_lr(train_cfg, world_size: int) -> float:
    """`--scale_lr`: lr x processes x batch size x accumulation (the global batch)."""
    if not train_cfg.scale_lr:
        return train_cfg.lr
    return train_cfg.lr * world_size * train_cfg.batch_size * train_cfg.accumulate_grad_batches


class FusedBackwardOptimizer(torch.optim.Optimizer):
    """The optimizer step fused into the backward pass: one small optimizer per parameter,
    stepped by a post-accumulate-grad hook the moment that parameter's gradient is complete, which
    then frees the gradient. All gradients never exist at once, which saves their memory (a full
    fp32 UNet's worth); it rules out global-norm clipping, accumulation and GradScaler.

    The outer param groups carry the learning rate, so LambdaLR schedules it as usual.
    """

    def __init__(self, groups: list[dict], make_optimizer):
        super().__init__(groups, {})
        self.inner: list[torch.optim.Optimizer] = []
        self._inner_of: dict[torch.Tensor, tuple[dict, torch.optim.Optimizer]] = {}
        for group in self.param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                inner = make_optimizer([{**options, "params": [p]}])
                self.inner.append(inner)
                self._inner_of[p] = (group, inner)
                p.register_post_accumulate_grad_hook(self._step_parameter)

    def _step_parameter(self, p: torch.Tensor) -> None:
        group, inner = self._inner_of[p]
        inner.param_groups[0]["lr"] = group["lr"]
        inner.step()
        p.grad = None

    def step(self, closure=None) -> None:
        """Nothing to do: every parameter was stepped during backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: the hooks free each gradient after its step."""

    def state_dict(self) -> dict:
        return {
            "inner": [o.state_dict() for o in self.inner],
            "param_groups": super().state_dict()["param_groups"],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        for optimizer, state in zip(self.inner, state_dict["inner"], strict=True):
            optimizer.load_state_dict(state)
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
