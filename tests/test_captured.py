"""The captured training step and sampler (train.capture) on the CPU: CUDA graphs cannot run
here, so these tests run the captured step's own code eagerly (`graphs=False`, through the same
static buffers and device-side decisions) against the eager step, and check the fallbacks."""

import re
import subprocess

import pytest
import torch

from ldm.sample import generate, seeded_noise
from ldm.train.captured import CapturedStep, capture_unavailable
from ldm.train.distributed import DistEnv
from ldm.train.logger import RunLogger
from ldm.train.loop import train_step
from ldm.train.optim import lr_lambda
from ldm.train.setup import DreamBoothLoss, setup

from .conftest import ROOT
from .train_helpers import CPU, run, small_config

CUDA = torch.device("cuda")  # a device name only: nothing runs on it


def eager_and_captured(cfg):
    """Two sessions that start identical: one steps eagerly, one through the captured step."""
    eager = setup(cfg, CPU, None, False, RunLogger(None, 0, cfg.train.max_steps))
    captured = setup(cfg, CPU, None, False, RunLogger(None, 0, cfg.train.max_steps))
    captured.captured = CapturedStep(captured, cfg, CPU, graphs=False)
    return eager, captured


def trained(session) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in session.model.model.state_dict().items()}


def poison_second_step(monkeypatch) -> None:
    """Each session's second forward returns inf losses (its gradients are then non-finite)."""
    forward, calls = DreamBoothLoss.forward, {}

    def poisoned(self, *args):
        calls[id(self)] = calls.get(id(self), 0) + 1
        out = forward(self, *args)
        return out * float("inf") if calls[id(self)] == 2 else out

    monkeypatch.setattr(DreamBoothLoss, "forward", poisoned)


@pytest.mark.parametrize(
    "precision, trainable", [("32", "[unet]"), ("16", "[unet]"), ("32", "[lora,text_encoder_lora]")]
)
def test_device_side_skip_gives_the_host_side_result(class_root, monkeypatch, precision, trainable):
    cfg = small_config(
        class_root,
        f"train.precision={precision}",
        f"train.trainable={trainable}",
        "train.ema.enabled=true",
    )
    poison_second_step(monkeypatch)
    eager, captured = eager_and_captured(cfg)
    weights = []
    for _ in range(3):
        host, device = train_step(eager, cfg, CPU), train_step(captured, cfg, CPU)
        for key in ("loss_instance", "loss_prior", "grad_norm"):
            assert torch.equal(host[key], device[key]) or not torch.isfinite(host[key])
        assert host["skipped"] == device["skipped"]
        weights.append(trained(captured))
        assert all(torch.equal(v, trained(eager)[k]) for k, v in weights[-1].items())
    assert captured.state.skipped_steps == eager.state.skipped_steps == 1
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # skipped
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
    for p_eager, p_captured in zip(eager.params, captured.params):
        a, b = eager.optimizer.state[p_eager], captured.optimizer.state[p_captured]
        assert torch.equal(a["step"], b["step"]) and torch.equal(a["exp_avg"], b["exp_avg"])
    assert torch.equal(eager.ema.num_updates, captured.ema.num_updates)  # no EMA update either
    # The groups hold plain floats again: the scheduler and checkpoints see no tensor.
    assert all(isinstance(g["lr"], float) for g in captured.optimizer.param_groups)


def test_the_lr_tensor_follows_the_schedule(class_root):
    cfg = small_config(
        class_root,
        "train.max_steps=5",
        "train.lr_schedule=cosine",
        "train.warmup_steps=2",
        "train.min_lr_ratio=0.1",
    )
    eager, captured = eager_and_captured(cfg)
    factor = lr_lambda(cfg.train)
    for step in range(5):
        host, device = train_step(eager, cfg, CPU), train_step(captured, cfg, CPU)
        expected = cfg.train.lr * factor(step)
        assert host["lr"] == device["lr"] == pytest.approx(expected, rel=1e-12)
        assert captured.captured.lrs[0].item() == pytest.approx(expected, rel=1e-6)
    assert all(torch.equal(v, trained(eager)[k]) for k, v in trained(captured).items())


def test_the_switch_falls_back_on_the_cpu_and_says_so_once(tmp_path, class_root, capsys):
    cfg = small_config(class_root, "train.capture=true", "train.max_steps=2")
    state, _ = run(cfg, tmp_path)
    assert state.step == 2
    message = "train.capture: no CUDA device (cpu): CUDA graphs need one; the training step runs"
    assert capsys.readouterr().out.count(message) == 1


def test_capture_says_why_it_does_not_apply(class_root):
    one_gpu = DistEnv(0, 0, 1, CUDA)
    assert capture_unavailable(small_config(class_root), one_gpu) is None
    assert "CUDA" in capture_unavailable(small_config(class_root), CPU)
    assert "DDP" in capture_unavailable(small_config(class_root), DistEnv(0, 0, 2, CUDA))
    fused = small_config(class_root, "train.fused_backward=true", "train.grad_clip=0")
    assert "fused_backward" in capture_unavailable(fused, one_gpu)
    eight_bit = small_config(class_root, "train.optimizer=adamw8bit")
    assert "adamw8bit" in capture_unavailable(eight_bit, one_gpu)


def test_captured_sampling_without_cuda_is_the_plain_sampler(tiny_v1):
    x_T = seeded_noise([0, 1], (4, 8, 8))
    prompts = ["a photo of sks dog", "a photo of dog"]
    plain = generate(tiny_v1, prompts, x_T, ddim_steps=3, precision="full")
    captured = generate(tiny_v1, prompts, x_T, ddim_steps=3, precision="full", capture=True)
    assert torch.equal(plain, captured)


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    """The one GPU script, --tiny: every kind of job it runs on a GPU, so it cannot rot."""
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--tiny", "--log", str(tmp_path / "log")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:5]]
        for line in done.stdout.splitlines()
        if line.startswith("| ") and "|---" not in line
    }
    number = r"[0-9.]+ \([0-9.]+\)"  # a value and its peak memory
    eager, captured, diffusers = rows["train s/step (peak GiB): bf16, 32 px"]
    assert re.fullmatch(number, eager)
    assert re.fullmatch(number + r" eager \[1\]", captured)  # the CPU falls back, and says so
    assert "[1] capture off (no CUDA device (cpu)" in done.stdout
    assert re.fullmatch(number, rows["train s/step (peak GiB): bf16 +text lean, 32 px"][0])
    for key in ("sample s/image", "class images/s"):
        cells = next(v for k, v in rows.items() if k.startswith(key))
        assert all(re.fullmatch(number, c) for c in cells[:2]), cells
    solver = rows["class images/s (peak GiB): batch 2, 2 DPM-Solver++ steps + guidance, 64 px"]
    assert re.fullmatch(number, solver[1]), solver  # the fine-tuning configs' sampler
    subject = next(v for k, v in rows.items() if k.startswith("time to trained subject"))
    assert re.fullmatch(r"[0-9]+ \([0-9]+\)", subject[1])  # total (class images)
    assert diffusers == "no diffusers" or re.fullmatch(number, diffusers)
    # The same run eagerly and "captured" (eager on the CPU): their losses agree exactly.
    equal = next(v for k, v in rows.items() if k.startswith("captured vs eager"))
    assert equal == ["-", "0.0e+00", "-"]
    assert "failed" not in done.stdout and "unreadable" not in done.stdout, done.stdout
