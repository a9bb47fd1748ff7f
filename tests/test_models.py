"""Full-size architectures (built on the meta device) against the reference parameter counts and
the key names of real checkpoints; tiny models for behaviour."""

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import count_params, instantiate_from_config

from .conftest import CONFIGS


def _build_meta(name: str, part: str):
    cfg = OmegaConf.load(CONFIGS / "stable-diffusion" / f"{name}.yaml").model.params[part]
    with torch.device("meta"):
        return instantiate_from_config(cfg)


@pytest.mark.parametrize(
    "name, part, params, tensors",
    [
        ("v1-inference", "unet_config", 859_520_964, 686),
        ("v2-inference", "unet_config", 865_910_724, 686),
        ("v1-inference", "first_stage_config", 83_653_863, 248),
        ("v2-inference-v", "first_stage_config", 83_653_863, 248),
    ],
)
def test_full_size_parameter_counts(name, part, params, tensors):
    module = _build_meta(name, part)
    assert count_params(module) == params
    assert len(module.state_dict()) == tensors


def test_unet_keys_are_the_checkpoint_names():
    keys = set(_build_meta("v1-inference", "unet_config").state_dict())
    for key in [
        "time_embed.0.weight",
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight",
        "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.0.out_layers.3.weight",
        "input_blocks.1.1.proj_in.weight",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight",
        "input_blocks.1.1.transformer_blocks.0.norm3.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight",
        "middle_block.1.proj_out.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "out.0.weight",
        "out.2.weight",
    ]:
        assert key in keys, key
    unet_v1 = _build_meta("v1-inference", "unet_config").state_dict()
    unet_v2 = _build_meta("v2-inference", "unet_config").state_dict()
    # v1 projects with 1x1 convolutions and a 768-wide context; v2 with linears and 1024.
    assert unet_v1["input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)
    assert unet_v2["input_blocks.1.1.proj_in.weight"].shape == (320, 320)
    assert unet_v1["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert unet_v2["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 1024)


def test_head_layout_v1_fixed_heads_v2_fixed_head_dim():
    v1 = _build_meta("v1-inference", "unet_config")
    v2 = _build_meta("v2-inference", "unet_config")
    heads = lambda m, i: m.input_blocks[i][1].transformer_blocks[0].attn1.heads  # noqa: E731
    assert [heads(v1, i) for i in (1, 4, 7)] == [8, 8, 8]  # head dims 40, 80, 160
    assert [heads(v2, i) for i in (1, 4, 7)] == [5, 10, 20]  # head dim 64


def test_vae_keys_are_the_checkpoint_names():
    keys = set(_build_meta("v1-inference", "first_stage_config").state_dict())
    for key in [
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.mid.attn_1.q.weight",
        "encoder.conv_out.weight",
        "decoder.up.3.block.2.conv2.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.mid.block_2.conv1.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
    ]:
        assert key in keys, key
    assert "decoder.up.0.upsample.conv.weight" not in keys


def test_unsupported_unet_options_fail_loudly():
    params = OmegaConf.to_container(
        OmegaConf.load(
            CONFIGS / "stable-diffusion" / "v1-tiny.yaml"
        ).model.params.unet_config.params
    )
    with pytest.raises(ValueError, match="num_classes"):
        instantiate_from_config(
            {
                "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": {**params, "num_classes": 10},
            }
        )


def test_vae_shapes_and_posterior(tiny_v1):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        posterior = tiny_v1.encode_first_stage(x)
        assert posterior.mean.shape == (2, 4, 8, 8)
        g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        z1 = tiny_v1.get_first_stage_encoding(posterior, generator=g1)
        z2 = tiny_v1.get_first_stage_encoding(posterior, generator=g2)
        assert torch.equal(z1, z2)
        assert torch.allclose(
            z1,
            tiny_v1.scale_factor
            * (
                posterior.mean
                + posterior.std
                * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
            ),
        )
        assert tiny_v1.decode_first_stage(z1).shape == (2, 3, 64, 64)


def test_unet_gradient_checkpointing_gives_identical_gradients(tiny_v1):
    unet = tiny_v1.model.diffusion_model
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.randn(2, 77, 32)

    def grads(enabled: bool):
        unet.zero_grad(set_to_none=True)
        unet.set_gradient_checkpointing(enabled)
        unet(x, t, ctx).square().mean().backward()
        return [p.grad.clone() for p in unet.parameters()]

    try:
        plain, ckpt = grads(False), grads(True)
    finally:
        unet.set_gradient_checkpointing(False)
        unet.zero_grad(set_to_none=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt))
    assert any(a.abs().sum() > 0 for a in plain)
