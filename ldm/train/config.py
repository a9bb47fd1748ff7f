"""The run configuration: YAML files merged in order, then `key.path=value` overrides.

`model` is free-form (it is handed to `instantiate_from_config`); `data`, `prior` and `train` are
checked against the schema below, so a misspelt or unknown key is an error, never a silent default.
This is the one place where training settings and their defaults are defined.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.config_files import read_config_file
from ldm.models.diffusion.captured import SAMPLERS
from ldm.util import ConfigError, size_multiple

TRAINABLE_PARTS = ("unet", "text_encoder", "token_embedding", "lora", "text_encoder_lora")
LOGGERS = ("tensorboard", "wandb")
# Layers LoRA may adapt: in the UNet's transformer blocks, and in the CLIP text encoder's layers.
LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
)
LORA_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "mlp.fc1", "mlp.fc2")


@dataclass
class DataConfig:
    instance_root: str | None = None  # --data_root
    class_root: str | None = None  # --reg_data_root; None turns prior preservation off
    token: str = "sks"  # --token: the rare identifier
    class_word: str | None = None  # --class_word
    instance_template: str = "a photo of {token} {class}"
    class_template: str = "a photo of {class}"
    size: int = 512
    center_crop: bool = True
    flip_p: float = 0.5
    num_workers: int = 2
    captions: bool = False  # each instance image's prompt from its .txt file (text-to-image)
    caption_dropout: float = 0.0  # chance of training a prompt as "" (classifier-free guidance)


@dataclass
class PriorConfig:
    """Class images sampled from the frozen model before training when the folder is short."""

    num_class_images: int = 200
    batch_size: int = 4
    sampler: str = "ddim"  # or dpmpp_2m (DPM-Solver++(2M): 20-25 steps do what DDIM does in 50)
    ddim_steps: int = 50  # sampler steps (UNet calls), whichever the sampler
    scale: float = 7.5
    negative_prompt: str = ""
    seed: int = 0  # image i uses seed + i


@dataclass
class SampleConfig:
    """Sample grids logged during training; prompts are templates with {token} and {class}."""

    every: int = 200  # 0 disables
    at_start: bool = True  # also a grid of the starting weights (step 0), to compare with
    prompts: list[str] = field(
        default_factory=lambda: [
            "a photo of {token} {class}",
            "a photo of {token} {class} on the beach",
            "a photo of {class}",
        ]
    )
    n_per_prompt: int = 2
    sampler: str = "ddim"  # or dpmpp_2m
    ddim_steps: int = 50
    scale: float = 7.5
    seed: int = 0
    use_ema: bool = True  # sample with the EMA weights when EMA is on


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.9999


@dataclass
class WandbConfig:
    """Weights & Biases, when train.loggers has wandb; the run is named after its folder."""

    project: str = "dreambooth"
    entity: str | None = None  # your W&B user or team (default: your default entity)
    group: str | None = None  # e.g. a sweep's name, to compare its runs together
    tags: list[str] = field(default_factory=list)


@dataclass
class LoRAConfig:
    """Low-rank adapters (`train.trainable: [lora]`, plus `text_encoder_lora` for the text
    encoder). Defaults are diffusers' train_dreambooth_lora.py: rank 4, alpha = rank (scale 1),
    no dropout, the UNet attention's q, k, v and output projections, and for the text encoder
    its attention's (kohya's network_dim also defaults to 4; its alpha to 1)."""

    rank: int = 4
    alpha: float | None = None  # None: alpha = rank, i.e. no scaling
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )


@dataclass
class TrainConfig:
    actual_resume: str | None = None  # base weights (--actual_resume)
    use_ema_weights: bool = False  # start from the base file's EMA weights
    max_steps: int = 800
    batch_size: int = 1  # instance images per process and micro-step (plus as many class images)
    accumulate_grad_batches: int = 1
    lr: float = 5.0e-6
    scale_lr: bool = False  # lr x processes x batch_size x accumulate_grad_batches
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1.0e-2
    eps: float = 1.0e-8
    lr_schedule: str = "constant"  # constant | cosine (after warm-up)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float | None = None  # max global grad norm; 0 disables (default 1, 0 if fused)
    precision: str = "bf16"  # 32 | bf16 | 16 (fp16 with a GradScaler)
    trainable: list[str] = field(default_factory=lambda: ["unet"])
    prior_loss_weight: float = 1.0  # lambda; 0 turns prior preservation off
    # "Offset noise": each latent channel's noise shifted by noise_offset * N(0, 1), so x_T's
    # channel means stop telling the model the image's mean colour (0 = the paper's noise)
    noise_offset: float = 0.0
    seed: int = 23
    log_every: int = 10
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])  # and/or wandb
    wandb: WandbConfig = field(default_factory=WandbConfig)
    val_every: int = 100  # 0 disables validation (and best.ckpt)
    val_timesteps: int = 8
    save_every: int = 500  # 0: only last.ckpt at the end
    keep_last: int = 2  # step-numbered checkpoints kept
    lean_fp16: bool = True  # step-numbered and best checkpoints: weights in fp16 (else fp32)
    full_state_steps: bool = False  # step-numbered checkpoints hold the optimizer state too
    # Save points write from a host copy in a background thread (ldm/train/saving.py); None: on CUDA
    async_save: bool | None = None
    max_nonfinite_steps: int = 20  # consecutive skipped steps before the run stops
    ema: EMAConfig = field(default_factory=EMAConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # fast | balanced | lean: the defaults of the switches below left unset (PROFILES); a
    # switch set explicitly wins. The saved config holds the resolved values.
    memory_profile: str = "fast"
    gradient_checkpointing: bool | None = None
    cache_latents: bool = True  # encode images once (needs center_crop)
    cache_text: bool = True  # encode prompts once when the text encoder is frozen
    optimizer: str | None = None  # adamw | adamw8bit (8-bit moments, ldm/train/adamw8bit.py)
    fused_backward: bool | None = None  # optimizer step inside backward, bucket by bucket
    offload_frozen: bool | None = None  # park the cached-away VAE / text encoder (default on)
    channels_last: bool = False
    compile: bool = False
    capture: bool = False  # CUDA graphs: step, class images, grids (unverified: captured.py)


# What each memory profile sets (README, "Memory and speed"): fast holds fp32 AdamW state and all
# gradients; balanced holds 8-bit state and steps inside backward (so no full set of gradients,
# and no global-norm clipping); lean also recomputes activations (gradient checkpointing).
PROFILES = {
    "fast": dict(gradient_checkpointing=False, optimizer="adamw", fused_backward=False),
    "balanced": dict(gradient_checkpointing=False, optimizer="adamw8bit", fused_backward=True),
    "lean": dict(gradient_checkpointing=True, optimizer="adamw8bit", fused_backward=True),
}


@dataclass
class RunSchema:
    model: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def load_config(
    bases: list[str | Path], overrides: list[str] = (), flags: dict | None = None
) -> DictConfig:
    """Merge the schema defaults, the YAML files in order, flag values (dotted keys), then the
    `key.path=value` overrides; validate and return the resolved config."""
    configs = [OmegaConf.structured(RunSchema)]
    configs += [read_config_file(base) for base in bases]  # bounded, no interpolations
    return merge_overrides(configs, overrides, flags)


def merge_overrides(
    configs: list, overrides: list[str] = (), flags: dict | None = None
) -> DictConfig:
    """Merge configs (the first carrying the schema) with flag values and dotlist overrides."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
    try:
        cfg = OmegaConf.merge(*configs)
        # Flag values go in as they are: a dotlist would read `--class_word ''` as null.
        for key, value in (flags or {}).items():
            if value is not None:
                OmegaConf.update(cfg, key, value, merge=True)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"config: {_one_line(e)}") from None
    if cfg.model is None:
        raise ConfigError("config: no 'model' section (pass a base config with -b)")
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Value checks the schema's types cannot express."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config: no value for {', '.join(missing)} (set them with key=value)")
    t = cfg.train
    apply_memory_profile(t)
    bad = [p for p in t.trainable if p not in TRAINABLE_PARTS]
    if bad or not t.trainable:
        raise ConfigError(f"train.trainable: {list(t.trainable)} (choose from {TRAINABLE_PARTS})")
    if "text_encoder" in t.trainable and "token_embedding" in t.trainable:
        raise ConfigError("train.trainable: text_encoder already trains the token embedding")
    if [name for name in t.loggers if name not in LOGGERS] or len(set(t.loggers)) < len(t.loggers):
        raise ConfigError(f"train.loggers: {list(t.loggers)} (choose from {LOGGERS}, each once)")
    for key in ("prior.sampler", "train.sample.sampler"):
        if OmegaConf.select(cfg, key) not in SAMPLERS:
            choices = ", ".join(SAMPLERS)
            raise ConfigError(f"{key}: {OmegaConf.select(cfg, key)!r} (choose from {choices})")
    wrong = [name for name, ok in value_checks(cfg).items() if not ok]
    if wrong:
        values = ", ".join(f"{name}={OmegaConf.select(cfg, name)!r}" for name in wrong)
        raise ConfigError(f"config: invalid value {values}")
    check_model_section(cfg)
    validate_lora(cfg)
    if "token_embedding" in t.trainable and not cfg.data.token.strip():
        raise ConfigError(
            "train.trainable=[token_embedding] trains the identifier: data.token is empty"
        )
    if "{token}" not in cfg.data.instance_template:
        raise ConfigError(
            f"data.instance_template {cfg.data.instance_template!r} has no {{token}}: the "
            "identifier would never be in a prompt"
        )
    if t.fused_backward and not fused_backward_possible(t):
        raise ConfigError(
            "train.fused_backward steps parameters as their gradients arrive: it needs "
            "accumulate_grad_batches=1, grad_clip=0 and a precision other than 16"
        )


def fused_backward_possible(t: DictConfig) -> bool:
    return t.accumulate_grad_batches == 1 and not t.grad_clip and str(t.precision) != "16"


def apply_memory_profile(t: DictConfig) -> None:
    """Fill the switches left unset (None) from `train.memory_profile`."""
    if t.memory_profile not in PROFILES:
        raise ConfigError(
            f"train.memory_profile: {t.memory_profile!r} (choose from {', '.join(PROFILES)})"
        )
    profile = PROFILES[t.memory_profile]
    for key in ("gradient_checkpointing", "optimizer"):
        if t[key] is None:
            t[key] = profile[key]
    if t.fused_backward is None:
        # The profile's choice yields to what rules it out (an explicit grad_clip > 0, ...).
        t.fused_backward = profile["fused_backward"] and fused_backward_possible(t)
    if t.grad_clip is None:
        t.grad_clip = 0.0 if t.fused_backward else 1.0  # clipping needs every gradient at once
    if t.offload_frozen is None:
        t.offload_frozen = True


def value_checks(cfg: DictConfig) -> dict[str, bool]:
    """Each key with a range its type does not express, and whether its value is in it."""
    t, d, p = cfg.train, cfg.data, cfg.prior
    timesteps = OmegaConf.select(cfg, "model.params.timesteps", default=1000)
    return {
        "train.precision": str(t.precision) in ("32", "bf16", "16"),
        "train.lr_schedule": t.lr_schedule in ("constant", "cosine"),
        "train.optimizer": t.optimizer in ("adamw", "adamw8bit"),
        "train.max_steps": t.max_steps > 0,
        "train.batch_size": t.batch_size > 0,
        "train.accumulate_grad_batches": t.accumulate_grad_batches > 0,
        "train.lr": t.lr > 0,
        "train.betas": len(t.betas) == 2 and all(0.0 <= b < 1.0 for b in t.betas),
        "train.eps": t.eps > 0,  # 0 divides 0 by 0 where a row's gradient is masked
        "train.weight_decay": t.weight_decay >= 0,
        "train.warmup_steps": t.warmup_steps >= 0,
        "train.min_lr_ratio": 0.0 <= t.min_lr_ratio <= 1.0,
        "train.grad_clip": t.grad_clip >= 0,
        "train.log_every": t.log_every > 0,
        "train.val_every": t.val_every >= 0,
        "train.val_timesteps": t.val_timesteps > 0,
        "train.save_every": t.save_every >= 0,
        "train.keep_last": t.keep_last >= 0,
        "train.max_nonfinite_steps": t.max_nonfinite_steps > 0,
        "train.ema.decay": 0.0 <= t.ema.decay <= 1.0,
        "train.lora.rank": t.lora.rank > 0,
        "train.lora.alpha": t.lora.alpha is None or t.lora.alpha > 0,
        "train.lora.dropout": 0.0 <= t.lora.dropout < 1.0,
        "train.prior_loss_weight": t.prior_loss_weight >= 0,
        "train.noise_offset": 0.0 <= t.noise_offset < 1.0,
        "train.sample.every": t.sample.every >= 0,
        "train.sample.n_per_prompt": t.sample.n_per_prompt > 0,
        "train.sample.ddim_steps": 0 < t.sample.ddim_steps <= timesteps,
        "data.size": d.size > 0,
        "data.flip_p": 0.0 <= d.flip_p <= 1.0,
        "data.caption_dropout": 0.0 <= d.caption_dropout < 1.0,
        "data.num_workers": d.num_workers >= 0,
        "prior.num_class_images": p.num_class_images >= 0,
        "prior.batch_size": p.batch_size > 0,
        "prior.ddim_steps": 0 < p.ddim_steps <= timesteps,
    }


# Keys of CompVis configs that drove its Lightning training and that nothing here reads, with
# the key that does the job. Inference configs may keep them; a training config may not, or an
# edit to them would silently do nothing.
IGNORED_MODEL_KEYS = {
    "model.base_learning_rate": "train.lr (and train.scale_lr)",
    "model.params.cond_stage_trainable": "train.trainable",
    "model.params.scheduler_config": "train.lr_schedule and train.warmup_steps",
    "model.params.use_ema": "train.ema.enabled",
    "model.params.monitor": "train.val_every (best.ckpt follows the validation loss)",
    "model.params.first_stage_config.params.monitor": "nothing: the VAE never trains",
    "model.params.unet_config.params.use_fp16": "train.precision",
    "model.params.cond_stage_config.params.freeze": "train.trainable",
}


def check_model_section(cfg: DictConfig) -> None:
    """No training knob in the model section that training ignores; a data.size the model takes."""
    for key, instead in IGNORED_MODEL_KEYS.items():
        if OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT:
            raise ConfigError(f"{key} is not read by training: remove it; {instead} does the job")
    multiple = size_multiple(cfg.model)
    if multiple and cfg.data.size % multiple:
        raise ConfigError(
            f"data.size={cfg.data.size}: this model takes image sides that are multiples of "
            f"{multiple} (VAE factor x UNet levels)"
        )


_ABSENT = object()


def validate_lora(cfg: DictConfig) -> None:
    """LoRA parts alone, adapting layers that exist in the model's encoders."""
    t = cfg.train
    parts = set(t.trainable)
    if not parts & {"lora", "text_encoder_lora"}:
        return
    if parts - {"lora", "text_encoder_lora"}:
        raise ConfigError(
            f"train.trainable: {list(t.trainable)}: LoRA trains adapters only; it does not "
            "combine with unet, text_encoder or token_embedding"
        )
    lc = t.lora
    for key, targets, allowed, needed in (
        ("targets", lc.targets, LORA_TARGETS, True),
        ("text_encoder_targets", lc.text_encoder_targets, LORA_TEXT_TARGETS, False),
    ):
        needed = needed or "text_encoder_lora" in parts
        if not set(targets) <= set(allowed) or (needed and not targets):
            raise ConfigError(
                f"config: invalid value train.lora.{key}={list(targets)!r} (choose from {allowed})"
            )
    cond = OmegaConf.select(cfg, "model.params.cond_stage_config.target", default="")
    if "text_encoder_lora" in parts and not str(cond).endswith("FrozenCLIPEmbedder"):
        raise ConfigError(
            "train.trainable: text_encoder_lora needs the CLIP text encoder (SD v1); "
            "OpenCLIP's fused attention (SD v2) has no separate q/k/v layers to adapt"
        )


def uses_prior(cfg: DictConfig) -> bool:
    """Prior preservation is on when there is a class folder and a non-zero weight."""
    return cfg.data.class_root is not None and cfg.train.prior_loss_weight > 0


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_leaves(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config's leaves by dotted key (`train.lr`); a list is one leaf."""
    leaves: dict[str, Any] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            leaves[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return leaves
