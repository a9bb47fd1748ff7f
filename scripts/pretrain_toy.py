"""Pretrain the toy world's base model from scratch (about 45 minutes on 2 CPU cores).

    python scripts/pretrain_toy.py            # writes models/toy/base.safetensors

1. Render the captioned world (ldm/data/toyworld.py) into WORK/world: PNGs with .txt captions.
2. Train the VAE (ldm/train/autoencoder.py: its loss is not the diffusion loss, so it has a short
   loop of its own) on the world's images and patterned objects, on 32 px crops, then measure its
   reconstruction (PSNR) and the scale factor that makes its latents unit-variance.
3. Write WORK/init.ckpt (the trained VAE, a seeded random UNet and text encoder) and train the
   UNet and text encoder with main.py on the captioned world: configs/toy/base.yaml and
   configs/toy/pretrain.yaml, the same loop and data code as DreamBooth.
4. Export the result as fp16 safetensors with its config (scripts/export.py), and report the
   figures: PSNR, scale factor, time of each phase, and, with the evaluator
   (models/toy/evaluator.safetensors, scripts/train_toy_evaluator.py), the base model's class and
   context accuracy on its own samples.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # main.py and scripts/ sit beside the installed ldm package

import main as train_main  # noqa: E402
from ldm.checkpoint import load_model, load_state_into, read_checkpoint, save_checkpoint  # noqa: E402
from ldm.config_files import read_config_file  # noqa: E402
from ldm.data import toyworld as tw  # noqa: E402
from ldm.data.images import list_images, load_rgb  # noqa: E402
from ldm.eval import toy  # noqa: E402
from ldm.train.autoencoder import evaluate_autoencoder, train_autoencoder  # noqa: E402
from ldm.train.state import RunDir  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402
from scripts import export  # noqa: E402

BASE = ROOT / "configs" / "toy" / "base.yaml"
PRETRAIN = ROOT / "configs" / "toy" / "pretrain.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "models" / "toy" / "base.safetensors"))
    p.add_argument("--work", default="outputs/toy_pretrain", help="world, VAE, run folder")
    p.add_argument("--world", type=int, default=12000, help="captioned scenes")
    p.add_argument("--vae_steps", type=int, default=1500)
    p.add_argument("--unet_steps", type=int, default=None, help="default: pretrain.yaml's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evaluator", default=str(ROOT / "models" / "toy" / "evaluator.safetensors"))
    p.add_argument("--vae_only", action="store_true", help="stop after the VAE")
    p.add_argument("--photos", action="store_true", help="only rewrite data/toy/<subject>/")
    p.add_argument("overrides", nargs="*", help="key=value for the UNet run (main.py)")
    return p.parse_args(argv)


PHOTO_CONTEXTS = ("grass", "table")  # the subjects' photos; the other contexts are new to them


def write_photos(root: Path = ROOT / "data" / "toy", n: int = 5, seed: int = 0) -> None:
    """data/toy/<subject>/: each subject's n "photos" for DreamBooth (the demo trains on the box)."""
    for name in tw.SUBJECTS:
        tw.write_subject_photos(root / name, name, n, seed, PHOTO_CONTEXTS)


def render_world(folder: Path, n: int, seed: int) -> None:
    """The captioned world, rendered once: a folder that already holds n images is kept."""
    if folder.is_dir() and len(list_images(folder)) == n:
        return
    tw.write_world(folder, n, seed)


def train_vae(opt: argparse.Namespace, model_cfg, world: Path) -> tuple[torch.nn.Module, dict]:
    """The VAE on world images plus patterned objects; returns it with its figures. A VAE that
    WORK/vae.ckpt already holds for the same settings is reused (pretraining resumes there)."""
    vae = instantiate_from_config(model_cfg.params.first_stage_config)
    settings = {"steps": opt.vae_steps, "seed": opt.seed, "world": opt.world,
                "config": OmegaConf.to_container(model_cfg.params.first_stage_config)}  # fmt: skip
    saved = Path(opt.work) / "vae.ckpt"
    if saved.is_file():
        _, extras = read_checkpoint(saved)
        if extras.get("settings") == settings:
            load_state_into(vae, read_checkpoint(saved)[0], path=saved)
            return vae.eval(), extras["figures"]
    images = [tw.as_tensor(load_rgb(p)) for p in list_images(world)]
    images += [
        tw.as_tensor(tw.render(tw.patterned_scene(opt.seed, i))) for i in range(opt.world // 3)
    ]
    pool = torch.stack(images)
    held_out = torch.stack(
        [tw.as_tensor(tw.render(tw.scene(opt.seed + 1, i))) for i in range(256)]
        + [
            tw.as_tensor(tw.render(s))
            for name in tw.SUBJECTS
            for s in tw.subject_scenes(name, 32, 7)
        ]
    )

    def log(row: dict) -> None:
        print(f"vae step {row['step']}: rec {row['rec']:.4f} ({row['seconds']:.0f} s)", flush=True)

    torch.manual_seed(opt.seed)
    vae = instantiate_from_config(model_cfg.params.first_stage_config)
    train_autoencoder(vae, pool, opt.vae_steps, batch_size=32, crop=32, seed=opt.seed,
                      precision="bf16", log=log, log_every=250)  # fmt: skip
    figures = evaluate_autoencoder(vae, held_out)
    save_checkpoint(
        {"state_dict": vae.state_dict(), "settings": settings, "figures": figures}, saved
    )
    return vae, figures


def init_checkpoint(path: Path, model_cfg, vae: torch.nn.Module, seed: int) -> None:
    """The trained VAE beside a seeded random UNet and text encoder, in the SD layout."""
    torch.manual_seed(seed)
    model = instantiate_from_config(model_cfg)
    model.first_stage_model.load_state_dict(vae.state_dict())
    save_checkpoint({"state_dict": model.state_dict()}, path)


def main(argv: list[str] | None = None) -> int:
    opt = parse_args(argv)
    if opt.photos:
        write_photos()
        return 0
    work = Path(opt.work)
    figures: dict = {}
    start = time.perf_counter()
    render_world(work / "world", opt.world, opt.seed)
    figures["render_s"] = time.perf_counter() - start

    model_cfg = read_config_file(BASE).model
    vae, vae_figures = train_vae(opt, model_cfg, work / "world")
    figures.update(vae=vae_figures, vae_s=time.perf_counter() - start - figures["render_s"])
    scale = round(1.0 / vae_figures["latent_std"], 5)
    model_cfg.params.scale_factor = scale
    print(f"VAE: PSNR {vae_figures['psnr']:.2f} dB, scale_factor {scale}", flush=True)
    if opt.vae_only:
        return 0
    init_checkpoint(work / "init.ckpt", model_cfg, vae, opt.seed)

    unet_start = time.perf_counter()
    logdir = work / "runs"
    args = ["-b", str(BASE), str(PRETRAIN), "-t", "-l", str(logdir), "-n", "pretrain"]
    args += ["--actual_resume", str(work / "init.ckpt"), f"model.params.scale_factor={scale}"]
    args += [f"data.instance_root={work / 'world'}", f"train.seed={opt.seed}"]
    if opt.unet_steps:
        args.append(f"train.max_steps={opt.unet_steps}")
    if train_main.main(args + opt.overrides) != 0:
        return 1
    run = sorted(logdir.glob("*_pretrain"))[-1]
    figures["unet_s"] = time.perf_counter() - unet_start
    if export.main(["--ckpt", str(RunDir(run).last), "--out", opt.out, "--half"]) != 0:
        return 1
    figures["total_s"] = time.perf_counter() - start
    if Path(opt.evaluator).is_file():  # the base's own samples, read by the evaluator
        model = load_model(model_cfg, opt.out)[0].float().eval()
        base = toy.evaluate_base(model, toy.load_toy_evaluator(opt.evaluator), seed=opt.seed)
        figures["base"] = {k: round(v, 3) for k, v in base.items()}
    print(json.dumps(figures, indent=2))
    print(f"scale_factor {scale}: configs/toy/base.yaml must say the same")
    return 0


if __name__ == "__main__":
    sys.exit(main())
