"""Everything before the first step: model and weights, class images, what trains, caches,
data, EMA, optimizer, resume and DDP, gathered in one `Session` that the loop (and the training
benchmark) steps."""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ldm.checkpoint import empty_parameters, load_model, load_state_into
from ldm.data.dreambooth import DreamBoothDataset, format_prompt
from ldm.modules.ema import LitEma
from ldm.train import distributed
from ldm.train.batches import LatentCache, PositionDataset, PositionSampler, stack_batch
from ldm.train.config import uses_prior
from ldm.train.distributed import DistEnv
from ldm.train.evaluation import Validation
from ldm.train.logger import RunLogger
from ldm.train.lora import load_adapters, resumed_weights
from ldm.train.optim import build_optimizer, build_scheduler, effective_lr
from ldm.train.prior import missing_indices, sample_class_images
from ldm.train.state import ema_entries, set_rng_state
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
    if resume is not None:
        with empty_parameters():
            model = instantiate_from_config(cfg.model)
        load_state_into(model, resumed_weights(resume.source, resume.extras), path=resume.path)
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
        class_prompt = format_prompt(dc.class_template, dc.token, dc.class_word)
        todo = missing_indices(Path(dc.class_root), cfg.prior.num_class_images)
        distributed.barrier(env)  # every rank has listed the folder before any rank writes
        wrote = sample_class_images(
            model, dc.class_root, class_prompt, cfg.prior, dc.size, tc.precision,
            todo[env.rank :: env.world_size], progress=env.is_main,
        )  # fmt: skip
        distributed.barrier(env)
        if wrote:
            logger.message(f"sampled {wrote} class images into {dc.class_root} (rank {env.rank})")
    token_ids = identifier_token_ids(model, dc.token)
    groups = configure_trainable(model, tc.trainable, token_ids, tc.lora, tc.seed)
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
    latent_shape = model.latent_shape(cfg.data.size, cfg.data.size)
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


def restore(resume: Resume, model, optimizer, scheduler, scaler, ema, text_ema) -> TrainState:
    """Put the adapters, optimizer, schedules and EMA back where the checkpoint left them (the
    RNG comes last, in `setup`)."""
    extras = resume.extras
    if extras.get("lora") is not None:
        load_adapters(model, extras["lora"]["adapters"], resume.path)
    optimizer.load_state_dict(extras["optimizer"])
    scheduler.load_state_dict(extras["lr_scheduler"])
    scaler.load_state_dict(extras["scaler"])
    if ema is not None:
        lora = extras.get("lora")
        ema.load_state_dict(lora["unet_ema"] if lora else ema_entries(resume.source))
    if text_ema is not None:
        text_ema.load_state_dict(extras["text_encoder_ema"])
    return TrainState(**extras["train_state"])


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
    cond_of: object  # per-kind batch size -> conditioning
    kinds: tuple[str, ...]
    ema: LitEma | None
    text_ema: LitEma | None
    validation: Validation | None
    frozen_state: dict
    state: TrainState


def setup(
    cfg, env: DistEnv, resume: Resume | None, unsafe_load: bool, logger: RunLogger
) -> Session:
    tc = cfg.train
    torch.manual_seed(tc.seed + env.rank)  # rank-offset; per-sample draws are keyed instead
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(cfg, resume, unsafe_load)
    dataset, cache, groups, frozen_state = prepare(cfg, env, model, resume, logger)
    kinds = ("instance", "class") if dataset.with_prior else ("instance",)
    cond_of = conditioning(model, dataset, kinds, cfg, env.device)
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
    state = TrainState()
    if resume:
        state = restore(resume, model, optimizer, scheduler, scaler, ema, text_ema)

    if tc.fused_backward and env.is_distributed:
        raise TrainingError("train.fused_backward is single-process: DDP must see whole gradients")
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
    if resume:
        # Last: starting the loader draws from the global RNG, which LoRA's dropout uses.
        set_rng_state(resume.extras["rng"])
    return Session(
        model, ddp, optimizer, scheduler, scaler, trained_parameters(model), batches, cond_of,
        kinds, ema, text_ema, validation, frozen_state, state,
    )  # fmt: skip
