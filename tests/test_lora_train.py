"""LoRA DreamBooth: only adapters train, every other tensor stays bitwise as loaded, the training
checkpoint holds merged SD-layout weights and resumes exactly, and the exported kohya file gives
diffusers' `load_lora_weights` the network our adapters make."""

import os

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

import main
from ldm.checkpoint import load_model_from_config, read_checkpoint
from ldm.formats.diffusers import write_diffusers_folder
from ldm.modules.lora import adapters_of_state
from ldm.train.config import ConfigError
from ldm.train.lora import load_adapters, lora_layers
from ldm.train.setup import build_model
from ldm.train.trainable import configure_trainable

from .conftest import CONFIGS, load_script
from .train_helpers import (
    TINY,
    base_checkpoint,
    full_and_resumed_runs,
    one_and_two_processes,
    run,
    scripted_validation,
    small_config,
    small_overrides,
)

export = load_script("export")
LORA = ["train.trainable=[lora,text_encoder_lora]", "train.lr=1e-2", "train.lora.rank=2"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, class_root):
    """A 2-step LoRA run (UNet and text encoder adapters, bf16, EMA, sample grids with the EMA
    at the start and at step 2) from a saved base."""
    root = tmp_path_factory.mktemp("lora_run")
    base = base_checkpoint(root / "base.ckpt", small_config(class_root))
    extra = [*LORA, f"train.actual_resume={base}", "train.max_steps=2", "train.precision=bf16"]
    ema = ["train.ema.enabled=true", "train.ema.decay=0.5"]
    grids = ["train.sample.every=2", "train.sample.ddim_steps=2", "train.sample.n_per_prompt=1"]
    cfg = small_config(class_root, *extra, *ema, *grids)
    _, folder = run(cfg, root / "run")
    return cfg, base, folder


def test_only_adapters_train_and_every_other_tensor_is_bitwise_unchanged(lora_run):
    cfg, base, folder = lora_run
    before = torch.load(base, weights_only=True)["state_dict"]
    last = torch.load(folder.last, weights_only=True)
    state, lora = last["state_dict"], last["lora"]
    assert set(state) == set(before)  # the SD layout, nothing of peft's
    adapters = adapters_of_state(lora["adapters"])
    adapted = {a.key for a in adapters}
    assert any(k.startswith("cond_stage_model.") for k in adapted)
    assert any(k.endswith("attn2.to_out.0.weight") for k in adapted)
    for key, tensor in before.items():
        if key in adapted:
            assert torch.equal(lora["base"][key], tensor), key  # the original kept bitwise
            assert not torch.equal(state[key], tensor), key  # merged: trained adapters moved it
        else:
            assert torch.equal(state[key], tensor), f"non-adapter {key} changed"
    a = adapters[0]
    merged = before[a.key] + (a.alpha / a.rank) * a.up @ a.down
    assert torch.allclose(state[a.key], merged, atol=1e-6)
    assert lora["ema"] is not None and lora["unet_ema"] is not None
    assert not any(k.startswith("model_ema.") for k in state)


def test_sample_grids_use_the_adapters_ema_and_leave_the_live_adapters(lora_run):
    _, _, folder = lora_run
    assert sorted(p.name for p in folder.images.iterdir()) == [
        "step=000000.png",
        "step=000002.png",
    ]
    # The grid at step 2 swapped the EMA in (decay 0.5: it differs from the live adapters) and
    # back out before the checkpoint was saved.
    lora = torch.load(folder.last, weights_only=True)["lora"]
    ups = [k for k in lora["adapters"] if k.endswith("lora_up.weight")]
    assert all(not torch.equal(lora["adapters"][k], lora["ema"][k]) for k in ups)


def test_training_checkpoint_is_the_adapted_model_for_sd_tools(lora_run):
    cfg, base, folder = lora_run
    live = build_model(cfg, None, False)  # the base, with the run's adapters put back
    configure_trainable(live, list(cfg.train.trainable), [], cfg.train.lora, cfg.train.seed)
    load_adapters(live, torch.load(folder.last, weights_only=True)["lora"]["adapters"], "last")
    merged = load_model_from_config(cfg, folder.last)  # strict: plain SD layout
    plain = load_model_from_config(cfg, base)
    x, t = (
        torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)),
        torch.tensor([9, 700]),
    )
    ids = merged.cond_stage_model.tokenize(["a photo of sks dog"] * 2)
    outputs = []
    with torch.no_grad():
        for model in (live.eval(), merged, plain):
            outputs.append(model.apply_model(x, t, model.get_learned_conditioning(ids)))
    assert (outputs[0] - outputs[1]).abs().max() < 1e-5
    assert (outputs[0] - outputs[2]).abs().max() > 1e-2  # the adapters do change the network


def test_export_use_ema_merges_the_adapters_ema_into_the_originals(lora_run, tmp_path):
    _, base, folder = lora_run
    out = tmp_path / "ema.safetensors"
    assert export.main(["--ckpt", str(folder.last), "--out", str(out), "--use_ema"]) == 0
    exported, _ = read_checkpoint(out)
    last = torch.load(folder.last, weights_only=True)
    start = torch.load(base, weights_only=True)["state_dict"]
    averaged = adapters_of_state(last["lora"]["ema"])
    for a in averaged:
        merged = start[a.key] + (a.alpha / a.rank) * a.up @ a.down
        assert torch.allclose(exported[a.key], merged, atol=1e-6), a.key
        assert not torch.equal(exported[a.key], last["state_dict"][a.key])  # not the live ones
    adapted = {a.key for a in averaged}
    assert all(torch.equal(exported[k], v) for k, v in start.items() if k not in adapted)


def test_exported_lora_in_diffusers_gives_our_unet_output(lora_run, tmp_path):
    cfg, base, folder = lora_run
    lora_file = tmp_path / "mydog.safetensors"
    assert (
        export.main(["--ckpt", str(folder.last), "--out", str(lora_file), "--format", "kohya"]) == 0
    )
    with safe_open(lora_file, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
        in keys
    )
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.alpha" in keys
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2.0"
    assert (
        meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.trigger_phrase"] == "sks dog"
    )
    assert os.path.getsize(lora_file) < 200_000

    plain = load_model_from_config(cfg, base)
    write_diffusers_folder(plain.state_dict(), cfg.model, tmp_path / "base")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base", local_files_only=True)
    pipe.load_lora_weights(str(lora_file))
    ours = load_model_from_config(cfg, folder.last)  # the merged adapters
    x, t = (
        torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)),
        torch.tensor([3, 500]),
    )
    ids = ours.cond_stage_model.tokenize(["a photo of sks dog on the beach"] * 2)
    with torch.no_grad():
        c_ours, c_theirs = ours.get_learned_conditioning(ids), pipe.text_encoder(ids)[0]
        e_ours = ours.apply_model(x, t, c_ours)
        e_theirs = pipe.unet(x, t, encoder_hidden_states=c_theirs).sample
        e_base = plain.apply_model(x, t, plain.get_learned_conditioning(ids))
    # float32: merged weights vs diffusers' unmerged adapters, and different attention kernels
    assert (c_ours - c_theirs).abs().max() < 1e-4
    assert (e_ours - e_theirs).abs().max() < 1e-4
    assert (e_ours - e_base).abs().max() > 1e-2


def test_lora_resume_reproduces_the_uninterrupted_run(tmp_path, class_root, monkeypatch):
    base = base_checkpoint(tmp_path / "base.ckpt", small_config(class_root))
    extra = (*LORA, "train.lora.dropout=0.1", "train.ema.enabled=true", "train.max_steps=4",
             "train.save_every=0", f"train.actual_resume={base}")  # fmt: skip
    argv = ["-b", str(TINY), "-t", *small_overrides(class_root, *extra)]
    full, cut = full_and_resumed_runs(tmp_path, argv, monkeypatch)
    a = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    for part in ("adapters", "base", "ema"):
        assert all(torch.equal(a["lora"][part][k], v) for k, v in b["lora"][part].items()), part
    assert all(torch.equal(a["state_dict"][k], v) for k, v in b["state_dict"].items())


def test_lora_parts_are_validated_in_one_line(class_root):
    with pytest.raises(ConfigError, match="does not combine with unet"):
        small_config(class_root, "train.trainable=[lora,unet]")
    with pytest.raises(ConfigError, match=r"train.lora.targets=\['to_x'\]"):
        small_config(class_root, "train.trainable=[lora]", "train.lora.targets=[to_x]")
    from ldm.train.config import load_config

    v2 = [TINY, CONFIGS / "stable-diffusion" / "v2-tiny.yaml"]
    with pytest.raises(ConfigError, match="text_encoder_lora needs the CLIP text encoder"):
        load_config(v2, ["train.trainable=[text_encoder_lora]"])


def test_a_resume_with_another_rank_is_one_line(lora_run, capsys):
    _, _, folder = lora_run
    argv = ["-r", str(folder.root), "-t", "train.max_steps=3", "train.lora.rank=3"]
    assert main.main(argv) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: ") and "adapters are of rank 2, the config's" in last, last


def test_adapters_start_as_a_no_op_and_alike_on_every_rank(class_root):
    cfg = small_config(class_root, "train.trainable=[lora]")
    models = [build_model(cfg, None, False) for _ in range(2)]
    for rank, model in enumerate(models):
        torch.manual_seed(rank)  # setup() seeds each rank differently
        configure_trainable(model, ["lora"], [], cfg.train.lora, cfg.train.seed)
    a, b = (lora_layers(m) for m in models)
    assert set(a) == set(b) and len(a) == 7 * 2 * 4  # 7 transformers, attn1 and attn2, q k v out
    for name in a:
        assert torch.equal(a[name].lora_A["default"].weight, b[name].lora_A["default"].weight)
        assert not a[name].lora_B["default"].weight.any()  # up = 0: the model is unchanged


def test_lean_and_best_checkpoints_hold_their_adapters_and_resume_from_the_originals(
    tmp_path, class_root, monkeypatch
):
    # Best at 3, not a save point: its adapters wait in host memory until step 4 writes them.
    scripted_validation(monkeypatch, {1: 5.0, 2: 4.0, 3: 3.0, 4: 6.0, 5: 7.0})
    base = base_checkpoint(tmp_path / "base.ckpt", small_config(class_root))
    extra = (*LORA, f"train.actual_resume={base}", "train.max_steps=4", "train.save_every=2",
             "train.val_every=1", "train.keep_last=1")  # fmt: skip
    logdir = tmp_path / "runs"
    assert (
        main.main(["-b", str(TINY), "-t", "-l", str(logdir), *small_overrides(class_root, *extra)])
        == 0
    )
    (folder,) = logdir.iterdir()
    ckpts = folder / "checkpoints"
    last, step4, best = (
        torch.load(ckpts / name, weights_only=True)
        for name in ("last.ckpt", "step=000004.ckpt", "best.ckpt")
    )
    start = torch.load(base, weights_only=True)["state_dict"]
    for lean in (step4, best):
        assert set(lean["state_dict"]) == set(start)  # the SD layout
        for a in adapters_of_state(lean["lora"]["adapters"]):
            assert lean["lora"]["base"][a.key].dtype == torch.float16  # lean: fp16 weights
            merged = start[a.key] + (a.alpha / a.rank) * a.up @ a.down
            assert torch.allclose(lean["state_dict"][a.key].float(), merged, atol=2e-3), a.key
    assert best["global_step"] == 3
    step4_adapters = step4["lora"]["adapters"]
    assert all(torch.equal(last["lora"]["adapters"][k], v) for k, v in step4_adapters.items())
    assert not all(torch.equal(best["lora"]["adapters"][k], v) for k, v in step4_adapters.items())
    out = tmp_path / "best.safetensors"
    assert (
        export.main(["--ckpt", str(ckpts / "best.ckpt"), "--out", str(out), "--format", "kohya"])
        == 0
    )

    # A lean resume: the originals from `lora.base` (not the merged weights), the adapters as
    # saved, and a fresh AdamW, whose first step moves each weight by at most lr (the gradient
    # step, g / |g|) + lr * weight_decay * |w| (the decoupled decay).
    assert main.main(["-r", str(ckpts / "step=000004.ckpt"), "-t", "train.max_steps=5"]) == 0
    resumed = torch.load(ckpts / "last.ckpt", weights_only=True)["lora"]
    assert all(torch.equal(resumed["base"][k], v.float()) for k, v in step4["lora"]["base"].items())
    moved = max((resumed["adapters"][k] - v).abs().max() for k, v in step4_adapters.items())
    largest = max(v.abs().max() for v in step4_adapters.values())
    assert 0 < moved <= 1e-2 * (1 + 1e-2 * largest) + 1e-7


def test_text_adapters_only_where_the_conditioning_reaches(class_root):
    # "CLIP skip": the conditioning is layer 0's output (of 2); layer 1 and the final norm are
    # unused, and adapters there would get no gradient, which DDP would wait for.
    clip = "model.params.cond_stage_config.params"
    cfg = small_config(class_root, *LORA, f"{clip}.layer=hidden", f"{clip}.layer_idx=-2")
    model = build_model(cfg, None, False)
    configure_trainable(model, list(cfg.train.trainable), [], cfg.train.lora, cfg.train.seed)
    text = [n for n in lora_layers(model) if n.startswith("cond_stage_model.")]
    assert len(text) == 4 and all(".encoder.layers.0.self_attn." in n for n in text)
    ids = model.cond_stage_model.tokenize(["a photo of sks dog"])
    model.get_learned_conditioning(ids).square().sum().backward()
    trained = [(n, p) for n, p in model.cond_stage_model.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for _, p in trained)


def test_two_processes_of_batch_b_match_one_of_batch_2b(tmp_path, class_root):
    base = base_checkpoint(tmp_path / "base.ckpt", small_config(class_root))
    extra = [*LORA, "train.max_steps=2", f"train.actual_resume={base}"]
    a, b = one_and_two_processes(tmp_path, TINY, small_overrides(class_root, *extra))
    la, lb = (
        torch.load(r / "checkpoints" / "last.ckpt", weights_only=True)["lora"] for r in (a, b)
    )
    diff = max((la["adapters"][k] - v).abs().max() for k, v in lb["adapters"].items())
    # bf16 rounds a batch of 1 and one of 2 differently, and Adam's normalised step carries that
    # to ~3e-5 here (3e-3 of lr); a rank stepping on its own gradients moves them by ~lr (1e-2).
    assert diff < 1e-3
