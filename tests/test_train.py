"""The training loop on tiny configs: the loss, what trains, precision, EMA and caching."""

import pytest
import torch

from ldm.checkpoint import load_model_from_config
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.sample import generate, seeded_noise
from ldm.train.batches import LatentCache, PositionDataset, latents_of, stack_batch
from ldm.train.logger import RunLogger
from ldm.train.loop import micro_steps, train_step
from ldm.train.optim import effective_lr, lr_lambda
from ldm.train.setup import DreamBoothLoss, TrainingError, build_dataset, build_model, setup
from ldm.train.trainable import configure_trainable, identifier_token_ids

from .conftest import tiny_config
from .train_helpers import CPU, base_checkpoint, metrics, run, small_config, weights

SKS = 48136


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_prior_loss_is_instance_plus_lambda_prior_of_separate_computations(class_root):
    cfg = small_config(class_root, "train.prior_loss_weight=0.5", "train.batch_size=2")
    model = build_model(cfg, None, False)
    for p in model.model.parameters():  # non-zero output layer, or every loss is mean(noise^2)
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    groups = configure_trainable(model, ["unet"], [SKS])
    unet = groups[0]["params"]
    torch.manual_seed(0)
    batch = {
        f"{k}_{n}": v
        for k in ("instance", "class")
        for n, v in (
            ("moments", torch.randn(2, 8, 4, 4)),
            ("t", torch.randint(0, 1000, (2,))),
            ("noise", torch.randn(2, 4, 4, 4)),
            ("eps", torch.randn(2, 4, 4, 4)),
            ("prompt", torch.tensor([0, 1]) if k == "instance" else torch.tensor([2, 3])),
        )
    }
    cond = torch.randn(4, 77, 32)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    inst, prior, _ = micro_steps(
        DreamBoothLoss(model),
        model,
        iter([batch]),
        lambda ids: cond[ids],
        scaler,
        cfg,
        CPU,
        ("instance", "class"),
    )
    grads = [p.grad.clone() for p in unet]
    model.zero_grad(set_to_none=True)

    def part(kind, c):
        posterior = DiagonalGaussianDistribution(batch[f"{kind}_moments"])
        z = model.scale_factor * posterior.sample(noise=batch[f"{kind}_eps"])
        return model.p_losses(z, c, batch[f"{kind}_t"], batch[f"{kind}_noise"]).mean()

    sep_inst, sep_prior = part("instance", cond[:2]), part("class", cond[2:])
    (sep_inst + 0.5 * sep_prior).backward()
    assert torch.allclose(inst, sep_inst.detach(), rtol=1e-5)
    assert torch.allclose(prior, sep_prior.detach(), rtol=1e-5)
    # Relative to the largest gradient: biases before a GroupNorm get only rounding noise.
    scale = max(a.abs().max() for a in grads)
    assert all(torch.allclose(a, p.grad, rtol=1e-4, atol=1e-5 * scale) for a, p in zip(grads, unet))


@pytest.mark.parametrize(
    "trainable, changed",
    [
        (["unet"], {"model."}),
        (["unet", "text_encoder"], {"model.", "cond_stage_model."}),
        (["token_embedding"], set()),
    ],
)
def test_only_what_trains_changes_and_frozen_tensors_are_bitwise_unchanged(
    tmp_path, class_root, trainable, changed
):
    base = base_checkpoint(tmp_path / "base.ckpt", small_config(class_root))
    cfg = small_config(
        class_root,
        f"train.trainable=[{','.join(trainable)}]",
        "train.max_steps=2",
        f"train.actual_resume={base}",
    )
    before = _state(build_model(cfg, None, False))
    _, folder = run(cfg, tmp_path)
    after = weights(folder.last)
    assert set(after) == set(before)
    emb = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    for key, value in before.items():
        moved = not torch.equal(after[key], value)
        if trainable == ["token_embedding"] and key == emb:
            rows = (after[key] != value).any(dim=1).nonzero().flatten().tolist()
            assert rows == [SKS], rows  # only the identifier's row trained
        elif any(key.startswith(prefix) for prefix in changed) and "model_ema" not in key:
            continue  # trained: most of these move (zero-initialised layers may not in 2 steps)
        else:
            assert not moved, f"frozen {key} changed"
    for part in changed:  # each trained part did move
        assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith(part))
    if "model." in changed:
        assert not torch.equal(
            after["model.diffusion_model.out.2.weight"],
            before["model.diffusion_model.out.2.weight"],
        )


def test_fp16_skips_a_non_finite_step_and_counts_it(tmp_path, class_root, monkeypatch):
    cfg = small_config(class_root, "train.precision=16", "train.save_every=1", "train.keep_last=5")
    calls = {"n": 0}
    forward = DreamBoothLoss.forward

    def poisoned(self, z, cond, t, noise):
        calls["n"] += 1
        out = forward(self, z, cond, t, noise)
        return out * float("inf") if calls["n"] == 2 else out

    monkeypatch.setattr(DreamBoothLoss, "forward", poisoned)
    session = setup(cfg, CPU, None, False, RunLogger(None, 0, 3))
    key = "model.diffusion_model.out.2.weight"
    after = []
    for _ in range(3):
        train_step(session, cfg, CPU)
        after.append(session.model.state_dict()[key].clone())
    assert session.state.skipped_steps == 1
    assert torch.equal(after[0], after[1])  # the skipped step changed nothing
    assert not torch.equal(after[1], after[2])

    calls["n"] = 0
    state, folder = run(cfg, tmp_path)
    assert [r["skipped"] for r in metrics(tmp_path)] == ["0", "1", "1"]
    # Nothing is saved amid non-finite steps: step 2 waits for the next finite step.
    names = sorted(p.name for p in folder.checkpoints.iterdir())
    assert names == ["last.ckpt", "step=000001.ckpt", "step=000003.ckpt"]


def test_a_run_that_stays_non_finite_stops_keeping_the_last_good_checkpoint(
    tmp_path, class_root, monkeypatch
):
    cfg = small_config(
        class_root, "train.max_steps=6", "train.save_every=1", "train.max_nonfinite_steps=2"
    )
    calls = {"n": 0}
    forward = DreamBoothLoss.forward

    def poisoned(self, *args):
        calls["n"] += 1
        out = forward(self, *args)
        return out * float("nan") if calls["n"] > 1 else out

    monkeypatch.setattr(DreamBoothLoss, "forward", poisoned)
    message = r"non-finite for 2 consecutive steps.*last good checkpoint is .*last.ckpt \(step 1\)"
    with pytest.raises(TrainingError, match=message):
        run(cfg, tmp_path)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    # Step 2 was non-finite: the save waited, so last.ckpt holds the last finite step.
    assert last["global_step"] == 1 and last["train_state"]["nonfinite_run"] == 0
    assert all(
        torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point()
    )


def test_bf16_on_cpu_trains_fp32_weights_and_keeps_frozen_weights_exact(tmp_path, class_root):
    cfg = small_config(class_root, "train.precision=bf16", "train.max_steps=2")
    before = _state(build_model(cfg, None, False))
    state, folder = run(cfg, tmp_path)
    after = weights(folder.last)
    losses = [float(r["loss"]) for r in metrics(tmp_path)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert after["model.diffusion_model.out.2.weight"].dtype == torch.float32
    vae = [k for k in before if k.startswith("first_stage_model.")]
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], before[k]) for k in vae)


def test_ema_weights_are_saved_in_the_sd_layout_and_load_with_use_ema(tmp_path, class_root):
    cfg = small_config(
        class_root, "train.ema.enabled=true", "train.ema.decay=0.5", "train.max_steps=2"
    )
    _, folder = run(cfg, tmp_path)
    sd = weights(folder.last)
    key = "model.diffusion_model.out.2.weight"
    ema_key = "model_ema.diffusion_modelout2weight"
    assert ema_key in sd and "model_ema.num_updates" in sd
    assert not torch.equal(sd[key], sd[ema_key])
    ema_model = load_model_from_config(cfg, folder.last, use_ema=True)
    assert torch.equal(ema_model.state_dict()[key], sd[ema_key])


def test_run_checkpoint_loads_strictly_and_samples(tmp_path, class_root):
    cfg = small_config(class_root, "train.max_steps=1")
    _, folder = run(cfg, tmp_path)
    raw = torch.load(folder.last, map_location="cpu", weights_only=True)
    assert {"optimizer", "scaler", "lr_scheduler", "rng", "config", "global_step"} <= set(raw)
    model = load_model_from_config(cfg, folder.last)
    images = generate(
        model, ["a photo of sks dog"], seeded_noise([0], (4, 4, 4)), ddim_steps=2, precision="32"
    )
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_cached_latents_and_text_give_the_same_step_as_uncached(class_root):
    cfg = small_config(class_root)
    model = build_model(cfg, None, False).eval()
    dataset = build_dataset(cfg)
    cache = LatentCache(model, dataset, torch.device("cpu"))
    kinds = ("instance", "class")
    for position in (0, 1, 5):
        plain = stack_batch([PositionDataset(dataset, 23, (4, 4, 4), 1000)[position]])
        cached = stack_batch([PositionDataset(dataset, 23, (4, 4, 4), 1000, cache)[position]])
        assert torch.equal(plain["instance_eps"], cached["instance_eps"])
        assert torch.allclose(
            latents_of(model, plain, kinds, CPU.device),
            latents_of(model, cached, kinds, CPU.device),
            atol=1e-5,
        )


def test_identifier_tokens():
    cfg = small_config("unused")
    model = build_model(cfg, None, False)
    assert identifier_token_ids(model, "sks") == [SKS]
    assert len(identifier_token_ids(model, "zwx qrt")) >= 2


def test_a_v_prediction_step_regresses_v(class_root):
    cfg = small_config(class_root, "train.batch_size=2")
    cfg.model = tiny_config("v2").model  # parameterization v
    model = build_model(cfg, None, False)
    configure_trainable(model, ["unet"], [SKS])
    torch.manual_seed(0)
    moments, eps = torch.randn(2, 8, 4, 4), torch.randn(2, 4, 4, 4)
    t, noise = torch.tensor([100, 800]), torch.randn(2, 4, 4, 4)
    batch = {"instance_moments": moments, "instance_t": t, "instance_noise": noise}
    batch["instance_eps"], batch["instance_prompt"] = eps, torch.zeros(2, dtype=torch.long)
    cond = model.get_learned_conditioning(["a photo of sks dog"] * 2).detach()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, _, _ = micro_steps(
        DreamBoothLoss(model),
        model,
        iter([batch]),
        lambda ids: cond,
        scaler,
        cfg,
        CPU,
        ("instance",),
    )
    z = model.scale_factor * DiagonalGaussianDistribution(moments).sample(noise=eps)
    abar = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        out = model.apply_model(abar.sqrt() * z + (1 - abar).sqrt() * noise, t, cond)
    v = abar.sqrt() * noise - (1 - abar).sqrt() * z  # Salimans & Ho: the target of a v model
    assert torch.allclose(loss, ((out - v) ** 2).mean(), rtol=1e-5)
    assert not torch.allclose(loss, ((out - noise) ** 2).mean(), rtol=1e-2)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.parameters())


def _session(cfg):
    return setup(cfg, CPU, None, False, RunLogger(None, 0, cfg.train.max_steps))


def test_accumulating_two_batches_of_one_gives_the_gradient_of_one_batch_of_two(
    tmp_path, class_root
):
    base = base_checkpoint(tmp_path / "base.ckpt", small_config(class_root))
    common = (f"train.actual_resume={base}", "train.grad_clip=0")
    grads, losses = [], []
    for batch, accumulate in ((2, 1), (1, 2)):
        cfg = small_config(
            class_root, *common, f"train.batch_size={batch}",
            f"train.accumulate_grad_batches={accumulate}",
        )  # fmt: skip
        s = _session(cfg)
        instance, prior, _ = micro_steps(
            s.ddp, s.model, s.batches, s.cond_of, s.scaler, cfg, CPU, s.kinds
        )
        losses.append((float(instance), float(prior)))
        grads.append([p.grad.clone() for p in s.params])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    scale = max(g.abs().max() for g in grads[0])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale) for a, b in zip(*grads))


def test_warmup_then_cosine_schedule_and_scale_lr(class_root):
    cfg = small_config(
        class_root, "train.lr_schedule=cosine", "train.warmup_steps=4", "train.max_steps=10",
        "train.min_lr_ratio=0.1", "train.lr=1e-3",
    )  # fmt: skip
    factor = lr_lambda(cfg.train)
    # Linear warm-up to 1 in 4 steps, then half a cosine period from 1 down to 0.1 in 6 steps.
    expected = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 7: 0.55, 10: 0.1}
    assert {s: round(factor(s), 6) for s in expected} == expected
    assert lr_lambda(small_config(class_root).train)(500) == 1.0  # constant by default
    cfg.train.scale_lr = True
    cfg.train.batch_size, cfg.train.accumulate_grad_batches = 3, 2
    assert effective_lr(cfg.train, world_size=4) == pytest.approx(1e-3 * 4 * 3 * 2)
    s = _session(cfg)
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 6 * 0.25)  # step 0


def test_uncached_text_conditioning_is_the_cached_one(class_root):
    sessions = [_session(small_config(class_root, f"train.cache_text={c}")) for c in (True, False)]
    ids = torch.tensor([0, 1, 1, 2])  # prompts by id, as a batch of instance and class parts
    cached, uncached = (s.cond_of(ids) for s in sessions)
    assert cached.shape == (4, 77, 32) and torch.equal(cached, uncached)
    assert not torch.equal(cached[0], cached[1]) and torch.equal(cached[1], cached[2])
