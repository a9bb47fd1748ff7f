"""Text encoders: tokenization, full-size layouts (on the meta device) and tiny-model behaviour."""

import pytest
import torch
from open_clip.tokenizer import tokenize as open_clip_tokenize
from torch import nn

from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.modules.encoders.tokenizer import clip_tokenizer

START, END, SKS = 49406, 49407, 48136
TINY_V1 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TINY_V2 = dict(width=32, heads=2, layers=2, embed_dim=16)
PROMPTS = [
    "a photo of sks dog",
    "A Photo of SKS Dog, in the snow!!",
    "a dog's toy: 1234 été café 🐶",
    "  two   spaces\tand\nnewlines ",
]


def tiny_v1(seed: int = 0, **kwargs) -> FrozenCLIPEmbedder:
    torch.manual_seed(seed)
    return FrozenCLIPEmbedder(text_config=TINY_V1, **kwargs)


def tiny_v2(seed: int = 0, **kwargs) -> FrozenOpenCLIPEmbedder:
    torch.manual_seed(seed)
    encoder = FrozenOpenCLIPEmbedder(text_config=TINY_V2, **kwargs)
    # open_clip starts LayerNorms at 1/0 and biases at 0; perturb them so that tests see them.
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return encoder


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def open_clip_ids(prompt: str) -> list[int]:
    """open_clip's own ids up to and including the end token."""
    ids = open_clip_tokenize([prompt])[0].tolist()
    return ids[: ids.index(END) + 1]


# ---- full-size architectures ------------------------------------------------------------------


def test_clip_l_full_size_count_and_checkpoint_keys():
    with torch.device("meta"):
        encoder = FrozenCLIPEmbedder()
    assert num_params(encoder) == 123_060_480
    keys = list(encoder.state_dict())
    assert len(keys) == 12 * 16 + 2 + 2  # 12 layers, embeddings, final LayerNorm
    assert all(k.startswith("transformer.text_model.") for k in keys)
    assert "transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "transformer.text_model.final_layer_norm.weight" in keys
    assert "transformer.text_model.encoder.layers.11.mlp.fc2.bias" in keys
    assert not any(k.endswith("position_ids") for k in keys)
    # Parameter names are the checkpoint's too (optimizers, EMA and logs see the same names).
    assert [n for n, _ in encoder.named_parameters()] == keys


def test_openclip_h_full_size_count_and_checkpoint_keys():
    with torch.device("meta"):
        encoder = FrozenOpenCLIPEmbedder(layer="penultimate")
    block = [
        "ln_1.weight",
        "ln_1.bias",
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    ]
    expected = {
        "model.positional_embedding",
        "model.text_projection",
        "model.logit_scale",
        "model.token_embedding.weight",
        "model.ln_final.weight",
        "model.ln_final.bias",
    } | {f"model.transformer.resblocks.{i}.{name}" for i in range(24) for name in block}
    state = encoder.state_dict()
    assert set(state) == expected
    assert state["model.text_projection"].shape == (1024, 1024)
    assert state["model.logit_scale"].shape == ()

    w, vocab, ctx = 1024, 49408, 77
    per_block = (
        2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (w * 4 * w + 4 * w) + (4 * w * w + w)
    )
    expected_count = vocab * w + ctx * w + w * 1024 + 1 + 24 * per_block + 2 * w
    assert num_params(encoder) == expected_count == 354_032_641


# ---- tokenization -----------------------------------------------------------------------------


def test_sks_is_one_token():
    assert clip_tokenizer()("sks")["input_ids"] == [START, SKS, END]
    assert open_clip_ids("sks") == [START, SKS, END]


def test_v1_pads_with_end_token_and_v2_with_zero():
    ids = [START, 320, 1125, 539, SKS, 1929, END]  # "a photo of sks dog"
    tokenizer = clip_tokenizer()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        START,
        END,
        END,
    )
    v1 = FrozenCLIPEmbedder(text_config=TINY_V1).tokenize(["a photo of sks dog"])
    v2 = FrozenOpenCLIPEmbedder(text_config=TINY_V2).tokenize(["a photo of sks dog"])
    assert v1.dtype == v2.dtype == torch.long
    assert v1[0].tolist() == ids + [END] * 70
    assert v2[0].tolist() == ids + [0] * 70


@pytest.mark.parametrize("prompt", PROMPTS)
def test_v1_ids_equal_open_clip_up_to_end_token(prompt):
    expected = open_clip_ids(prompt)
    ids = FrozenCLIPEmbedder(text_config=TINY_V1).tokenize([prompt])[0].tolist()
    assert ids[: len(expected)] == expected
    assert ids[len(expected) :] == [END] * (77 - len(expected))


def test_long_prompt_truncates_to_77_ending_with_end_token():
    prompt = " ".join(["a photo of sks dog"] * 40)
    for encoder in (
        FrozenCLIPEmbedder(text_config=TINY_V1),
        FrozenOpenCLIPEmbedder(text_config=TINY_V2),
    ):
        ids = encoder.tokenize([prompt, "a dog"])
        assert ids.shape == (2, 77)
        assert ids[0, 0] == START and ids[0, 76] == END
        assert END not in ids[0, :76].tolist()


# ---- behaviour of tiny models -----------------------------------------------------------------


@torch.no_grad()
def test_output_shapes_and_token_input():
    prompts = ["a photo of sks dog", "a dog"]
    assert tiny_v1()(prompts).shape == (2, 77, 32)
    assert tiny_v1(layer="pooled")(prompts).shape == (2, 1, 32)
    assert tiny_v1(layer="hidden", layer_idx=1)(prompts).shape == (2, 77, 32)
    for layer in ("last", "penultimate"):
        assert tiny_v2(layer=layer)(prompts).shape == (2, 77, 32)
    for encoder in (tiny_v1(), tiny_v2()):
        assert torch.equal(encoder.encode(encoder.tokenize(prompts)), encoder(prompts))


@torch.no_grad()
@pytest.mark.parametrize("make", [tiny_v1, tiny_v2])
def test_deterministic_and_independent_of_the_rest_of_the_batch(make):
    encoder = make()
    batch = encoder(["a photo of sks dog", "a red cube", ""])
    assert torch.equal(encoder(["a photo of sks dog", "a red cube", ""]), batch)
    assert torch.equal(make()(["a photo of sks dog", "a red cube", ""]), batch)
    # Catches attention across the batch (e.g. a [L, B, D] permute into batch-first blocks).
    for i, prompt in enumerate(["a photo of sks dog", "a red cube", ""]):
        torch.testing.assert_close(encoder([prompt])[0], batch[i])


@torch.no_grad()
def test_v1_layers_select_the_right_states():
    prompts = ["a photo of sks dog", "a dog"]
    encoder = tiny_v1()
    last = encoder(prompts)
    encoder.layer, encoder.layer_idx = "hidden", -1
    hidden = encoder(prompts)
    # hidden_states are taken before the final LayerNorm; last_hidden_state after it.
    assert not torch.allclose(hidden, last)
    torch.testing.assert_close(encoder.transformer.text_model.final_layer_norm(hidden), last)
    encoder.layer = "pooled"
    end = encoder.tokenize(prompts).eq(END).int().argmax(1)  # first end token
    torch.testing.assert_close(encoder(prompts)[:, 0], last[torch.arange(2), end])


@torch.no_grad()
def test_v2_penultimate_is_open_clips_second_to_last_block_after_ln_final():
    tokens = FrozenOpenCLIPEmbedder(text_config=TINY_V2).tokenize(["a photo of sks dog", "a dog"])
    last, penultimate = tiny_v2(layer="last"), tiny_v2(layer="penultimate")
    assert not torch.allclose(last(tokens), penultimate(tokens))
    reference = last.model.forward_intermediates(
        tokens, normalize_intermediates=True, intermediates_only=True, output_fmt="NLC"
    )["text_intermediates"]
    torch.testing.assert_close(last(tokens), reference[-1])
    torch.testing.assert_close(penultimate(tokens), reference[-2])


@torch.no_grad()
@pytest.mark.parametrize("make", [tiny_v1, tiny_v2])
def test_strict_state_dict_round_trip(make):
    prompts = ["a photo of sks dog"]
    source, target = make(seed=0), make(seed=1)
    assert not torch.allclose(source(prompts), target(prompts))
    target.load_state_dict(source.state_dict(), strict=True)
    assert torch.equal(target(prompts), source(prompts))


class Parent(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.cond_stage_model = encoder


@pytest.mark.parametrize(
    "make,prefix,last_key",
    [
        (tiny_v1, "cond_stage_model.transformer.text_model.", "final_layer_norm.bias"),
        (tiny_v2, "cond_stage_model.model.", "ln_final.bias"),
    ],
)
def test_nested_checkpoint_layout_and_strict_errors_name_checkpoint_keys(make, prefix, last_key):
    state = Parent(make(seed=0)).state_dict()
    assert all(k.startswith(prefix) for k in state)
    target = Parent(make(seed=1))
    target.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(target.cond_stage_model(["a dog"]), make(seed=0)(["a dog"]))

    extra = dict(state, **{prefix + "extra.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=rf'Unexpected key\(s\).*"{prefix}extra\.weight"'):
        target.load_state_dict(extra, strict=True)
    missing = {k: v for k, v in state.items() if k != prefix + last_key}
    with pytest.raises(RuntimeError, match=rf'Missing key\(s\).*"{prefix}{last_key}"'):
        target.load_state_dict(missing, strict=True)
    assert target.load_state_dict(missing, strict=False).missing_keys == [prefix + last_key]


def first_linear(encoder: nn.Module) -> nn.Module:
    if isinstance(encoder, FrozenCLIPEmbedder):
        return encoder.transformer.text_model.encoder.layers[0].mlp.fc1
    return encoder.model.transformer.resblocks[0].mlp.c_fc


def grads_and_forward_calls(encoder: nn.Module, checkpointing: bool) -> tuple[dict, int]:
    """Parameter gradients of a random projection of the output, and how often block 0 ran."""
    encoder.train().set_gradient_checkpointing(checkpointing)
    calls = []
    handle = first_linear(encoder).register_forward_hook(lambda *_: calls.append(1))
    encoder.zero_grad()
    out = encoder(["a photo of sks dog", "a red cube"])
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    return grads, len(calls)


@pytest.mark.parametrize("make", [tiny_v1, lambda: tiny_v2(layer="penultimate")])
def test_gradient_checkpointing_recomputes_and_gives_identical_gradients(make):
    encoder = make()
    plain, plain_calls = grads_and_forward_calls(encoder, checkpointing=False)
    recomputed, recomputed_calls = grads_and_forward_calls(encoder, checkpointing=True)
    assert (plain_calls, recomputed_calls) == (1, 2)
    assert plain.keys() == recomputed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=0, atol=0, msg=name)
    assert grads_and_forward_calls(encoder, checkpointing=False)[1] == 1


@pytest.mark.parametrize("make", [tiny_v1, tiny_v2])
def test_frozen_encoder_with_checkpointing_builds_no_graph(make):
    encoder = make().requires_grad_(False).train()
    encoder.set_gradient_checkpointing(True)
    assert not encoder(["a photo of sks dog"]).requires_grad


@pytest.mark.parametrize("make", [tiny_v1, tiny_v2])
def test_token_embedding_rows_of_used_tokens_get_gradients(make):
    encoder = make().requires_grad_(False)
    embedding = encoder.token_embedding
    assert isinstance(embedding, nn.Embedding) and embedding.num_embeddings == 49408
    embedding.requires_grad_(True)
    out = encoder(["a photo of sks dog"])
    (out * torch.randn_like(out)).sum().backward()
    used = encoder.tokenize(["a photo of sks dog"]).unique()
    rows_with_grad = embedding.weight.grad.abs().sum(1).nonzero().flatten()
    assert rows_with_grad.tolist() == used.tolist()
    assert SKS in rows_with_grad.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("make", [tiny_v1, tiny_v2])
def test_tokens_follow_the_weights_device(make):
    encoder = make().cuda()
    with torch.no_grad():
        assert encoder(["a photo of sks dog"]).device == encoder.token_embedding.weight.device


def test_unknown_architectures_and_overrides_are_errors():
    with pytest.raises(ValueError, match="clip-vit-base"):
        FrozenCLIPEmbedder(version="openai/clip-vit-base-patch32")
    with pytest.raises(ValueError, match="ViT-X"):
        FrozenOpenCLIPEmbedder(arch="ViT-X")
    with pytest.raises(ValueError, match="hidden_size"):
        FrozenOpenCLIPEmbedder(text_config=dict(hidden_size=32))
    with pytest.raises(ValueError, match="layer_idx"):
        FrozenCLIPEmbedder(layer="hidden", text_config=TINY_V1)


def test_what_the_conditioning_never_uses_is_listed_as_unused():
    """SD v2 conditions on the penultimate block: the last block, the projection and the
    temperature get no gradient, so training freezes them (DDP needs every trained parameter
    to get one). Checked against the gradients themselves."""
    for encoder in (tiny_v2(layer="penultimate"), tiny_v2(layer="last"), tiny_v1()):
        encoder(["a photo of sks dog"]).square().mean().backward()
        no_grad = {id(p) for p in encoder.parameters() if p.grad is None}
        assert {id(p) for p in encoder.unused_parameters()} == no_grad
