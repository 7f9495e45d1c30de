"""Samplers: parity with diffusers' schedulers (test-only oracle) and exact inverse identities."""
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from renoise import samplers
from renoise.schedules import Schedule

warnings.filterwarnings("ignore", message=".*scale_model_input.*")
pytest.importorskip("diffusers")
from test_schedules import CLASSES, CONFIGS  # noqa: E402

NAMES = ("ddim", "euler_ancestral", "lcm")
KINDS = ("epsilon", "v_prediction", "sample")
SHAPE = (2, 4, 8, 8)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _run_chain(cfg, sampler, dtype, tol, eta=0.0):
    """Feed our step and diffusers' step the same x, model output and noise at every timestep of
    1-, 4- and 50-step schedules; x follows diffusers' chain."""
    s, ref, mod = Schedule.from_config(cfg), CLASSES[sampler].from_config(cfg), samplers.get(sampler)
    opts = {"eta": eta} if sampler == "ddim" else {}
    gen = torch.Generator().manual_seed(0)
    for n in (1, 4, 50):
        ref.set_timesteps(n)
        assert torch.equal(s.timesteps(n, sampler), ref.timesteps)
        x = torch.randn(SHAPE, generator=gen, dtype=dtype) * 3
        for i, (t, t_next) in enumerate(s.chain(n, sampler)):
            ti = ref.timesteps[i]
            out = torch.randn(SHAPE, generator=gen, dtype=dtype)
            seed = 1000 * n + i
            noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)
            if sampler == "euler_ancestral":
                assert rel_err(mod.model_input(x, t, s), ref.scale_model_input(x, ti)) < tol
            else:
                assert mod.model_input(x, t, s) is x
            if sampler == "ddim":
                expected = ref.step(out, ti, x, eta=eta, variance_noise=noise if eta else None).prev_sample
            else:  # diffusers draws its noise from the generator: the same seed gives the same noise
                expected = ref.step(out, ti, x, generator=torch.Generator().manual_seed(seed)).prev_sample
            got = mod.step(x, out, t, t_next, s, noise=noise if mod.is_stochastic(t_next, **opts) else None, **opts)
            assert got.dtype == dtype
            assert rel_err(got, expected) < tol, (sampler, n, i, t, rel_err(got, expected))
            x = expected


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sampler", NAMES)
@pytest.mark.parametrize("name", CONFIGS)
def test_step_matches_diffusers(name, sampler, dtype, tol):
    _run_chain(CONFIGS[name], sampler, dtype, tol)


@pytest.mark.parametrize("sampler", ["ddim", "lcm"])  # diffusers' Euler-ancestral has no x0-prediction
def test_sample_prediction_matches_diffusers(sampler):
    _run_chain(dict(CONFIGS["sd15"], prediction_type="sample"), sampler, torch.float64, 1e-6)


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_ddim_eta_matches_diffusers(name):
    _run_chain(CONFIGS[name], "ddim", torch.float64, 1e-6, eta=0.6)
    _run_chain(CONFIGS[name], "ddim", torch.float32, 1e-5, eta=1.0)


@pytest.mark.parametrize("sampler", NAMES)
def test_add_noise_matches_diffusers(sampler):
    cfg = CONFIGS["sd15"]
    s, ref, mod = Schedule.from_config(cfg), CLASSES[sampler].from_config(cfg), samplers.get(sampler)
    ref.set_timesteps(4)
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    for t in ref.timesteps:
        expected = ref.add_noise(x0, noise, t.reshape(1))
        assert rel_err(mod.add_noise(x0, noise, t.item(), s), expected) < 1e-6


# ---------------------------------------------------------------------------- inverse identities
def _coef_scale(mod, t, t_next, s, opts, x, out, noise):
    A, B, C = (abs(float(c)) for c in mod.coefficients(t, t_next, s, **opts))
    return A, A * x.abs().max() + B * out.abs().max() + C * noise.abs().max()


@st.composite
def transitions(draw, sampler):
    if sampler == "euler_ancestral":
        t = draw(st.floats(1.0, 999.0))
        t_next = draw(st.one_of(st.none(), st.floats(0.0, t - 0.5)))
    else:
        t = draw(st.integers(1, 999))
        t_next = draw(st.one_of(st.none(), st.integers(0, t - 1)))
    return t, t_next


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sampler", NAMES)
@given(data=st.data())
def test_inverse_step_inverts_step(sampler, kind, data):
    s = Schedule.from_config(dict(CONFIGS["sd15"], prediction_type=kind,
                                  set_alpha_to_one=data.draw(st.booleans(), "set_alpha_to_one")))
    mod = samplers.get(sampler)
    t, t_next = data.draw(transitions(sampler), "t, t_next")
    opts = {"eta": data.draw(st.sampled_from([0.0, 0.3, 1.0]), "eta")} if sampler == "ddim" else {}
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4), "shape"))
    seed = data.draw(st.integers(0, 2**31 - 1), "seed")
    gen = torch.Generator().manual_seed(seed)
    x, out, noise = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    noise = noise if mod.is_stochastic(t_next, **opts) else None
    A, scale = _coef_scale(mod, t, t_next, s, opts, x, out, noise if noise is not None else torch.zeros(()))
    singular = kind == "sample" and t_next is None and (sampler == "euler_ancestral" or (sampler == "ddim" and s.final_alpha_cumprod == 1.0))
    if singular:  # the step returns the model output whatever x is
        with pytest.raises(ValueError, match="cannot be inverted"):
            mod.inverse_step(x, out, t, t_next, s, noise=noise, **opts)
        return
    x_next = mod.step(x, out, t, t_next, s, noise=noise, **opts)
    back = mod.inverse_step(x_next, out, t, t_next, s, noise=noise, **opts)
    assert float((back - x).abs().max()) <= 1e-12 * scale / A
    # and the other way round
    forward = mod.step(mod.inverse_step(x, out, t, t_next, s, noise=noise, **opts), out, t, t_next, s, noise=noise, **opts)
    assert float((forward - x).abs().max()) <= 1e-12 * (1 + scale / A)


def test_inverse_is_not_the_epsilon_shortcut():
    """With v-prediction the update depends on x through the output's meaning; an epsilon-style
    inverse would be off. Our inverse agrees with a direct solve of the nonlinear-looking update."""
    s = Schedule.from_config(CONFIGS["sd21"])
    mod = samplers.get("ddim")
    gen = torch.Generator().manual_seed(3)
    x, v = torch.randn(SHAPE, generator=gen, dtype=torch.float64), torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    x_next = mod.step(x, v, 501, 251, s)
    as_eps = mod.step(x, v, 501, 251, Schedule.from_config(CONFIGS["sd15"]))
    assert rel_err(as_eps, x_next) > 1e-2
    torch.testing.assert_close(mod.inverse_step(x_next, v, 501, 251, s), x, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- dtypes, timesteps, noise
@pytest.mark.parametrize("sampler", NAMES)
def test_low_precision_uses_fp32_math(sampler):
    s, mod = Schedule.from_config(CONFIGS["sd15"]), samplers.get(sampler)
    gen = torch.Generator().manual_seed(4)
    x, out, noise = (torch.randn(SHAPE, generator=gen) for _ in range(3))
    t, t_next = s.chain(4, sampler)[1]
    ref = mod.step(x, out, t, t_next, s, noise=noise)
    assert ref.dtype == torch.float32
    assert rel_err(ref, mod.step(x.double(), out.double(), t, t_next, s, noise=noise.double())) < 1e-6
    for dt in (torch.float16, torch.bfloat16):
        got = mod.step(x.to(dt), out.to(dt), t, t_next, s, noise=noise.to(dt))
        expected = mod.step(x.to(dt).float(), out.to(dt).float(), t, t_next, s, noise=noise.to(dt).float()).to(dt)
        assert got.dtype == dt and torch.equal(got, expected)


@pytest.mark.parametrize("sampler", NAMES)
def test_tensor_timesteps_equal_number_timesteps(sampler):
    s, mod = Schedule.from_config(CONFIGS["sd21"]), samplers.get(sampler)
    gen = torch.Generator().manual_seed(5)
    x, out, noise = (torch.randn(SHAPE, generator=gen, dtype=torch.float64) for _ in range(3))
    chain = s.chain(4, sampler)
    for t, t_next in chain[:-1]:
        num = mod.step(x, out, t, t_next, s, noise=noise)
        ten = mod.step(x, out, torch.tensor(t), torch.tensor(t_next), s, noise=noise)
        torch.testing.assert_close(ten, num, rtol=1e-13, atol=1e-13)
    # one timestep per batch element
    (t0, n0), (t1, n1) = chain[0], chain[1]
    per_sample = mod.step(x, out, torch.tensor([t0, t1]), torch.tensor([n0, n1]), s, noise=noise)
    torch.testing.assert_close(per_sample[0], mod.step(x, out, t0, n0, s, noise=noise)[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(per_sample[1], mod.step(x, out, t1, n1, s, noise=noise)[1], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("sampler", NAMES)
def test_step_compiles_without_graph_breaks(sampler):
    s, mod = Schedule.from_config(CONFIGS["sd15"]), samplers.get(sampler)
    gen = torch.Generator().manual_seed(6)
    x, out, noise = (torch.randn(SHAPE, generator=gen) for _ in range(3))
    t, t_next = s.chain(4, sampler)[1]
    t, t_next = torch.tensor(t), torch.tensor(t_next)

    def both(x, out, noise, t, t_next):
        y = mod.step(x, out, t, t_next, s, noise=noise)
        return y, mod.inverse_step(y, out, t, t_next, s, noise=noise)

    compiled = torch.compile(both, fullgraph=True, backend="eager")
    y, back = compiled(x, out, noise, t, t_next)
    torch.testing.assert_close(y, both(x, out, noise, t, t_next)[0])
    torch.testing.assert_close(back, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", NAMES)
def test_noise_coeff_and_is_stochastic(sampler):
    s, mod = Schedule.from_config(CONFIGS["sd15"]), samplers.get(sampler)
    opts = {"eta": 0.5} if sampler == "ddim" else {}
    gen = torch.Generator().manual_seed(7)
    x, out, noise = (torch.randn(SHAPE, generator=gen, dtype=torch.float64) for _ in range(3))
    for t, t_next in s.chain(4, sampler):
        stochastic = mod.is_stochastic(t_next, **opts)
        c = mod.noise_coeff(t, t_next, s, **opts)
        assert isinstance(c, torch.Tensor) and c.dtype == torch.float64
        assert stochastic == (t_next is not None or sampler == "ddim")
        if stochastic:
            diff = mod.step(x, out, t, t_next, s, noise=noise, **opts) - mod.step(x, out, t, t_next, s, noise=torch.zeros_like(x), **opts)
            torch.testing.assert_close(diff, c * noise, rtol=1e-12, atol=1e-12)
        else:
            assert float(c) == 0.0
    assert not samplers.get("ddim").is_stochastic(None, eta=0.0)


def test_sigma_space_and_vp_space_agree():
    """Euler's σ-space sample x/√(σ²+1) is the VP sample; add_noise in both spaces agrees."""
    s = Schedule.from_config(CONFIGS["sd15"])
    gen = torch.Generator().manual_seed(8)
    x0, noise = torch.randn(SHAPE, generator=gen, dtype=torch.float64), torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    eu, dd = samplers.get("euler_ancestral"), samplers.get("ddim")
    xs = eu.add_noise(x0, noise, 600, s)
    torch.testing.assert_close(eu.model_input(xs, 600, s), dd.add_noise(x0, noise, 600, s), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("sampler", NAMES)
def test_bad_input_raises(sampler):
    s, mod = Schedule.from_config(CONFIGS["sd15"]), samplers.get(sampler)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="smaller than t"):
        mod.step(x, x, 250, 500, s, noise=x)
    with pytest.raises(ValueError, match="smaller than t"):
        mod.inverse_step(x, x, 250, 250, s, noise=x)
    with pytest.raises(ValueError, match="shape"):
        mod.step(x, x[:1], 500, 250, s, noise=x)
    with pytest.raises(ValueError, match="shape"):
        mod.step(x, x, 500, 250, s, noise=x[..., :4])
    with pytest.raises(ValueError, match="outside"):
        mod.step(x, x, 1500, 250, s, noise=x)
    if sampler != "ddim":
        with pytest.raises(ValueError, match="noise"):
            mod.step(x, x, 500, 250, s)
    else:
        with pytest.raises(ValueError, match="noise"):
            mod.step(x, x, 500, 250, s, eta=0.5)
        with pytest.raises(ValueError, match="eta"):
            mod.step(x, x, 500, 250, s, eta=-0.1)
    with pytest.raises(ValueError, match="sampler"):
        samplers.get("heun")


def test_every_sampler_says_whether_it_adds_noise():
    """The loop refuses noise correction from the sampler's ADDS_NOISE, not from the model family."""
    import renoise
    from renoise import samplers
    from renoise.presets import Plan
    from renoise.schedules import FlowSchedule
    assert {n: samplers.get(n).ADDS_NOISE for n in samplers.NAMES} == {
        "ddim": True, "euler_ancestral": True, "lcm": True, "flow_euler": False}
    plan = Plan(name="nc", sampler="euler_ancestral", num_steps=2, noise_correction="optimize")
    with pytest.raises(ValueError, match="the 'flow_euler' step adds none: use noise_correction='none'"):
        renoise.invert(lambda x, t: torch.zeros_like(x), torch.zeros(1, 4, 2, 2), FlowSchedule(), "flow_euler", 2, plan)
