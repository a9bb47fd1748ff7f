"""The diffusion process and the DDIM sampler against closed forms and the reference figures."""

import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.diffusionmodules.util import (
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
    timestep_embedding,
)


def test_schedule_matches_reference_figures(tiny_v1):
    betas = tiny_v1.betas.double()
    assert betas[999].item() == pytest.approx(0.012, rel=1e-6)
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-6)
    assert tiny_v1.alphas_cumprod[999].item() == pytest.approx(0.0046601, abs=5e-7)
    assert tiny_v1.alphas_cumprod[499].item() == pytest.approx(0.2776697, abs=5e-7)
    # Scaled linear: sqrt(beta) is linear in t.
    diffs = np.diff(np.sqrt(betas.numpy()))
    assert np.allclose(diffs, diffs[0], rtol=1e-4)


def test_schedule_buffers_have_compvis_names(tiny_v1):
    names = {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    }
    top_level = {k for k in tiny_v1.state_dict() if "." not in k}
    assert top_level == names


def test_ddim_timesteps_are_compvis_uniform():
    steps = make_ddim_timesteps(50, 1000)
    assert steps.tolist() == list(range(1, 1000, 20))
    assert steps[0] == 1 and steps[1] == 21 and steps[-1] == 981
    assert make_ddim_timesteps(1000, 1000).tolist() == list(range(1, 1000))  # CompVis: 1000
    assert make_ddim_timesteps(3, 1000).tolist() == [1, 334, 667, 999]  # CompVis: 1000, past T
    assert len(make_ddim_timesteps(7, 1000)) == 8  # as CompVis
    with pytest.raises(ValueError):
        make_ddim_timesteps(0, 1000)


def test_ddim_sigmas_follow_eta(tiny_v1):
    ac = tiny_v1.alphas_cumprod.double().numpy()
    # With every timestep a DDIM step and eta = 1, DDIM is DDPM: sigma^2 is the posterior
    # variance beta_t (1 - abar_{t-1}) / (1 - abar_t) of Ho et al. (eq. 7), a buffer computed
    # from the betas on its own.
    steps = make_ddim_timesteps(1000, 1000)
    sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(ac, steps, eta=1.0)
    assert np.allclose(sigmas[1:] ** 2, tiny_v1.posterior_variance.double().numpy()[2:], rtol=1e-4)
    half, _, _ = make_ddim_sampling_parameters(ac, steps, eta=0.5)
    assert np.allclose(half, 0.5 * sigmas)
    assert np.all(make_ddim_sampling_parameters(ac, steps, eta=0.0)[0] == 0)
    coarse = make_ddim_timesteps(10, 1000)
    _, alphas, alphas_prev = make_ddim_sampling_parameters(ac, coarse, eta=1.0)
    assert alphas_prev[0] == ac[0] and np.allclose(alphas_prev[1:], ac[coarse[:-1]])


def _one_step(model, output, eta, index):
    """One DDIM step from x at step `index` of a 10-step schedule, the network replaced by a
    constant `output`; returns (x, t, noise the step drew, x_prev)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    sampler = DDIMSampler(model)
    sampler.make_schedule(10, ddim_eta=eta)
    t = torch.full((2,), int(sampler.ddim_timesteps[index]))
    model.apply_model = lambda *args: output
    try:
        x_prev, _ = sampler.p_sample_ddim(
            x, None, t, index, generator=torch.Generator().manual_seed(5)
        )
    finally:
        del model.apply_model
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    return x.double(), t, noise.double(), x_prev.double()


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_one_ddim_step_is_the_closed_form(tiny_v1, eta):
    """Song et al. eq. 12 in float64: 10 steps are timesteps 1, 101, ..., 901 (c = 100)."""
    e = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x, t, noise, x_prev = _one_step(tiny_v1, e, eta, index=4)
    ac = tiny_v1.alphas_cumprod.double()
    a, a_prev = ac[401], ac[301]
    assert int(t[0]) == 401
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    pred_x0 = (x - (1 - a).sqrt() * e.double()) / a.sqrt()
    expected = a_prev.sqrt() * pred_x0 + (1 - a_prev - sigma**2).sqrt() * e.double()
    expected = expected + sigma * noise
    assert torch.allclose(x_prev, expected, atol=1e-5)


def test_one_ddim_step_of_a_v_model_converts_v(tiny_v2):
    """v-prediction: eps = sqrt(abar) v + sqrt(1 - abar) x, x0 = sqrt(abar) x - sqrt(1 - abar) v;
    taking the output for eps (the eps branch) gives another step."""
    v = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x, _, _, x_prev = _one_step(tiny_v2, v, 0.0, index=6)
    ac = tiny_v2.alphas_cumprod.double()
    a, a_prev = ac[601], ac[501]
    v = v.double()
    eps, x0 = a.sqrt() * v + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * v
    assert torch.allclose(x_prev, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, atol=1e-5)
    as_eps = a_prev.sqrt() * (x - (1 - a).sqrt() * v) / a.sqrt() + (1 - a_prev).sqrt() * v
    assert not torch.allclose(x_prev, as_eps, atol=1e-2)


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 10.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-np.log(10000) * torch.arange(4) / 4)
    assert torch.allclose(emb[1, :4], torch.cos(10 * freqs))
    assert torch.allclose(emb[1, 4:], torch.sin(10 * freqs))
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_q_sample_and_parameterisations_are_consistent(tiny_v1):
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 400, 999])
    x_t = tiny_v1.q_sample(x0, t, eps)
    abar = tiny_v1.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, atol=1e-6)
    assert torch.allclose(tiny_v1.predict_start_from_noise(x_t, t, eps), x0, atol=1e-3)
    v = tiny_v1.get_v(x0, eps, t)
    assert torch.allclose(v, abar.sqrt() * eps - (1 - abar).sqrt() * x0, atol=1e-6)
    assert torch.allclose(tiny_v1.predict_start_from_z_and_v(x_t, t, v), x0, atol=1e-5)
    assert torch.allclose(tiny_v1.predict_eps_from_z_and_v(x_t, t, v), eps, atol=1e-5)


def test_loss_is_per_sample_and_uses_the_right_target(tiny_v1, tiny_v2):
    torch.manual_seed(0)
    for model in (tiny_v1, tiny_v2):
        x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        t = torch.tensor([100, 700])
        c = model.get_learned_conditioning(["a photo of sks dog", "a photo of dog"])
        with torch.no_grad():
            loss = model.p_losses(x0, c, t, noise=eps)
            out = model.apply_model(model.q_sample(x0, t, eps), t, c)
        target = eps if model.parameterization == "eps" else model.get_v(x0, eps, t)
        assert loss.shape == (2,)
        assert torch.allclose(loss, ((out - target) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)


def _sample(model, scale, seed=0, uc=True, steps=5, eta=0.0):
    c = model.get_learned_conditioning(["a photo of sks dog"] * 2)
    u = model.get_learned_conditioning([""] * 2) if uc else None
    g = torch.Generator().manual_seed(seed)
    x, _ = DDIMSampler(model).sample(
        steps,
        2,
        (4, 8, 8),
        conditioning=c,
        unconditional_conditioning=u,
        unconditional_guidance_scale=scale,
        eta=eta,
        verbose=False,
        generator=g,
    )
    return x


def test_sampler_is_deterministic_for_a_seed(tiny_v1):
    with torch.no_grad():
        a, b = _sample(tiny_v1, 7.5, seed=3), _sample(tiny_v1, 7.5, seed=3)
        c = _sample(tiny_v1, 7.5, seed=4)
        stochastic = [_sample(tiny_v1, 7.5, seed=5, eta=1.0) for _ in range(2)]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(*stochastic)


def test_guidance_scale_one_is_the_conditional_output(tiny_v1):
    with torch.no_grad():
        guided = _sample(tiny_v1, 1.0, uc=True)
        conditional = _sample(tiny_v1, 1.0, uc=False)
        other = _sample(tiny_v1, 4.0, uc=True)
    assert torch.allclose(guided, conditional)
    assert not torch.allclose(guided, other)


def test_guidance_is_one_batched_forward_with_the_cfg_formula(tiny_v1, tiny_v2):
    for model in (tiny_v1, tiny_v2):
        sampler = DDIMSampler(model)
        calls = []
        original = model.apply_model

        def counting(x, t, c, original=original, calls=calls):
            calls.append(x.shape[0])
            return original(x, t, c)

        torch.manual_seed(0)
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
        c = model.get_learned_conditioning(["a sks dog", "a dog"])
        uc = model.get_learned_conditioning(["", ""])
        with torch.no_grad():
            e_c, e_u = original(x, t, c), original(x, t, uc)
            model.apply_model = counting
            try:
                guided = sampler.guided_model_output(x, t, c, 6.0, uc)
            finally:
                del model.apply_model
        assert calls == [4]
        assert torch.allclose(guided, e_u + 6.0 * (e_c - e_u), atol=1e-4)
