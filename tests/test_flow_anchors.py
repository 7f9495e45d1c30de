"""The exact flow-matching velocity of a Gaussian mixture (renoise.toy) and the flow-inversion anchors
(renoise.flow_anchors: plain Euler inversion, RF-Solver, FireFlow, RF-Inversion, Uni-Inv, FTEdit) run by
renoise.invert / renoise.sample, each checked against its published formula on that analytic flow."""
import math

import numpy as np
import pytest
import torch

import renoise
from renoise import flow_anchors
from renoise.inversion import InversionResult
from renoise.presets import Plan
from renoise.schedules import FlowSchedule
from renoise.toy import GaussianMixture

UNIFORM = FlowSchedule(spacing="flux")          # shift 1: σ = 1, 1 - 1/n, ..., 1/n, 0 (uniform steps)
FLUX = FlowSchedule(shift=3.0, use_dynamic_shifting=True, spacing="flux").for_image(1024)


def mixture(seed=0, K=6, d=12, std=0.3):
    g = torch.Generator().manual_seed(seed)
    return GaussianMixture.random(K, d, std=std, scale=1.0, generator=g), g


def plan(solver, n, **kw):
    return Plan(sampler="flow_euler", num_steps=n, solver=solver, **kw)


def recording(den):
    """den with a log of (x, t) of every call."""
    log = []

    def f(x, t):
        log.append((x.clone(), t))
        return den(x, t)
    f.log = log
    return f


# ------------------------------------------------------------------------------ the exact velocity

@pytest.mark.parametrize("sigma", [0.05, 0.3, 0.7, 0.97])
def test_velocity_is_tweedie_by_autograd(sigma):
    """v = E[ε|x] - E[x0|x] with E[ε|x] = -σ·∇log p_σ(x) and E[x0|x] = (x - σ·E[ε|x])/(1-σ), the
    marginal density's score taken by autograd of its log-sum-exp."""
    mix, g = mixture(1)
    x = ((1 - sigma) * mix.sample(5, g) + sigma * torch.randn(5, mix.dim, generator=g, dtype=torch.float64))
    x.requires_grad_()
    a = 1 - sigma
    var = a**2 * mix.std**2 + sigma**2
    d2 = (x[:, None] - a * mix.means[None]).pow(2).sum(-1)
    logp = torch.logsumexp(mix.log_weights - d2 / (2 * var), 1).sum()
    (score,) = torch.autograd.grad(logp, x)
    e_eps = -sigma * score
    e_x0 = (x - sigma * e_eps) / (1 - sigma)
    want = (e_eps - e_x0).detach()
    got = mix.velocity(x.detach(), sigma)
    assert (got - want).abs().max() < 1e-10 * want.abs().max()


def test_velocity_agrees_with_the_vp_posterior_mean():
    """The same x_σ scaled by c = √((1-σ)² + σ²) is a VP sample at ᾱ = (1-σ)²/c²: the existing VP
    posterior mean gives E[x0|x], E[ε|x] = (x - (1-σ)·E[x0|x])/σ, and v is their difference. Per-sample
    σ (a [B] tensor) and the [B, C, h, w] layout too."""
    mix, g = mixture(2, d=16)
    sig = torch.tensor([0.1, 0.4, 0.6, 0.95], dtype=torch.float64)
    x = (1 - sig[:, None]) * mix.sample(4, g) + sig[:, None] * torch.randn(4, 16, generator=g, dtype=torch.float64)
    want = []
    for xi, s in zip(x, sig.tolist()):
        c = math.hypot(1 - s, s)
        x0 = mix.posterior_mean(xi[None] / c, torch.tensor((1 - s) ** 2 / c**2, dtype=torch.float64))
        want.append((xi[None] - (1 - s) * x0) / s - x0)
    want = torch.cat(want)
    assert (mix.velocity(x, sig) - want).abs().max() < 1e-12
    assert torch.allclose(mix.velocity(x.reshape(4, 1, 4, 4), sig), want.reshape(4, 1, 4, 4), atol=1e-12)


def test_velocity_monte_carlo():
    """v is the conditional mean of ε - x0: the residual ε - x0 - v(x_σ) has mean 0 and is uncorrelated
    with x_σ (checked within 5 standard errors over 200k draws)."""
    mix, g = mixture(3, K=3, d=2, std=0.4)
    n, s = 200_000, 0.45
    x0 = mix.sample(n, g)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = (1 - s) * x0 + s * eps
    res = eps - x0 - mix.velocity(x, s)
    for f in (res, res * x):
        mean, se = f.mean(0), f.std(0) / n**0.5
        assert (mean.abs() < 5 * se).all(), (mean, se)
    # and it is not trivially so: the unconditional mean -E[x0] fails the same test
    plain = eps - x0 + x0.mean(0)
    assert ((plain * x).mean(0).abs() > 5 * (plain * x).std(0) / n**0.5).any()


def test_flow_denoiser_convention():
    mix, g = mixture(4)
    den = mix.flow_denoiser(FLUX)
    x = mix.sample(3, g).reshape(3, 3, 2, 2)
    t = FLUX.timesteps(8)[3].item()
    assert torch.equal(den(x, t), mix.velocity(x, t / 1000)) and den.calls == 1
    assert torch.equal(den(x, None), -x)                       # σ = 0: v = -x0 = -x
    with pytest.raises(ValueError, match="dimensions"):
        den(torch.zeros(2, 5), t)


def test_flow_noise_is_the_ode_end():
    """RK4's noise end converges at fourth order (doubling the steps shrinks the change ~16-fold, to < 1e-8
    at 400 steps) and sampling back from it returns to the data."""
    mix, g = mixture(5)
    x0 = mix.sample(3, g)
    z = {n: mix.flow_noise(x0, n) for n in (100, 200, 400)}
    z1 = z[400]
    d1, d2 = float((z[100] - z[200]).abs().max()), float((z[200] - z[400]).abs().max())
    assert d2 < 1e-8 and 10 < d1 / d2 < 24, (d1, d2)
    back = renoise.flow_anchors.sample_chain(mix.flow_denoiser(UNIFORM), z1, UNIFORM, UNIFORM.chain(400),
                                             plan("rf-solver", 400))
    assert (back - x0).abs().max() < 1e-5


# ------------------------------------------------------------------------------ the anchors' formulas

def test_euler_anchor_is_published_plain_inversion_and_differs_from_k0():
    """solver="euler": x' = x + h·v(x, σ_lo) (v at the known point and its own σ), one call a step; ReNoise's
    K = 0 takes v(x, σ_hi) at the same point."""
    mix, g = mixture(6)
    x0 = mix.sample(2, g)
    den = mix.flow_denoiser(FLUX)
    chain = FLUX.chain(5)
    res = renoise.invert(den, x0, FLUX, "flow_euler", 5, plan("euler", 5))
    k0 = renoise.invert(den, x0, FLUX, "flow_euler", 5, Plan(sampler="flow_euler", num_steps=5))
    x = y = x0
    for t, tn in reversed(chain):
        s, s_hi = FLUX.sig(tn), FLUX.sig(t)
        x = x + (s_hi - s) * mix.velocity(x, s)
        y = y + (s_hi - s) * mix.velocity(y, s_hi)
    assert (res.z_T - x).abs().max() < 1e-12 and (k0.z_T - y).abs().max() < 1e-12
    assert (res.z_T - k0.z_T).abs().max() > 1e-3
    assert res.model_calls == 5 and res.sampler == "flow_euler" and res.noises == [None] * 5
    assert res.convergence()["budget"] == [1.0, 1.0]


def test_rf_solver_step_formula_and_calls():
    """x' = x + h·v1 + ½h²·(v2 - v1)/(h/2), v2 at the half step: two calls, the second at x + (h/2)·v1 and
    σ + h/2; algebraically the explicit midpoint x + h·v2."""
    mix, g = mixture(7)
    x = mix.sample(3, g)
    den = recording(mix.flow_denoiser(FLUX))
    s, s2 = 0.3, 0.45
    got = flow_anchors.rf_solver_step(den, x, s, s2, FLUX)
    h = s2 - s
    v1 = mix.velocity(x, s)
    v2 = mix.velocity(x + h / 2 * v1, s + h / 2)
    assert len(den.log) == 2 and den.log[1][1] == pytest.approx((s + h / 2) * 1000)
    assert torch.allclose(den.log[1][0], x + h / 2 * v1, atol=1e-14)
    assert (got - (x + h * v1 + 0.5 * h * h * (v2 - v1) / (h / 2))).abs().max() < 1e-12
    assert (got - (x + h * v2)).abs().max() < 1e-12


def _slope(ns, errs):
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0]


def test_rf_solver_is_second_order_and_euler_first():
    """Inverting to the exact ODE's noise end (RK4 reference) on uniform steps: RF-Solver's error falls as
    n^-2, plain Euler inversion's as n^-1, FireFlow's as n^-2 (its reused midpoint keeps the order)."""
    mix, g = mixture(8, std=0.5)
    x0 = mix.sample(4, g)
    z1 = mix.flow_noise(x0, 1000)
    den = mix.flow_denoiser(UNIFORM)
    ns = [8, 16, 32, 64]
    slopes = {}
    for solver in ("euler", "rf-solver", "fireflow"):
        errs = [float((renoise.invert(den, x0, UNIFORM, "flow_euler", n, plan(solver, n)).z_T - z1).norm())
                for n in ns]
        slopes[solver] = _slope(ns, errs)
    assert 0.8 < slopes["euler"] < 1.2, slopes
    assert 1.8 < slopes["rf-solver"] < 2.3, slopes
    assert 1.7 < slopes["fireflow"] < 2.3, slopes


def test_fireflow_reuses_the_midpoint_velocity():
    """n + 1 calls each way; every call after the first is at a midpoint x_i + (h/2)·ṽ_{i-1} (the previous
    midpoint velocity, never a fresh v(x_i, σ_i)); the trajectory is the published recursion."""
    mix, g = mixture(9)
    x0 = mix.sample(2, g)
    den = recording(mix.flow_denoiser(FLUX))
    n = 6
    res = renoise.invert(den, x0, FLUX, "flow_euler", n, plan("fireflow", n))
    assert res.model_calls == n + 1 and len(den.log) == n + 1
    sig = [0.0] + [FLUX.sig(t) for t, _ in reversed(FLUX.chain(n))]
    x, v, calls = x0, mix.velocity(x0, 0.0), [(x0, 0.0)]
    for i in range(n):
        h = sig[i + 1] - sig[i]
        xm = x + h / 2 * v
        calls.append((xm, sig[i] + h / 2))
        v = mix.velocity(xm, sig[i] + h / 2)
        x = x + h * v
        assert (res.trajectory[i + 1] - x).abs().max() < 1e-12
    for (xa, ta), (xb, sb) in zip(den.log, calls):
        assert ta == pytest.approx(sb * 1000) and (xa - xb).abs().max() < 1e-12
    den.log.clear()
    renoise.sample(den, res)
    assert len(den.log) == n + 1


def test_rf_inversion_controller():
    """γ = 0 is plain Euler inversion exactly; γ > 0 pulls z_T towards the fixed noise y1 (drawn from the
    generator), monotonically in γ, and γ = 1 lands on it; the step is Algorithm 1's."""
    mix, g = mixture(10)
    x0 = mix.sample(3, g)
    den = mix.flow_denoiser(FLUX)
    n = 8
    y1 = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float32).double()
    euler = renoise.invert(den, x0, FLUX, "flow_euler", n, plan("euler", n))
    dist = []
    for gamma in (0.0, 0.25, 0.5, 1.0):
        r = renoise.invert(den, x0, FLUX, "flow_euler", n, plan("rf-inversion", n, rf_gamma=gamma),
                           generator=torch.Generator().manual_seed(5))
        assert r.model_calls == n
        if gamma == 0:
            assert torch.equal(r.z_T, euler.z_T) and torch.equal(r.trajectory, euler.trajectory)
        dist.append(float((r.z_T - y1).norm()))
    assert dist[0] > dist[1] > dist[2] > dist[3] and dist[3] < 1e-12, dist
    y = x0[:1]
    s, s2 = 0.2, 0.35
    u = mix.velocity(y, s)
    want = y + (s2 - s) * (u + 0.5 * ((y1[:1] - y) / (1 - s) - u))
    got = flow_anchors.rf_inversion_step(den, y, s, s2, FLUX, y1[:1], 0.5)
    assert (got - want).abs().max() < 1e-12
    with pytest.raises(ValueError, match="generator"):
        renoise.invert(den, x0, FLUX, "flow_euler", n, plan("rf-inversion", n))


def test_rf_inversion_sampling_eta():
    """Algorithm 2: η = 0 samples by plain Euler; η = 1 on every step lands on the image y0 = z0 whatever
    z_T is; the preset's η = 0.9 on the first quarter of the steps acts on those steps only."""
    mix, g = mixture(11)
    x0 = mix.sample(2, g)
    den = mix.flow_denoiser(FLUX)
    n = 8
    r = renoise.invert(den, x0, FLUX, "flow_euler", n, plan("rf-inversion", n, rf_gamma=0.5),
                       generator=torch.Generator().manual_seed(0))
    plain = renoise.sample(den, r)
    r.plan = plan("euler", n)
    assert torch.equal(renoise.sample(den, r), plain)
    r.plan = Plan(sampler="flow_euler", num_steps=n)            # the flow_euler sampler's own loop: the same
    assert (renoise.sample(den, r) - plain).abs().max() < 1e-13
    r.plan = plan("rf-inversion", n, rf_eta=1.0, rf_eta_window=(0.0, 1.0))
    anywhere = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    assert (renoise.sample(den, r, z_T=anywhere) - x0).abs().max() < 1e-12
    r.plan = Plan.preset("rf-inversion").replace(num_steps=n)
    assert [flow_anchors.eta_at(r.plan, i, n) for i in range(n)] == [0.9, 0.9] + [0.0] * 6
    seen = []
    renoise.sample(den, r, callback=lambda i, t, x: seen.append(x))
    x = r.z_T
    for i, (t, tn) in enumerate(r.chain):
        s, s2 = FLUX.sig(t), FLUX.sig(tn)
        u = mix.velocity(x, s)
        eta = 0.9 if i < 2 else 0.0
        x = x + (s2 - s) * (u + eta * ((x - x0) / s - u))
        assert (seen[i] - x).abs().max() < 1e-12


def test_uni_inv_predictor_corrector_formula_and_calls():
    """Uni-Inv (UniEdit-Flow `denoise_uniinv`): n + 1 calls; the first at (x0, σ = 0), every later one at
    the predictor x_i + h·ṽ_{i-1} and the step's UPPER σ; x_{i+1} = x_i + h·ṽ_i; it samples by plain Euler
    (n calls, the flow_euler sampler's own loop)."""
    mix, g = mixture(15)
    x0 = mix.sample(2, g)
    den = recording(mix.flow_denoiser(FLUX))
    n = 6
    res = renoise.invert(den, x0, FLUX, "flow_euler", n, plan("uni-inv", n))
    assert res.model_calls == n + 1 and len(den.log) == n + 1
    sig = [0.0] + [FLUX.sig(t) for t, _ in reversed(FLUX.chain(n))]
    x, v, calls = x0, mix.velocity(x0, 0.0), [(x0, 0.0)]
    for i in range(n):
        h = sig[i + 1] - sig[i]
        xp = x + h * v
        calls.append((xp, sig[i + 1]))
        v = mix.velocity(xp, sig[i + 1])
        x = x + h * v
        assert (res.trajectory[i + 1] - x).abs().max() < 1e-12
    for (xa, ta), (xb, sb) in zip(den.log, calls):
        assert ta == pytest.approx(sb * 1000) and (xa - xb).abs().max() < 1e-12
    den.log.clear()
    back = renoise.sample(den, res)
    assert len(den.log) == n
    res.plan = Plan(sampler="flow_euler", num_steps=n)
    assert (renoise.sample(mix.flow_denoiser(FLUX), res) - back).abs().max() < 1e-13


def test_uni_inv_round_trip_is_second_order_euler_first():
    """The paper's claim: Uni-Inv's local inversion-reconstruction error is O(h³), so inverting and sampling
    back by plain Euler on n uniform steps errs as n^-2; plain Euler inversion (v at the known point) as n^-1."""
    mix, g = mixture(8, std=0.5)
    x0 = mix.sample(4, g)
    den = mix.flow_denoiser(UNIFORM)
    ns = [16, 32, 64, 128]
    slopes = {}
    for solver in ("euler", "uni-inv"):
        errs = []
        for n in ns:
            r = renoise.invert(den, x0, UNIFORM, "flow_euler", n, plan(solver, n))
            errs.append(float((renoise.sample(den, r) - x0).norm()))
        slopes[solver] = _slope(ns, errs)
    assert 0.8 < slopes["euler"] < 1.2, slopes
    assert 1.8 < slopes["uni-inv"] < 2.4, slopes


def test_ftedit_fixed_point_average_formula_and_calls():
    """FTEdit's Stage I (`fixpoint_step`, num_fixpoint_steps = 2, average_step_ranges = (0, 5)): 3 calls a
    step, all at the UPPER σ, at x, x + h·u_0, x + h·u_1; the step is x + h·(u_0 + u_1 + u_2)/3; it samples by
    plain Euler (n calls)."""
    mix, g = mixture(16)
    x = mix.sample(3, g)
    den = recording(mix.flow_denoiser(FLUX))
    s, s2 = 0.3, 0.42
    h = s2 - s
    got = flow_anchors.ftedit_step(den, x, s, s2, FLUX)
    u0 = mix.velocity(x, s2)
    u1 = mix.velocity(x + h * u0, s2)
    u2 = mix.velocity(x + h * u1, s2)
    assert len(den.log) == 3 and all(t == pytest.approx(s2 * 1000) for _, t in den.log)
    for (xa, _), xb in zip(den.log, (x, x + h * u0, x + h * u1)):
        assert (xa - xb).abs().max() < 1e-14
    assert (got - (x + h * (u0 + u1 + u2) / 3)).abs().max() < 1e-12
    # with no iteration in the averaging window the answer is the last iterate x + h·u_K
    assert (flow_anchors.ftedit_step(mix.flow_denoiser(FLUX), x, s, s2, FLUX, average=(5, 6))
            - (x + h * u2)).abs().max() < 1e-12
    den.log.clear()
    n = 5
    res = renoise.invert(den, x, FLUX, "flow_euler", n, Plan.preset("ftedit").replace(num_steps=n))
    assert res.model_calls == 3 * n and len(den.log) == 3 * n
    den.log.clear()
    renoise.sample(den, res)
    assert len(den.log) == n


def test_ftedit_is_renoise_averaging_k2_over_all_iterates():
    """FTEdit's Stage I is ReNoise's averaged fixed-point iteration with K = 2 and the window [0, 3) (the
    paper's iteration from the known point, model at the upper σ, mean of every iterate's velocity)."""
    mix, g = mixture(17)
    x0 = mix.sample(3, g)
    den = mix.flow_denoiser(FLUX)
    n = 7
    a = renoise.invert(den, x0, FLUX, "flow_euler", n, plan("ftedit", n))
    b = renoise.invert(den, x0, FLUX, "flow_euler", n, Plan(sampler="flow_euler", num_steps=n, iters=2,
                                                             window=(0, 3), average=True))
    assert (a.trajectory - b.trajectory).abs().max() < 1e-12 and a.model_calls == b.model_calls == 3 * n


def test_ftedit_round_trip_is_a_third_of_k0():
    """Averaging in the iteration-0 velocity u_0 = v(x, σ') (error O(h) against the exact inverse's velocity;
    u_1, u_2: O(h²), O(h³)) keeps FTEdit's Stage I first order: its Euler round trip errs as n^-1, and as
    n grows its error tends to a third of ReNoise K = 0's (which takes u_0 alone)."""
    mix, g = mixture(8, std=0.5)
    x0 = mix.sample(4, g)
    den = mix.flow_denoiser(UNIFORM)
    ns = [16, 32, 64, 128]

    def err(p):
        return float((renoise.sample(den, renoise.invert(den, x0, UNIFORM, "flow_euler", p.num_steps, p))
                      - x0).norm())
    ft = [err(plan("ftedit", n)) for n in ns]
    k0 = [err(Plan(sampler="flow_euler", num_steps=n)) for n in ns]
    assert 0.8 < _slope(ns, ft) < 1.2, ft
    ratio = [a / b for a, b in zip(ft, k0)]
    assert abs(ratio[-1] - 1 / 3) < 0.03 and abs(ratio[-1] - 1 / 3) < abs(ratio[0] - 1 / 3), ratio


# ------------------------------------------------------------------------------ plans, files, eval names

def test_anchor_plans_refuse_fixed_point_settings():
    with pytest.raises(ValueError, match="flow_euler"):
        Plan(solver="rf-solver")
    with pytest.raises(ValueError, match="iters"):
        plan("fireflow", 8, iters=2, window=(2, 3), average=False)
    with pytest.raises(ValueError, match="anderson"):
        plan("euler", 8, anderson=3, average=False)
    with pytest.raises(ValueError, match="solver must be one of"):
        plan("rk45", 8)
    with pytest.raises(ValueError, match="gamma"):
        plan("rf-inversion", 8, rf_gamma=1.5)
    with pytest.raises(ValueError, match="eta_window"):
        plan("rf-inversion", 8, rf_eta_window=(0.5, 0.2))
    mix, g = mixture(12)
    x0 = mix.sample(1, g)
    with pytest.raises(ValueError, match="eager"):
        renoise.invert(mix.flow_denoiser(FLUX), x0, FLUX, "flow_euler", 4, plan("euler", 4), compile="trace")
    for name in flow_anchors.ANCHORS:
        assert Plan.preset({"euler": "euler-inversion"}.get(name, name)).solver == name
    assert Plan.preset("uni-inv").num_steps == Plan.preset("ftedit").num_steps == 30
    for name in ("uni-inv", "ftedit"):
        with pytest.raises(ValueError, match="iters"):
            plan(name, 8, iters=2, window=(2, 3), average=False)


def test_anchor_result_saves_and_samples_the_same(tmp_path):
    mix, g = mixture(13)
    x0 = mix.sample(2, g)
    den = mix.flow_denoiser(FLUX)
    res = renoise.invert(den, x0, FLUX, "flow_euler", 8, Plan.preset("rf-inversion").replace(num_steps=8),
                         generator=torch.Generator().manual_seed(0))
    res.save(tmp_path / "a.safetensors")
    back = InversionResult.load(tmp_path / "a.safetensors")
    assert back.plan == res.plan and back.plan.rf_eta_window == (0.0, 0.25)
    assert torch.equal(renoise.sample(den, back), renoise.sample(den, res))


def test_eval_names_the_anchors():
    from renoise.evaluation.methods import parse_spec
    [m] = parse_spec("rfs-12:solver=rf-solver,num_steps=12")
    p = m.plan("flow", {"sampler": "flow_euler"})
    assert p.solver == "rf-solver" and p.num_steps == 12 and p.iters == 0
    [m] = parse_spec("fireflow")
    assert m.plan("flow", {"sampler": "flow_euler"}).solver == "fireflow"
    for name in ("uni-inv", "ftedit"):
        [m] = parse_spec(name)
        p = m.plan("flow", {"sampler": "flow_euler", "num_steps": 4})
        assert p.solver == name and p.num_steps == 4
    [m] = parse_spec("rfi:solver=rf-inversion,rf_gamma=0.7,rf_eta=0.9,rf_eta_window=[0,0.3]")
    p = m.plan("flow", {"sampler": "flow_euler"})
    assert (p.rf_gamma, p.rf_eta, p.rf_eta_window) == (0.7, 0.9, (0, 0.3))


def test_anchors_reconstruct_on_the_analytic_flow():
    """invert -> sample reconstructs the data on the analytic flow, better with more steps, and RF-Solver,
    FireFlow beat plain Euler inversion at 8 steps (their second order)."""
    mix, g = mixture(14, std=0.3)
    x0 = mix.sample(4, g)
    den = mix.flow_denoiser(FLUX)

    def err(solver, n, **kw):
        r = renoise.invert(den, x0, FLUX, "flow_euler", n, plan(solver, n, **kw),
                           generator=torch.Generator().manual_seed(0))
        return float((renoise.sample(den, r) - x0).norm() / x0.norm())
    e = {s: err(s, 8) for s in ("euler", "rf-solver", "fireflow")}
    assert e["rf-solver"] < e["euler"] / 5 and e["fireflow"] < e["euler"] / 5, e
    assert err("rf-solver", 32) < e["rf-solver"] / 4


def test_editor_runs_an_anchor_on_a_flow_pipeline(tmp_path):
    """The anchors go through the same Editor (and so the CLI's --preset) as ReNoise on a flow pipeline: a
    tiny FLUX.1-schnell folder, FireFlow at 3 steps: 4 calls to invert, 4 to reconstruct."""
    from tiny_flow_pipeline import save_flux

    from renoise.models import load_pipeline
    from renoise.pipeline import Editor
    pipe = load_pipeline(str(save_flux(tmp_path / "schnell", kind="schnell")), dtype=torch.float32)
    editor = Editor(pipe, "fireflow", num_steps=3, guidance_scale=0.0)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    inv = editor.invert(images, "a photo of a cat", generator=torch.Generator().manual_seed(0))
    assert inv.result.plan.solver == "fireflow" and inv.result.model_calls == 4
    z, den = editor.reconstruct_latents(inv)
    assert den.calls == 4 and z.shape == inv.result.z_T.shape and bool(torch.isfinite(z).all())


def test_readme_anchor_snippet_runs():
    from pathlib import Path
    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    section = text.split("### Flow-inversion anchors: plain Euler, RF-Solver, FireFlow, RF-Inversion", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    env = {}
    exec(code, env)
    inv, x0 = env["inv"], env["x0"]
    assert inv.plan.solver == "fireflow" and inv.model_calls == 9 and env["velocity"].calls == 18
    assert float((env["x0_again"] - x0).norm() / x0.norm()) < 0.05


def test_cli_plan_flags_name_the_anchors():
    """The command line's plan flags carry the solver and RF-Inversion's controllers (--eta stays DDIM's)."""
    from renoise.__main__ import _plan_overrides, build_parser
    base = ["edit", "--image", "x.png", "--prompt", "a", "--edit-prompt", "b", "--out", "o"]
    args = build_parser().parse_args([*base, "--preset", "rf-inversion", "--solver", "rf-inversion", "--rf-gamma",
                                      "0.7", "--rf-eta", "0.9", "--rf-eta-window", "0,0.3"])
    over = _plan_overrides(args)
    assert over == {"solver": "rf-inversion", "rf_gamma": 0.7, "rf_eta": 0.9, "rf_eta_window": (0, 0.3)}
    p = renoise.presets.resolve(args.preset, **over)
    assert (p.solver, p.rf_gamma, p.rf_eta_window, p.num_steps) == ("rf-inversion", 0.7, (0, 0.3), 28)
    for name in ("uni-inv", "ftedit"):
        args = build_parser().parse_args([*base, "--preset", "euler-inversion", "--solver", name])
        p = renoise.presets.resolve(args.preset, **_plan_overrides(args))
        assert p.solver == name and p.iters == 0


def test_plans_know_every_anchor():
    """presets.SOLVERS (what a Plan accepts) lists the same solvers as flow_anchors.SOLVERS (what runs):
    presets sits below the core and cannot import it, so the two tuples are kept equal here."""
    from renoise import presets
    assert presets.SOLVERS == flow_anchors.SOLVERS
