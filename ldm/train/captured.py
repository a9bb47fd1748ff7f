"""The captured training step (`train.capture`): a whole optimizer step replayed as a CUDA graph.

With cached latents and text every step has the same shapes, so forward, backward, unscale, clip
and the AdamW update can be recorded once and replayed: one launch instead of thousands, which
is what bounds an SD step at batch 1 + 1 on a large GPU. It is the eager step (the loop's
`micro_steps`, then the optimizer step) with no host sync inside:

- Inputs: each micro-batch (cached VAE moments or pixels, the keyed timesteps, diffusion noise,
  posterior noise and prompt ids) is copied into static device buffers. The draws are the keyed
  ones of `ldm.train.batches`, so a replay sees exactly what the eager step sees.
- The skip of a non-finite step is decided on the device: fused AdamW gets `found_inf` = not
  isfinite(grad norm) and leaves weights, moments and its step count as they were; with fp16
  the GradScaler decides, as in the eager step.
- The learning rate is a device tensor per parameter group, filled from the schedule before
  each replay; the groups keep plain floats otherwise (scheduler and checkpoints as eager).
- The host learns whether the step was finite (skip counters, EMA, the non-finite stop) once per
  step, after the next step's batch has been fetched and queued behind this step's work.

The first `WARMUP` steps run eagerly on a side stream (optimizer state, library handles); the
next one is recorded, then replayed. Where capture does not apply (`capture_unavailable`: no
CUDA, several processes, fused backward, 8-bit AdamW) the loop says so once and runs eagerly.

UNVERIFIED: no GPU has run this yet; `scripts/gpu_check.sh` compares it with the eager step.
On the CPU the tests run the same step with `graphs=False` (eagerly, through the static buffers).
"""

import math

import torch

from ldm.graphs import record, side_stream
from ldm.train.config import ConfigError


def capture_unavailable(cfg, env) -> str | None:
    """Why `train.capture` cannot apply to this run, or None."""
    tc = cfg.train
    if env.device.type != "cuda":
        return f"no CUDA device ({env.device.type}): CUDA graphs need one"
    if env.is_distributed:
        return "several processes: DDP's gradient all-reduce is not captured"
    if tc.fused_backward:
        return "train.fused_backward steps the optimizer inside backward"
    if tc.optimizer != "adamw":
        return f"train.optimizer={tc.optimizer} cannot skip a step on the device"
    return None


def captured_step(session, cfg, env, logger) -> "CapturedStep | None":
    """The runner when `train.capture` is on and applies; else None, saying why once."""
    if not cfg.train.capture:
        return None
    reason = capture_unavailable(cfg, env)
    if reason is not None:
        logger.message(f"train.capture: {reason}; the training step runs eagerly")
        return None
    return CapturedStep(session, cfg, env)


def device_optimizer_step(
    optimizer, scaler, params, grad_clip: float, lrs, found_inf, capturable: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop's `optimizer_step` without its host sync: unscale, clip, then a fused AdamW step
    that the device skips when the gradient norm is not finite. Returns (grad norm, finite), both
    on the device. `lrs` (one 0-d tensor per group) stand in for the groups' lr during the step."""
    scaler.unscale_(optimizer)  # a no-op unless fp16
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    finite = torch.isfinite(grad_norm)
    groups = optimizer.param_groups
    plain = [(g["lr"], g["capturable"]) for g in groups]
    for group, lr in zip(groups, lrs, strict=True):
        group["lr"], group["capturable"] = lr, capturable
    try:
        if scaler.is_enabled():
            scaler.step(optimizer)  # passes its own found_inf to the fused step
            scaler.update()
        else:
            found_inf.copy_(~finite)  # 1.0: the fused kernel leaves everything as it was
            optimizer.found_inf = found_inf
            optimizer.step()
    finally:
        optimizer.__dict__.pop("found_inf", None)
        for group, (lr, capturable_before) in zip(groups, plain):
            group["lr"], group["capturable"] = lr, capturable_before
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


class CapturedStep:
    """Runs the session's optimizer steps through static buffers, recorded as a CUDA graph after
    `WARMUP` eager steps (`graphs=True`, CUDA), or eagerly through the same buffers (CPU tests)."""

    WARMUP = 2

    def __init__(self, session, cfg, env, graphs: bool = True):
        self.session, self.cfg, self.env, self.graphs = session, cfg, env, graphs
        device = env.device
        groups = session.optimizer.param_groups
        # CUDA's fused AdamW reads a float32 lr tensor (the eager step's lr in float32: updates
        # differ by its rounding, ~6e-8 relative); the CPU's takes a double, as the eager step.
        dtype = torch.float32 if device.type == "cuda" else torch.float64
        self.lrs = [torch.tensor(float(g["lr"]), dtype=dtype, device=device) for g in groups]
        self.found_inf = torch.zeros((), device=device)
        self.inputs: list[dict[str, torch.Tensor]] | None = None  # static micro-batches
        self.stats: torch.Tensor | None = None  # [instance, prior, grad norm, finite]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm_steps = 0

    def step(self, micro_steps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """One optimizer step with the loop's `micro_steps`: (instance loss, prior loss, grad
        norm) on the device, and whether it was finite (a non-finite step changed nothing)."""
        s = self.session
        if self.inputs is None:
            self._stage(self._fetch())
        for lr, group in zip(self.lrs, s.optimizer.param_groups, strict=True):
            lr.fill_(group["lr"])
        self._run(micro_steps)
        stats = self.stats.clone()  # the graph overwrites its own at the next replay
        self._stage(self._fetch())  # queued behind this step: the GPU need not wait for it
        finite = bool(stats[3])  # the one host sync of a step
        s.scheduler.step()
        return stats[0], stats[1], stats[2], finite

    def _run(self, micro_steps) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif not self.graphs:
            self._body(micro_steps)
        elif self.warm_steps < self.WARMUP:
            with side_stream():
                self._body(micro_steps)
            self.warm_steps += 1
        else:
            self._record(micro_steps)
            self.graph.replay()

    def _body(self, micro_steps) -> None:
        """The step itself: what is recorded, and what warm-up steps run."""
        s, tc = self.session, self.cfg.train
        batches = iter(self.inputs)
        instance, prior, _ = micro_steps(
            s.ddp, s.model, batches, s.cond_of, s.scaler, self.cfg, self.env, s.kinds
        )
        grad_norm, finite = device_optimizer_step(
            s.optimizer, s.scaler, s.params, tc.grad_clip, self.lrs, self.found_inf, self.graphs
        )
        self.stats = torch.stack([instance, prior, grad_norm.float(), finite.float()])

    def _record(self, micro_steps) -> None:
        # Gradients are None before the recording, so backward allocates them in its pool.
        self.session.optimizer.zero_grad(set_to_none=True)
        try:
            self.graph, _ = record(lambda: self._body(micro_steps))
        except RuntimeError as e:
            raise ConfigError(
                f"train.capture: recording the training step as a CUDA graph failed "
                f"({' '.join(str(e).split())[:300]}); run with train.capture=false"
            ) from None

    def _fetch(self) -> list[dict[str, torch.Tensor]]:
        batches = self.session.batches
        return [next(batches) for _ in range(self.cfg.train.accumulate_grad_batches)]

    def _stage(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Copy host micro-batches into the static buffers (made at the first call)."""
        if self.inputs is None:
            self.inputs = [
                {k: torch.empty_like(v, device=self.env.device) for k, v in b.items()}
                for b in batches
            ]
        for static, batch in zip(self.inputs, batches, strict=True):
            for key, value in batch.items():
                static[key].copy_(value, non_blocking=True)
