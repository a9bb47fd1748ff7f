"""DreamBooth fine-tuning of Stable Diffusion.

    python main.py --base configs/dreambooth/v1-finetune_unfrozen.yaml -t \
        --actual_resume sd-v1-5.ckpt -n mydog --data_root photos/ \
        --reg_data_root class_images/ --class_word dog [train.max_steps=400 ...]

Flags follow CompVis / XavierXiao's Dreambooth-Stable-Diffusion; any config key can be set after
them as `key.path=value`. `--gpus 0,1` runs one process per GPU through torchrun, and
`torchrun --nproc_per_node N main.py ...` does the same by hand (and across machines).
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, SaveError, read_checkpoint
from ldm.config_files import config_from_data
from ldm.data.images import DataError, check_image_folder, list_images
from ldm.train import distributed
from ldm.train.config import ConfigError, RunSchema, load_config, merge_overrides, to_yaml
from ldm.train.loop import train
from ldm.train.setup import Resume, Stopped, TrainingError
from ldm.train.state import claim_run_dir, run_dir_of
from ldm.util import check_targets

USER_ERRORS = (
    ConfigError,
    CheckpointError,
    DataError,
    TrainingError,
    SaveError,
    torch.cuda.OutOfMemoryError,
)


def str2bool(value: str) -> bool:
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "-b",
        "--base",
        nargs="*",
        default=[],
        metavar="config.yaml",
        help="configs, merged in order",
    )
    p.add_argument(
        "-t", "--train", action="store_true", help="train (without it: print the resolved config)"
    )
    p.add_argument("-n", "--name", default=None, help="run name (default: the first config's name)")
    p.add_argument("-r", "--resume", default=None, help="a run folder or a checkpoint in one")
    p.add_argument("-l", "--logdir", default="logs", help="folder for run folders")
    p.add_argument("-s", "--seed", type=int, default=None, help="train.seed")
    p.add_argument("--actual_resume", default=None, help="base weights (.ckpt / .safetensors)")
    p.add_argument(
        "--data_root", default=None, help="folder of subject photos (data.instance_root)"
    )
    p.add_argument("--reg_data_root", default=None, help="folder of class images (data.class_root)")
    p.add_argument("--class_word", default=None, help="the class noun, e.g. dog")
    p.add_argument("--token", default=None, help="the identifier (default sks)")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=None,
                   help="lr x processes x batch x accumulation; a bare --scale_lr means true")  # fmt: skip
    p.add_argument("--gpus", default=None, help="GPU ids, e.g. 0,1: one process per GPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--unsafe_load",
        action="store_true",
        help="trust the files: allow arbitrary unpickling and any config target (both run code)",
    )
    return p


def flag_values(args: argparse.Namespace) -> dict:
    """Flags as dotted config keys (unset flags are None and change nothing)."""
    return {
        "train.seed": args.seed,
        "train.actual_resume": args.actual_resume,
        "train.scale_lr": args.scale_lr,
        "data.instance_root": args.data_root,
        "data.class_root": args.reg_data_root,
        "data.class_word": args.class_word,
        "data.token": args.token,
    }


def resolve(args, overrides: list[str]):
    """(config, run folder, resume) for a new run or a resumed one."""
    # -b takes several files, so it swallows overrides that follow it: hand those back.
    overrides = [b for b in args.base if "=" in b] + list(overrides)
    args.base = [b for b in args.base if "=" not in b]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"unrecognised arguments: {' '.join(bad)}")
    if args.resume is None:
        if not args.base:
            raise ConfigError("pass a config with -b/--base (or resume a run with -r)")
        cfg = load_config(args.base, overrides, flag_values(args))
        check_targets(cfg.model, args.unsafe_load)  # before a run folder exists
        return cfg, None, None
    if args.base:
        raise ConfigError("-r resumes with the run's own config; change settings with key=value")
    run, ckpt = run_dir_of(args.resume)
    source, extras = read_checkpoint(ckpt, unsafe_load=args.unsafe_load)
    if "config" not in extras or "train_state" not in extras:
        raise CheckpointError(f"{ckpt}: not a checkpoint of this codebase's training (no config)")
    configs = [
        OmegaConf.structured(RunSchema),
        config_from_data(extras["config"], f"{ckpt}: config"),
    ]
    cfg = merge_overrides(configs, overrides, flag_values(args))
    check_targets(cfg.model, args.unsafe_load)
    return cfg, run, Resume(str(ckpt), source, extras)


def check_data(cfg) -> None:
    """Fail before anything expensive: missing settings, unreadable or missing images."""
    dc = cfg.data
    if dc.instance_root is None:
        raise ConfigError("training needs --data_root")
    if dc.class_word is None and not dc.captions:
        raise ConfigError("training needs --class_word (use '' for no class noun)")
    check_image_folder(dc.instance_root)
    if dc.class_root is not None and Path(dc.class_root).exists():
        if not Path(dc.class_root).is_dir():
            raise DataError(dc.class_root, "not a folder (data.class_root / --reg_data_root)")
        if list_images(dc.class_root):
            check_image_folder(dc.class_root)


def run(args, overrides: list[str]) -> int:
    cfg, run_dir, resume = resolve(args, overrides)
    if not args.train:
        print(to_yaml(cfg), end="")
        print("nothing to do: pass -t to train", file=sys.stderr)
        return 0
    check_data(cfg)
    if resume is not None and resume.extras["global_step"] >= cfg.train.max_steps:
        raise ConfigError(
            f"train.max_steps={cfg.train.max_steps}: the checkpoint is at step "
            f"{resume.extras['global_step']} already (resume with a larger train.max_steps)"
        )
    env = distributed.setup(args.device)
    try:
        if env.is_main and run_dir is None:
            run_dir = claim_run_dir(args.logdir, args.name or Path(args.base[0]).stem)
        run_dir = distributed.broadcast_object(run_dir, env)
        try:
            if env.is_main:
                run_dir.create()
                print(f"run folder: {run_dir.root}", flush=True)
            state = train(cfg, run_dir, env, resume, unsafe_load=args.unsafe_load)
        except BaseException:
            # A new run that failed before its first checkpoint leaves no folder behind.
            if env.is_main and resume is None and not run_dir.has_checkpoints():
                shutil.rmtree(run_dir.root, ignore_errors=True)
            raise
        if env.is_main:
            print(f"done at step {state.step}: {run_dir.last}", flush=True)
    except Stopped as e:
        if env.is_main:
            print(e, flush=True)
    finally:
        distributed.teardown()
    return 0


def without_flag(argv: list[str], flag: str) -> list[str]:
    """argv minus `flag VALUE` / `flag=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(f"{flag}="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parser().parse_known_args(argv)
    try:
        gpus = distributed.parse_gpus(args.gpus, args.device)
        if gpus and "WORLD_SIZE" not in os.environ:
            if len(gpus) > 1:
                return distributed.launch_per_gpu(gpus, [__file__, *without_flag(argv, "--gpus")])
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus[0])
        return run(args, overrides)
    except USER_ERRORS as e:  # bad input or an environment fault: one line; bugs keep tracebacks
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
