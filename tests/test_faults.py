"""Honest users' mistakes and ordinary environment faults: each is one line and exit code 1 (or a
defined behaviour), never a traceback; an internal bug keeps its traceback."""

import os
import signal
import threading

import pytest
import torch

import main
from ldm.checkpoint import SaveError, save_checkpoint
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.train import prior, saving
from ldm.train.distributed import DistEnv
from ldm.train.logger import RunLogger
from ldm.train.optim import effective_lr
from ldm.train.setup import Resume, restore, restore_rng, setup
from ldm.train.state import rng_state

from .train_helpers import CPU, TINY, run, small_config, small_overrides


def one_line_error(capsys, argv: list[str]) -> str:
    assert main.main(argv) == 1, argv
    err = capsys.readouterr().err
    # The last line; libraries may warn before it (torch's pytree, once, on some imports).
    assert "Traceback" not in err and err.endswith("\n"), (argv, err)
    last = err.splitlines()[-1]
    assert last.startswith("error: "), (argv, err)
    return last


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.eps=0", "train.eps=0.0"),
        ("train.betas=[0.9,1.0]", "train.betas"),
        ("train.keep_last=-1", "train.keep_last=-1"),
        ("train.save_every=-1", "train.save_every=-1"),
        ("train.lr=-1", "train.lr=-1.0"),
        ("prior.ddim_steps=2000", "prior.ddim_steps=2000"),
        ("data.size=72", "data.size=72: this model takes image sides that are multiples of 16"),
        ("data.instance_template='a photo of {class}'", "has no {token}"),
        ("--token=", "data.token is empty"),
        ("model.base_learning_rate=1e-4", "train.lr (and train.scale_lr) does the job"),
        ("model.params.use_ema=false", "train.ema.enabled does the job"),
        ("model.params.cond_stage_config.params.freeze=true", "train.trainable does the job"),
    ],
)
def test_bad_values_and_ignored_keys_are_one_line_naming_the_key(capsys, override, needle):
    extra = ["train.trainable=[token_embedding]"] if override.startswith("--token") else []
    assert needle in one_line_error(capsys, ["-b", str(TINY), override, *extra])


def test_environment_faults_are_one_line(tmp_path, class_root, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    base = ["-b", str(TINY), "-t", "-l", str(tmp_path / "logs")]
    small = small_overrides(class_root)
    err = one_line_error(capsys, [*base, "--reg_data_root", str(afile), *small[:1]])
    assert "afile: not a folder" in err
    err = one_line_error(capsys, ["-b", str(TINY), "-t", "-l", str(afile / "logs"), *small])
    assert "cannot create a run folder" in err
    vae_typo = "model.params.first_stage_config.params.ddconfig.num_res_block=2"
    err = one_line_error(capsys, [*base, *small, vae_typo])
    assert "error: model:" in err and "num_res_block" in err
    if not torch.cuda.is_available():
        assert "CUDA device 0 is not available" in one_line_error(
            capsys, [*base, *small, "--device", "cuda"]
        )
        assert "--gpus 0,1: no CUDA device 0" in one_line_error(
            capsys, [*base, *small, "--gpus", "0,1"]
        )
    monkeypatch.setattr(
        "ldm.checkpoint.shutil.disk_usage", lambda path: type("U", (), {"free": 1000})()
    )
    err = one_line_error(capsys, [*base, *small])
    assert "last.ckpt: not enough disk space: it needs" in err


def test_a_failed_background_save_stops_the_run_at_the_next_save_point(
    tmp_path, class_root, capsys, monkeypatch
):
    """train.async_save: the step-2 save fails in its thread; the step-3 (final) save, written in
    the loop, would succeed, but the run ends with the background write's one line."""

    def failing_in_the_background(payload, path, real=saving.save_checkpoint):
        if threading.current_thread().name == "checkpoints":
            raise SaveError(f"{path}: not enough disk space (in the background)")
        real(payload, path)

    monkeypatch.setattr(saving, "save_checkpoint", failing_in_the_background)
    argv = ["-b", str(TINY), "-t", "-l", str(tmp_path / "logs"), *small_overrides(class_root)]
    err = one_line_error(capsys, [*argv, "train.async_save=true", "train.save_every=2"])
    assert "last.ckpt: not enough disk space (in the background)" in err


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_checkpoint({"w": torch.zeros(10)}, path)
    monkeypatch.setattr(
        "ldm.checkpoint.shutil.disk_usage", lambda p: type("U", (), {"free": 100})()
    )
    with pytest.raises(SaveError, match=r"last.ckpt: not enough disk space: it needs 0.00 GB"):
        save_checkpoint({"w": torch.ones(1000)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(10))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_empty_class_word_and_token_flags_are_empty_strings(capsys):
    assert main.main(["-b", str(TINY), "--class_word", "", "--token", ""]) == 0
    out = capsys.readouterr().out
    assert "class_word: ''" in out and "token: ''" in out


def test_an_internal_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(main, "train", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        main.main(["-b", str(TINY), "-t", "-l", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []  # nor does it leave a run folder


def test_sigterm_during_class_image_sampling_exits_0_with_a_line(tmp_path, capsys, monkeypatch):
    generate = prior.generate

    def generate_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return generate(*args, **kwargs)

    monkeypatch.setattr(prior, "generate", generate_then_sigterm)
    class_root = tmp_path / "class"
    extra = ("prior.num_class_images=4", "prior.batch_size=1")
    assert (
        main.main(
            [
                "-b",
                str(TINY),
                "-t",
                "-l",
                str(tmp_path / "logs"),
                *small_overrides(class_root, *extra),
            ]
        )
        == 0
    )
    assert "stop signal during class-image sampling" in capsys.readouterr().out
    assert len(list(class_root.glob("prior_*.png"))) == 1  # the batch under way is finished
    assert list((tmp_path / "logs").iterdir()) == []  # no checkpoint: no run folder


def test_sigterm_while_caching_latents_exits_0_before_the_first_step(
    tmp_path, capsys, monkeypatch, class_root
):
    encode = LatentDiffusion.encode_first_stage

    def encode_then_sigterm(self, x):
        os.kill(os.getpid(), signal.SIGTERM)
        return encode(self, x)

    monkeypatch.setattr(LatentDiffusion, "encode_first_stage", encode_then_sigterm)
    args = ["-b", str(TINY), "-t", "-l", str(tmp_path / "logs"), *small_overrides(class_root)]
    assert main.main(args) == 0
    assert "stop signal while caching latents" in capsys.readouterr().out
    assert list((tmp_path / "logs").iterdir()) == []  # no step, no checkpoint: no run folder


def test_center_crop_off_trains_and_validates_on_center_crops(tmp_path, class_root):
    cfg = small_config(
        class_root, "data.center_crop=false", "train.val_every=1", "train.max_steps=1"
    )
    state, folder = run(cfg, tmp_path)
    assert state.step == 1 and state.best_val < float("inf")
    assert (folder.checkpoints / "best.ckpt").exists()


def test_resume_details_ema_trainable_lr_and_rng(tmp_path, class_root, capsys):
    assert main.main(
        ["-b", str(TINY), "-t", "-l", str(tmp_path),
         *small_overrides(class_root, "train.max_steps=1", "train.scale_lr=true")]
    ) == 0  # fmt: skip
    (folder,) = tmp_path.iterdir()
    more = "train.max_steps=2"
    err = one_line_error(
        capsys, ["-r", str(folder), "-t", more, "train.trainable=[unet,text_encoder]"]
    )
    assert "train.trainable: ['unet', 'text_encoder'] now, ['unet'] in" in err
    assert "--actual_resume" in err
    err = one_line_error(capsys, ["-r", str(folder), "-t"])
    assert "train.max_steps=1: the checkpoint is at step 1 already" in err
    assert main.main(["-r", str(folder), "-t", more, "train.ema.enabled=true"]) == 0
    assert "has no UNet EMA; it starts from the weights of step 1" in capsys.readouterr().out
    last = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(k.startswith("model_ema.") for k in last["state_dict"])

    # The same checkpoint resumed by two processes: with scale_lr the lr doubles, said in a line.
    cfg = small_config(class_root, "train.scale_lr=true", "train.max_steps=3")
    lines = []
    logger = RunLogger(None, 0, 3)
    logger.message = lines.append
    session = setup(cfg, CPU, None, False, logger)
    extras = {k: v for k, v in last.items() if k != "state_dict"}
    two = DistEnv(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
    parts = (session.optimizer, session.scheduler, session.scaler, None, None)
    restore(Resume(str(folder), last["state_dict"], extras), cfg, two, parts, logger)
    lr = effective_lr(cfg.train, 2)
    assert lr == 2 * effective_lr(cfg.train, 1)
    assert [g["lr"] for g in session.optimizer.param_groups] == [lr]
    assert any("continuing with" in line for line in lines)
    assert any("RNG: the checkpoint holds the states of 1 processes" in line for line in lines)


def test_each_rank_gets_its_own_rng_state_back():
    torch.manual_seed(1)
    rank0 = rng_state()
    torch.manual_seed(2)
    rank1 = rng_state()
    expected = torch.rand(3)
    torch.manual_seed(3)
    env = DistEnv(rank=1, local_rank=1, world_size=2, device=torch.device("cpu"))
    restore_rng([rank0, rank1], env, RunLogger(None, 0, 1))
    assert torch.equal(torch.rand(3), expected)
