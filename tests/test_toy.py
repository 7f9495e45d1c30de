"""renoise.toy: the analytic denoiser is exact, and inversion facts that follow from it."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from renoise import samplers
from renoise.fixed_point import iterate
from renoise.metrics import psnr
from renoise.samplers import _common
from renoise.schedules import Schedule
from renoise.toy import GaussianMixture, ShiftedGaussian

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
            prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def small_mixture(seed=0, K=5, d=3, std=0.3):
    gen = torch.Generator().manual_seed(seed)
    mix = GaussianMixture(torch.randn(K, d, generator=gen, dtype=torch.float64), std,
                          torch.randn(K, generator=gen, dtype=torch.float64))
    return mix, gen


@pytest.mark.parametrize("abar", [0.999, 0.6, 0.05])
def test_posterior_mean_is_tweedie(abar):
    """E[x0|x] = (x + (1-ᾱ)·∇log p(x)) / √ᾱ, with p the noised mixture differentiated by autograd."""
    mix, gen = small_mixture()
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64).requires_grad_()
    v = abar * mix.std**2 + 1 - abar
    d2 = (x[:, None, :] - math.sqrt(abar) * mix.means[None]).pow(2).sum(-1)
    logp = torch.logsumexp(mix.log_weights - d2 / (2 * v), dim=1)
    (score,) = torch.autograd.grad(logp.sum(), x)
    tweedie = (x + (1 - abar) * score) / math.sqrt(abar)
    torch.testing.assert_close(mix.posterior_mean(x.detach(), abar), tweedie.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral", "lcm"])
def test_denoiser_speaks_every_sampler_and_prediction_type(sampler, kind):
    """The output, read back with the sampler's own conventions, is the posterior mean."""
    mix, gen = small_mixture(1)
    s = Schedule.create(prediction_type=kind)
    mod = samplers.get(sampler)
    den = mix.denoiser(s, sampler)
    x0 = mix.sample(6, gen)
    for t in (10, 400, 999, torch.tensor(700)):
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        x = mod.add_noise(x0, noise, t, s)           # in the sampler's space
        out = den(x, t)
        abar, sig = float(s.alpha(t)), float(s.sigma(t))
        if sampler == "euler_ancestral":               # diffusers' σ-space readings
            x0_hat = {"epsilon": x - sig * out, "sample": out,
                      "v_prediction": out * (-sig / (sig**2 + 1) ** 0.5) + x / (sig**2 + 1)}[kind]
            xv = x / math.sqrt(sig**2 + 1)
        else:
            p, q, _, _ = _common.vp_x0_eps(kind, abar)
            x0_hat, xv = p * x + q * out, x
        torch.testing.assert_close(x0_hat, mix.posterior_mean(xv, abar), rtol=1e-9, atol=1e-9)


@given(a=st.lists(st.floats(-3, 3), min_size=1, max_size=6).filter(lambda v: max(map(abs, v)) > 0.1),
       t=st.floats(0, 3), dt=st.floats(0.01, 1.0), seed=st.integers(0, 2**31 - 1))
def test_shifted_gaussian_one_renoising_iteration_is_exact(a, t, dt, seed):
    """Supplementary toy: the Euler step forward from z_t misses the pre-image; one renoising
    iteration (one more evaluation of the ReNoise map) finds it exactly."""
    ode = ShiftedGaussian(torch.tensor(a, dtype=torch.float64))
    z_t = torch.randn(4, len(a), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    naive = ode.euler(z_t, t, dt)                              # inversion: velocity taken at (z_t, t)
    miss = ode.euler(naive, t + dt, -dt) - z_t                 # the denoising step back from it
    expected_miss = -ode.a * (math.exp(-t) - math.exp(-(t + dt))) * dt
    torch.testing.assert_close(miss, expected_miss.expand_as(miss), rtol=1e-9, atol=1e-12)
    assert float(miss.abs().max()) > 1e-4 * float(ode.a.abs().max()) * dt**2
    renoised = iterate(ode.renoise_map(z_t, t, dt), naive, 1).z
    torch.testing.assert_close(ode.euler(renoised, t + dt, -dt), z_t, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- mixture inversion
def invert_and_reconstruct(mix, x0, schedule, num_steps, calls, anderson=0):
    """DDIM inversion with `calls` model calls per step (ReNoise with K = calls - 1 renoising
    iterations), then DDIM sampling back; returns per-sample PSNR and the total model calls."""
    ddim, den = samplers.get("ddim"), mix.denoiser(schedule, "ddim")
    chain = schedule.chain(num_steps, "ddim")
    z, total = x0, 0
    for t, t_next in reversed(chain):
        z_prev = z
        res = iterate(lambda z_: ddim.inverse_step(z_prev, den(z_, t), t, t_next, schedule), z_prev, calls,
                      anderson=anderson)
        z, total = res.z, total + res.evals
    for t, t_next in chain:
        z = ddim.step(z, den(z, t), t, t_next, schedule)
    return psnr(z, x0, data_range=1.0), total


@pytest.fixture(scope="module")
def mixture_problem():
    gen = torch.Generator().manual_seed(0)
    mix = GaussianMixture.random(16, 64, std=0.05, scale=1.0, generator=gen)
    return mix, mix.sample(64, gen), Schedule.from_config(SD15)


# median PSNR (dB) of plain DDIM inversion (1 call per step), as measured on this setup
PLAIN_DB = {4: 26.0, 10: 27.1, 50: 31.3}


@pytest.mark.parametrize("num_steps", [4, 10, 50])
def test_mixture_renoising_lowers_ddim_inversion_error(mixture_problem, num_steps):
    mix, x0, s = mixture_problem
    plain, calls = invert_and_reconstruct(mix, x0, s, num_steps, 1)
    once, _ = invert_and_reconstruct(mix, x0, s, num_steps, 2)
    nine, _ = invert_and_reconstruct(mix, x0, s, num_steps, 10)
    assert calls == num_steps
    assert abs(float(plain.median()) - PLAIN_DB[num_steps]) < 1.0
    gain_once, gain_nine = float(once.median() - plain.median()), float(nine.median() - plain.median())
    # one renoising iteration: +0.9 / +2.1 / +5.7 dB measured; nine: +6 / +13 / +39 dB
    assert gain_once > {4: 0.6, 10: 1.5, 50: 4.5}[num_steps]
    assert gain_nine > {4: 5.0, 10: 11.0, 50: 35.0}[num_steps]
    assert bool((once > plain).float().mean() > 0.9)


def test_mixture_safeguarded_anderson_matches_plain_k9_with_a_third_of_the_calls(mixture_problem):
    mix, x0, s = mixture_problem
    k9, k9_calls = invert_and_reconstruct(mix, x0, s, 4, 10)
    plain3, _ = invert_and_reconstruct(mix, x0, s, 4, 3)
    aa, aa_calls = invert_and_reconstruct(mix, x0, s, 4, 3, anderson=2)
    assert 3 * aa_calls <= k9_calls
    assert aa.median() >= k9.median()
    assert int((aa < plain3 - 3).sum()) == 0      # no sample 3 dB below plain at equal calls
