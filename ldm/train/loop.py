"""The DreamBooth training loop. It reads top to bottom: set-up (ldm.train.setup), then the
step loop (lr, micro-steps with no_sync, unscale, clip, step, EMA, log, validate, sample, save)."""

import math
import signal
from contextlib import nullcontext
from dataclasses import asdict

import torch
from torchvision.utils import save_image

from ldm.checkpoint import save_checkpoint
from ldm.train import distributed
from ldm.train.batches import concat, latents_of
from ldm.train.distributed import DistEnv
from ldm.train.evaluation import sample_grid
from ldm.train.logger import RunLogger
from ldm.train.lora import fold_into_checkpoint
from ldm.train.optim import FusedBackwardOptimizer
from ldm.train.setup import Resume, Session, TrainingError, TrainState, setup
from ldm.train.state import RunDir, checkpoint_payload, save_step
from ldm.util import autocast


class StopSignal:
    """SIGTERM, SIGINT and SIGUSR1 ask the loop to save last.ckpt and exit cleanly."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def requested(self, env: DistEnv) -> bool:
        return distributed.any_rank(self.received is not None, env)

    def close(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def micro_steps(ddp, model, batches, cond_of, scaler, cfg, env, kinds) -> tuple:
    """Forward and backward over `accumulate_grad_batches` micro-batches, gradients synced
    (with DDP) only on the last. Returns the mean instance and prior losses (on device), and
    whether the loss was finite where that must be known before backward (fused_backward)."""
    tc = cfg.train
    n = tc.accumulate_grad_batches
    b = tc.batch_size
    loss_instance = torch.zeros((), device=env.device)
    loss_prior = torch.zeros((), device=env.device)
    finite = True
    for micro in range(n):
        batch = next(batches)
        z = latents_of(model, batch, kinds, env.device)
        t, noise = concat(batch, "t", kinds, env.device), concat(batch, "noise", kinds, env.device)
        last = micro == n - 1
        with ddp.no_sync() if env.is_distributed and not last else nullcontext():
            with autocast(env.device, tc.precision):
                per_sample = ddp(z, cond_of(b), t, noise)
            instance = per_sample[:b].mean()
            prior = per_sample[b:].mean() if len(kinds) == 2 else torch.zeros_like(instance)
            loss = instance + tc.prior_loss_weight * prior
            # Backward steps the weights when fused: a non-finite loss must not get that far.
            if tc.fused_backward:
                finite = bool(torch.isfinite(loss))
            if finite:
                scaler.scale(loss / n).backward()
        loss_instance += instance.detach() / n
        loss_prior += prior.detach() / n
    return loss_instance, loss_prior, finite


def optimizer_step(optimizer, scaler, scheduler, params, grad_clip: float) -> tuple:
    """Unscale, clip, step (skipped when the gradient is not finite). Returns (grad norm, finite)."""
    if isinstance(optimizer, FusedBackwardOptimizer):  # stepped in backward; no full gradient
        optimizer.step()  # a no-op that keeps the scheduler's step bookkeeping in order
        scheduler.step()
        return None, True
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    finite = bool(torch.isfinite(grad_norm))  # the one host sync of a step
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips the update itself when it found inf/nan
        scaler.update()
    elif finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return grad_norm, finite


def train_step(session: Session, cfg, env: DistEnv) -> dict:
    """One optimizer step (all its micro-steps) and the EMA; the step's numbers, on device."""
    s, tc = session, cfg.train
    lr = s.scheduler.get_last_lr()[0]
    instance, prior, loss_finite = micro_steps(
        s.ddp, s.model, s.batches, s.cond_of, s.scaler, cfg, env, s.kinds
    )
    grad_norm, finite = optimizer_step(s.optimizer, s.scaler, s.scheduler, s.params, tc.grad_clip)
    finite = finite and loss_finite
    s.state.step += 1
    if finite:
        s.state.nonfinite_run = 0
        for average, module in ((s.ema, s.model.model), (s.text_ema, s.model.cond_stage_model)):
            if average is not None:
                average(module)
    else:
        s.state.skipped_steps += 1
        s.state.nonfinite_run += 1
    losses = distributed.mean_over_ranks(torch.stack([instance, prior]), env)
    return {
        "step": s.state.step,
        "loss": losses[0] + tc.prior_loss_weight * losses[1],
        "loss_instance": losses[0],
        "loss_prior": losses[1] if len(s.kinds) == 2 else None,
        "lr": lr,
        "grad_norm": grad_norm,
        "skipped": s.state.skipped_steps,
    }


def train(
    cfg, run: RunDir, env: DistEnv, resume: Resume | None = None, unsafe_load: bool = False
) -> TrainState:
    """Train until `train.max_steps` or a stop signal; rank 0 writes the run folder."""
    tc = cfg.train
    start = resume.extras["global_step"] if resume else 0
    logger = RunLogger(run.root if env.is_main else None, start, tc.max_steps)
    stop = None
    try:
        session = setup(cfg, env, resume, unsafe_load, logger)
        state = session.state
        stop = StopSignal()
        while state.step < tc.max_steps:
            logger.step(train_step(session, cfg, env))
            if state.nonfinite_run >= tc.max_nonfinite_steps:
                logger.flush(state.step, env.device)
                raise TrainingError(
                    f"loss or gradients non-finite for {state.nonfinite_run} consecutive steps "
                    f"(step {state.step}); the last good checkpoint is {run.last}"
                )
            stopping = stop.requested(env)
            new_best = periodic(cfg, env, run, session, logger, stopping)
            final = state.step == tc.max_steps or stopping
            save = final or (tc.save_every and state.step % tc.save_every == 0)
            if env.is_main and (save or new_best):
                save_checkpoints(session, cfg, run, save, new_best)
            if stopping:
                logger.message(f"stop signal: saved {run.last} at step {state.step}")
                break
    finally:
        if stop is not None:
            stop.close()
        logger.close()
    distributed.barrier(env)
    return state


def save_checkpoints(session: Session, cfg, run: RunDir, save: bool, best: bool) -> None:
    s = session
    payload = checkpoint_payload(
        s.model, s.optimizer, s.scaler, s.scheduler, s.text_ema, cfg, s.state.step, asdict(s.state)
    )
    payload["state_dict"].update(s.frozen_state)  # the frozen weights as loaded, bitwise
    # A LoRA run: merged weights in the SD layout; adapters and original weights beside them.
    payload["lora"] = fold_into_checkpoint(payload["state_dict"], s.model, s.ema, s.text_ema)
    if save:
        save_checkpoint(payload, run.last)
        save_step(run, payload, s.state.step, cfg.train.keep_last)
    if best:
        save_checkpoint(payload, run.best)


def periodic(cfg, env, run, session: Session, logger, stopping: bool) -> bool:
    """Logging, validation and sample grids at their intervals; True on a new best val/loss."""
    tc, state, model, ema = cfg.train, session.state, session.model, session.ema
    step = state.step
    final = step == tc.max_steps or stopping
    if step % tc.log_every == 0 or final:
        logger.flush(step, env.device)
    if not env.is_main:
        return False
    new_best = False
    if session.validation is not None and (step % tc.val_every == 0 or final):
        value = session.validation.loss(model, tc.precision)
        logger.scalar("val/loss", value, step)
        new_best = value < state.best_val
        state.best_val = min(value, state.best_val)
    if tc.sample.every and (step % tc.sample.every == 0 or final):
        swap = ema is not None and tc.sample.use_ema
        if swap:
            ema.store(model.model.parameters())
            ema.copy_to(model.model)
        grid = sample_grid(
            model, tc.sample, cfg.data.token, cfg.data.class_word, cfg.data.size, tc.precision
        )
        if swap:
            ema.restore(model.model.parameters())
        save_image(grid, run.images / f"step={step:06d}.png")
        logger.image("samples", grid, step)
    return new_best
