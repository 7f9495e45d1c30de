"""ReNoise inversion with a FlowSchedule and the flow_euler sampler, and saving/loading its result."""
import json

import pytest
import torch

import renoise
from renoise.inversion import InversionResult
from renoise.presets import Plan
from renoise.schedules import FlowSchedule

FLUX = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": True,
        "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def gaussian_velocity(mean, std):
    """The exact velocity E[ε - x0 | x_σ] for data x0 ~ N(mean, std²) (elementwise), x_σ = (1-σ)x0 + σε."""
    def v(x, t):
        s = t / 1000                     # t a Python float (eager) or a 0-d tensor (compiled regions)
        var = (1 - s) ** 2 * std**2 + s**2
        r = x - (1 - s) * mean
        x0 = mean + (1 - s) * std**2 / var * r
        eps = s / var * r
        return (eps - x0).to(x.dtype)
    return v


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    std = 0.5
    z0 = mean + std * torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    return gaussian_velocity(mean, std), z0


def _err(a, b):
    return float((a - b).norm() / b.norm())


def test_renoise_beats_plain_euler_inversion(problem):
    den, z0 = problem
    sch = FlowSchedule.from_config(FLUX, spacing="flux").for_image(16)
    plain = renoise.invert(den, z0, sch, "flow_euler", 8, Plan(sampler="flow_euler", num_steps=8))
    fixed = renoise.invert(den, z0, sch, "flow_euler", 8, Plan(sampler="flow_euler", num_steps=8, iters=20,
                                                                window=(20, 21), average=False))
    e_plain, e_fixed = _err(renoise.sample(den, plain), z0), _err(renoise.sample(den, fixed), z0)
    assert e_fixed < 1e-6 and e_plain > 1e-3, (e_fixed, e_plain)
    assert plain.timesteps.tolist() == sch.timesteps(8).tolist()


def test_save_load_roundtrip_flow(problem, tmp_path):
    den, z0 = problem
    sch = FlowSchedule.from_config(FLUX, spacing="flux").for_image(1024)
    res = renoise.invert(den, z0, sch, "flow_euler", 6, Plan(sampler="flow_euler", num_steps=6, iters=3),
                         strength=0.5)
    res.extra = {"model": "flux-dev", "size": [64, 64]}
    path = tmp_path / "flow.safetensors"
    res.save(path)
    back = InversionResult.load(path)
    assert isinstance(back.schedule, FlowSchedule) and back.schedule == sch and back.schedule.mu == sch.mu
    assert back.sampler == "flow_euler" and back.plan == res.plan and back.extra == res.extra
    assert back.chain == res.chain and back.start == res.start == 3
    for f in ("z_T", "trajectory", "timesteps"):
        assert torch.equal(getattr(back, f), getattr(res, f))
    assert back.noises == res.noises == [None] * 3
    assert torch.equal(renoise.sample(den, back), renoise.sample(den, res))
    # an unknown schedule kind is refused by name
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta["schedule_kind"] = "karras"
    save_file(tensors, str(tmp_path / "odd.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="schedule_kind"):
        InversionResult.load(tmp_path / "odd.safetensors")
    assert json.loads(meta["schedule"])["spacing"] == "flux"


def test_flow_refuses_the_regularizer(problem):
    den, z0 = problem
    sch = FlowSchedule.from_config(FLUX, spacing="flux").for_image(16)
    with pytest.raises(ValueError, match="prediction_type"):
        renoise.invert(den, z0, sch, "flow_euler", 4, Plan(sampler="flow_euler", num_steps=4, reg_rounds=1,
                                                           lambda_ac=0.1), generator=torch.Generator())


def test_traced_regions_equal_eager(problem):
    """compile="trace": each inversion step and each sampling step run through dynamo (eager backend)
    with tensor timesteps, as compiled regions do; the values equal the eager loop's."""
    den, z0 = problem
    sch = FlowSchedule.from_config(FLUX, spacing="flux").for_image(64)
    plan = Plan(sampler="flow_euler", num_steps=4, iters=2, window=(2, 3), average=False)
    eager = renoise.invert(den, z0, sch, "flow_euler", 4, plan)
    traced = renoise.invert(den, z0, sch, "flow_euler", 4, plan, compile="trace")
    assert _err(traced.z_T, eager.z_T) < 1e-12
    assert _err(renoise.sample(den, traced, compile="trace"), renoise.sample(den, eager)) < 1e-12
