"""scripts/sweep.py and the runner it shares with ablate.py (scripts/runner.py): grids and run
names, a sweep of the tiny demo that is stopped, restarted and rerun, failing combinations, GPU
workers in their own processes, and the GPU queue."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from ldm.eval.report import METRICS
from ldm.train import loop
from scripts import runner, sweep, targets

from .conftest import ROOT
from .test_eval_metrics import evaluator, tiny_clip_arch  # noqa: F401 (fixtures)
from .train_helpers import TINY, metrics, small_overrides

DOG_PHOTOS = ROOT / "data" / "demo" / "dog"


def test_grid_combinations_and_run_names():
    axes = sweep.parse_grid(["train.lr=1e-6,5e-6", "train.trainable=[unet],[unet,text_encoder]"])
    assert axes == [
        ("train.lr", ["1e-6", "5e-6"]),
        ("train.trainable", ["[unet]", "[unet,text_encoder]"]),
    ]
    combos = sweep.combinations(axes, None, seed=0)
    assert [sweep.run_name(c) for c in combos] == [
        "lr=1e-6_trainable=unet",
        "lr=1e-6_trainable=unet+text_encoder",
        "lr=5e-6_trainable=unet",
        "lr=5e-6_trainable=unet+text_encoder",
    ]
    # Keys that share their last part keep the whole key.
    assert sweep.run_name([("train.ema.decay", "0.9"), ("x.decay", "a b/c")]) == (
        "train.ema.decay=0.9_x.decay=a-b-c"
    )
    drawn = sweep.combinations(axes, 2, seed=3)
    assert drawn == sweep.combinations(axes, 2, seed=3)  # a rerun draws the same runs
    assert len(drawn) == 2 and drawn == [c for c in combos if c in drawn]
    assert sweep.combinations(axes, 9, seed=0) == combos
    for bad in (["train.lr"], ["train.lr=1,,2"], ["train.lr=1", "train.lr=2"]):
        with pytest.raises(ValueError, match="--grid"):
            sweep.parse_grid(bad)


def sweep_argv(out: Path, class_root: Path, grid: list[str], *extra: str) -> list[str]:
    # The overrides follow -b, which swallows them: sweep.py hands them back as main.py does.
    return ["-b", str(TINY), *small_overrides(class_root), "--out", str(out), *extra,
            "--grid", *grid]  # fmt: skip


def table_rows(printed: str) -> list[str]:
    lines = [line for line in printed.splitlines() if line.startswith("| ")]
    return lines[1:]  # after the header


def test_sweep_is_stopped_restarted_and_skips_finished_runs(
    tmp_path, class_root, monkeypatch, capsys
):
    out = tmp_path / "sweep"
    argv = sweep_argv(out, class_root, ["train.lr=1e-3,2e-3", "data.flip_p=0.0,0.5"])
    names = ["lr=1e-3_flip_p=0.0", "lr=1e-3_flip_p=0.5", "lr=2e-3_flip_p=0.0", "lr=2e-3_flip_p=0.5"]
    periodic = loop.periodic

    def stop_the_second_run(cfg, env, run, session, *args):
        if run.root.name.endswith(names[1]) and session.state.step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return periodic(cfg, env, run, session, *args)

    monkeypatch.setattr(loop, "periodic", stop_the_second_run)
    assert sweep.main(argv) == 0  # a stop is not a failure
    assert "stopped; rerun the same command" in capsys.readouterr().err
    rows = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["name"] for r in rows] == names
    assert [r["status"] for r in rows] == ["done", "stopped", "not run", "not run"]
    (stopped,) = (out / "runs" / names[1]).iterdir()
    assert stopped.name.endswith("_" + names[1])

    monkeypatch.setattr(loop, "periodic", periodic)
    assert sweep.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{names[0]}: trained (3 steps)" in printed
    assert list((out / "runs" / names[1]).iterdir()) == [stopped]  # resumed in its folder
    assert len(metrics(stopped)) == 3
    rows = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in rows] == ["done"] * 4
    for row in rows:
        run = Path(row["run"])
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 3
        assert ckpt["config"]["train"]["lr"] == float(row["labels"]["train.lr"])
        assert ckpt["config"]["data"]["flip_p"] == float(row["labels"]["data.flip_p"])
        assert row["summary"]["train/loss"] == float(metrics(run)[-1]["loss"])
    table = table_rows(printed)
    assert len(table) == 4
    assert table[3].startswith("| 2e-3 | 0.5 | done | 3 | ")
    assert f"{rows[3]['summary']['train/loss']:.4f}" in table[3]
    assert (out / "sweep.md").read_text().strip() in printed

    # A rerun trains nothing and prints the same table.
    monkeypatch.setattr(runner.train_main, "main", None)
    assert sweep.main(argv) == 0
    assert table_rows(capsys.readouterr().out) == table

    # A run folder trained with other settings is refused, not taken as finished.
    changed = [a.replace("data.size=32", "data.size=64") for a in argv]
    assert sweep.main(changed) == 1
    assert "was trained with other settings (data.size)" in capsys.readouterr().err


def test_failing_combinations_are_reported_and_the_others_run(tmp_path, class_root, capsys):
    out = tmp_path / "sweep"
    grid = [f"data.instance_root=nowhere,{DOG_PHOTOS}", "train.precision=32,64"]
    assert sweep.main(sweep_argv(out, class_root, grid, "train.max_steps=1")) == 1
    rows = json.loads((out / "sweep.json").read_text())["runs"]
    statuses = [(r["labels"]["data.instance_root"], r["labels"]["train.precision"], r["status"])
                for r in rows]  # fmt: skip
    assert statuses == [
        ("nowhere", "32", "failed"),  # fails in main.py: no such folder
        ("nowhere", "64", "config error"),  # never starts
        (str(DOG_PHOTOS), "32", "done"),
        (str(DOG_PHOTOS), "64", "config error"),
    ]
    err = capsys.readouterr().err
    assert "train.precision='64'" in err
    failed = err.splitlines()[-1]
    assert failed.startswith("sweep.py: failed: ") and failed.count("instance_root=") == 3


def test_sweep_evaluates_each_run(tmp_path, class_root, evaluator, capsys):  # noqa: F811
    out = tmp_path / "sweep"
    tiny = ["--num_prompts", "1", "--n_samples", "2", "--n_class_images", "1", "--ddim_steps", "2"]
    target = ["--real_dir", str(DOG_PHOTOS), "--class_word", "dog", *tiny, "--device", "cpu"]
    argv = sweep_argv(out, class_root, ["train.seed=1"], "train.max_steps=1", "--evaluate", *target)
    assert sweep.main(argv, evaluator) == 0
    (row,) = json.loads((out / "sweep.json").read_text())["runs"]
    report = json.loads((Path(row["run"]) / "eval" / "last" / "dog" / "report.json").read_text())
    assert {k: row["summary"][f"eval/{k}"] for k in report["metrics"]} == report["metrics"]
    (line,) = table_rows((out / "sweep.md").read_text())  # the printout has evaluate.py's too
    assert (out / "sweep.md").read_text().strip() in capsys.readouterr().out
    assert line.endswith(" | ".join(f"{report['metrics'][k]:.4f}" for k in METRICS) + " |")

    # Evaluation flags without --evaluate, or --evaluate without a target: one line, no run.
    assert sweep.main(sweep_argv(out, class_root, ["train.seed=2"], *target)) == 1
    assert sweep.main(sweep_argv(out, class_root, ["train.seed=2"], "--evaluate", *tiny)) == 1
    assert sweep.main(sweep_argv(out, class_root, ["train.seed=2"], *target[:4])) == 1
    err = capsys.readouterr().err.splitlines()
    assert "need --evaluate" in err[0] and "--real_dir with --class_word" in err[1]
    assert err[2].endswith(
        "need --evaluate: --subject, --dreambench_root, --real_dir, --class_word"
    )
    assert not (out / "runs" / "seed=2").exists()


def test_gpu_workers_run_each_job_in_its_own_process(tmp_path, class_root, capsys):
    """The --gpus path on the CPU: a worker process per job, which takes its job as JSON."""
    out = tmp_path / "sweep"
    argv = sweep_argv(out, class_root, ["train.seed=5"], "--gpus", "0", "--device", "cpu")
    assert sweep.main([*argv[:-2], "train.max_steps=1", *argv[-2:]]) == 0
    (row,) = json.loads((out / "sweep.json").read_text())["runs"]
    assert row["status"] == "done" and row["summary"]["step"] == 1
    log = (out / "logs" / "seed=5.log").read_text()
    assert "done at step 1" in log
    assert "GPU 0: seed=5 done" in capsys.readouterr().out


def test_jobs_survive_a_round_trip_through_json(tmp_path):
    """A GPU worker rebuilds its job, target included, from the JSON on its command line."""
    target = targets.DreamBenchTarget(("--n_samples", "2"), root=str(tmp_path), names=("dog",))
    (subject,) = target.subjects(tmp_path)
    args = ([TINY], ["train.max_steps=2"], tmp_path, target, subject, "cpu")
    job = runner.make_job("a/b", [("k", 1)], *args)
    again = runner.job_from_json(runner.job_to_json(job))
    assert again == job and type(again.target) is targets.DreamBenchTarget
    assert job.max_steps == 2 and job.run_name == "a_b" and again.subject.class_word == "dog"
    plain = runner.make_job("c", [], [TINY], [], tmp_path)
    assert runner.job_from_json(runner.job_to_json(plain)) == plain


def queue_job(name: str, root: str | None) -> runner.Job:
    return runner.Job(name, (), (), (), "", max_steps=1, class_root=root, class_images=1)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_gpu_queue_runs_every_job_once_and_never_two_on_a_filling_class_folder(tmp_path):
    jobs = [queue_job(f"v{i}", r) for i, r in enumerate(["a", "a", "a", "b", None, None])]
    spans, lock = [], threading.Lock()

    def launch(job, gpu) -> bool:
        start = time.monotonic()
        time.sleep(0.05)
        with lock:
            spans.append((job, gpu, start, time.monotonic()))
        if job.name == "v5":
            raise RuntimeError("a crashed worker still frees its class folder")
        return job.name != "v3"

    failed = runner.run_queue(jobs, [0, 1, 2], launch)
    assert sorted(j.name for j, *_ in spans) == [j.name for j in jobs]
    assert failed == {"v3", "v5"}
    assert {gpu for _, gpu, *_ in spans} == {0, 1, 2}
    for a, _, start_a, end_a in spans:
        for b, _, start_b, end_b in spans:
            if a is not b and a.class_root is not None and a.class_root == b.class_root:
                assert end_a <= start_b or end_b <= start_a


def test_jobs_share_a_class_folder_once_it_is_full(tmp_path, monkeypatch):
    """Sweeps share one class folder: the others wait only until the first job has filled it."""
    monkeypatch.setattr(runner, "POLL_S", 0.05)
    root = tmp_path / "class"
    jobs = [queue_job(f"v{i}", str(root)) for i in range(3)]
    spans, lock = {}, threading.Lock()

    def launch(job, gpu) -> bool:
        start = time.monotonic()
        if job.name == "v0":  # fills the folder, then trains for a while
            root.mkdir()
            (root / "prior_00000.png").write_bytes(b"")
        time.sleep(0.5 if job.name == "v0" else 0.05)
        with lock:
            spans[job.name] = (start, time.monotonic())
        return True

    assert runner.run_queue(jobs, [0, 1, 2], launch) == set()
    assert spans["v1"][0] < spans["v0"][1] and spans["v2"][0] < spans["v0"][1]
    # After a stop signal no job starts.
    started, stop = [], threading.Event()
    stop.set()
    assert runner.run_queue(jobs, [0, 1], lambda job, gpu: started.append(job), stop) == set()
    assert started == []
