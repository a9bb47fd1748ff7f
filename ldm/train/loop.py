"""The DreamBooth training loop. It reads top to bottom: set-up (ldm.train.setup), then the
step loop (lr, micro-steps with no_sync, unscale, clip, step, EMA, log, validate, sample, save)."""

import math
import signal
from contextlib import nullcontext
from pathlib import Path

import torch

from ldm.sample import save_png, to_pil
from ldm.train import distributed
from ldm.train.batches import concat, latents_of
from ldm.train.distributed import DistEnv
from ldm.train.evaluation import sample_grid
from ldm.train.logger import RunLogger
from ldm.train.optim import FusedBackwardOptimizer
from ldm.train.saving import RunCheckpoints
from ldm.train.setup import Resume, Session, TrainingError, TrainState, setup
from ldm.train.state import RunDir, rng_state
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
        cond = cond_of(concat(batch, "prompt", kinds, env.device))
        last = micro == n - 1
        with ddp.no_sync() if env.is_distributed and not last else nullcontext():
            # No cast cache: each weight is used once per forward, so it would save no cast
            # while holding a half-precision copy of every trained weight until the forward ends.
            with autocast(env.device, tc.precision, cache=False):
                per_sample = ddp(z, cond, t, noise)
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
    if s.captured is not None:  # train.capture: the same step, replayed as a CUDA graph
        instance, prior, grad_norm, finite = s.captured.step(micro_steps)
    else:
        instance, prior, loss_finite = micro_steps(
            s.ddp, s.model, s.batches, s.cond_of, s.scaler, cfg, env, s.kinds
        )
        grad_norm, finite = optimizer_step(
            s.optimizer, s.scaler, s.scheduler, s.params, tc.grad_clip
        )
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
    logger = RunLogger(run.root if env.is_main else None, start, tc.max_steps, cfg)
    stop = StopSignal()  # from the start: a signal during set-up (class images) stops cleanly
    try:
        if env.is_main and (removed := run.remove_partial_files()):
            logger.message(f"removed {len(removed)} unfinished checkpoint files: {removed}")
        session = setup(cfg, env, resume, unsafe_load, logger, lambda: stop.received is not None)
        if env.is_main:
            run.write_config(cfg)
        state = session.state
        background = tc.async_save if tc.async_save is not None else env.device.type == "cuda"
        good = (Path(resume.path), start) if resume else None
        saver = RunCheckpoints(run, cfg, session.frozen_state, good, background, logger.message)
        postponed = False
        if tc.sample.every and tc.sample.at_start and state.step == 0 and env.is_main:
            log_samples(cfg, run, session, logger)  # the "before" grid
        while state.step < tc.max_steps:
            logger.step(train_step(session, cfg, env))
            if state.nonfinite_run >= tc.max_nonfinite_steps:
                logger.flush(state.step, env.device)
                saver.wait()  # the newest good checkpoint is on disk before it is named
                raise TrainingError(nonfinite_message(state, saver.good))
            stopping = stop.requested(env)
            new_best = periodic(cfg, env, run, session, logger, stopping)
            final = state.step == tc.max_steps or stopping
            numbered = not stopping and (
                state.step == tc.max_steps
                or bool(tc.save_every and state.step % tc.save_every == 0)
            )
            # Amid non-finite steps a save waits for a finite one (or the end), so that the
            # newest checkpoint is a good one.
            due = final or numbered or postponed
            postponed = due and state.nonfinite_run > 0 and not final
            save = due and not postponed
            if new_best:
                saver.new_best(session, saved_now=save)
            if save:
                rng = distributed.gather_objects(rng_state(), env)
                if env.is_main:
                    saver.save(session, numbered and state.nonfinite_run == 0, rng, final)
            if stopping:
                logger.message(f"stop signal: saved {run.last} at step {state.step}")
                break
    finally:
        stop.close()
        logger.close()
    distributed.barrier(env)
    return state


def nonfinite_message(state: TrainState, good: tuple | None) -> str:
    where = (
        f"the last good checkpoint is {good[0]} (step {good[1]})"
        if good
        else "no checkpoint was saved before it"
    )
    return (
        f"loss or gradients non-finite for {state.nonfinite_run} consecutive steps "
        f"(step {state.step}); {where}"
    )


def periodic(cfg, env, run, session: Session, logger, stopping: bool) -> bool:
    """Logging, validation and sample grids at their intervals; True on a new best val/loss."""
    tc, state, model = cfg.train, session.state, session.model
    step = state.step
    final = step == tc.max_steps or stopping
    if step % tc.log_every == 0 or final:
        logger.flush(step, env.device)
    if not env.is_main:
        return False
    new_best = False
    if session.validation is not None and (step % tc.val_every == 0 or final):
        with session.parking.unparked():
            value = session.validation.loss(model, tc.precision)
        logger.scalar("val/loss", value, step)
        new_best = value < state.best_val
        state.best_val = min(value, state.best_val)
    if tc.sample.every and (step % tc.sample.every == 0 or final):
        log_samples(cfg, run, session, logger)
    return new_best


def log_samples(cfg, run: RunDir, session: Session, logger: RunLogger) -> None:
    """The sample grid of the current weights (EMA's, if on) as images/step=NNNNNN.png."""
    tc, model, ema, step = cfg.train, session.model, session.ema, session.state.step
    swap = ema is not None and tc.sample.use_ema
    # Only what trains is averaged, and put aside (a LoRA run's frozen UNet is not copied).
    trained = [p for p in model.model.parameters() if p.requires_grad]
    if swap:
        ema.store(trained)
        ema.copy_to(model.model)
    with session.parking.unparked():
        grid = sample_grid(
            model, tc.sample, cfg.data.token, cfg.data.class_word, cfg.data.size, tc.precision,
            capture=tc.capture,
        )  # fmt: skip
    if swap:
        ema.restore(trained)
    save_png(to_pil(grid[None])[0], run.images / f"step={step:06d}.png")
    logger.image("samples", grid, step)
