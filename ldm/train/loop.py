"""The DreamBooth training loop. It reads top to bottom: set-up, model, class images, data,
EMA, optimizer, resume, DDP, then the step loop (lr, micro-steps with no_sync, unscale, clip,
step, EMA, log, validate, sample, save)."""

import math
import signal
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torchvision.utils import save_image

from ldm.checkpoint import empty_parameters, load_model, load_state_into, save_checkpoint
from ldm.data.dreambooth import DreamBoothDataset
from ldm.modules.ema import LitEma
from ldm.train import distributed
from ldm.train.batches import (
    LatentCache,
    PositionDataset,
    PositionSampler,
    concat,
    latents_of,
    stack_batch,
)
from ldm.train.config import uses_prior
from ldm.train.distributed import DistEnv
from ldm.train.evaluation import Validation, prompt, sample_grid
from ldm.train.logger import RunLogger
from ldm.train.optim import (
    FusedBackwardOptimizer,
    build_optimizer,
    build_scheduler,
    effective_lr,
)
from ldm.train.prior import missing_indices, sample_class_images
from ldm.train.state import (
    RunDir,
    checkpoint_payload,
    ema_entries,
    save_step,
    set_rng_state,
)
from ldm.train.trainable import (
    configure_trainable,
    frozen_modules,
    identifier_token_ids,
    text_encoder_trains,
    trained_parameters,
)
from ldm.util import autocast, instantiate_from_config, precision_dtype


class TrainingError(RuntimeError):
    """The run cannot go on; the message is one line."""


class DreamBoothLoss(nn.Module):
    """What DDP wraps: latents, conditioning (embeddings, or token ids when the text encoder
    trains), timesteps and noise in; one loss per sample out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, z, cond, t, noise) -> torch.Tensor:
        if cond.dtype == torch.long:
            cond = self.model.get_learned_conditioning(cond)
        return self.model.p_losses(z, cond, t, noise)


@dataclass
class TrainState:
    """Counters that a resumed run continues from."""

    step: int = 0
    best_val: float = math.inf
    skipped_steps: int = 0
    nonfinite_run: int = 0


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


@dataclass
class Resume:
    """A training checkpoint to continue from (read by main.py, which takes its config)."""

    path: str
    source: dict
    extras: dict


def build_model(cfg, resume: Resume | None, unsafe_load: bool) -> nn.Module:
    """The model with its starting weights: the resumed run's, the base checkpoint's, or (with
    neither, as in the demo) a seeded random initialisation, the same on every rank."""
    if resume is not None:
        with empty_parameters():
            model = instantiate_from_config(cfg.model)
        load_state_into(model, resume.source, path=resume.path)
        return model
    tc = cfg.train
    if tc.actual_resume is None:
        torch.manual_seed(tc.seed)
        return instantiate_from_config(cfg.model)
    return load_model(cfg.model, tc.actual_resume, tc.use_ema_weights, unsafe_load)[0]


def build_dataset(cfg) -> DreamBoothDataset:
    dc = cfg.data
    return DreamBoothDataset(
        dc.instance_root,
        dc.token,
        dc.class_word,
        size=dc.size,
        instance_template=dc.instance_template,
        class_root=dc.class_root if uses_prior(cfg) else None,
        class_template=dc.class_template,
        center_crop=dc.center_crop,
        flip_p=dc.flip_p,
        seed=cfg.train.seed,
    )


def conditioning(model, dataset: DreamBoothDataset, kinds, cfg, device):
    """A function of the per-kind batch size giving the conditioning of a micro-batch: cached
    text embeddings when the text encoder is frozen and `cache_text` is on, token ids when it
    trains (the loss module encodes them with gradients), else embeddings computed each step."""
    prompts = {"instance": dataset.instance_prompt, "class": dataset.class_prompt}
    tokens = {k: model.cond_stage_model.tokenize([prompts[k]]).to(device) for k in kinds}
    if text_encoder_trains(cfg.train.trainable):
        return lambda b: torch.cat([tokens[k].expand(b, -1) for k in kinds])

    def encode(b: int) -> torch.Tensor:
        with torch.no_grad(), autocast(device, cfg.train.precision):
            ids = torch.cat([tokens[k].expand(b, -1) for k in kinds])
            return model.get_learned_conditioning(ids).float()

    if not cfg.train.cache_text:
        return encode
    cached = {k: v for k, v in zip(kinds, encode(1).split(1))}
    return lambda b: torch.cat([cached[k].expand(b, -1, -1) for k in kinds])


def prepare(cfg, env: DistEnv, model: nn.Module, resume: Resume | None, logger: RunLogger):
    """Class images, trainable parts, frozen dtype, data and caches: everything before the
    optimizer. Returns (dataset, cache, parameter groups, frozen weights as loaded)."""
    tc, dc = cfg.train, cfg.data
    # The frozen weights as loaded (CPU, often memory-mapped): checkpoints store these, so a
    # frozen tensor is saved bitwise as it was, even while the device holds a half-precision copy.
    frozen_state = {
        k: v
        for m in frozen_modules(model, tc.trainable)
        for k, v in _prefixed_state(model, m).items()
    }
    model.to(env.device)
    if uses_prior(cfg) and resume is None:
        class_prompt = prompt(dc.class_template, dc.token, dc.class_word)
        todo = missing_indices(Path(dc.class_root), cfg.prior.num_class_images)
        distributed.barrier(env)  # every rank has listed the folder before any rank writes
        wrote = sample_class_images(
            model, dc.class_root, class_prompt, cfg.prior, dc.size, tc.precision,
            todo[env.rank :: env.world_size], progress=env.is_main,
        )  # fmt: skip
        distributed.barrier(env)
        if wrote:
            logger.message(f"sampled {wrote} class images into {dc.class_root} (rank {env.rank})")
    groups = configure_trainable(model, tc.trainable, identifier_token_ids(model, dc.token))
    dtype = precision_dtype(tc.precision)
    for module in frozen_modules(model, tc.trainable):
        module.to(dtype or torch.float32)
    unet = model.model.diffusion_model
    # train.gradient_checkpointing decides, whatever the UNet config's use_checkpoint says.
    unet.set_gradient_checkpointing(tc.gradient_checkpointing)
    model.cond_stage_model.set_gradient_checkpointing(
        tc.gradient_checkpointing and text_encoder_trains(tc.trainable)
    )
    if tc.channels_last:
        unet.to(memory_format=torch.channels_last)
    dataset = build_dataset(cfg)
    cache = None
    if tc.cache_latents and dc.center_crop:
        cache = LatentCache(model, dataset, env.device)
    elif tc.cache_latents:
        logger.message("latent cache off: random crop (data.center_crop=false) has no fixed pixels")
    return dataset, cache, groups, frozen_state


def _prefixed_state(model: nn.Module, module: nn.Module) -> dict:
    """`module`'s state dict under its name inside `model` (checkpoint layout)."""
    name = next(n for n, m in model.named_modules() if m is module)
    return module.state_dict(prefix=f"{name}.")


def make_loader(cfg, env, model, dataset, cache, start_step: int) -> DataLoader:
    tc = cfg.train
    f = model.first_stage_model.downsample_factor
    latent_shape = (model.channels, cfg.data.size // f, cfg.data.size // f)
    positions = PositionDataset(dataset, tc.seed, latent_shape, model.num_timesteps, cache)
    sampler = PositionSampler(
        env.rank, env.world_size, tc.batch_size, start=start_step * tc.accumulate_grad_batches
    )
    return DataLoader(
        positions,
        batch_size=tc.batch_size,
        sampler=sampler,
        collate_fn=stack_batch,
        num_workers=0 if cache is not None else cfg.data.num_workers,
        pin_memory=env.device.type == "cuda",
    )


def restore(resume: Resume, optimizer, scheduler, scaler, ema, text_ema) -> TrainState:
    """Put the optimizer, schedules, EMA and RNG back where the checkpoint left them."""
    extras = resume.extras
    optimizer.load_state_dict(extras["optimizer"])
    scheduler.load_state_dict(extras["lr_scheduler"])
    scaler.load_state_dict(extras["scaler"])
    if ema is not None:
        ema.load_state_dict(ema_entries(resume.source))
    if text_ema is not None:
        text_ema.load_state_dict(extras["text_encoder_ema"])
    set_rng_state(extras["rng"])
    return TrainState(**extras["train_state"])


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


def train(
    cfg, run: RunDir, env: DistEnv, resume: Resume | None = None, unsafe_load: bool = False
) -> TrainState:
    """Train until `train.max_steps` or a stop signal; rank 0 writes the run folder."""
    tc = cfg.train
    torch.manual_seed(tc.seed + env.rank)  # rank-offset; per-sample draws are keyed instead
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = resume.extras["global_step"] if resume else 0
    logger = RunLogger(run.root if env.is_main else None, start, tc.max_steps)

    model = build_model(cfg, resume, unsafe_load)
    dataset, cache, groups, frozen_state = prepare(cfg, env, model, resume, logger)
    kinds = ("instance", "class") if dataset.with_prior else ("instance",)
    cond_of = conditioning(model, dataset, kinds, cfg, env.device)
    validation = None
    if tc.val_every and env.is_main:
        validation = Validation(model, dataset, tc.val_timesteps, tc.seed, env.device)

    ema = text_ema = None
    if tc.ema.enabled and "unet" in tc.trainable:
        model.model_ema = ema = LitEma(model.model, decay=tc.ema.decay)
    if tc.ema.enabled and text_encoder_trains(tc.trainable):
        text_ema = LitEma(model.cond_stage_model, decay=tc.ema.decay)

    params = trained_parameters(model)
    optimizer = build_optimizer(groups, tc, effective_lr(tc, env.world_size), env.device)
    scheduler = build_scheduler(optimizer, tc)
    scaler = torch.amp.GradScaler(env.device.type, enabled=str(tc.precision) == "16")
    state = restore(resume, optimizer, scheduler, scaler, ema, text_ema) if resume else TrainState()

    if tc.fused_backward and env.is_distributed:
        raise TrainingError("train.fused_backward is single-process: DDP must see whole gradients")
    loss_module = DreamBoothLoss(model)
    if tc.compile:
        model.model.diffusion_model.compile()
    ddp = loss_module
    if env.is_distributed:
        ddp = DistributedDataParallel(
            loss_module,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            broadcast_buffers=False,
            gradient_as_bucket_view=True,
        )
    batches = iter(make_loader(cfg, env, model, dataset, cache, state.step))
    stop = StopSignal()
    try:
        while state.step < tc.max_steps:
            lr = scheduler.get_last_lr()[0]
            instance, prior, loss_finite = micro_steps(
                ddp, model, batches, cond_of, scaler, cfg, env, kinds
            )
            grad_norm, finite = optimizer_step(optimizer, scaler, scheduler, params, tc.grad_clip)
            finite = finite and loss_finite
            state.step += 1
            if finite:
                state.nonfinite_run = 0
                for average, module in ((ema, model.model), (text_ema, model.cond_stage_model)):
                    if average is not None:
                        average(module)
            else:
                state.skipped_steps += 1
                state.nonfinite_run += 1
            losses = distributed.mean_over_ranks(torch.stack([instance, prior]), env)
            logger.step(
                {
                    "step": state.step,
                    "loss": losses[0] + tc.prior_loss_weight * losses[1],
                    "loss_instance": losses[0],
                    "loss_prior": losses[1] if len(kinds) == 2 else None,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "skipped": state.skipped_steps,
                }
            )
            if state.nonfinite_run >= tc.max_nonfinite_steps:
                logger.flush(state.step, env.device)
                raise TrainingError(
                    f"loss or gradients non-finite for {state.nonfinite_run} consecutive steps "
                    f"(step {state.step}); the last good checkpoint is {run.last}"
                )
            stopping = stop.requested(env)
            new_best = periodic(cfg, env, run, model, state, logger, validation, ema, stopping)
            final = state.step == tc.max_steps or stopping
            save = final or (tc.save_every and state.step % tc.save_every == 0)
            if env.is_main and (save or new_best):
                payload = checkpoint_payload(
                    model, optimizer, scaler, scheduler, text_ema, cfg, state.step, asdict(state)
                )
                payload["state_dict"].update(frozen_state)
                if save:
                    save_checkpoint(payload, run.last)
                    save_step(run, payload, state.step, tc.keep_last)
                if new_best:
                    save_checkpoint(payload, run.best)
            if stopping:
                logger.message(f"stop signal: saved {run.last} at step {state.step}")
                break
    finally:
        stop.close()
        logger.close()
    distributed.barrier(env)
    return state


def periodic(cfg, env, run, model, state, logger, validation, ema, stopping: bool) -> bool:
    """Logging, validation and sample grids at their intervals; True on a new best val/loss."""
    tc, step = cfg.train, state.step
    final = step == tc.max_steps or stopping
    if step % tc.log_every == 0 or final:
        logger.flush(step, env.device)
    if not env.is_main:
        return False
    new_best = False
    if validation is not None and (step % tc.val_every == 0 or final):
        value = validation.loss(model, tc.precision)
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
