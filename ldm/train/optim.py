"""Optimizer and learning-rate schedule from the `train` config."""

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(
    groups: list[dict], train_cfg, lr: float, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA), or bitsandbytes' 8-bit AdamW when `optimizer: adamw8bit`."""
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
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kwargs)


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


def effective_lr(train_cfg, world_size: int) -> float:
    """`--scale_lr`: lr x processes x batch size x accumulation (the global batch)."""
    if not train_cfg.scale_lr:
        return train_cfg.lr
    return train_cfg.lr * world_size * train_cfg.batch_size * train_cfg.accumulate_grad_batches
