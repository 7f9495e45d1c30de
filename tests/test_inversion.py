"""renoise.invert / renoise.sample on the analytic Gaussian-mixture model; plans, presets, I/O, errors."""
import dataclasses

import pytest
import torch

import renoise
from renoise import noise_correction, presets
from renoise.inversion import InversionResult, NonFiniteLatentError
from renoise.metrics import psnr
from renoise.presets import Plan
from renoise.schedules import Schedule
from renoise.toy import GaussianMixture

SPACING = {"ddim": "leading", "euler_ancestral": "trailing", "lcm": None}
STEPS = 4


@pytest.fixture(scope="module")
def mixture():
    g = torch.Generator().manual_seed(0)
    gm = GaussianMixture.random(16, 64, std=0.3, generator=g)
    x0 = gm.sample(12, g).view(12, 4, 4, 4).float()
    return gm, x0


def setup(gm, sampler, prediction_type="epsilon"):
    sch = Schedule.create(timestep_spacing=SPACING[sampler], steps_offset=1, prediction_type=prediction_type)
    return sch, gm.denoiser(sch, sampler)


def recon_psnr(den, res, x0):
    return psnr(renoise.sample(den, res).flatten(1), x0.flatten(1), data_range=1.0).median().item()


def plan(sampler, **kw):
    return Plan(sampler=sampler, num_steps=STEPS, **kw)


# ------------------------------------------------------------------------------ reconstruction

@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral", "lcm"])
def test_renoise_beats_plain_inversion(sampler, mixture):
    gm, x0 = mixture
    sch, den = setup(gm, sampler)
    nc = "none" if sampler == "ddim" else "override"     # both methods get the same noise correction
    scores = {}
    for name, kw in {"plain": dict(), "last": dict(iters=9, window=(9, 10), average=False),
                     "avg": dict(iters=9, window=(7, 10))}.items():
        res = renoise.invert(den, x0, sch, sampler, STEPS, plan(sampler, noise_correction=nc, **kw),
                             generator=torch.Generator().manual_seed(1))
        scores[name] = recon_psnr(den, res, x0)
    assert scores["last"] > scores["plain"] + 5, scores
    assert scores["avg"] > scores["plain"] + 5, scores


@pytest.mark.parametrize("sampler", ["euler_ancestral", "lcm"])
def test_override_noise_correction_lands_exactly(sampler, mixture):
    """With override, denoising from z_T with the stored noises retraces the inversion's trajectory
    at every stochastic step (float32 rounding); only the last, deterministic step keeps the first
    inversion step's fixed-point error (no noise there to correct)."""
    gm, x0 = mixture
    sch, den = setup(gm, sampler)
    p = plan(sampler, iters=2, window=(0, 3), noise_correction="override")
    res = renoise.invert(den, x0, sch, sampler, STEPS, p,
                         generator=torch.Generator().manual_seed(2))
    seen = []
    renoise.sample(den, res, callback=lambda i, t, x: seen.append(x))
    n = len(res.chain)
    for i in range(n - 1):
        want = res.trajectory[n - 1 - i]
        assert (seen[i] - want).abs().max() <= 2e-6 * want.abs().max(), i
    # without correction the same inversion does not land
    raw = renoise.invert(den, x0, sch, sampler, STEPS, plan(sampler, iters=2, window=(0, 3)),
                         generator=torch.Generator().manual_seed(2))
    seen = []
    renoise.sample(den, raw, callback=lambda i, t, x: seen.append(x))
    assert (seen[0] - raw.trajectory[n - 1]).abs().max() > 1e-2


def test_optimize_moves_toward_the_target_in_unit_steps():
    g = torch.Generator().manual_seed(0)
    n, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    target[1] = n[1] + 1e-3 * torch.randn(4, 8, 8, generator=g)        # already within lr of the target
    d0 = (n - target).flatten(1).norm(dim=1)
    one = noise_correction.optimize(n, target, steps=1, lr=1.8)
    d1 = (one - target).flatten(1).norm(dim=1)
    torch.testing.assert_close(d1[0], d0[0] - 1.8)
    torch.testing.assert_close(((one - n).flatten(1).norm(dim=1)), torch.full((2,), 1.8))
    d10 = (noise_correction.optimize(n, target) - target).flatten(1).norm(dim=1)
    assert d0[0] > 18 and torch.isclose(d10[0], d0[0] - 18, rtol=1e-4)    # ten full moves toward it
    d9 = (noise_correction.optimize(n, target, steps=9) - target).flatten(1).norm(dim=1)
    assert d0[1] < 0.1                                                     # overshoots and oscillates:
    assert torch.isclose(d9[1], 1.8 - d0[1], rtol=1e-3) and torch.isclose(d10[1], d0[1], rtol=1e-2)
    assert torch.equal(noise_correction.optimize(target, target), target)


def test_clip_goes_optimize_s_distance_without_overshooting():
    """clip: n* where it is within steps·lr, else steps·lr along the line to it; what optimize reaches with
    100 times more, 100 times shorter steps (to within their length), where optimize itself overshoots."""
    g = torch.Generator().manual_seed(0)
    n = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    u = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    d0 = torch.tensor([0.0, 0.5, 1.9, 10.0, 17.9, 30.0], dtype=torch.float64)
    target = n + d0.reshape(-1, 1, 1, 1) * u / u.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    out = noise_correction.toward("clip", n, target, steps=10, lr=1.8)
    left = (out - target).flatten(1).norm(dim=1)
    torch.testing.assert_close(left, (d0 - 18).clamp(min=0), rtol=0, atol=1e-12)
    moved = (out - n).flatten(1).norm(dim=1)
    torch.testing.assert_close(moved, d0.clamp(max=18), rtol=0, atol=1e-12)      # along the line, never past
    fine = noise_correction.optimize(n, target, steps=1000, lr=0.018)
    assert ((fine - out).flatten(1).norm(dim=1) <= 0.018 + 1e-9).all()
    coarse = (noise_correction.optimize(n, target) - target).flatten(1).norm(dim=1)
    assert coarse[2] > 1.5 and left[2] == 0                                       # optimize: 1.9 -> 1.7 away
    with pytest.raises(ValueError, match="stored noise"):
        noise_correction.toward("clip", None, target)
    assert Plan(sampler="euler_ancestral", noise_correction="clip").noise_correction == "clip"


@pytest.mark.parametrize("sampler,opts", [("euler_ancestral", {}), ("lcm", {}), ("ddim", {"eta": 0.5})])
def test_noise_target_of_any_point_the_map_was_evaluated_at(sampler, opts, mixture):
    """target_from_map(n, x, g(x)) = n + (A/C)·(g(x) - x) is the noise that makes x's denoising step land on
    z_prev, as target_noise computes it from x's model output, on every stochastic step."""
    gm, x0 = mixture
    sch, den = setup(gm, sampler)
    smod = renoise.samplers.get(sampler)
    gen = torch.Generator().manual_seed(4)
    for t, tn in sch.chain(STEPS, sampler):
        if tn is None or not smod.is_stochastic(tn, **opts):
            continue
        z_prev, x, n = (torch.randn(3, 4, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
        e = den(x, t)
        gx = smod.inverse_step(z_prev, e, t, tn, sch, noise=n, **opts)
        want = noise_correction.target_noise(smod, x, e, z_prev, t, tn, sch, **opts)
        got = noise_correction.target_from_map(smod, n, x, gx, t, tn, sch, **opts)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        landed = smod.step(x, e, t, tn, sch, noise=got, **opts)
        torch.testing.assert_close(landed, z_prev, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("nc", [dict(nc_steps=10, nc_lr=1.8), dict(nc_steps=2, nc_lr=0.05),
                                dict(noise_correction="clip", nc_steps=1, nc_lr=0.01)])
def test_noise_correction_keeps_the_point_whose_step_lands_closer(nc, mixture):
    """With Anderson, noise correction compares the answer z = g(a) with the solve's best accepted point
    x and keeps, per sample, the one whose corrected step misses z_prev by less (checked here with the
    model called at each): never a worse step than the answer's, and x where it is better."""
    from renoise.fixed_point import FixedPointResult
    from renoise.inversion import _correct
    gm, x0 = mixture
    sch, den = setup(gm, "euler_ancestral")
    smod = renoise.samplers.get("euler_ancestral")
    t, tn = sch.chain(STEPS, "euler_ancestral")[1]
    gen = torch.Generator().manual_seed(5)
    z_prev, n = x0[:8].double(), torch.randn(8, 4, 4, 4, generator=gen, dtype=torch.float64)
    g = lambda v: smod.inverse_step(z_prev, den(v, t), t, tn, sch, noise=n)  # noqa: E731
    fixed = z_prev
    for _ in range(60):
        fixed = g(fixed)
    x = fixed + 0.05 * torch.randn(8, 4, 4, 4, generator=gen, dtype=torch.float64)
    z = fixed + torch.linspace(0, 0.3, 8, dtype=torch.float64).reshape(8, 1, 1, 1) * torch.randn(8, 4, 4, 4,
                                                                                                  generator=gen)
    p = Plan(sampler="euler_ancestral", num_steps=STEPS, iters=3, window=(3, 4), average=False, anderson=2,
             **{"noise_correction": "optimize", **nc})
    miss = lambda v, noise: (smod.step(v, den(v, t), t, tn, sch, noise=noise) - z_prev).flatten(1).norm(dim=1)  # noqa
    target = noise_correction.target_noise(smod, z, den(z, t), z_prev, t, tn, sch)
    alone = noise_correction.toward(p.noise_correction, n, target, p.nc_steps, p.nc_lr)
    fp = FixedPointResult(z, torch.zeros(3, 8), 3, best=(x, g(x), torch.zeros(8)))
    chosen, noise = _correct(p, smod, sch, {}, fp, n, z, den(z, t), z_prev, t, tn)
    took_x = (chosen == x).flatten(1).all(1)
    assert bool((took_x | (chosen == z).flatten(1).all(1)).all())
    assert bool((miss(chosen, noise) <= miss(z, alone) * (1 + 1e-9) + 1e-12).all())
    assert bool(took_x.any()) and not bool(took_x.all())
    assert bool((miss(chosen, noise)[took_x] < miss(z, alone)[took_x]).all())
    fp.best = None                                                         # plain iteration: the answer as it is
    chosen, noise = _correct(p, smod, sch, {}, fp, n, z, den(z, t), z_prev, t, tn)
    assert torch.equal(chosen, z) and torch.equal(noise, alone)


@pytest.mark.parametrize("sampler", ["ddim"])
def test_residuals_fall_with_iteration_where_the_map_contracts(sampler, mixture):
    gm, x0 = mixture
    sch, den = setup(gm, sampler)
    res = renoise.invert(den, x0, sch, sampler, STEPS, plan(sampler, iters=9, window=(9, 10), average=False))
    assert len(res.residuals) == STEPS
    for r in res.residuals[1:]:                         # t >= 250: the map contracts on this model
        med = r.median(1).values
        assert r.shape == (10, 12)
        assert (med[1:] < med[:-1]).all(), med
        assert med[-1] < 0.2 * med[0]


def test_ddim_eta_noise_correction_is_generic(mixture):
    gm, x0 = mixture
    sch, den = setup(gm, "ddim")
    kw = dict(iters=3, window=(0, 4), noise_correction="override")
    res = renoise.invert(den, x0, sch, "ddim", STEPS, plan("ddim", **kw), generator=torch.Generator().manual_seed(3),
                         sampler_opts={"eta": 0.5})
    assert all(n is not None for n in res.noises)      # DDIM with eta > 0 adds noise on every step
    assert res.model_calls == STEPS * (4 + 1)
    seen = []
    renoise.sample(den, res, callback=lambda i, t, x: seen.append(x))
    for i in range(STEPS):
        want = res.trajectory[STEPS - 1 - i]
        assert (seen[i] - want).abs().max() <= 2e-6 * max(want.abs().max(), 1)


# ------------------------------------------------------------------------------ bookkeeping

def test_model_calls_and_batching_of_reference_map(mixture):
    gm, x0 = mixture
    sch, den0 = setup(gm, "euler_ancestral")
    batches = []

    def den(x, t):
        batches.append(x.shape[0])
        return den0(x, t)

    # the reference preset's structure; weaker weights, as a 4x4 toy map is no 128x128 latent
    p = Plan.preset("sdxl-turbo-reference").replace(lambda_ac=0.2, lambda_kl=0.001)
    res = renoise.invert(den, x0, sch, "euler_ancestral", 4, p, generator=torch.Generator().manual_seed(0))
    # first step (t = 249 < 250): K = 5, deterministic; then 3 steps of K = 9 + 1 noise-correction call
    assert res.model_calls == len(batches) == 6 + 3 * (10 + 1)
    first_calls = [0, 6, 17, 28]
    assert [batches[i] for i in first_calls] == [24] * 4            # reference map stacked on iteration 0
    assert sum(b == 24 for b in batches) == 4
    assert [r.shape[0] for r in res.residuals] == [6, 10, 10, 10]


def test_deterministic_and_batch_equals_per_image(mixture):
    gm, x0 = mixture
    sch, den = setup(gm, "euler_ancestral")
    p = plan("euler_ancestral", iters=3, window=(1, 4), noise_correction="optimize")
    noises = [torch.randn(x0.shape, generator=torch.Generator().manual_seed(i)) for i in range(3)] + [None]
    a = renoise.invert(den, x0, sch, "euler_ancestral", STEPS, p, noises=noises)
    b = renoise.invert(den, x0, sch, "euler_ancestral", STEPS, p, noises=noises)
    assert torch.equal(a.z_T, b.z_T)
    for i in (0, 5):
        one = renoise.invert(den, x0[i:i + 1], sch, "euler_ancestral", STEPS, p,
                             noises=[n[i:i + 1] if n is not None else None for n in noises])
        torch.testing.assert_close(one.z_T[0], a.z_T[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(one.noises[0][0], a.noises[0][i], rtol=1e-5, atol=1e-5)
    # with the regularizer: the same generator seed gives the same result
    pr = p.replace(lambda_ac=0.2, lambda_kl=0.001, reg_rounds=2, reg_rolls=2)
    c = renoise.invert(den, x0, sch, "euler_ancestral", STEPS, pr, generator=torch.Generator().manual_seed(4))
    d = renoise.invert(den, x0, sch, "euler_ancestral", STEPS, pr, generator=torch.Generator().manual_seed(4))
    assert torch.equal(c.z_T, d.z_T) and not torch.equal(c.z_T, a.z_T)


def test_save_load_roundtrip(mixture, tmp_path):
    gm, x0 = mixture
    sch, den = setup(gm, "euler_ancestral")
    p = Plan.preset("sdxl-turbo").replace(reg_rounds=1, lambda_ac=0.2, lambda_kl=0.001)
    res = renoise.invert(den, x0, sch, "euler_ancestral", 4, p, generator=torch.Generator().manual_seed(5),
                         strength=0.75)
    assert len(res.chain) == 3 and res.start == 1
    res.extra = {"prompt": "a cat", "size": [32, 48]}
    path = tmp_path / "inv.safetensors"
    res.save(path)
    back = InversionResult.load(path)
    assert back.extra == res.extra
    for f in ("z_T", "trajectory", "timesteps"):
        assert torch.equal(getattr(back, f), getattr(res, f))
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(back.noises, res.noises))
    assert all(torch.equal(x, y) for x, y in zip(back.residuals, res.residuals))
    assert back.plan == res.plan and back.sampler == "euler_ancestral" and back.model_calls == res.model_calls
    assert back.chain == res.chain and torch.equal(back.schedule.alphas_cumprod, sch.alphas_cumprod)
    assert torch.equal(renoise.sample(den, back), renoise.sample(den, res))
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match="not a renoise inversion"):
        InversionResult.load(tmp_path / "bad.safetensors")


def test_non_finite_latent_names_timestep_and_iteration(mixture):
    gm, x0 = mixture
    sch, den0 = setup(gm, "ddim")
    calls = []

    def den(x, t):
        calls.append(t)
        out = den0(x, t)
        return out * float("nan") if len(calls) == 2 + 3 else out      # step 0 made 2 calls: step 1, i = 2

    with pytest.raises(NonFiniteLatentError, match=r"inversion step 1 \(timestep t=251\), renoising iteration i=2 "):
        renoise.invert(den, x0, sch, "ddim", STEPS, plan("ddim", iters=4, window=(4, 5), average=False,
                                                        first_iters=1, first_window=(1, 2)))


def test_anderson_plan_runs_and_counts(mixture):
    gm, x0 = mixture
    sch, den = setup(gm, "ddim")
    res = renoise.invert(den, x0, sch, "ddim", STEPS, plan("ddim", iters=5, window=(0, 6), average=False, anderson=3))
    assert res.model_calls == STEPS * 6
    assert recon_psnr(den, res, x0) > recon_psnr(
        den, renoise.invert(den, x0, sch, "ddim", STEPS, plan("ddim")), x0)


def _recording(den):
    seen = []

    def rec(x, t):
        out = den(x, t)
        seen.append((x.clone(), t, out.clone()))
        return out
    return rec, seen


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral"])
def test_warm_start_starts_from_the_previous_model_output(sampler, mixture):
    """warm_start="previous": step 0 starts at z0 as before; every later step's first call is at
    inverse_step(z_prev, e_prev), e_prev the previous step's last model output (the noise
    correction's call where there is one); no extra calls, and the fixed point does not move."""
    gm, x0 = mixture
    sch, den = setup(gm, sampler)
    nc = "none" if sampler == "ddim" else "override"
    p = plan(sampler, iters=2, window=(2, 3), average=False, noise_correction=nc, warm_start="previous")
    rec, seen = _recording(den)
    drawn = torch.randn(STEPS, *x0.shape, generator=torch.Generator().manual_seed(3))   # before noise correction
    res = renoise.invert(rec, x0, sch, sampler, STEPS, p, noises=drawn)
    per_step = 3 + (nc != "none")
    smod = renoise.samplers.get(sampler)
    chain = sch.chain(STEPS, sampler)
    assert res.model_calls == len(seen) == STEPS * per_step - (nc != "none")     # the last step adds no noise
    assert torch.equal(seen[0][0], x0)
    for s in range(1, STEPS):
        first = sum(3 + (nc != "none" and smod.is_stochastic(chain[-k][1])) for k in range(1, s + 1))
        t, tn = chain[len(chain) - 1 - s]
        e_prev = seen[first - 1][2]
        noise = drawn[len(chain) - 1 - s] if smod.is_stochastic(tn) else None
        want = smod.inverse_step(res.trajectory[s], e_prev, t, tn, sch, noise=noise)
        assert torch.allclose(seen[first][0], want, atol=1e-6), s
    if sampler != "ddim":      # the fixed points: where the mixture's maps contract (DDIM at 4 steps)
        return
    cold = renoise.invert(den, x0, sch, sampler, STEPS, p.replace(iters=40, window=(40, 41), warm_start="none"),
                          generator=torch.Generator().manual_seed(3))
    warm = renoise.invert(den, x0, sch, sampler, STEPS, p.replace(iters=40, window=(40, 41)),
                          generator=torch.Generator().manual_seed(3))
    done = (torch.stack([r[-1] for r in warm.residuals + cold.residuals]) < 1e-4).all(0)   # converged samples
    assert done.sum() >= x0.shape[0] // 2
    assert (warm.z_T - cold.z_T)[done].abs().max() < 1e-4


def test_warm_start_less_the_fresh_noise(mixture):
    """warm_start="previous-noise": on an Euler-ancestral step the first call is at
    inverse_step(z_prev, e_prev - (σ_up / σ_t')·n); on deterministic DDIM steps it is "previous",
    bit for bit."""
    gm, x0 = mixture
    sch, den = setup(gm, "euler_ancestral")
    p = plan("euler_ancestral", iters=2, window=(2, 3), average=False, warm_start="previous-noise")
    rec, seen = _recording(den)
    drawn = torch.randn(STEPS, *x0.shape, generator=torch.Generator().manual_seed(3))
    res = renoise.invert(rec, x0, sch, "euler_ancestral", STEPS, p, noises=drawn)
    smod = renoise.samplers.get("euler_ancestral")
    chain = sch.chain(STEPS, "euler_ancestral")
    for s in range(1, STEPS):
        i = len(chain) - 1 - s
        t, tn = chain[i]
        e_prev = seen[3 * s - 1][2]
        sg, sn = float(sch.sig(t)), float(sch.sig(tn))
        up = (sn**2 * (sg**2 - sn**2) / sg**2) ** 0.5
        want = smod.inverse_step(res.trajectory[s], e_prev - up / sn * drawn[i], t, tn, sch, noise=drawn[i])
        assert torch.allclose(seen[3 * s][0], want, atol=1e-5), s
    sch, den = setup(gm, "ddim")
    kw = dict(iters=2, window=(2, 3), average=False)
    a = renoise.invert(den, x0, sch, "ddim", STEPS, plan("ddim", warm_start="previous", **kw))
    b = renoise.invert(den, x0, sch, "ddim", STEPS, plan("ddim", warm_start="previous-noise", **kw))
    assert torch.equal(a.z_T, b.z_T) and a.model_calls == b.model_calls


def test_warm_start_converges_faster(mixture):
    gm, x0 = mixture
    sch, den = setup(gm, "ddim")
    err = {}
    exact = renoise.invert(den, x0, sch, "ddim", STEPS, plan("ddim", iters=60, window=(60, 61), average=False))
    for ws in ("none", "previous"):
        res = renoise.invert(den, x0, sch, "ddim", STEPS, plan("ddim", iters=2, window=(2, 3), average=False,
                                                               warm_start=ws))
        err[ws] = (res.z_T - exact.z_T).flatten(1).abs().amax(1).median().item()
    assert err["previous"] < 0.95 * err["none"], err        # measured: 1.64 against 1.89


def test_extrapolated_warm_start_formula(mixture):
    """warm_start="extrapolate" on deterministic DDIM steps: steps 0 and 1 start as "previous"; every
    later step's first call is at inverse_step(z_prev, e1 + (t - t1)/(t1 - t2)·(e1 - e2)), e1 and e2
    the last model outputs of the two steps before, at their timesteps t1 and t2."""
    gm, x0 = mixture
    sch, den = setup(gm, "ddim")
    p = plan("ddim", iters=2, window=(2, 3), average=False, warm_start="extrapolate")
    rec, seen = _recording(den)
    res = renoise.invert(rec, x0, sch, "ddim", STEPS, p)
    smod = renoise.samplers.get("ddim")
    chain = sch.chain(STEPS, "ddim")
    assert res.model_calls == len(seen) == 3 * STEPS
    assert torch.equal(seen[0][0], x0)
    for s in range(1, STEPS):
        t, tn = chain[len(chain) - 1 - s]
        e1, t1 = seen[3 * s - 1][2], seen[3 * s - 1][1]
        guess = e1
        if s >= 2:
            e2, t2 = seen[3 * s - 4][2], seen[3 * s - 4][1]
            guess = e1 + (t - t1) / (t1 - t2) * (e1 - e2)
        want = smod.inverse_step(res.trajectory[s], guess, t, tn, sch)
        assert torch.allclose(seen[3 * s][0], want, atol=1e-6), s


def test_extrapolated_warm_start_on_stochastic_steps_is_previous_noise(mixture):
    """On Euler-ancestral, whose steps add noise, "extrapolate" takes "previous-noise"'s guess, bit for bit."""
    gm, x0 = mixture
    sch, den = setup(gm, "euler_ancestral")
    drawn = torch.randn(STEPS, *x0.shape, generator=torch.Generator().manual_seed(3))
    kw = dict(iters=2, window=(2, 3), average=False)
    a = renoise.invert(den, x0, sch, "euler_ancestral", STEPS, plan("euler_ancestral", warm_start="extrapolate", **kw),
                       noises=drawn)
    b = renoise.invert(den, x0, sch, "euler_ancestral", STEPS,
                       plan("euler_ancestral", warm_start="previous-noise", **kw), noises=drawn)
    assert torch.equal(a.z_T, b.z_T) and a.model_calls == b.model_calls


def test_extrapolated_warm_start_gains_an_order_on_a_flow():
    """One call a step (K = 0) on the exact velocity of a Gaussian mixture, the first step (which has no
    history) solved to convergence: the Euler round trip's error falls as n^-3 with "extrapolate" (the
    guess is off by O(h²) in v), as n^-2 with "previous" (off by O(h)). Measured slopes 3.1 and 1.9."""
    import numpy as np
    from renoise.schedules import FlowSchedule
    uniform = FlowSchedule(spacing="flux")
    g = torch.Generator().manual_seed(8)
    mix = GaussianMixture.random(6, 12, std=0.5, scale=1.0, generator=g)
    x0 = mix.sample(4, g)
    den = mix.flow_denoiser(uniform)
    ns, errs = [8, 16, 32, 64], {}
    for ws in ("previous", "extrapolate"):
        errs[ws] = []
        for n in ns:
            p = Plan(sampler="flow_euler", num_steps=n, iters=0, average=False, warm_start=ws, first_iters=40,
                     first_window=(40, 41), first_until=1000 / n + 1)
            res = renoise.invert(den, x0, uniform, "flow_euler", n, p)
            assert res.model_calls == n + 40
            errs[ws].append(float((renoise.sample(den, res) - x0).norm()))
    slope = {ws: -np.polyfit(np.log(ns), np.log(e), 1)[0] for ws, e in errs.items()}
    assert 1.7 < slope["previous"] < 2.2 and slope["extrapolate"] > 2.7, (slope, errs)
    assert errs["extrapolate"][-1] < 0.1 * errs["previous"][-1], errs


@pytest.mark.parametrize("kw", [dict(relax=1.5), dict(relax=2.0, anderson=3, warm_start="previous")])
def test_relaxed_steps_reach_the_same_fixed_points(kw, mixture):
    """relax: each iteration's model call is at z + β·(G(z) - z); the step's answer is still the last
    G(z), so the fixed points do not move; Plan.relax reaches fixed_point.iterate."""
    gm, x0 = mixture
    sch, den = setup(gm, "ddim")
    long = dict(iters=60, window=(60, 61), average=False)
    cold = renoise.invert(den, x0, sch, "ddim", STEPS, plan("ddim", **long))
    relaxed = renoise.invert(den, x0, sch, "ddim", STEPS, plan("ddim", **long, **kw))
    done = (torch.stack([r[-1] for r in relaxed.residuals + cold.residuals]) < 1e-5).all(0)
    assert done.sum() >= x0.shape[0] // 2
    assert (relaxed.z_T - cold.z_T)[done].abs().max() < 1e-4
    rec, seen = _recording(den)
    short = plan("ddim", iters=1, window=(1, 2), average=False, relax=kw["relax"])
    res = renoise.invert(rec, x0, sch, "ddim", 1, short)       # one step: G at z0, then at z0 + β(G(z0) - z0)
    smod, (t, tn) = renoise.samplers.get("ddim"), sch.chain(1, "ddim")[0]
    g0 = smod.inverse_step(x0, seen[0][2], t, tn, sch)
    assert torch.allclose(seen[1][0], x0 + kw["relax"] * (g0 - x0), atol=1e-6)
    assert torch.allclose(res.z_T, smod.inverse_step(x0, seen[1][2], t, tn, sch), atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral"])
def test_tolerance_stops_each_sample_once_its_residual_is_small(sampler, mixture):
    """tol: a sample stops iterating at its first residual <= tol, measured in the model's input
    scale (Euler's x is divided by √(σ² + 1)), its iterate frozen there; the step's calls are those
    of its slowest sample; tol=0 runs every call."""
    gm, x0 = mixture
    sch, den = setup(gm, sampler)
    smod = renoise.samplers.get(sampler)
    scale = [float(smod.model_input(torch.ones(()), t, sch)) for t, _ in reversed(sch.chain(STEPS, sampler))]
    kw = dict(iters=30, window=(30, 31), average=False)
    full = renoise.invert(den, x0, sch, sampler, STEPS, plan(sampler, **kw), generator=torch.Generator().manual_seed(0))
    tol = float(torch.stack([r[3] * c for r, c in zip(full.residuals, scale)]).median())
    res = renoise.invert(den, x0, sch, sampler, STEPS, plan(sampler, tol=tol, **kw),
                         generator=torch.Generator().manual_seed(0))
    assert res.model_calls < full.model_calls
    assert res.model_calls == sum(r.shape[0] for r in res.residuals)
    for step, (r, c) in enumerate(zip(res.residuals, scale)):
        for b in range(x0.shape[0]):
            hit = (r[:, b] * c <= tol).nonzero()
            stop = int(hit[0]) if len(hit) else r.shape[0] - 1
            assert (r[:stop, b] * c > tol).all() and (r[stop + 1:, b] == 0).all()   # frozen after its first hit
            if step == 0:                                                          # the same iterations till then
                assert torch.allclose(r[: stop + 1, b], full.residuals[0][: stop + 1, b], rtol=1e-2)
    zero = renoise.invert(den, x0, sch, sampler, STEPS, plan(sampler, iters=5, window=(5, 6), average=False, tol=0.0),
                          generator=torch.Generator().manual_seed(0))
    assert zero.model_calls == STEPS * 6


@pytest.mark.parametrize("sampler", ["ddim"])
def test_first_tol_is_the_tolerance_of_the_first_steps(sampler, mixture):
    """first_tol replaces tol on the steps with t < first_until (Plan.tol_at): those stop at it, the others at
    tol; the convergence report names each step's own tol. Without tol it is refused."""
    gm, x0 = mixture
    sch, den = setup(gm, sampler)
    smod = renoise.samplers.get(sampler)
    chain = list(reversed(sch.chain(STEPS, sampler)))
    kw = dict(iters=30, window=(30, 31), average=False, anderson=2)
    p = plan(sampler, tol=1e-2, first_tol=1e-7, **kw)
    assert [p.tol_at(t) for t, _ in chain] == [1e-7 if t < 250 else 1e-2 for t, _ in chain]
    assert sum(t < 250 for t, _ in chain) == 1
    res = renoise.invert(den, x0, sch, sampler, STEPS, p, generator=torch.Generator().manual_seed(0))
    loose = renoise.invert(den, x0, sch, sampler, STEPS, p.replace(first_tol=None),
                           generator=torch.Generator().manual_seed(0))
    for (t, _), r, r_loose in zip(chain, res.residuals, loose.residuals):
        c = float(smod.model_input(torch.ones(()), t, sch))
        last = torch.stack([col[col > 0][-1] for col in r.T]) * c        # each sample's last residual
        assert (last <= p.tol_at(t)).all(), (t, last)
        for col in r.T:                                                     # stopped at the first hit of its tol
            assert (col[col > 0][:-1] * c > p.tol_at(t)).all()
        if t < 250:
            assert r.shape[0] > r_loose.shape[0] and (r_loose[-1] * c > 1e-7).any()
    stalled = renoise.invert(den, x0, sch, sampler, STEPS, p.replace(iters=1, window=(1, 2)),
                             generator=torch.Generator().manual_seed(0)).convergence()["not_converged"]
    assert {s["tol"] for s in stalled if s["timestep"] < 250} == {1e-7}
    assert all(s["tol"] == 1e-2 for s in stalled if s["timestep"] >= 250)
    with pytest.raises(ValueError, match="first_tol .* needs a tol"):
        plan(sampler, first_tol=1e-3)
    with pytest.raises(ValueError, match="first_tol must be"):
        plan(sampler, tol=1e-2, first_tol=-1.0)
    with pytest.raises(ValueError, match="--first-tol none"):                 # `--tol none` on demo-euler-4
        presets.resolve("demo-euler-4", tol=None)
    assert presets.resolve("demo-euler-4", tol=None, first_tol=None).tol_at(1) is None


# ------------------------------------------------------------------------------ presets

def test_presets_hold_table_1():
    sd, xl, turbo, lcm, ref = (Plan.preset(n) for n in ("sd14", "sdxl", "sdxl-turbo", "lcm-lora",
                                                          "sdxl-turbo-reference"))
    assert (sd.sampler, sd.num_steps, sd.iters, sd.lambda_ac, sd.lambda_kl) == ("ddim", 50, 1, 10.0, 0.05)
    assert sd.at(241) == (1, (0, 2), [1.0, 1.0]) and sd.at(261)[2] == [0.0, 1.0]     # w1,w2 / w2
    assert presets.resolve("sd15").replace(name="sd14") == sd
    assert (xl.sampler, xl.num_steps, xl.iters, xl.lambda_ac, xl.lambda_kl) == ("ddim", 50, 1, 10.0, 0.055)
    assert (turbo.sampler, turbo.num_steps, turbo.iters, turbo.lambda_ac, turbo.lambda_kl) == \
        ("euler_ancestral", 4, 9, 10.0, 0.055)
    assert turbo.at(249)[2] == [1.0] * 4 and turbo.at(499)[2] == [0.0] * 7 + [1.0] * 3   # w1..w4 / w8..w10
    assert turbo.noise_correction == "optimize"
    assert (lcm.sampler, lcm.iters, lcm.lambda_ac, lcm.lambda_kl) == ("lcm", 7, 20.0, 0.075)
    assert lcm.at(259)[2] == [0.0] * 5 + [1.0] * 3                                     # w6..w8
    assert ref.at(249) == (5, (0, 5), [1.0] * 5 + [0.0]) and ref.at(999)[2] == [0.0] * 8 + [1.0] * 2
    assert (ref.lambda_ac, ref.lambda_kl, ref.reg_rounds, ref.reg_rolls, ref.nc_steps, ref.nc_lr) == \
        (20.0, 0.065, 4, 5, 10, 1.8)
    assert turbo.replace(iters=5, window=(3, 6)).at(999) == (5, (3, 6), [0, 0, 0, 1.0, 1.0, 1.0])
    demo, demo4 = Plan.preset("demo"), Plan.preset("demo-4")       # ours: benchmarks/quality_per_call.py
    assert (demo.num_steps, demo.iters, demo.anderson, demo.relax, demo.tol, demo.warm_start) == \
        (10, 9, 3, 2.0, 1e-2, "previous-noise")
    assert demo4 == demo.replace(name="demo-4", num_steps=4, tol=1.5e-2)
    assert Plan.preset("demo-euler-4") == demo.replace(name="demo-euler-4", sampler="euler_ancestral", num_steps=4,
                                                       first_tol=1e-5, noise_correction="clip")
    assert demo.relax_start == demo4.relax_start == Plan.preset("demo-euler-4").relax_start == "plain"
    assert Plan.from_dict(Plan.preset("demo-euler-4").to_dict()) == Plan.preset("demo-euler-4")
    assert Plan.from_dict({"name": "old"}).relax_start == "plain"          # plans saved before the field
    assert dataclasses.replace(turbo, lambda_kl=0.0).lambda_kl == 0.0


@pytest.mark.parametrize("kw,match", [
    (dict(iters=3, window=(2, 5)), "outside the iterations 0..3"),
    (dict(iters=3, window=(-1, 2)), "outside"),
    (dict(iters=3, window=(2, 2)), "outside"),
    (dict(iters=3, first_iters=1), r"first_window \(0, 1\)|first_window"),
    (dict(iters=2, window=(0, 3), weights=(1.0, -1.0, 1.0)), "non-negative"),
    (dict(iters=2, window=(0, 3), weights=(1.0, 1.0)), "has 2 entries"),
    (dict(sampler="heun"), "unknown sampler"),
    (dict(noise_correction="always"), "noise_correction"),
    (dict(iters=-1), "iters must be an int"),
    (dict(anderson=2), "cannot be combined with averaging"),
    (dict(lambda_ac=-1.0), "lambda_ac"),
    (dict(tol=-1e-3), "tol must be a finite number >= 0"),
    (dict(tol="small"), "tol must be a finite number >= 0"),
    (dict(warm_start="yes"), "warm_start must be one of none, previous, previous-noise"),
    (dict(relax_start="fast"), "relax_start must be one of plain, relaxed"),
    (dict(relax=0.0), "relax must be a finite number > 0"),
    (dict(relax=float("nan")), "relax must be a finite number > 0"),
    (dict(relax="2"), "relax must be a finite number > 0"),
])
def test_inconsistent_plans_are_refused(kw, match):
    if kw.get("iters") == 3 and "first_iters" in kw:
        kw = dict(kw, window=(3, 4))
    with pytest.raises(ValueError, match=match):
        Plan(**kw)


def test_bad_input_is_refused(mixture):
    gm, x0 = mixture
    sch, den = setup(gm, "euler_ancestral")
    with pytest.raises(ValueError, match="unknown preset"):
        renoise.invert(den, x0, sch, "euler_ancestral", 4, "sdxl-lightning")
    with pytest.raises(ValueError, match="unknown plan field"):
        presets.resolve("sdxl", lambda_pair=3)
    with pytest.raises(ValueError, match="unknown sampler"):
        renoise.invert(den, x0, sch, "dpm++", 4, "sdxl")
    with pytest.raises(ValueError, match="no noise"):
        renoise.invert(den, x0, sch, "euler_ancestral", 4, plan("euler_ancestral"))
    with pytest.raises(ValueError, match="one entry per inverted step"):
        renoise.invert(den, x0, sch, "euler_ancestral", 4, plan("euler_ancestral"), noises=[torch.randn_like(x0)] * 2)
    with pytest.raises(ValueError, match=r"noises\[1\].*shape"):
        renoise.invert(den, x0, sch, "euler_ancestral", 4, plan("euler_ancestral"),
                       noises=[torch.randn_like(x0), torch.randn(1, 4, 4, 4), None, None])
    with pytest.raises(ValueError, match="generator"):
        renoise.invert(den, x0, sch, "ddim", 4, Plan.preset("sdxl"))
    with pytest.raises(ValueError, match="eta"):
        renoise.invert(den, x0, sch, "ddim", 4, plan("ddim"), sampler_opts={"eta": 2.0})
    with pytest.raises(ValueError, match="does not take the options"):
        renoise.invert(den, x0, sch, "lcm", 4, plan("lcm", noise_correction="override"), sampler_opts={"eta": 0.5},
                       generator=torch.Generator())
    v = Schedule.create(timestep_spacing="trailing", prediction_type="v_prediction")
    with pytest.raises(ValueError, match="prediction_type is 'v_prediction'"):
        renoise.invert(gm.denoiser(v, "ddim"), x0, v, "ddim", 4, Plan.preset("sdxl"), generator=torch.Generator())
    x = Schedule.create(timestep_spacing="trailing", prediction_type="sample")
    with pytest.raises(ValueError, match="cannot be inverted"):
        renoise.invert(gm.denoiser(x, "euler_ancestral"), x0, x, "euler_ancestral", 4, plan("euler_ancestral"),
                       generator=torch.Generator())
    with pytest.raises(ValueError, match="strength"):
        renoise.invert(den, x0, sch, "ddim", 4, plan("ddim"), strength=0.1)
    with pytest.raises(ValueError, match="NaN"):
        renoise.invert(den, x0 * float("nan"), sch, "ddim", 4, plan("ddim"))
    res = renoise.invert(den, x0, sch, "ddim", 4, plan("ddim"))
    with pytest.raises(ValueError, match="shape"):
        renoise.sample(den, res, z_T=x0[:2])


def test_invert_runs_under_inference_mode(mixture):
    gm, x0 = mixture
    sch, den = setup(gm, "euler_ancestral")
    p = Plan.preset("sdxl-turbo").replace(lambda_ac=0.2, lambda_kl=0.001)
    want = renoise.invert(den, x0, sch, "euler_ancestral", 4, p, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        got = renoise.invert(den, x0, sch, "euler_ancestral", 4, p, generator=torch.Generator().manual_seed(6))
        assert torch.equal(renoise.sample(den, got), renoise.sample(den, want))
    assert torch.equal(got.z_T, want.z_T)
