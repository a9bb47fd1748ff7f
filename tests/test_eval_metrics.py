"""The DreamBooth evaluation networks (DINO ViT-S/16, LPIPS, CLIP) and metrics, on CPU without downloads."""

import json
import math
import re
import socket

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from ldm.eval.clip import CLIPEmbedder, load_clip
from ldm.eval.lpips import LPIPS, load_lpips
from ldm.eval.metrics import (
    Evaluator,
    clip_t_score,
    embed_images,
    lpips_tensor,
    mean_pairwise_cosine,
    mean_pairwise_lpips,
    strip_identifier,
)
from ldm.eval.vit import VisionTransformer, dino_transform, load_dino, vit_small

TINY_CLIP = "ldm-test-tiny-clip"
# The lpips package's slices of torchvision's `features` (pretrained_networks.py).
ALEX_SLICES = [range(0, 2), range(2, 5), range(5, 8), range(8, 10), range(10, 12)]
SHIFT, SCALE = [-0.030, -0.088, -0.188], [0.458, 0.448, 0.450]  # the lpips package's ScalingLayer


def random_image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_identical_embeddings_have_similarity_one():
    x = torch.randn(1, 16)
    assert mean_pairwise_cosine(x.repeat(3, 1), 2.5 * x.repeat(4, 1)) == pytest.approx(1.0)
    assert clip_t_score(x.repeat(3, 1), 0.1 * x.repeat(3, 1)) == pytest.approx(1.0)


def test_mean_pairwise_cosine_is_the_mean_over_all_generated_real_pairs():
    rng = np.random.default_rng(0)
    gen, real = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
    norm = np.linalg.norm
    expected = np.mean([g @ r / (norm(g) * norm(r)) for g in gen for r in real])  # N * M pairs
    a, b = torch.tensor(gen), torch.tensor(real)
    assert mean_pairwise_cosine(a, b) == pytest.approx(expected, abs=1e-6)
    assert mean_pairwise_cosine(a[[2, 0, 1]], b[[3, 1, 0, 2]]) == pytest.approx(expected, abs=1e-6)
    # Zipped, rows paired with themselves would give 1; all 4 pairs give (1 + 0 + 0 + 1) / 4.
    eye = torch.eye(2)
    assert mean_pairwise_cosine(eye, eye) == pytest.approx(0.5)


def test_clip_t_pairs_each_image_with_its_own_prompt():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert clip_t_score(images, texts) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    with pytest.raises(ValueError, match="one prompt embedding per image"):
        clip_t_score(images, texts[:1])


def test_strip_identifier():
    assert strip_identifier("a sks dog in the snow", "sks") == "a dog in the snow"
    assert strip_identifier("sks dog, a sks dog", "sks") == "dog, a dog"
    assert strip_identifier("a dog that asks", "sks") == "a dog that asks"
    assert strip_identifier("a photo of a dog", "sks") == "a photo of a dog"


def test_mean_pairwise_lpips_uses_each_pair_i_lt_j_once():
    values = [0.3, -0.2, 0.9, 0.0]
    images = torch.tensor(values).view(4, 1, 1, 1).expand(4, 3, 2, 2)

    # Not symmetric, so a pair taken as (j, i) or twice would change the mean.
    def signed(x, y):
        return (x - y).mean(dim=(1, 2, 3)) + 10 * x.mean(dim=(1, 2, 3)) ** 2

    expected = np.mean(
        [values[i] - values[j] + 10 * values[i] ** 2 for i in range(4) for j in range(4) if i < j]
    )
    for batch_size in (1, 4, 16):
        assert mean_pairwise_lpips(signed, images, batch_size) == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_lpips(signed, images[:1])


def test_embed_images_batches_match_one_pass():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    images = [random_image(i, 8) for i in range(5)]
    transform = torchvision.transforms.ToTensor()
    whole = net(torch.stack([transform(img) for img in images])).detach()
    out = embed_images(net, images, transform, batch_size=2)
    assert out.shape == (5, 4) and not out.requires_grad
    torch.testing.assert_close(out, whole)


def expected_dino_keys(depth: int = 12) -> set[str]:
    keys = {"cls_token", "pos_embed", "norm.weight", "norm.bias"}
    keys |= {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    for i in range(depth):
        for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"}
    return keys


def test_dino_vits16_has_the_official_architecture():
    with torch.device("meta"):
        model = vit_small()
    state = model.state_dict()
    assert set(state) == expected_dino_keys()
    # patch embed + cls + pos (197 tokens) + 12 blocks + final norm, from the architecture.
    d, hidden = 384, 4 * 384
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    expected = (3 * 16 * 16 * d + d) + d + 197 * d + 12 * block + 2 * d
    assert expected == 21_665_664
    assert sum(p.numel() for p in model.parameters()) == expected
    assert state["pos_embed"].shape == (1, 197, 384)
    assert state["blocks.0.attn.qkv.weight"].shape == (1152, 384)
    assert state["blocks.11.mlp.fc1.weight"].shape == (1536, 384)
    assert model.blocks[0].attn.num_heads == 6 and model.norm.eps == 1e-6


def dino_reference_forward(m: VisionTransformer, x: torch.Tensor, heads: int) -> torch.Tensor:
    """facebookresearch/dino VisionTransformer.forward written out (explicit softmax attention)."""
    b, _, w, h = x.shape  # DINO's own naming: `w` is dim 2
    t = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat((m.cls_token.expand(b, -1, -1), t), dim=1)
    n, dim = m.pos_embed.shape[1] - 1, t.shape[-1]
    if t.shape[1] - 1 == n and w == h:
        pos = m.pos_embed
    else:
        w0, h0, s = w // 16 + 0.1, h // 16 + 0.1, math.sqrt(n)
        grid = m.pos_embed[:, 1:].reshape(1, int(s), int(s), dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(w0 / s, h0 / s), mode="bicubic")
        pos = torch.cat((m.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), 1)
    t = t + pos
    for blk in m.blocks:
        y = blk.norm1(t)
        qkv = blk.attn.qkv(y).reshape(b, y.shape[1], 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(-1)
        t = t + blk.attn.proj((attn @ qkv[2]).transpose(1, 2).reshape(b, -1, dim))
        t = t + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(t))))
    return m.norm(t)[:, 0]


@pytest.mark.parametrize("size", [(224, 224), (256, 192)])
def test_dino_forward_matches_the_official_computation(size):
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=32, depth=2, num_heads=2).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 32)
        torch.testing.assert_close(out, dino_reference_forward(model, x, heads=2))


def test_dino_loads_the_official_checkpoint_layout(tmp_path):
    torch.manual_seed(0)
    source = vit_small().eval()
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(source.state_dict(), path)  # the official file is a plain state dict
    loaded = load_dino(path).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))


def test_dino_key_mismatch_names_the_keys(tmp_path):
    state = vit_small().state_dict()
    del state["norm.bias"]
    state["head.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=r"missing 1 keys: norm\.bias.*unexpected.*head\.w"):
        load_dino(path)


def test_dino_transform_is_resize_256_crop_224_imagenet_norm():
    img = Image.new("RGB", (512, 384), (124, 116, 104))  # ImageNet mean, in 0..255
    x = dino_transform()(img)
    assert x.shape == (3, 224, 224)
    assert x.abs().max() < 0.01


def alexnet_features_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under torchvision's AlexNet key names and shapes (`features.*`)."""
    with torch.device("meta"):
        ref = torchvision.models.alexnet()
    g = torch.Generator().manual_seed(seed)
    items = [(k, v) for k, v in ref.state_dict().items() if k.startswith("features.")]
    return {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in items}


def lin_heads_state(chns=(64, 192, 384, 256, 256), seed: int = 1) -> dict[str, torch.Tensor]:
    """Random positive heads in the layout of the official `alex.pth`."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(chns)
    }


def test_lpips_has_the_lpips_package_layout():
    state = LPIPS("alex").state_dict()
    heads = {k: v.shape for k, v in state.items() if k.startswith("lin")}
    assert heads == {k: v.shape for k, v in lin_heads_state().items()}
    expected = {"scaling_layer.shift", "scaling_layer.scale"} | set(heads)
    for k, indices in enumerate(ALEX_SLICES):
        for i in indices:
            if i in (0, 3, 6, 8, 10):  # the convolutions
                expected |= {f"net.slice{k + 1}.{i}.weight", f"net.slice{k + 1}.{i}.bias"}
    assert set(state) == expected
    assert state["scaling_layer.shift"].flatten().tolist() == pytest.approx(SHIFT)
    assert state["scaling_layer.scale"].flatten().tolist() == pytest.approx(SCALE)
    vgg = LPIPS("vgg").state_dict()
    assert [vgg[f"lin{k}.model.1.weight"].shape[1] for k in range(5)] == [64, 128, 256, 512, 512]


def lpips_reference(features: dict, heads: dict, x0: torch.Tensor, x1: torch.Tensor):
    """LPIPS v0.1 computed directly on torchvision's AlexNet, as in the lpips package."""
    with torch.device("meta"):
        alex = torchvision.models.alexnet().features
    alex.load_state_dict({k.removeprefix("features."): v for k, v in features.items()}, assign=True)
    shift, scale = torch.tensor(SHIFT).view(1, 3, 1, 1), torch.tensor(SCALE).view(1, 3, 1, 1)
    h0, h1, total = (x0 - shift) / scale, (x1 - shift) / scale, 0
    for k, indices in enumerate(ALEX_SLICES):
        for i in indices:
            h0, h1 = alex[i](h0), alex[i](h1)
        n0 = h0 / (h0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        n1 = h1 / (h1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + F.conv2d((n0 - n1) ** 2, heads[f"lin{k}.model.1.weight"]).mean((1, 2, 3))
    return total


def test_lpips_loads_official_files_and_matches_the_reference(tmp_path):
    features, heads = alexnet_features_state(), lin_heads_state()
    torch.save(heads, tmp_path / "alex.pth")
    # torchvision's file also holds the classifier, which LPIPS does not use.
    torch.save({**features, "classifier.1.weight": torch.zeros(4, 4)}, tmp_path / "alexnet.pth")
    model = load_lpips(tmp_path / "alex.pth", tmp_path / "alexnet.pth")
    x0, x1 = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        d = model.train()(x0, x1)  # train mode too: the heads' dropout must never act
        torch.testing.assert_close(d, lpips_reference(features, heads, x0, x1))
        assert (d > 0).all()
        torch.testing.assert_close(model(x1, x0), d)
        assert model(x0, x0).abs().max() == 0
    assert mean_pairwise_lpips(model, lpips_tensor([random_image(3)] * 3)) == 0.0


def test_lpips_key_mismatch_names_the_keys(tmp_path):
    heads = lin_heads_state()
    heads["lin5.model.1.weight"] = heads.pop("lin4.model.1.weight")
    torch.save(heads, tmp_path / "alex.pth")
    torch.save(alexnet_features_state(), tmp_path / "alexnet.pth")
    with pytest.raises(RuntimeError, match=r"alex\.pth.*missing.*lin4\..*unexpected.*lin5\."):
        load_lpips(tmp_path / "alex.pth", tmp_path / "alexnet.pth")
    features = alexnet_features_state()
    del features["features.10.bias"]
    torch.save(lin_heads_state(), tmp_path / "alex.pth")
    torch.save(features, tmp_path / "alexnet.pth")
    with pytest.raises(RuntimeError, match=r"alexnet\.pth.*missing 1 keys: features\.10\.bias"):
        load_lpips(tmp_path / "alex.pth", tmp_path / "alexnet.pth")


def test_missing_weight_files_name_the_file_and_the_download(tmp_path):
    missing, heads = tmp_path / "nothing_here.pth", tmp_path / "alex.pth"
    torch.save(lin_heads_state(), heads)
    for load, url in [
        (lambda: load_dino(missing), "dino_deitsmall16_pretrain.pth"),
        (lambda: load_lpips(missing, heads), "v0.1/alex.pth"),
        (lambda: load_lpips(heads, missing), "alexnet-owt-7be5be79.pth"),
        (lambda: load_clip(missing, "ViT-B/32"), "vit_base_patch32_clip_224.openai"),
    ]:
        with pytest.raises(FileNotFoundError, match=rf"nothing_here\.pth.*{re.escape(url)}"):
            load()


@pytest.fixture(scope="module")
def tiny_clip_arch(tmp_path_factory):
    """Register a tiny CLIP with open_clip's config registry, as a built-in arch would be."""
    vision = dict(image_size=32, layers=1, width=32, head_width=16, patch_size=16)
    text = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    config = {"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}
    path = tmp_path_factory.mktemp("clip_config") / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return TINY_CLIP


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", refuse)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", refuse)


def test_clip_loads_a_local_file_without_network(tiny_clip_arch, tmp_path, no_network):
    torch.manual_seed(0)
    source = open_clip.create_model(tiny_clip_arch, force_quick_gelu=True).eval()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(source.state_dict(), path)
    clip = load_clip(path, tiny_clip_arch).eval()
    pixels = torch.randn(2, 3, 32, 32)
    prompts = ["a dog in the snow", "a cat"]
    tokens = open_clip.tokenize(prompts)
    with torch.no_grad():
        img, txt = clip(pixels), clip.encode_texts(prompts)
        torch.testing.assert_close(img, F.normalize(source.encode_image(pixels), dim=-1))
        torch.testing.assert_close(txt, F.normalize(source.encode_text(tokens), dim=-1))
        torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
        # The activation is part of the arch: without QuickGELU the same weights embed differently.
        gelu = load_clip(path, tiny_clip_arch, quick_gelu=False).eval()
        assert not torch.allclose(gelu(pixels), img, atol=1e-4)
    assert clip.preprocess(random_image(0, 48)).shape == (3, 32, 32)


def test_clip_key_mismatch_is_an_error(tiny_clip_arch, tmp_path, no_network):
    state = open_clip.create_model(tiny_clip_arch).state_dict()
    del state["ln_final.bias"]
    torch.save(state, tmp_path / "clip.pth")
    with pytest.raises(RuntimeError, match=r"clip\.pth.*ln_final\.bias"):
        load_clip(tmp_path / "clip.pth", tiny_clip_arch)


@pytest.fixture
def evaluator(tiny_clip_arch):
    torch.manual_seed(0)
    dino = VisionTransformer(embed_dim=32, depth=1, num_heads=2)
    model = open_clip.create_model(tiny_clip_arch, force_quick_gelu=True)
    preprocess = open_clip.image_transform(32, is_train=False)
    clip = CLIPEmbedder(model, preprocess, open_clip.get_tokenizer(tiny_clip_arch))
    lpips = LPIPS("alex")
    lpips.load_state_dict({**lpips.state_dict(), **lin_heads_state()})
    return Evaluator(dino, clip, lpips, batch_size=2)


def test_evaluate_subject_computes_the_paper_definitions(evaluator):
    ev = evaluator
    snow, beach = "a sks dog in the snow", "a sks dog on the beach"
    same = random_image(10)
    generated = [(same, snow), (same, snow)] + [(random_image(i), beach) for i in (11, 12, 13)]
    real = [random_image(20), random_image(21, 80)]
    class_images = [random_image(30), random_image(31)]
    scores = ev.evaluate_subject(generated, real, class_images, token="sks")
    images = [img for img, _ in generated]
    with torch.no_grad():
        dino = ev.dino(torch.stack([ev.dino_transform(i) for i in images + real + class_images]))
        clip = ev.clip(torch.stack([ev.clip.preprocess(i) for i in images + real]))
        text = ev.clip.encode_texts(["a dog in the snow"] * 2 + ["a dog on the beach"] * 3)
        pairs = [(2, 3), (2, 4), (3, 4)]
        beach = [ev.lpips(*lpips_tensor([images[i], images[j]]).split(1)) for i, j in pairs]
    gen_d, real_d, class_d = dino[:5], dino[5:7], dino[7:]

    def pairwise(a, b):
        return F.cosine_similarity(a[:, None], b[None], dim=-1).mean().item()

    expected = {
        "dino": pairwise(gen_d, real_d),
        "clip_i": pairwise(clip[:5], clip[5:]),
        "clip_t": F.cosine_similarity(clip[:5], text, dim=-1).mean().item(),
        "pres": pairwise(class_d, real_d),
        # Per prompt: the identical "snow" images have LPIPS 0, the "beach" ones their pair mean.
        "div": (0 + torch.cat(beach).mean().item()) / 2,
    }
    assert scores == pytest.approx(expected, abs=1e-5)
    assert scores["div"] > 0


def test_clip_t_embeds_prompts_without_the_identifier(evaluator):
    prompts = ["a sks dog in the snow", "a sks dog"]
    with torch.no_grad():
        stripped = evaluator.clip.encode_texts(["a dog in the snow", "a dog"])
        with_token = evaluator.clip.encode_texts(prompts)
    emb = evaluator.prompt_embeddings(prompts, "sks")
    torch.testing.assert_close(emb, stripped)
    assert not torch.allclose(emb, with_token, atol=1e-3)


def test_pres_is_nan_without_class_images_and_networks_are_frozen(evaluator):
    generated = [(random_image(1), "a sks dog"), (random_image(2), "a sks dog")]
    scores = evaluator.evaluate_subject(generated, [random_image(3)], None, token="sks")
    assert math.isnan(scores["pres"])
    assert all(math.isfinite(scores[k]) for k in ("dino", "clip_i", "clip_t", "div"))
    for net in (evaluator.dino, evaluator.clip, evaluator.lpips):
        assert not net.training
        assert not any(p.requires_grad for p in net.parameters())
