"""DPM-Solver++(2M): diffusers' DPMSolverMultistepScheduler step for step, and the `sampler`
choice reaching the paths that sample (class images, the captured sampler's fallback)."""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from ldm.models.diffusion.captured import make_sampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler, solver_timesteps
from ldm.sample import generate, seeded_noise, to_pil
from ldm.train.config import PriorConfig
from ldm.train.prior import missing_indices, sample_class_images


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers, numpy 2
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_dpm_solver_is_diffusers_multistep_scheduler(tiny_v1, tiny_v2, steps):
    """Our sampler against diffusers' scheduler with its defaults (dpmsolver++, order 2,
    midpoint, linspace timesteps, final sigma 0), both fed our guided UNet output: the same
    timesteps and, to float32 rounding, the same latents; eps (v1) and v (v2) models."""
    for model, prediction in ((tiny_v1, "epsilon"), (tiny_v2, "v_prediction")):
        sampler = DPMSolverSampler(model)
        c = model.get_learned_conditioning(["a photo of sks dog", "a dog on the beach"])
        uc = model.get_learned_conditioning(["", ""])
        x_T = seeded_noise([0, 1], (4, 8, 8))
        with torch.no_grad():
            ours, _ = sampler.sample(
                steps, 2, (4, 8, 8), conditioning=c, unconditional_conditioning=uc,
                unconditional_guidance_scale=6.0, x_T=x_T, verbose=False,
            )  # fmt: skip
            scheduler = DPMSolverMultistepScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type=prediction,
            )  # fmt: skip
            scheduler.set_timesteps(steps)
            assert scheduler.timesteps.tolist() == sampler.ddim_timesteps[::-1].tolist()
            x = x_T.clone()
            for t in scheduler.timesteps:
                out = sampler.guided_model_output(x, t.repeat(2), c, 6.0, uc)
                x = scheduler.step(out, t, x).prev_sample
        scale = x.abs().max().item()
        assert (ours - x).abs().max().item() <= 1e-5 * max(scale, 1.0), (prediction, steps)


def test_solver_timesteps_start_at_the_last_and_never_repeat():
    assert solver_timesteps(20, 1000)[[0, 1, -1]].tolist() == [50, 100, 999]
    assert len(solver_timesteps(1000, 1000)) == 999  # S = T would repeat one step
    with pytest.raises(ValueError, match="1..1000"):
        solver_timesteps(0, 1000)


def test_dpm_solver_refuses_step_noise(tiny_v1):
    with pytest.raises(ValueError, match="eta 0.5: DPM-Solver"):
        generate(tiny_v1, ["a dog"], seeded_noise([0], (4, 8, 8)), 2, sampler="dpmpp_2m", eta=0.5)


def test_the_sampler_choice_reaches_class_images(tmp_path, tiny_v1):
    """prior.sampler: the class images are generate()'s with that sampler, not DDIM's."""
    prior = PriorConfig(num_class_images=2, batch_size=2, sampler="dpmpp_2m", ddim_steps=3)
    todo = missing_indices(tmp_path, 2)
    assert sample_class_images(tiny_v1, tmp_path, "a photo of dog", prior, 32, "32", todo, False)
    shape = tiny_v1.latent_shape(32, 32)
    expected = {}
    for sampler in ("dpmpp_2m", "ddim"):
        images = generate(
            tiny_v1, ["a photo of dog"] * 2, seeded_noise([0, 1], shape), 3, prior.scale,
            precision="32", sampler=sampler,
        )  # fmt: skip
        expected[sampler] = [np.asarray(image) for image in to_pil(images)]
    written = [np.asarray(Image.open(tmp_path / f"prior_0000{i}.png")) for i in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(written, expected["dpmpp_2m"]))
    assert not all(np.array_equal(a, b) for a, b in zip(written, expected["ddim"]))


def test_capture_without_cuda_keeps_the_chosen_sampler(tiny_v1):
    assert type(make_sampler(tiny_v1, "dpmpp_2m", capture=True)) is DPMSolverSampler
    with pytest.raises(ValueError, match="sampler 'euler': choose one of ddim, dpmpp_2m"):
        make_sampler(tiny_v1, "euler")
