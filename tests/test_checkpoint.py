"""Checkpoint loading in the real SD layout: strict, EMA-aware, and with one-line errors."""

import pickle

import pytest
import torch

from ldm.checkpoint import (
    CheckpointError,
    ema_key,
    load_model_from_config,
    read_checkpoint,
    save_checkpoint,
    save_safetensors,
)

from .conftest import build_tiny, tiny_config

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def real_layout(model, with_ema: bool = False) -> dict:
    """The state dict as SD releases store it: position_ids, and for full-EMA files one
    `model_ema.*` entry per UNet parameter plus decay and num_updates."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if POSITION_IDS.startswith("cond_stage_model.transformer") and any(
        k.startswith("cond_stage_model.transformer.") for k in sd
    ):
        sd[POSITION_IDS] = torch.arange(77)[None]
    if with_ema:
        for k, v in model.model.state_dict(prefix="model.").items():
            sd[ema_key(k)] = v + 1.0  # distinguishable from the live weights
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int)
    return sd


@pytest.fixture(scope="module")
def source_model():
    return build_tiny("v1", seed=1)


def _outputs(model):
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        c = model.get_learned_conditioning(["a photo of sks dog"])
        return c, model.apply_model(x, t, c)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_round_trip_is_exact_and_strict(tmp_path, source_model, suffix):
    path = tmp_path / f"model{suffix}"
    sd = real_layout(source_model, with_ema=True)
    if suffix == ".ckpt":
        save_checkpoint({"state_dict": sd, "global_step": 7, "epoch": 1}, path)
    else:
        save_safetensors(sd, path, metadata={"format": "pt"})
    loaded = load_model_from_config(tiny_config("v1"), path)
    for key, value in source_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not any(p.is_meta for p in loaded.parameters())
    for a, b in zip(_outputs(source_model), _outputs(loaded)):
        assert torch.equal(a, b)


def test_use_ema_takes_the_model_ema_weights(tmp_path, source_model):
    path = tmp_path / "full-ema.ckpt"
    save_checkpoint({"state_dict": real_layout(source_model, with_ema=True)}, path)
    ema = load_model_from_config(tiny_config("v1"), path, use_ema=True)
    unet_key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(ema.state_dict()[unet_key], source_model.state_dict()[unet_key] + 1.0)
    # Only the UNet has EMA weights; the rest is the file's single copy.
    vae_key = "first_stage_model.quant_conv.weight"
    assert torch.equal(ema.state_dict()[vae_key], source_model.state_dict()[vae_key])


def test_use_ema_without_ema_weights_is_an_error(tmp_path, source_model):
    path = tmp_path / "emaonly.ckpt"
    save_checkpoint({"state_dict": real_layout(source_model)}, path)
    with pytest.raises(CheckpointError, match="emaonly.ckpt: has no EMA weights"):
        load_model_from_config(tiny_config("v1"), path, use_ema=True)


def test_v2_weights_with_a_v1_config_name_the_mismatch(tmp_path):
    path = tmp_path / "v2.ckpt"
    save_checkpoint({"state_dict": real_layout(build_tiny("v2"))}, path)
    with pytest.raises(CheckpointError) as info:
        load_model_from_config(tiny_config("v1"), path)
    message = str(info.value)
    assert "\n" not in message and "v2.ckpt" in message
    assert "the file is SD v2 (OpenCLIP text encoder) but the config builds SD v1" in message
    assert "cond_stage_model." in message


def test_shape_mismatch_names_the_tensor(tmp_path, source_model):
    sd = real_layout(source_model)
    key = "model.diffusion_model.out.2.weight"
    sd[key] = torch.zeros(4, 64, 3, 3)
    path = tmp_path / "wrong.safetensors"
    save_safetensors(sd, path, metadata={})
    with pytest.raises(
        CheckpointError, match=r"wrong.safetensors: 1 tensors have other shapes.*out\.2\.weight"
    ):
        load_model_from_config(tiny_config("v1"), path)


def test_missing_and_unexpected_keys_are_errors(tmp_path, source_model):
    sd = real_layout(source_model)
    del sd["model.diffusion_model.out.2.bias"]
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    path = tmp_path / "odd.ckpt"
    save_checkpoint({"state_dict": sd}, path)
    with pytest.raises(
        CheckpointError, match=r"1 keys missing.*out\.2\.bias.*1 unexpected keys.*extra\.weight"
    ):
        load_model_from_config(tiny_config("v1"), path)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_file_is_one_line_error(tmp_path, source_model, suffix):
    path = tmp_path / f"cut{suffix}"
    sd = real_layout(source_model)
    if suffix == ".ckpt":
        save_checkpoint({"state_dict": sd}, path)
    else:
        save_safetensors(sd, path, metadata={})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_model_from_config(tiny_config("v1"), path)
    assert f"cut{suffix}" in str(info.value) and "\n" not in str(info.value)


class NotAWeight:
    """Stands for a Lightning callback object pickled into old checkpoints."""


def test_arbitrary_pickles_are_refused_unless_unsafe(tmp_path, source_model):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": real_layout(source_model), "callbacks": NotAWeight()}, path)
    with pytest.raises(
        CheckpointError, match="lightning.ckpt: refused: it needs arbitrary unpickling"
    ):
        load_model_from_config(tiny_config("v1"), path)
    model = load_model_from_config(tiny_config("v1"), path, unsafe_load=True)
    assert torch.equal(_outputs(model)[1], _outputs(source_model)[1])


def test_half_precision_file_loads_into_float32_model(tmp_path, source_model):
    sd = {k: v.half() if v.is_floating_point() else v for k, v in real_layout(source_model).items()}
    path = tmp_path / "fp16.safetensors"
    save_safetensors(sd, path, metadata={})
    model = load_model_from_config(tiny_config("v1"), path)
    key = "model.diffusion_model.out.2.weight"
    assert model.state_dict()[key].dtype == torch.float32
    assert torch.equal(model.state_dict()[key], sd[key].float())


def test_missing_file_and_extras(tmp_path, source_model):
    with pytest.raises(CheckpointError, match="nope.ckpt: no such checkpoint file"):
        read_checkpoint(tmp_path / "nope.ckpt")
    path = tmp_path / "x.ckpt"
    save_checkpoint({"state_dict": real_layout(source_model), "global_step": 42}, path)
    _, extras = read_checkpoint(path)
    assert extras == {"global_step": 42}


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint({"step": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint({"step": 2, "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_legacy_non_zip_checkpoints_load(tmp_path, source_model):
    """torch's pre-1.6 format (no zip, so no memory map): plain tensors load as they are, and an
    old Lightning pickle with --unsafe_load, not "corrupt"."""
    plain = tmp_path / "legacy.ckpt"
    torch.save(
        {"state_dict": real_layout(source_model)}, plain, _use_new_zipfile_serialization=False
    )
    model = load_model_from_config(tiny_config("v1"), plain)
    assert torch.equal(_outputs(model)[1], _outputs(source_model)[1])
    pickled = tmp_path / "legacy-lightning.ckpt"
    obj = {"state_dict": real_layout(source_model), "callbacks": NotAWeight()}
    torch.save(obj, pickled, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="refused: it needs arbitrary unpickling"):
        load_model_from_config(tiny_config("v1"), pickled)
    model = load_model_from_config(tiny_config("v1"), pickled, unsafe_load=True)
    assert torch.equal(_outputs(model)[1], _outputs(source_model)[1])
