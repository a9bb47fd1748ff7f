"""Optimizer and learning-rate schedule from the `train` config."""

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from ldm.checkpoint import CheckpointError
from ldm.train.adamw8bit import AdamW8bit


def build_optimizer(
    groups: list[dict], train_cfg, lr: float, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (fused), or AdamW with 8-bit moments (`optimizer: adamw8bit`, ldm.train.adamw8bit);
    with `fused_backward`, stepped bucket by bucket inside backward."""
    kwargs = dict(
        lr=lr,
        betas=tuple(train_cfg.betas),
        eps=train_cfg.eps,
        weight_decay=train_cfg.weight_decay,
    )
    if train_cfg.optimizer == "adamw8bit":
        # Compiled on CUDA always (eager it would make ~30 passes over memory), on the CPU
        # only when train.compile asks for it (it needs a C++ compiler and measured no faster).
        compile = True if device.type == "cuda" else bool(train_cfg.compile)

        def make(param_groups):
            return AdamW8bit(param_groups, compile=compile, **kwargs)
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


def buckets(params: list[torch.Tensor], numel: int) -> list[list[torch.Tensor]]:
    """Consecutive parameters in buckets of about `numel` elements (a bucket closes once it
    reaches it). Registration order follows the network, and gradients arrive in roughly the
    reverse order, so a bucket's gradients complete close together."""
    out, size = [[]], 0
    for p in params:
        if size >= numel:
            out.append([])
            size = 0
        out[-1].append(p)
        size += p.numel()
    return [b for b in out if b]


class FusedBackwardOptimizer(torch.optim.Optimizer):
    """The optimizer step fused into the backward pass. Parameters are split into buckets of
    consecutive tensors (`BUCKET_NUMEL` elements); each bucket has its own inner optimizer, which
    one post-accumulate-grad hook steps (one fused/foreach step for the bucket) the moment the
    bucket's last gradient is complete, and the bucket's gradients are then freed. The full set
    of gradients never exists, which saves a fp32 UNet's worth of memory, while the step count
    stays in the hundreds of tensors' tens of buckets, not one step per tensor. It rules out
    global-norm clipping, accumulation and GradScaler.

    The outer param groups carry the learning rate, so LambdaLR schedules it as usual, and the
    state dict has the layout of the unfused optimizer's (state by parameter index).
    """

    BUCKET_NUMEL = 2**23

    def __init__(self, groups: list[dict], make_optimizer, bucket_numel: int | None = None):
        super().__init__(groups, {})
        bucket_numel = bucket_numel or self.BUCKET_NUMEL
        self.buckets: list[tuple[dict, torch.optim.Optimizer, list[torch.Tensor]]] = []
        self._bucket_of: dict[torch.Tensor, int] = {}
        for group in self.param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for params in buckets(group["params"], bucket_numel):
                for p in params:
                    self._bucket_of[p] = len(self.buckets)
                    p.register_post_accumulate_grad_hook(self._arrived)
                inner = make_optimizer([{**options, "params": params}])
                self.buckets.append((group, inner, params))
            # The outer group takes the inner optimizer's full options (fused, amsgrad,
            # decoupled_weight_decay...), so the saved groups load into either form.
            for key, value in inner.param_groups[0].items():
                group.setdefault(key, value)
        self._waiting = [len(params) for _, _, params in self.buckets]

    def _arrived(self, p: torch.Tensor) -> None:
        k = self._bucket_of[p]
        self._waiting[k] -= 1
        if self._waiting[k] == 0:
            self._step_bucket(k)

    def _step_bucket(self, k: int) -> None:
        group, inner, params = self.buckets[k]
        inner.param_groups[0]["lr"] = group["lr"]
        inner.step()
        for p in params:
            p.grad = None
        self._waiting[k] = len(params)

    def step(self, closure=None) -> None:
        """Step the buckets still waiting for a gradient that never came (a parameter unused in
        this backward): like the unfused optimizer, step what has a gradient."""
        for k, (_, _, params) in enumerate(self.buckets):
            if self._waiting[k] != len(params):
                self._step_bucket(k)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: the hooks free each bucket's gradients after its step."""

    def state_dict(self) -> dict:
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state = {}
        for _, inner, params in self.buckets:
            inner_state = inner.state_dict()["state"]
            state.update(
                {index[p]: inner_state[i] for i, p in enumerate(params) if i in inner_state}
            )
        return {"state": state, "param_groups": super().state_dict()["param_groups"]}

    def load_state_dict(self, state_dict: dict) -> None:
        if "inner" in state_dict:  # the layout of one optimizer per parameter (before buckets)
            inner = state_dict["inner"]
            state = {i: d["state"][0] for i, d in enumerate(inner) if 0 in d["state"]}
            state_dict = {"state": state, "param_groups": state_dict["param_groups"]}
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [
            len(g["params"]) for g in self.param_groups
        ]:
            raise CheckpointError("optimizer state: parameter groups do not match the model")
        saved_id = {
            p: i
            for group, saved in zip(self.param_groups, saved_groups)
            for p, i in zip(group["params"], saved["params"])
        }
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        position = {id(g): n for n, g in enumerate(self.param_groups)}
        for group, inner, params in self.buckets:
            options = {**inner.param_groups[0], **saved_groups[position[id(group)]]}
            inner.load_state_dict(
                {
                    "state": {
                        i: state_dict["state"][saved_id[p]]
                        for i, p in enumerate(params)
                        if saved_id[p] in state_dict["state"]
                    },
                    "param_groups": [{**options, "params": list(range(len(params)))}],
                }
            )
