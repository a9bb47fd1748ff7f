"""AdamW with both moments held in 8 bits, written in plain torch ops, so it runs (and is tested)
on the CPU as on CUDA, and its state is ordinary tensors that `torch.load(weights_only=True)`
reads back bit for bit.

Format. A parameter of at least `MIN_NUMEL` elements whose size is a multiple of `BLOCK` (every
large SD tensor) keeps its moments in blocks of 256 consecutive elements (memory order), each
block with one float32 scale, its absolute maximum:

- `exp_avg` m: int8 code q = round(127 * (|m| / max|m|)^(1/4)) * sign(m); m = max|m| * (q / 127)^4.
- `exp_avg_sq` v: uint8 code q = round(255 * (v / max v)^(1/4)), at least 1; v = max v * (q / 255)^4.

Fourth-root companding spends most codes near the block's maximum, where most values are, while
values 10^6 (m) and 10^9 (v) times smaller still get codes of their own; it costs two square roots
to encode and two squarings to decode (no table look-up, which is slow on the CPU). Never rounding
a non-zero v down to 0 keeps m / sqrt(v) bounded (the "zero point" failure of 8-bit Adam).

That is 2 + 8/256 = 2.03125 bytes per element against fp32 AdamW's 8. Smaller tensors (biases,
norms) keep float32 moments, as in bitsandbytes. The update itself is computed in float32 from the
dequantised moments, exactly as `torch.optim.AdamW` (decoupled weight decay, bias correction), and
only the new moments are rounded for storage. `tests/test_adamw8bit.py` bounds the difference from
fp32 AdamW; the README gives the numbers and why this and not torchao's or bitsandbytes' version.

The step gathers parameters into windows (`window_numel`) and runs a few dozen element-wise
kernels per window, not per tensor: the cost of a step does not grow with the number of tensors,
and its scratch memory is bounded (about 9 float32 buffers of one window). Windows are large on
CUDA (few kernel launches) and cache-sized on the CPU, where each eager pass over a large window
goes to memory: on the CPU machine a 2**23-element step took 0.36 s of CPU time in 2**23-element
windows and 0.12 s in 2**18-element ones (fp32 fused AdamW: 0.011 s).
"""

from collections import defaultdict
from collections.abc import Iterator

import torch

from ldm.checkpoint import CheckpointError

BLOCK = 256
MIN_NUMEL = 4096
WINDOW = 2**23  # elements per step window on CUDA: ~300 MB of fp32 scratch at most
CPU_WINDOW = 2**18  # on the CPU: a window's ~9 MB of buffers stay in cache
QUANTISED_BYTES_PER_ELEMENT = 2 + 2 * 4 / BLOCK  # two codes + two float32 scales per block
_TINY = torch.finfo(torch.float32).tiny


def quantised(p: torch.Tensor) -> bool:
    """Whether AdamW8bit stores this parameter's moments in 8 bits."""
    return p.numel() >= MIN_NUMEL and p.numel() % BLOCK == 0


def state_bytes(params) -> int:
    """Bytes of AdamW8bit's state for `params` (one float32 step counter each)."""
    return sum(
        4 + (int(p.numel() * QUANTISED_BYTES_PER_ELEMENT) if quantised(p) else 8 * p.numel())
        for p in params
    )


def window_numel(device: torch.device) -> int:
    """Elements per step window on `device` (see the module docstring)."""
    return WINDOW if device.type == "cuda" else min(WINDOW, CPU_WINDOW)


def _block_max(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, BLOCK).abs().amax(dim=1)


def encode_exp_avg(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """m [n] float32 -> (int8 codes [n], float32 block maxima [n / BLOCK])."""
    scale = _block_max(m)
    r = m.view(-1, BLOCK).abs().div_(scale.clamp_min(_TINY)[:, None])
    q = r.sqrt_().sqrt_().mul_(127).round_().copysign_(m.view(-1, BLOCK))
    return q.to(torch.int8).view(-1), scale


def decode_exp_avg(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    c = codes.view(-1, BLOCK).float().div_(127)
    return c.square().square_().copysign_(c).mul_(scale[:, None]).view(-1)


def encode_exp_avg_sq(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v [n] float32, >= 0 -> (uint8 codes [n], float32 block maxima [n / BLOCK])."""
    scale = _block_max(v)
    r = v.view(-1, BLOCK).div(scale.clamp_min(_TINY)[:, None])
    q = r.sqrt_().sqrt_().mul_(255).round_().clamp_(1, 255)
    return q.to(torch.uint8).view(-1), scale


def decode_exp_avg_sq(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    c = codes.view(-1, BLOCK).float().div_(255)
    return c.square_().square_().mul_(scale[:, None]).view(-1)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor in memory order (channels_last weights included), so that
    writes reach the tensor."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(order).view(-1)


def _flat_grad(p: torch.Tensor) -> torch.Tensor:
    """The gradient in the parameter's memory order (a copy only if its layout differs)."""
    if p.is_contiguous():
        return p.grad.reshape(-1)
    order = sorted(range(p.dim()), key=lambda d: -p.stride(d))
    return p.grad.permute(order).reshape(-1)


def _windows(params: list[torch.Tensor], limit: int) -> Iterator[list[tuple]]:
    """Consecutive (param, start, end) slices, at most `limit` elements per window; a tensor larger
    than a window is split (at multiples of `limit`, itself a multiple of BLOCK)."""
    window, size = [], 0
    for p in params:
        start, n = 0, p.numel()
        while start < n:
            take = min(n - start, limit - size)
            window.append((p, start, start + take))
            size, start = size + take, start + take
            if size == limit:
                yield window
                window, size = [], 0
    if window:
        yield window


def _adam(grad, m, v, beta1: float, beta2: float, eps: float, bias_correction2_sqrt):
    """torch.optim.AdamW's moment update (in place) and m / denominator, for flat float32 tensors;
    the caller scales by lr / bias_correction1. `bias_correction2_sqrt` is a 0-d tensor, so a
    compiled step is not recompiled every step."""
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return m / v.sqrt().div_(bias_correction2_sqrt).add_(eps)


def _quantised_step(grad, m_codes, m_scale, v_codes, v_scale, beta1, beta2, eps, correction):
    """Decode, update, encode: (m / denominator, new m codes and scales, new v codes and scales)."""
    m = decode_exp_avg(m_codes, m_scale)
    v = decode_exp_avg_sq(v_codes, v_scale)
    update = _adam(grad, m, v, beta1, beta2, eps, correction)
    return (update, *encode_exp_avg(m), *encode_exp_avg_sq(v))


_compiled_quantised_step = None


def compiled_quantised_step():
    """`_quantised_step` through torch.compile (one fused kernel instead of ~30 passes over
    memory); compiled once, for any window size."""
    global _compiled_quantised_step
    if _compiled_quantised_step is None:
        _compiled_quantised_step = torch.compile(_quantised_step, dynamic=True)
    return _compiled_quantised_step


class AdamW8bit(torch.optim.Optimizer):
    """`torch.optim.AdamW` with 8-bit moments (see the module docstring). `compile`: run the
    quantised part of the step through torch.compile (None: on CUDA only; eager it costs ~30
    passes over memory, compiled a few)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        compile: bool | None = None,
    ):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.compile = compile

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        if quantised(p):
            blocks = p.numel() // BLOCK
            state["exp_avg"] = torch.zeros(p.numel(), dtype=torch.int8, device=p.device)
            state["exp_avg_scale"] = torch.zeros(blocks, device=p.device)
            state["exp_avg_sq"] = torch.ones(p.numel(), dtype=torch.uint8, device=p.device)
            state["exp_avg_sq_scale"] = torch.zeros(blocks, device=p.device)
        else:
            state["exp_avg"] = torch.zeros(p.numel(), device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.numel(), device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # Parameters that share a step count share a bias correction, so a window is
            # made of parameters with the same count (all of them, unless some had no gradient).
            by_step: dict[float, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self.state[p] or self._init_state(p)
                state["step"] += 1
                by_step[float(state["step"])].append(p)
            for step, params in by_step.items():
                limit = window_numel(params[0].device)
                for quant in (True, False):
                    chosen = [p for p in params if quantised(p) == quant]
                    for window in _windows(chosen, limit):
                        self._step_window(window, group, step, quant)
        return loss

    def _step_window(self, window: list[tuple], group: dict, step: float, quant: bool) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        device = window[0][0].device
        keys = ("exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale")
        keys = keys if quant else keys[::2]
        states = [self.state[p] for p, _, _ in window]
        # (start, end) of each window slice in each state tensor: scales have one per block.
        ranges = {k: [(a, b) for _, a, b in window] for k in keys}
        if quant:
            for k in keys[1::2]:
                ranges[k] = [(a // BLOCK, b // BLOCK) for _, a, b in window]
        stored = [torch.cat([s[k][a:b] for s, (a, b) in zip(states, ranges[k])]) for k in keys]
        grad = torch.cat([_flat_grad(p)[a:b] for p, a, b in window]).float()
        # Filled on the device: torch.tensor(x, device="cuda") is a blocking copy from the host,
        # a stream synchronisation per window inside fused backward.
        correction = torch.full((), (1 - beta2**step) ** 0.5, device=device)
        if quant:
            compile = self.compile if self.compile is not None else device.type == "cuda"
            step_fn = compiled_quantised_step() if compile else _quantised_step
            update, *stored = step_fn(grad, *stored, beta1, beta2, eps, correction)
        else:
            update = _adam(grad, *stored, beta1, beta2, eps, correction)
        del grad
        params = [_flat(p)[a:b] for p, a, b in window]
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        sizes = [b - a for _, a, b in window]
        torch._foreach_add_(params, update.split(sizes), alpha=-lr / (1 - beta1**step))
        for k, new in zip(keys, stored):
            targets = [s[k][a:b] for s, (a, b) in zip(states, ranges[k])]
            torch._foreach_copy_(targets, new.split([b - a for a, b in ranges[k]]))

    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, but codes keep their integer dtype (torch would cast every state
        tensor of a float parameter to the parameter's dtype), and state that is not this
        optimizer's is refused in one line."""
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [
            len(g["params"]) for g in self.param_groups
        ]:
            raise CheckpointError("optimizer state: parameter groups do not match the model")
        ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        self.state = defaultdict(dict)
        for i, p in zip(ids, params):
            entry = state_dict["state"].get(i)
            if entry is None:
                continue
            expected = self._init_state(p)
            if set(entry) != set(expected) or any(
                entry[k].shape != expected[k].shape or entry[k].dtype != expected[k].dtype
                for k in expected
            ):
                raise CheckpointError(
                    f"optimizer state of parameter {i} is not AdamW8bit state for a tensor "
                    f"of shape {tuple(p.shape)} (was train.optimizer changed?)"
                )
            for k, value in entry.items():
                expected[k].copy_(value)
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
