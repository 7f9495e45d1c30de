"""renoise.invert / renoise.sample against a plain loop-by-loop implementation of
REFERENCE-BEHAVIOUR.md, on a tiny random diffusers UNet with diffusers' own schedulers.

The oracle is tests/official_renoise.py (the official algorithm written against diffusers,
also the baseline of benchmarks/inversion.py --part speed), written from the reference description,
not from renoise: diffusers' scheduler tables with hand-written inverse steps, the reference's
running mean, a per-channel autograd regularizer loop, and noise correction by torch.optim.SGD.
"""
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_unet


import renoise  # noqa: E402
import official_renoise as official  # noqa: E402
from renoise.presets import Plan  # noqa: E402
from renoise.schedules import Schedule  # noqa: E402

SIZE = 16


@pytest.fixture(scope="module")
def net():
    unet = make_tiny_unet("sd1")
    ctx = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(3))

    @torch.no_grad()
    def call(x, t):          # the raw network on its (already scaled) input
        return 0.5 * unet(x, t, encoder_hidden_states=ctx.expand(x.shape[0], -1, -1)).sample

    return call


def close(ours, theirs, rel=2e-5):
    """max |ours - theirs| <= rel · max |theirs| (float32 through tens of model calls)."""
    err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} x scale {scale:.3g}"


CASES = {
    # name: (sampler, steps, plan kwargs, reference kwargs)
    "ddim-plain": ("ddim", 6, dict(), dict(K=0, K_first_max=0, avg_first=(0, 1), avg_main=(0, 1), average=True)),
    "ddim-avg": ("ddim", 6, dict(iters=3, window=(1, 4), first_iters=2, first_window=(0, 2)),
                 dict(K=3, K_first_max=2, avg_first=(0, 2), avg_main=(1, 4), average=True)),
    "ddim-avg-reg": ("ddim", 6, dict(iters=2, window=(1, 3), first_iters=1, first_window=(0, 2), lambda_kl=0.05,
                                      lambda_ac=10.0, reg_rounds=2, reg_rolls=3),
                     dict(K=2, K_first_max=1, avg_first=(0, 2), avg_main=(1, 3), average=True)),
    "ddim-noavg-reg-clean": ("ddim", 6, dict(iters=2, window=(0, 3), average=False, lambda_kl=0.05, lambda_ac=10.0,
                                              reg_rounds=2, reg_rolls=3, reference_noise="clean"),
                             dict(K=2, K_first_max=2, avg_first=(0, 3), avg_main=(0, 3), average=False,
                                  clean_ref=True)),
    "euler-noavg-reg-override": ("euler_ancestral", 4, dict(iters=3, window=(2, 4), average=False, lambda_kl=0.065,
                                                            lambda_ac=20.0, reg_rounds=2, reg_rolls=2,
                                                            noise_correction="override"),
                                 dict(K=3, K_first_max=3, avg_first=(2, 4), avg_main=(2, 4), average=False)),
    # the preset against the benchmark's official defaults (reg and nc included)
    "euler-turbo-reference": ("euler_ancestral", 4, "sdxl-turbo-reference", official.SDXL_TURBO),
    "lcm-avg-optimize": ("lcm", 4, dict(iters=4, window=(2, 5), first_iters=2, first_window=(0, 3),
                                        noise_correction="optimize"),
                         dict(K=4, K_first_max=2, avg_first=(0, 3), avg_main=(2, 5), average=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_invert_equals_reference_loop(case, net):
    sampler, steps, plan_kw, ref_kw = CASES[case]
    if isinstance(plan_kw, str):
        plan = Plan.preset(plan_kw)
        ref_kw = dict(ref_kw)
        reg, nc = ref_kw.pop("reg"), ref_kw.pop("nc")
        assert reg == (plan.lambda_kl, plan.lambda_ac, plan.reg_rounds, plan.reg_rolls)
        assert nc == plan.noise_correction and (plan.nc_steps, plan.nc_lr) == (10, 1.8)
    else:
        plan = Plan(sampler=sampler, num_steps=steps, **plan_kw)
        reg = (plan.lambda_kl, plan.lambda_ac, plan.reg_rounds, plan.reg_rolls) if plan.regularize else None
        nc = None if plan.noise_correction == "none" else plan.noise_correction
    ref = official.Scheduler(sampler, steps)
    schedule = Schedule.from_config(ref.config)
    smod = renoise.samplers.get(sampler)
    den = lambda x, t: net(smod.model_input(x, t, schedule), t)  # noqa: E731
    z0 = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(1))

    res = renoise.invert(den, z0, schedule, sampler, steps, plan, generator=torch.Generator().manual_seed(9))
    traj, noises, calls = official.invert(net, ref, z0, torch.Generator().manual_seed(9), reg=reg, nc=nc, **ref_kw)
    assert [t for t, _ in res.chain] == ref.ts
    assert res.model_calls == calls
    for k in range(1, len(traj)):
        close(res.trajectory[k], traj[k])
    for ours, theirs in zip(res.noises, noises):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            close(ours, theirs)
    close(renoise.sample(den, res), official.denoise(net, ref, traj[-1], noises))
