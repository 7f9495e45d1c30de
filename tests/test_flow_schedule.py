"""FlowSchedule and the flow_euler sampler against diffusers' FlowMatchEulerDiscreteScheduler (test oracle)."""
import json

import numpy as np
import pytest
import torch

from renoise import samplers
from renoise.samplers import flow_euler
from renoise.schedules import FlowSchedule, Schedule

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

STEPS = (1, 4, 28, 50)
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
        "max_image_seq_len": 4096}
# (name, config, spacing, image token counts for dynamic shifting)
CASES = [
    ("default", {}, "default", None),
    ("sd3", SD3, "default", None),
    ("sd3-flux-spacing", SD3, "flux", None),
    ("shift-terminal", {**SD3, "shift_terminal": 0.1}, "default", None),
    ("flux", FLUX, "flux", (16, 1024, 4096, 64 * 48)),
    ("flux-default-spacing", FLUX, "default", (1024, 4096)),
    ("sd35-dynamic-linear", {**FLUX, "time_shift_type": "linear", "max_shift": 1.16}, "default", (1024,)),
    ("dynamic-terminal", {**FLUX, "shift_terminal": 0.02}, "flux", (256, 4096)),
]


def _mus(s, seq_lens):
    return [None] if seq_lens is None else [s.calculate_mu(n) for n in seq_lens]


def _reference(cfg, n, spacing, mu):
    ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    sig = np.linspace(1.0, 1 / n, n) if spacing == "flux" else None   # as FluxPipeline passes them
    ref.set_timesteps(n, sigmas=sig, mu=mu)
    return ref


@pytest.mark.parametrize("name,cfg,spacing,seq_lens", CASES, ids=[c[0] for c in CASES])
def test_sigmas_and_timesteps_equal_diffusers(name, cfg, spacing, seq_lens):
    base = FlowSchedule.from_config(cfg, spacing=spacing)
    for mu in _mus(base, seq_lens):
        s = base if mu is None else base.with_mu(mu)
        for n in STEPS:
            if cfg.get("shift_terminal") and n == 1:   # diffusers divides by 1 - σ_last = 0 (NaN); we refuse
                with pytest.raises(ValueError, match="shift_terminal"):
                    s.sigmas(n)
                continue
            ref = _reference(cfg, n, spacing, mu)
            assert torch.equal(s.sigmas(n), ref.sigmas), (name, n, mu)
            assert torch.equal(s.timesteps(n), ref.timesteps), (name, n, mu)
            chain = s.chain(n)
            assert [t for t, _ in chain] == ref.timesteps.tolist()
            assert [tn for _, tn in chain] == ref.timesteps.tolist()[1:] + [None]


def test_static_shift_is_the_shift_sigmas_apply():
    """static_shift(σ) = shift·σ / (1 + (shift - 1)·σ) on numbers, arrays and tensors; it keeps 0 and 1,
    is the identity at shift 1, and the SD3 config's sigmas (diffusers' own, checked above) are it applied
    to the unshifted schedule's grid."""
    s = FlowSchedule.from_config(SD3)
    x = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(s.static_shift(x), 3 * x / (1 + 2 * x), rtol=1e-15, atol=0)
    assert np.allclose(s.static_shift(x.numpy()), 3 * x.numpy() / (1 + 2 * x.numpy()), rtol=1e-15, atol=0)
    assert s.static_shift(0.0) == 0 and s.static_shift(1.0) == 1 and abs(s.static_shift(0.25) - 0.5) < 1e-15
    assert torch.equal(FlowSchedule().static_shift(x), x)
    lo = float(np.float32(s.static_shift(np.float32(1 / 1000))))          # the shifted grid's σ_min
    grid = np.linspace(1000, lo * 1000, 28) / 1000
    assert np.allclose(s.sigmas(28)[:-1].numpy(), s.static_shift(grid), rtol=1e-6, atol=0)


def test_mu_equals_the_pipelines_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    s = FlowSchedule.from_config(FLUX)
    for n in (16, 256, 1000, 4096, 6000):
        assert s.calculate_mu(n) == calculate_shift(n, 256, 4096, 0.5, 1.15)
    assert s.for_image(1024).mu == s.calculate_mu(1024)


@pytest.mark.parametrize("name,cfg,spacing,seq_lens", CASES[1:5], ids=[c[0] for c in CASES[1:5]])
def test_step_equals_diffusers(name, cfg, spacing, seq_lens):
    gen = torch.Generator().manual_seed(0)
    base = FlowSchedule.from_config(cfg, spacing=spacing)
    for mu in _mus(base, seq_lens):
        s = base if mu is None else base.with_mu(mu)
        for n in ((2, 4, 28) if cfg.get("shift_terminal") else (1, 4, 28)):
            ref = _reference(cfg, n, spacing, mu)
            x = torch.randn(2, 4, 8, 8, generator=gen)
            for i, (t, tn) in enumerate(s.chain(n)):
                v = torch.randn(x.shape, generator=gen)
                expected = ref.step(v, ref.timesteps[i], x).prev_sample
                got = flow_euler.step(x, v, t, tn, s)
                err = float((got - expected).norm() / expected.norm())
                assert err < 1e-6, (name, n, i, err)
                x = expected


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_inverse_step_undoes_step(dtype, tol):
    s = FlowSchedule.from_config(FLUX, spacing="flux").for_image(1024)
    gen = torch.Generator().manual_seed(1)
    for t, tn in s.chain(28):
        x = torch.randn(3, 16, 8, 8, generator=gen, dtype=dtype)
        v = torch.randn(x.shape, generator=gen, dtype=dtype) * 2
        back = flow_euler.inverse_step(flow_euler.step(x, v, t, tn, s), v, t, tn, s)
        assert float((back - x).norm() / x.norm()) < tol
        fwd = flow_euler.step(flow_euler.inverse_step(x, v, t, tn, s), v, t, tn, s)
        assert float((fwd - x).norm() / x.norm()) < tol


def test_tensor_timesteps_and_per_sample_timesteps():
    s = FlowSchedule.from_config(SD3)
    t, tn = s.chain(4)[1]
    x, v = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    eager = flow_euler.step(x, v, t, tn, s)
    assert torch.allclose(flow_euler.step(x, v, torch.tensor(t), torch.tensor(tn), s), eager, rtol=0, atol=1e-6)
    tt, ttn = torch.tensor([t, t]), torch.tensor([tn, tn])
    assert torch.allclose(flow_euler.step(x, v, tt, ttn, s), eager, rtol=0, atol=1e-6)


def test_add_noise_equals_scale_noise():
    s = FlowSchedule.from_config(SD3)
    ref = FlowMatchEulerDiscreteScheduler.from_config(SD3)
    ref.set_timesteps(28)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = ref.timesteps[7]
    expected = ref.scale_noise(x0, t[None], eps)
    assert torch.allclose(flow_euler.add_noise(x0, eps, float(t), s), expected, rtol=0, atol=1e-6)


def test_registered_and_refuses_discrete_schedules():
    assert "flow_euler" in samplers.NAMES and samplers.get("flow_euler") is flow_euler
    import renoise
    assert renoise.FlowSchedule is FlowSchedule
    disc = Schedule.create()
    with pytest.raises(ValueError, match="FlowSchedule"):
        flow_euler.step(torch.zeros(1, 1), torch.zeros(1, 1), 500, 400, disc)
    with pytest.raises(ValueError, match="FlowSchedule"):
        disc.chain(4, "flow_euler")
    with pytest.raises(ValueError, match="flow_euler"):
        FlowSchedule().chain(4, "ddim")
    with pytest.raises(ValueError, match="smaller"):
        flow_euler.step(torch.zeros(1, 1), torch.zeros(1, 1), 400.0, 500.0, FlowSchedule())


def test_from_config_sources_and_errors(tmp_path):
    ref = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in FLUX.items() if not k.startswith("_")})
    ref.save_pretrained(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    for src in (tmp_path, tmp_path / "scheduler", tmp_path / "scheduler" / "scheduler_config.json", saved):
        s = FlowSchedule.from_config(src, spacing="flux")
        assert s.use_dynamic_shifting and s.max_shift == 1.15 and s.spacing == "flux"
    with pytest.raises(ValueError, match="for_image"):
        FlowSchedule.from_config(saved).sigmas(4)
    with pytest.raises(ValueError, match="FlowSchedule.from_config"):
        Schedule.from_config(saved)
    with pytest.raises(ValueError, match="FlowSchedule.from_config"):
        Schedule.from_config({"shift": 3.0})
    with pytest.raises(ValueError, match="Schedule.from_config"):
        FlowSchedule.from_config({"_class_name": "DDIMScheduler", "beta_start": 0.00085})
    for key in ("use_karras_sigmas", "invert_sigmas", "stochastic_sampling"):
        with pytest.raises(ValueError, match=key):
            FlowSchedule.from_config({**SD3, key: True})
    with pytest.raises(ValueError, match="spacing"):
        FlowSchedule(spacing="trailing")
    with pytest.raises(ValueError, match="num_steps"):
        FlowSchedule().sigmas(0)
    assert FlowSchedule(**FlowSchedule.from_config(SD3).to_dict()) == FlowSchedule.from_config(SD3)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(shift=st.floats(0.5, 6.0), dynamic=st.booleans(), seq_len=st.integers(16, 8192), n=st.integers(1, 60),
       spacing=st.sampled_from(["default", "flux"]), pick=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_identity_property(shift, dynamic, seq_len, n, spacing, pick, seed):
    """inverse_step ∘ step = step ∘ inverse_step = id (float64, fixed v), on any schedule and step."""
    s = FlowSchedule(shift=shift, use_dynamic_shifting=dynamic, spacing=spacing).for_image(seq_len)
    chain = s.chain(n)
    t, tn = chain[min(int(pick * n), n - 1)]
    gen = torch.Generator().manual_seed(seed)
    x, v = (torch.randn(2, 3, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    assert torch.allclose(flow_euler.inverse_step(flow_euler.step(x, v, t, tn, s), v, t, tn, s), x, rtol=0, atol=1e-13)
    assert torch.allclose(flow_euler.step(flow_euler.inverse_step(x, v, t, tn, s), v, t, tn, s), x, rtol=0, atol=1e-13)
    sig = s.sigmas(n)
    assert bool((sig[:-1] > sig[1:]).all()) and sig[-1] == 0 and float(sig[0]) <= 1 + 1e-6
