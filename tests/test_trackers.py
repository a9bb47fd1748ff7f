"""Experiment tracking: TensorBoard's HParams session and the run summary, Weights & Biases
offline (the same scalars, the config and the sample grids; a resumed run continues the same W&B
run), the one-line error without wandb, and the argument form of a W&B sweep."""

import json
import struct
import sys
import time

import pytest
import yaml
from omegaconf import OmegaConf

import main
from ldm.train.trackers import read_summary, record_evaluation

from .conftest import ROOT
from .train_helpers import TINY, hparams_record, metrics, small_overrides


def train_cli(logdir, class_root, *extra: str) -> int:
    return main.main(
        ["-b", str(TINY), "-t", "-l", str(logdir), *small_overrides(class_root, *extra)]
    )


def only_run(logdir):
    (folder,) = [p for p in logdir.iterdir() if p.is_dir()]
    return folder


def test_tensorboard_hparams_hold_the_config_and_the_final_metrics(tmp_path, class_root):
    extra = ("train.lr=2e-4", "train.val_every=2", "train.trainable=[unet,text_encoder]")
    assert train_cli(tmp_path / "logs", class_root, *extra) == 0
    run = only_run(tmp_path / "logs")
    hparams, scalars, ended = hparams_record(run)
    assert hparams["train.lr"] == 2e-4 and hparams["train.max_steps"] == 3
    assert hparams["train.trainable"] == "[unet, text_encoder]"
    assert hparams["train.ema.enabled"] is False and hparams["data.size"] == 32
    assert hparams["data.class_root"] == str(class_root)
    assert "train.actual_resume" not in hparams  # None: TensorBoard has no null
    summary = read_summary(run)
    rows = metrics(run)
    assert summary["step"] == 3 and summary["train/loss"] == float(rows[-1]["loss"])
    assert summary["val/best_loss"] <= summary["val/loss"]  # validated at steps 2 and 3
    assert scalars == pytest.approx({k: v for k, v in summary.items() if k != "step"})
    assert ended  # the session reached max_steps

    # A resume with more steps: the session shows the new config, and evaluation figures of
    # the replaced last.ckpt leave the summary.
    (run / "summary.json").write_text(json.dumps({**summary, "eval/dino": 0.5}))
    assert main.main(["-r", str(run), "-t", "train.max_steps=4"]) == 0
    hparams, scalars, ended = hparams_record(run)
    assert hparams["train.max_steps"] == 4 and ended
    resumed = read_summary(run)
    assert resumed["step"] == 4 and "eval/dino" not in resumed and "eval/dino" not in scalars
    assert resumed["train/loss"] == float(metrics(run)[-1]["loss"])
    assert resumed["val/best_loss"] == min(summary["val/best_loss"], resumed["val/loss"])


def wandb_records(path) -> list:
    """The protobuf records of an offline W&B run file (a LevelDB-style log: 32 KiB blocks of
    [crc32 4 bytes, length 2 bytes, type 1 byte, data]; types FULL=1, FIRST=2, MIDDLE=3, LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, parts, pos = [], b"", header  # the file header takes a record header's room
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        parts += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def wandb_history(records) -> dict[int, dict]:
    """{step: {key: value}} of the run's logged rows."""
    rows = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items}
            rows.setdefault(row.get("_step", record.history.step.num), {}).update(row)
    return rows


def wandb_config(records) -> dict:
    """The run's config: given at the start, or updated later."""
    config = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({u.key: json.loads(u.value_json) for u in updates})
    return config


def summary_items(records) -> dict[str, str]:
    """The W&B run's summary after its summary records (updates and removals), as JSON text."""
    items = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                items["/".join(item.nested_key) or item.key] = item.value_json
            for item in record.summary.remove:
                items.pop("/".join(item.nested_key) or item.key, None)
    return items


def tensorboard_scalars(folder) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    values = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for raw in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(raw)
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":
                    values[(value.tag, event.step)] = value.simple_value
    return values


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    yield wandb
    wandb.teardown()  # wandb keeps the environment it saw until then


def test_wandb_offline_run_and_resume(tmp_path, class_root, wandb_offline, monkeypatch):
    extra = ["train.loggers=[tensorboard,wandb]", "train.max_steps=2", "train.val_every=2"]
    extra += ["train.sample.every=2", "train.sample.ddim_steps=2", "train.sample.n_per_prompt=1"]
    monkeypatch.setenv("WANDB_RUN_ID", "sweeprun1")  # what a W&B sweep agent sets
    assert train_cli(tmp_path / "logs", class_root, *extra) == 0
    monkeypatch.delenv("WANDB_RUN_ID")
    wandb_offline.teardown()  # as a new process would: the resume below sees no WANDB_RUN_ID
    run = only_run(tmp_path / "logs")
    assert (run / "wandb" / "run_id").read_text().strip() == "sweeprun1"
    # One folder per W&B session, named by the second it began (a second session in the same
    # second gets a "-1" suffix).
    sessions = lambda: set(run.glob("wandb/offline-run-*-sweeprun1*"))  # noqa: E731
    (first,) = sessions()
    records = wandb_records(first / "run-sweeprun1.wandb")
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert start.display_name == run.name and start.project == "dreambooth"
    config = wandb_config(records)
    assert config["train"]["lr"] == 3e-4 and config["data"]["size"] == 32
    assert config["train"]["loggers"] == ["tensorboard", "wandb"]

    # The same scalars as TensorBoard, step by step; the sample grid as an image.
    history = wandb_history(records)
    scalars = tensorboard_scalars(run / "tensorboard")
    assert {tag for tag, _ in scalars} >= {"train/loss", "train/lr", "val/loss"}
    assert sorted(history) == [0, 1, 2]  # 0: the grid of the starting weights (sample.at_start)
    for (tag, step), value in scalars.items():
        assert history[step].get(tag) == pytest.approx(value, rel=1e-6), (tag, step, history)
    assert [history[s]["train/loss"] for s in (1, 2)] == pytest.approx(
        [float(row["loss"]) for row in metrics(run)]
    )
    for step in (0, 2):
        assert history[step]["samples/_type"] == "image-file"
        assert (first / "files" / history[step]["samples/path"]).is_file()

    # An evaluation of last.ckpt (scripts/evaluate.py's path) joins the W&B run's summary.
    cfg = OmegaConf.load(next((run / "configs").glob("*-project.yaml")))
    record_evaluation(run, cfg, {"dino": 0.5})
    (evaluated,) = sessions() - {first}
    # Under load W&B's service process can still be writing the offline log when finish()
    # has returned (seen once in a full-suite run): read it until the summary arrives.
    deadline = time.monotonic() + 20
    while True:
        summary = summary_items(wandb_records(evaluated / "run-sweeprun1.wandb"))
        if "eval/dino" in summary or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert json.loads(summary["eval/dino"]) == 0.5

    # -r continues the same W&B run, from the next step.
    assert main.main(["-r", str(run), "-t", "train.max_steps=3"]) == 0
    (second,) = sessions() - {first, evaluated}
    records = wandb_records(second / "run-sweeprun1.wandb")
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert start.run_id == "sweeprun1" and start.display_name == run.name
    assert sorted(wandb_history(records)) == [3]
    last = summary_items(records)
    assert json.loads(last["step"]) == 3 and "val/best_loss" in last


def test_loggers_are_checked_before_any_work(tmp_path, class_root, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    assert train_cli(tmp_path / "logs", class_root, "train.loggers=[tensorboard,wandb]") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.loggers: wandb is not installed" in err
    assert 'pip install -e ".[wandb]"' in err
    assert not (tmp_path / "logs").exists()  # no run folder was made
    assert train_cli(tmp_path / "logs", class_root, "train.loggers=[mlflow]") == 1
    assert "train.loggers: ['mlflow']" in capsys.readouterr().err


def test_wandb_sweep_arguments_are_main_py_overrides(capsys):
    """The example sweep's command, expanded as W&B's agent does, is a main.py command line."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = yaml.safe_load((ROOT / "configs" / "sweeps" / "wandb_example.yaml").read_text())
    for pick in (0, -1):
        values = {key: p["values"][pick] for key, p in sweep["parameters"].items()}
        macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
        macros.update(env=["/usr/bin/env"], interpreter=["python"], program=[sweep["program"]])
        command = []
        for chunk in sweep["command"]:
            command += macros[chunk[2:-1]] if chunk.startswith("${") else [chunk]
        assert command[:3] == ["/usr/bin/env", "python", "main.py"]
        assert "train.trainable=['unet', 'text_encoder']" in command or pick == 0
        # Without -t, main.py checks the command line and prints the resolved config.
        assert main.main([a for a in command[3:] if a != "-t"]) == 0
        cfg = OmegaConf.to_container(OmegaConf.create(capsys.readouterr().out))
        for key, value in values.items():
            section, name = key.split(".")
            assert cfg[section][name] == value
        assert cfg["train"]["loggers"] == ["tensorboard", "wandb"]
