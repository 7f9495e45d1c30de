"""renoise.schedules against diffusers' schedulers (test-only oracle) and the pinned facts."""
import warnings

import numpy as np
import pytest
import torch

from renoise.schedules import Schedule

warnings.filterwarnings("ignore", message=".*scale_model_input.*")
diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, LCMScheduler  # noqa: E402

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
          set_alpha_to_one=False, clip_sample=False)
# scheduler_config.json of the published models (FACTS.md §1d); LCM: a typical LCMScheduler config
CONFIGS = {
    "sd15": dict(SD, _class_name="PNDMScheduler", prediction_type="epsilon", steps_offset=1, skip_prk_steps=True),
    "sd21": dict(SD, _class_name="DDIMScheduler", prediction_type="v_prediction", steps_offset=1),
    "sdxl": dict(SD, _class_name="EulerDiscreteScheduler", prediction_type="epsilon", steps_offset=1,
                 timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False),
    "sdxl-turbo": dict(SD, _class_name="EulerAncestralDiscreteScheduler", prediction_type="epsilon", steps_offset=1,
                       timestep_spacing="trailing", interpolation_type="linear"),
    "lcm": dict(SD, _class_name="LCMScheduler", prediction_type="epsilon", steps_offset=1, set_alpha_to_one=True,
                timestep_spacing="leading", original_inference_steps=50, timestep_scaling=10.0),
}
CLASSES = {"ddim": DDIMScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler, "lcm": LCMScheduler}


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_bit_equal_to_diffusers(beta_schedule):
    cfg = dict(beta_schedule=beta_schedule, beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000)
    ours = Schedule.from_config(cfg)
    ref = DDIMScheduler.from_config(cfg)
    assert ours.alphas_cumprod.dtype == torch.float64
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod.double())
    assert ours.final_alpha_cumprod == 1.0  # diffusers' default set_alpha_to_one=True


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("sampler", CLASSES)
def test_timesteps_identical_to_diffusers(name, sampler):
    cfg = CONFIGS[name]
    ours, ref = Schedule.from_config(cfg), CLASSES[sampler].from_config(cfg)
    if sampler != "euler_ancestral":  # Euler has no final alpha
        assert ours.final_alpha_cumprod == float(ref.final_alpha_cumprod)
    for n in (1, 2, 3, 4, 7, 10, 25, 50):
        ref.set_timesteps(n)
        ts = ours.timesteps(n, sampler)
        assert ts.dtype == ref.timesteps.dtype and torch.equal(ts, ref.timesteps), (name, sampler, n)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_every_spacing_matches_ddim_and_euler(spacing):
    cfg = dict(CONFIGS["sd15"], timestep_spacing=spacing, steps_offset=1)
    ours = Schedule.from_config(cfg)
    for sampler in ("ddim", "euler_ancestral"):
        ref = CLASSES[sampler].from_config(cfg)
        for n in (1, 3, 4, 6, 30, 50, 1000):
            ref.set_timesteps(n)
            assert torch.equal(ours.timesteps(n, sampler), ref.timesteps), (sampler, n)


def test_pinned_timestep_lists_and_alphas():
    """FACTS.md §1e."""
    s = Schedule.from_config(dict(CONFIGS["sd15"]))
    assert s.timesteps(4, "ddim").tolist() == [751, 501, 251, 1]                     # leading, offset 1
    assert Schedule.from_config(CONFIGS["sdxl-turbo"]).timesteps(4, "ddim").tolist() == [999, 749, 499, 249]
    assert s.timesteps(4, "euler_ancestral").tolist() == [999, 666, 333, 0]           # absent spacing -> linspace
    assert s.timesteps(4, "lcm").tolist() == [999, 759, 499, 259]
    got = [float(s.alpha(t)) for t in (249, 499, 749, 999)]
    assert np.allclose(got, [0.67543, 0.27767, 0.05662, 0.0046601], rtol=2e-4)
    assert float(s.alpha(None)) == float(s.alpha(0)) == pytest.approx(0.99915)


def test_chain_follows_each_schedulers_prev_rule():
    s = Schedule.from_config(CONFIGS["sdxl-turbo"])  # trailing
    assert s.chain(4, "ddim") == [(999, 749), (749, 499), (499, 249), (249, None)]   # t - T // n
    s15 = Schedule.from_config(CONFIGS["sd15"])
    assert s15.chain(4, "ddim") == [(751, 501), (501, 251), (251, 1), (1, None)]
    assert s15.chain(3, "euler_ancestral") == [(999.0, 499.5), (499.5, 0.0), (0.0, None)]
    assert s15.chain(4, "lcm") == [(999, 759), (759, 499), (499, 259), (259, None)]
    assert Schedule.from_config(dict(CONFIGS["sd15"], timestep_spacing="linspace")).chain(4, "ddim")[0] == (999, 749)


@pytest.mark.parametrize("name", ["sd15", "sdxl-turbo"])
def test_sigma_interpolates_like_diffusers_euler(name):
    cfg = CONFIGS[name]
    s, ref = Schedule.from_config(cfg), EulerAncestralDiscreteScheduler.from_config(cfg)
    for n in (3, 7, 50):
        ref.set_timesteps(n)
        ours = torch.stack([s.sigma(float(t)) for t in ref.timesteps] + [s.sigma(None)])
        torch.testing.assert_close(ours.float(), ref.sigmas, rtol=1e-6, atol=0)
        as_tensor = s.sigma(ref.timesteps)  # a float32 tensor of timesteps
        torch.testing.assert_close(as_tensor, ours[:-1], rtol=1e-15, atol=0)


def test_number_and_tensor_timesteps_agree():
    s = Schedule.from_config(CONFIGS["sd15"])
    for t in (0, 1, 250, 999):
        assert float(s.alpha(torch.tensor(t))) == float(s.alpha(t))
        assert float(s.sigma(torch.tensor(t))) == float(s.sigma(t))
    assert float(s.alpha(400.5)) == pytest.approx(1 / (1 + float(s.sigma(400.5)) ** 2), rel=1e-14)
    assert float(s.sigma(400.5)) == pytest.approx((float(s.sigma(400)) + float(s.sigma(401))) / 2, rel=1e-14)
    assert s.alpha(torch.tensor([1, 999])).shape == (2,)


def test_create_defaults_are_stable_diffusion():
    s = Schedule.create()
    ref = DDIMScheduler.from_config(CONFIGS["sd15"])
    assert torch.equal(s.alphas_cumprod, ref.alphas_cumprod.double())
    assert s.final_alpha_cumprod == float(ref.final_alpha_cumprod)
    assert s.num_train_timesteps == 1000 and s.prediction_type == "epsilon"


@pytest.mark.parametrize("bad, match", [
    (dict(timestep_spacing="uniform"), "timestep_spacing"),
    (dict(prediction_type="flow"), "prediction_type"),
    (dict(beta_schedule="cosine"), "beta_schedule"),
    (dict(clip_sample=True), "clip_sample"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
])
def test_bad_configs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        Schedule.from_config(dict(CONFIGS["sd15"], **bad))


def test_bad_arguments_raise():
    s = Schedule.from_config(CONFIGS["sd15"])
    with pytest.raises(ValueError, match="sampler"):
        s.timesteps(4, "dpm")
    with pytest.raises(ValueError, match="num_steps"):
        s.timesteps(0, "ddim")
    with pytest.raises(ValueError, match="original_inference_steps"):
        s.timesteps(51, "lcm")
    with pytest.raises(ValueError, match="outside"):
        s.alpha(1000)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        Schedule(torch.tensor([0.9, float("nan")]))
    with pytest.raises(ValueError, match="dict"):
        Schedule.from_config("scheduler_config.json")
