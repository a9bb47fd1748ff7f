"""kohya/webui LoRA files made by the test from the layout's rules (not by our exporter): txt2img
loads them, merged as the layout says, and refuses what is not one in one line."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.checkpoint import read_checkpoint, save_checkpoint
from ldm.formats.kohya import apply_lora_files

from .conftest import CONFIGS, build_tiny, load_script, tiny_config

txt2img = load_script("stable_txt2img")
export = load_script("export")
TINY_V1 = str(CONFIGS / "stable-diffusion" / "v1-tiny.yaml")
U = "model.diffusion_model."

# kohya name -> (the SD weight it adapts, rank, alpha or None). For SD v1 kohya names the UNet by
# its diffusers path: down_blocks.0.attentions.0 is input_blocks.1.1, up_blocks.1.attentions.1 is
# output_blocks.3.1 (one ResBlock per level, two levels), down_blocks.0.resnets.0.conv1 is
# input_blocks.1.0.in_layers.2; the text encoder by transformers' path. Other tools use the
# CompVis path (middle_block_1_proj_in).
V1_FILE = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
        f"{U}input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", 4, 2.0),
    "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0": (
        f"{U}output_blocks.3.1.transformer_blocks.0.attn2.to_out.0.weight", 2, 1.0),
    "lora_unet_down_blocks_0_resnets_0_conv1": (f"{U}input_blocks.1.0.in_layers.2.weight", 3, 3.0),
    "lora_unet_middle_block_1_proj_in": (f"{U}middle_block.1.proj_in.weight", 2, None),
    "lora_te_text_model_encoder_layers_1_mlp_fc1": (
        "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight", 4, 8.0),
}  # fmt: skip


def lora_tensors(spec: dict, shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """down [rank, in(, k, k)] and up [out, rank(, 1, 1)] as kohya stores Linear and Conv2d
    LoRA modules; alpha a scalar."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (key, rank, alpha) in spec.items():
        shape = shapes[key]
        down_shape = (rank, shape[1], *shape[2:])
        up_shape = (shape[0], rank) + ((1, 1) if len(shape) == 4 else ())
        tensors[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=g) * 0.3
        tensors[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.3
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


def merged_by_hand(state: dict, spec: dict, tensors: dict, weight: float) -> dict:
    """W + weight * alpha / rank * up @ down, the matrices flattened past the first axis; no
    alpha means alpha = rank."""
    state = dict(state)
    for name, (key, rank, alpha) in spec.items():
        down = tensors[f"{name}.lora_down.weight"].flatten(1)
        up = tensors[f"{name}.lora_up.weight"].flatten(1)
        scale = (alpha if alpha is not None else rank) / rank
        state[key] = state[key] + weight * scale * (up @ down).reshape(state[key].shape)
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_files")
    model = build_tiny("v1")
    state = model.state_dict()
    tensors = lora_tensors(V1_FILE, {k: tuple(v.shape) for k, v in state.items()})
    save_file(tensors, root / "mydog.safetensors", metadata={"ss_network_dim": "4"})
    save_checkpoint({"state_dict": state}, root / "base.ckpt")
    expected = merged_by_hand(state, V1_FILE, tensors, 0.7)
    save_checkpoint({"state_dict": expected}, root / "expected.ckpt")
    return root


def sample(ckpt, outdir, *args: str) -> list[np.ndarray]:
    argv = [
        "--ckpt", str(ckpt), "--config", TINY_V1, "--outdir", str(outdir), "--device", "cpu",
        "--H", "64", "--W", "64", "--ddim_steps", "3", "--n_samples", "2", "--n_iter", "1",
        "--prompt", "a photo of sks dog", *args,
    ]  # fmt: skip
    assert txt2img.main(argv) == 0
    return [np.asarray(Image.open(p)).astype(int) for p in sorted((outdir / "samples").glob("*"))]


def test_kohya_file_merges_as_the_layout_says(files, tmp_path):
    lora = sample(
        files / "base.ckpt", tmp_path / "a", "--lora", f"{files / 'mydog.safetensors'}:0.7"
    )
    expected = sample(files / "expected.ckpt", tmp_path / "b")
    plain = sample(files / "base.ckpt", tmp_path / "c")
    # Same weights up to float32 rounding of the merge order: at most one level of 255.
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(lora, expected, strict=True))
    assert all(np.abs(a - b).max() > 10 for a, b in zip(lora, plain, strict=True))
    # More than one file: 0.3 and 0.4 of the same adapters are 0.7 of them.
    path = str(files / "mydog.safetensors")
    twice = sample(
        files / "base.ckpt", tmp_path / "d", "--lora", f"{path}:0.3", "--lora", f"{path}:0.4"
    )
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(twice, expected, strict=True))


def test_export_merges_lora_files_into_a_full_sd_file(files, tmp_path):
    out = tmp_path / "merged.safetensors"
    path = str(files / "mydog.safetensors")
    argv = ["--ckpt", str(files / "base.ckpt"), "--config", TINY_V1, "--out", str(out)]
    assert export.main([*argv, "--lora", f"{path}:0.3", "--lora", f"{path}:0.4"]) == 0
    merged, _ = read_checkpoint(out)
    expected, _ = read_checkpoint(files / "expected.ckpt")
    assert set(merged) == set(expected)
    # 0.3 then 0.4 of the adapters is 0.7 of them, up to float32 rounding of the two sums
    for key in expected:
        assert torch.allclose(merged[key], expected[key], atol=1e-5), key
    changed = {key for key, _, _ in V1_FILE.values()}
    base, _ = read_checkpoint(files / "base.ckpt")
    assert all(not torch.equal(merged[k], base[k]) for k in changed)
    assert all(torch.equal(merged[k], base[k]) for k in base if k not in changed)


def test_sd_v2_text_lora_lands_on_openclip_fused_qkv_rows(tmp_path):
    model = build_tiny("v2")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"
    spec = {"lora_te_text_model_encoder_layers_1_self_attn_k_proj": (key, 2, 1.0)}
    tensors = lora_tensors(spec, {key: (32, 32)})  # k_proj is [32, 32]; in_proj is q;k;v rows
    save_file(tensors, tmp_path / "v2.safetensors")
    apply_lora_files(state, tiny_config("v2").model, [str(tmp_path / "v2.safetensors")])
    before = model.state_dict()[key]
    k_rows = merged_by_hand({key: before[32:64]}, spec, tensors, 1.0)[key]
    assert torch.equal(state[key][:32], before[:32]) and torch.equal(state[key][64:], before[64:])
    assert torch.allclose(state[key][32:64], k_rows, atol=1e-6)


@pytest.mark.parametrize(
    "tensors, expected",
    [
        (
            {"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32)},
            "1 keys are not kohya-layout LoRA weights of this model "
            "(lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight)",
        ),
        (
            {"lora_unet_mid_block_attentions_0_proj_in.dora_scale": torch.zeros(1)},
            "(lora_unet_mid_block_attentions_0_proj_in.dora_scale)",
        ),
        (
            {"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)},
            "lora_unet_conv_in needs both lora_down and lora_up weights",
        ),
        (
            {
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(
                    2, 64
                ),
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(
                    32, 2
                ),
            },
            "do not fit the model's weight (32, 32)",
        ),
    ],
)
def test_what_is_not_a_lora_of_this_model_is_one_line(files, tmp_path, capsys, tensors, expected):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)
    argv = ["--ckpt", str(files / "base.ckpt"), "--config", TINY_V1, "--lora", str(path)]
    assert txt2img.main([*argv, "--outdir", str(tmp_path / "o"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
