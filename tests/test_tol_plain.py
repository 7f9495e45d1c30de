"""tol_plain: Anderson also stops a sample once its residual is what K plain iterations would reach."""
import pytest
import torch

from renoise.fixed_point import iterate
from renoise.presets import Plan


def two_speeds(n=8, seed=0):
    """g(z) = M z + b for two samples with symmetric M: sample 0 contracts fast (eigenvalues in
    [0.1, 0.3]), sample 1 slowly ([0.9, 0.97]); their exact fixed points."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(2, n, n, generator=gen, dtype=torch.float64))
    ev = torch.stack([torch.linspace(0.1, 0.3, n), torch.linspace(0.9, 0.97, n)]).double()
    M = Q @ torch.diag_embed(ev) @ Q.transpose(1, 2)
    b = torch.randn(2, n, generator=gen, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - M, b)
    return (lambda z: torch.einsum("bij,bj->bi", M, z) + b), exact


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stops_where_plain_iteration_would_get_no_further(seed):
    """A tol too tight for 10 calls: alone it spends them all on both samples; with tol_plain=9 each
    stops early, no less accurate than 10 plain calls (K = 9), the slow sample after a few calls."""
    g, exact = two_speeds(seed=seed)
    z0 = torch.zeros_like(exact)
    opts = dict(anderson=3, relax=2.0, tol=1e-10)
    plain9 = iterate(g, z0, 10)                                    # K = 9: 10 plain calls
    alone = iterate(g, z0, 10, **opts)
    both = iterate(g, z0, 10, tol_plain=9, **opts)
    err = lambda r: (r.z - exact).norm(dim=1)                      # noqa: E731
    calls = lambda r: (r.residuals > 0).sum(0)                     # noqa: E731  per sample
    assert calls(alone).tolist() == [10, 10]
    assert calls(both)[0] < 10 and calls(both)[1] <= 4
    assert bool((err(both) <= err(plain9)).all())
    # where it stopped, the residual was within r0·L̂^9, L̂ the first (un-relaxed) plain step's ratio
    for b in range(2):
        r = both.residuals[:, b]
        assert float(r[r > 0][-1]) <= float(r[0]) * float(r[1] / r[0]) ** 9 * (1 + 1e-12)


def test_a_loose_tol_still_decides_on_fast_samples():
    g, exact = two_speeds()
    z0 = torch.zeros_like(exact)
    tol = 0.3 * float(iterate(g, z0, 1).residuals[0].max())
    alone = iterate(g, z0, 10, anderson=3, relax=2.0, tol=tol)
    both = iterate(g, z0, 10, anderson=3, relax=2.0, tol=tol, tol_plain=9)
    assert torch.equal(alone.z[0], both.z[0])                      # tol is reached first: nothing changes
    assert both.evals <= alone.evals


def test_tol_plain_alone_and_bad_values():
    g, exact = two_speeds()
    z0 = torch.zeros_like(exact)
    res = iterate(g, z0, 10, anderson=3, tol_plain=4)             # tol None: only at r <= r0·L̂^4
    assert res.evals < 10                                          # both stopped early
    with pytest.raises(ValueError, match="needs Anderson"):
        iterate(g, z0, 5, tol=1e-3, tol_plain=3)
    with pytest.raises(ValueError, match="tol_plain"):
        iterate(g, z0, 5, anderson=3, tol_plain=0)
    with pytest.raises(ValueError, match="needs anderson > 0"):
        Plan(iters=9, window=(9, 10), average=False, tol=1e-2, tol_plain=9)
    with pytest.raises(ValueError, match="tol_plain must be an int >= 1"):
        Plan(iters=9, window=(9, 10), average=False, anderson=3, tol_plain=2.5)


def test_plan_field_reaches_the_inversion():
    """Plan.tol_plain is what renoise.invert's steps stop on: with a tol no step reaches in 10 calls,
    tol alone spends them all; with tol_plain=9 steps stop early and reconstruct as well as K = 9."""
    import renoise
    from renoise.metrics import psnr
    from renoise.schedules import Schedule
    from renoise.toy import GaussianMixture
    g = torch.Generator().manual_seed(0)
    gm = GaussianMixture.random(16, 64, std=0.3, generator=g)
    x0 = gm.sample(4, g).view(4, 4, 4, 4).float()
    sch = Schedule.create(timestep_spacing="leading", steps_offset=1)
    den = gm.denoiser(sch, "ddim")
    k9 = Plan(num_steps=4, iters=9, window=(9, 10), average=False)
    base = k9.replace(anderson=3, relax=2.0, tol=1e-12)
    runs = [renoise.invert(den, x0, sch, "ddim", 4, p) for p in (k9, base, base.replace(tol_plain=9))]
    assert runs[0].model_calls == runs[1].model_calls == 40 and runs[2].model_calls < 40
    q = [psnr(renoise.sample(den, r).flatten(1), x0.flatten(1), data_range=1.0) for r in runs]
    assert bool((q[2] >= q[0] - 0.1).all()), q
    # the report names the solves that used every call above tol, not those tol_plain stopped early
    assert len(runs[1].convergence()["not_converged"]) == 4 * 4
    named = runs[2].convergence()["not_converged"]
    assert len(named) < 16 and all(c["calls"] == 10 for c in named)


def test_demo_exact_preset_is_demo_chasing_plain_iteration():
    demo, exact = Plan.preset("demo"), Plan.preset("demo-exact")
    assert exact == demo.replace(name="demo-exact", tol=3e-4, tol_plain=6)
    assert demo.tol_plain is None and Plan.from_dict({"name": "old"}).tol_plain is None
    assert Plan.from_dict(exact.to_dict()) == exact


def test_demo_damped_preset_is_demo_at_two_damped_calls_a_step():
    demo, damped = Plan.preset("demo"), Plan.preset("demo-damped")
    assert damped == demo.replace(name="demo-damped", iters=1, window=(1, 2), anderson=0, relax=0.5, tol=None)
    assert Plan.from_dict(damped.to_dict()) == damped
