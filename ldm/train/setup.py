"""Everything before the first step: model and weights, class images, what trains, caches,
data, EMA, optimizer, resume and DDP, gathered in one `Session` that the loop (and the training
benchmark) steps."""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ldm.checkpoint import CheckpointError, empty_parameters, load_model, load_state_into
from ldm.data.dreambooth import DreamBoothDataset, format_prompt
from ldm.modules.ema import LitEma
from ldm.train import distributed
from ldm.train.batches import LatentCache, PositionDataset, PositionSampler, stack_batch
from ldm.train.captured import captured_step
from ldm.train.config import ConfigError, uses_prior
from ldm.train.distributed import DistEnv
from ldm.train.evaluation import Validation
from ldm.train.logger import RunLogger
from ldm.train.lora import load_adapters, resumed_weights
from ldm.train.memory import FrozenParking, describe_peak, expected_peak, parked_modules
from ldm.train.optim import build_optimizer, build_scheduler, effective_lr, set_schedule
from ldm.train.prior import missing_indices, sample_class_images
from ldm.train.state import ema_entries, is_lean, set_rng_state
from ldm.train.trainable import (
    cast_frozen,
    configure_trainable,
    frozen_modules,
    identifier_token_ids,
    text_encoder_trains,
    trained_parameters,
)
from ldm.util import autocast, instantiate_from_config, precision_dtype


class TrainingError(RuntimeError):
    """The run cannot go on; the message is one line."""


class Stopped(Exception):
    """A stop signal arrived before training began (class-image sampling, latent caching)."""


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


@dataclass
class Resume:
    """A training checkpoint to continue from (read by main.py, which takes its config)."""

    path: str
    source: dict
    extras: dict


def build_model(cfg, resume: Resume | None, unsafe_load: bool) -> nn.Module:
    """The model with its starting weights: the resumed run's, the base checkpoint's, or (with
    neither, as in the demo) a seeded random initialisation, the same on every rank."""
    try:
        if resume is not None:
            with empty_parameters():
                model = instantiate_from_config(cfg.model, unsafe=unsafe_load)
            load_state_into(model, resumed_weights(resume.source, resume.extras), path=resume.path)
            return model
        tc = cfg.train
        if tc.actual_resume is None:
            torch.manual_seed(tc.seed)
            return instantiate_from_config(cfg.model, unsafe=unsafe_load)
        return load_model(cfg.model, tc.actual_resume, tc.use_ema_weights, unsafe_load)[0]
    except (CheckpointError, ConfigError):
        raise
    except (ValueError, KeyError) as e:  # the model classes' own checks of their arguments
        raise ConfigError(f"model: {' '.join(str(e).split())}") from None


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
        captions=dc.captions,
    )


def conditioning(model, dataset: DreamBoothDataset, cfg, device):
    """A function of prompt ids [N] (indices into `dataset.prompts`) giving their conditioning:
    cached text embeddings when the text encoder is frozen and `cache_text` is on, token ids when
    it trains (the loss module encodes them with gradients), else embeddings computed each step."""
    tokens = model.cond_stage_model.tokenize(dataset.prompts).to(device)  # [P, 77]
    if text_encoder_trains(cfg.train.trainable):
        return lambda ids: tokens[ids]

    def encode(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(device, cfg.train.precision):
            return model.get_learned_conditioning(tokens[ids]).float()

    if not cfg.train.cache_text:
        return encode
    everything = torch.arange(len(dataset.prompts), device=device)
    table = torch.cat([encode(part) for part in everything.split(256)])  # [P, 77, D]
    return lambda ids: table[ids]


def prepare(
    cfg, env: DistEnv, model: nn.Module, resume: Resume | None, logger: RunLogger, should_stop
):
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
        class_prompt = format_prompt(dc.class_template, dc.token, dc.class_word)
        todo = missing_indices(Path(dc.class_root), cfg.prior.num_class_images)
        distributed.barrier(env)  # every rank has listed the folder before any rank writes
        wrote = sample_class_images(
            model, dc.class_root, class_prompt, cfg.prior, dc.size, tc.precision,
            todo[env.rank :: env.world_size], progress=env.is_main, should_stop=should_stop,
            capture=tc.capture,
        )  # fmt: skip
        if wrote:
            logger.message(f"sampled {wrote} class images into {dc.class_root} (rank {env.rank})")
        if distributed.any_rank(should_stop(), env):  # also the barrier after sampling
            raise Stopped(
                f"stop signal during class-image sampling: the images written so far stay in "
                f"{dc.class_root}; the same command continues"
            )
    token_ids = identifier_token_ids(model, dc.token)
    groups = configure_trainable(model, tc.trainable, token_ids, tc.lora, tc.seed)
    if resume is not None and resume.extras.get("lora") is not None:
        load_adapters(model, resume.extras["lora"]["adapters"], resume.path)
    dtype = precision_dtype(tc.precision)
    for module in frozen_modules(model, tc.trainable):
        cast_frozen(module, dtype or torch.float32)
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
        cache = LatentCache(model, dataset, env.device, should_stop=should_stop)
        if distributed.any_rank(not cache.complete, env):
            raise Stopped("stop signal while caching latents, before the first step: the same "
                          "command starts again")  # fmt: skip
    elif tc.cache_latents:
        logger.message("latent cache off: random crop (data.center_crop=false) has no fixed pixels")
    return dataset, cache, groups, frozen_state


def _prefixed_state(model: nn.Module, module: nn.Module) -> dict:
    """`module`'s state dict under its name inside `model` (checkpoint layout)."""
    name = next(n for n, m in model.named_modules() if m is module)
    return module.state_dict(prefix=f"{name}.")


def make_loader(cfg, env, model, dataset, cache, start_step: int) -> DataLoader:
    tc = cfg.train
    latent_shape = model.latent_shape(cfg.data.size, cfg.data.size)
    positions = PositionDataset(
        dataset,
        tc.seed,
        latent_shape,
        model.num_timesteps,
        cache,
        cfg.data.caption_dropout,
        tc.noise_offset,
    )
    sampler = PositionSampler(
        env.rank, env.world_size, tc.batch_size, start=start_step * tc.accumulate_grad_batches
    )
    return DataLoader(
        positions,
        batch_size=tc.batch_size,
        sampler=sampler,
        collate_fn=stack_batch,
        # Its own generator: starting the loader then draws nothing from the global RNG, which a
        # resume has put back (LoRA's dropout draws from it).
        generator=torch.Generator().manual_seed(tc.seed),
        num_workers=0 if cache is not None else cfg.data.num_workers,
        pin_memory=env.device.type == "cuda",
    )


def restore(resume: Resume, cfg, env: DistEnv, session_parts: tuple, logger) -> TrainState:
    """Put the optimizer, schedules, EMA and RNG back where the checkpoint left them; a lean
    checkpoint (no optimizer state) gives its weights and step, with a fresh optimizer."""
    optimizer, scheduler, scaler, ema, text_ema = session_parts
    extras, state = resume.extras, TrainState(**resume.extras["train_state"])
    lr = effective_lr(cfg.train, env.world_size)
    lora = extras.get("lora")
    if is_lean(extras):
        logger.message(
            f"{resume.path}: a lean checkpoint (weights only, no optimizer state): continuing "
            f"from its weights at step {state.step} with a fresh optimizer"
        )
        set_schedule(optimizer, scheduler, lr, state.step)
    else:
        load_optimizer_state(resume, cfg, optimizer)
        scheduler.load_state_dict(extras["lr_scheduler"])
        scaler.load_state_dict(extras["scaler"])
        restore_rng(extras["rng"], env, logger)
        if scheduler.base_lrs[0] != lr:
            logger.message(
                f"lr: {scheduler.base_lrs[0]:g} in the checkpoint, {lr:g} now (train.lr, "
                f"train.scale_lr x {env.world_size} processes): continuing with {lr:g}"
            )
            set_schedule(optimizer, scheduler, lr, scheduler.last_epoch)
    unet_ema = lora["unet_ema"] if lora is not None else ema_entries(resume.source)
    restore_ema(ema, unet_ema, "UNet", state.step, logger)
    restore_ema(text_ema, extras.get("text_encoder_ema"), "text encoder", state.step, logger)
    return state


def load_optimizer_state(resume: Resume, cfg, optimizer) -> None:
    """The optimizer state, or one line naming the setting that makes it not fit."""
    saved = resume.extras["config"]["train"]
    for key in ("trainable", "optimizer", "fused_backward"):
        now = OmegaConf.to_container(cfg.train)[key]
        if saved.get(key) != now:
            raise ConfigError(
                f"train.{key}: {now} now, {saved.get(key)} in {resume.path}, whose optimizer "
                f"state then does not fit: resume with train.{key}={saved.get(key)}, or start a "
                f"new run from its weights with --actual_resume {resume.path}"
            )
    try:
        optimizer.load_state_dict(resume.extras["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(
            f"{resume.path}: its optimizer state does not fit this run ({e})"
        ) from None


def restore_rng(saved, env: DistEnv, logger) -> None:
    """Each rank continues its own RNG stream; a checkpoint from another number of processes
    leaves the extra ranks on their fresh seeds (training draws are keyed, so data is the same)."""
    states = saved if isinstance(saved, list) else [saved]  # a dict: one process
    if env.rank < len(states):
        set_rng_state(states[env.rank])
    if len(states) != env.world_size:
        logger.message(
            f"RNG: the checkpoint holds the states of {len(states)} processes, this run has "
            f"{env.world_size}: ranks beyond {len(states) - 1} start from train.seed + rank"
        )


def restore_ema(ema: LitEma | None, saved: dict | None, part: str, step: int, logger) -> None:
    """The average as saved; turned on at resume, it starts from the resumed weights."""
    if ema is None:
        if saved:
            logger.message(f"the checkpoint's {part} EMA is dropped (train.ema.enabled=false)")
        return
    if not saved:
        logger.message(
            f"train.ema.enabled: the checkpoint has no {part} EMA; it starts from the weights "
            f"of step {step}"
        )
        return
    ema.load_state_dict(saved)


@dataclass
class Session:
    """A model ready to train, with everything the step loop touches."""

    model: nn.Module
    ddp: nn.Module  # DreamBoothLoss, wrapped in DDP when there are several processes
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    params: list[nn.Parameter]
    batches: object  # an endless iterator of micro-batches
    cond_of: object  # prompt ids -> conditioning
    kinds: tuple[str, ...]
    ema: LitEma | None
    text_ema: LitEma | None
    validation: Validation | None
    frozen_state: dict
    state: TrainState
    parking: FrozenParking  # the frozen modules kept off the device between uses
    expected_peak: dict[str, int]  # bytes by part (ldm.train.memory.expected_peak, peak_bytes)
    captured: object = None  # ldm.train.captured.CapturedStep when train.capture applies


def setup(
    cfg,
    env: DistEnv,
    resume: Resume | None,
    unsafe_load: bool,
    logger: RunLogger,
    should_stop=lambda: False,
) -> Session:
    tc = cfg.train
    torch.manual_seed(tc.seed + env.rank)  # rank-offset; per-sample draws are keyed instead
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(cfg, resume, unsafe_load)
    dataset, cache, groups, frozen_state = prepare(cfg, env, model, resume, logger, should_stop)
    kinds = ("instance", "class") if dataset.with_prior else ("instance",)
    cond_of = conditioning(model, dataset, cfg, env.device)
    validation = None
    if tc.val_every and env.is_main:
        validation = Validation(model, dataset, tc.val_timesteps, tc.seed, env.device)

    ema = text_ema = None
    if tc.ema.enabled and {"unet", "lora"} & set(tc.trainable):
        ema = LitEma(model.model, decay=tc.ema.decay)
        if "unet" in tc.trainable:  # the full-EMA layout (model_ema.*) of the SD state dict
            model.model_ema = ema
    if tc.ema.enabled and text_encoder_trains(tc.trainable):
        text_ema = LitEma(model.cond_stage_model, decay=tc.ema.decay)

    optimizer = build_optimizer(groups, tc, effective_lr(tc, env.world_size), env.device)
    scheduler = build_scheduler(optimizer, tc)
    scaler = torch.amp.GradScaler(env.device.type, enabled=str(tc.precision) == "16")
    parts = (optimizer, scheduler, scaler, ema, text_ema)
    state = restore(resume, cfg, env, parts, logger) if resume else TrainState()

    if tc.fused_backward and env.is_distributed:
        raise TrainingError(
            "train.fused_backward is single-process (DDP must see whole gradients): "
            "set train.fused_backward=false, or use memory_profile=fast"
        )
    ddp = DreamBoothLoss(model)
    if tc.compile:
        model.model.diffusion_model.compile()
    if env.is_distributed:
        ddp = DistributedDataParallel(
            ddp,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            broadcast_buffers=False,
            gradient_as_bucket_view=True,
        )
    batches = iter(make_loader(cfg, env, model, dataset, cache, state.step))
    # Parked last: DDP's start-up broadcast and the caches above need the modules in place.
    parked = parked_modules(model, tc, cache is not None)
    peak = expected_peak(model, cfg, parked, tc.batch_size * len(kinds), env.device)
    parking = FrozenParking(parked, env.device)
    parking.park()
    logger.message(describe_peak(peak, cfg, parked))
    session = Session(
        model, ddp, optimizer, scheduler, scaler, trained_parameters(model), batches, cond_of,
        kinds, ema, text_ema, validation, frozen_state, state, parking, peak,
    )  # fmt: skip
    session.captured = captured_step(session, cfg, env, logger)
    return session
