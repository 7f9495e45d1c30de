"""renoise.fixed_point.iterate: plain, weighted, readout, tol, safeguarded Anderson."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from renoise.fixed_point import iterate


def contraction(seed, B=3, n=6, rho=0.6, cond_spread=False):
    """g(z) = M z + b per sample with symmetric M, eigenvalues in [0, rho] (rho exactly present
    when cond_spread); the exact fixed point is (I - M)^{-1} b."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(B, n, n, generator=gen, dtype=torch.float64))
    ev = torch.rand(B, n, generator=gen, dtype=torch.float64) * rho
    if cond_spread:
        ev[:, 0] = rho
    M = Q @ torch.diag_embed(ev) @ Q.transpose(1, 2)
    b = torch.randn(B, n, generator=gen, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - M, b)
    return (lambda z: torch.einsum("bij,bj->bi", M, z) + b), exact


class Counter:
    def __init__(self, g):
        self.g, self.calls = g, 0

    def __call__(self, *args):
        self.calls += 1
        return self.g(*args)


@settings(max_examples=20)
@given(seed=st.integers(0, 10**6), rho=st.floats(0.05, 0.6), m=st.sampled_from([0, 1, 3]),
       relax=st.sampled_from([1.0, 0.7, 1.5]))
def test_converges_to_the_exact_fixed_point(seed, rho, m, relax):
    g, exact = contraction(seed, rho=rho)
    res = iterate(g, torch.zeros_like(exact), 60, anderson=m, relax=relax)
    torch.testing.assert_close(res.z, exact, rtol=1e-8, atol=1e-8)
    assert res.residuals.shape == (60, 3) and res.evals == 60


@settings(max_examples=8)
@given(seed=st.integers(0, 10**6), rho=st.floats(0.9, 0.97), m=st.sampled_from([2, 3, 5]))
def test_anderson_needs_fewer_evaluations_on_ill_conditioned_contractions(seed, rho, m):
    g, exact = contraction(seed, B=2, n=16, rho=rho, cond_spread=True)
    z0 = torch.zeros_like(exact)
    plain = iterate(g, z0, 1000, tol=1e-6)
    mixed = iterate(g, z0, 1000, anderson=m, tol=1e-6)
    assert bool((plain.residuals.min(0).values <= 1e-6).all()) and bool((mixed.residuals.min(0).values <= 1e-6).all())
    assert 2 * mixed.evals < plain.evals
    # residual r bounds the error by r / (1 - rho)
    err = (mixed.z - exact).pow(2).mean(1).sqrt()
    assert bool((err <= 1e-6 / (1 - rho)).all())


def test_relaxed_iteration_follows_its_closed_form():
    """g(z) = t + λ(z - t) per sample: g is called at c_{k+1} = c_k + β(g(c_k) - c_k), so
    c_k - t = (1 - β(1 - λ))^k (c_0 - t); the iterates are g(c_k), the residuals g(c_k) - c_k."""
    lam = torch.tensor([0.2, 0.9, 0.97], dtype=torch.float64)[:, None]
    t = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)[:, None].expand(3, 4)
    g = Counter(lambda z: t + lam * (z - t))
    z0, beta, n = torch.zeros(3, 4, dtype=torch.float64), 1.8, 12
    res = iterate(g, z0, n, relax=beta, keep_iterates=True)
    for k in range(n):
        c = t + (1 - beta * (1 - lam)) ** k * (z0 - t)
        torch.testing.assert_close(res.iterates[k], t + lam * (c - t), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res.residuals[k], ((lam - 1) * (c - t)).pow(2).mean(1).sqrt(), rtol=1e-12,
                                   atol=1e-12)
    assert g.calls == n
    torch.testing.assert_close(res.z, res.iterates[-1], rtol=0, atol=0)


def test_over_relaxation_needs_fewer_calls_where_the_jacobian_is_near_one():
    """Eigenvalues in [0, 0.95]: β = 1.9 shrinks the slowest error by 0.905 a call instead of 0.95
    (and the fastest by 0.9), so the same tolerance takes about half the calls; same fixed point.
    (On a linear map Anderson needs no help: relaxed Anderson converges too, not faster.)"""
    g, exact = contraction(11, B=2, n=16, rho=0.95, cond_spread=True)
    z0 = torch.zeros_like(exact)
    plain = iterate(g, z0, 2000, tol=1e-8)
    relaxed = iterate(g, z0, 2000, relax=1.9, tol=1e-8)
    assert relaxed.evals < 0.6 * plain.evals
    torch.testing.assert_close(relaxed.z, exact, rtol=0, atol=1e-6)
    mixed = iterate(g, z0, 2000, anderson=3, relax=1.9, tol=1e-8)
    assert mixed.evals < relaxed.evals
    torch.testing.assert_close(mixed.z, exact, rtol=0, atol=1e-6)


def test_damping_settles_where_plain_iteration_oscillates():
    """g(z) = t + λ(z - t) with λ in [-0.95, -0.5] (plain iteration flips sign every call): two calls with
    β = ½ (the `demo-damped` preset's step) leave |λ|·|1 - ½(1 - λ)| = |λ|(1 + λ)/2 of the start's error,
    at most 0.125, where plain iteration leaves λ² >= 0.25 and relax 2 does not shrink it (|λ|·|1 - 2(1 - λ)| >= 1)."""
    lam = torch.tensor([-0.95, -0.8, -0.5], dtype=torch.float64)[:, None]
    t = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g, z0 = (lambda z: t + lam * (z - t)), torch.zeros(3, 5, dtype=torch.float64)
    err = {beta: ((iterate(g, z0, 2, relax=beta).z - t).norm(dim=1) / (z0 - t).norm(dim=1)) for beta in (0.5, 1.0, 2.0)}
    lam = lam[:, 0]
    torch.testing.assert_close(err[0.5], lam.abs() * (1 + lam) / 2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(err[1.0], lam ** 2, rtol=1e-12, atol=1e-12)
    assert bool((err[0.5] <= 0.125 + 1e-12).all()) and bool((err[1.0] >= 0.25).all()) and bool((err[2.0] >= 1 - 1e-12).all())


@pytest.mark.parametrize("m", [0, 3])
def test_tol_freezes_relaxed_samples(m):
    rates = torch.tensor([0.1, 0.95], dtype=torch.float64)[:, None]
    g = Counter(lambda z: 1.0 + rates * (z - 1.0))
    res = iterate(g, torch.zeros(2, 3, dtype=torch.float64), 300, anderson=m, relax=1.5, tol=1e-9,
                  keep_iterates=True)
    stop = int((res.residuals[:, 0] > 1e-9).sum())
    assert stop < res.evals - 1
    for later in res.iterates[stop:]:
        assert torch.equal(later[0], res.iterates[stop][0])
    torch.testing.assert_close(res.z, torch.ones(2, 3, dtype=torch.float64), rtol=0, atol=1e-7)


@given(seed=st.integers(0, 10**6), iters=st.integers(1, 8), data=st.data())
def test_weights_give_the_weighted_mean_of_iterates(seed, iters, data):
    g, _ = contraction(seed, rho=0.9)
    w = data.draw(st.lists(st.floats(0, 3), min_size=iters, max_size=iters).filter(lambda v: sum(v) > 0.1))
    counted = Counter(g)
    res = iterate(counted, torch.ones(3, 6, dtype=torch.float64), iters, weights=w, keep_iterates=True)
    assert counted.calls == res.evals == iters == len(res.iterates)
    expected = sum(wk * zk for wk, zk in zip(w, res.iterates)) / sum(w)
    torch.testing.assert_close(res.z, expected, rtol=1e-12, atol=1e-12)
    # the iterates are g applied again and again, and the residuals their differences
    z = torch.ones(3, 6, dtype=torch.float64)
    for k in range(iters):
        z_next = g(z)
        torch.testing.assert_close(res.iterates[k], z_next)
        torch.testing.assert_close(res.residuals[k], (z_next - z).pow(2).mean(1).sqrt())
        z = z_next


def test_no_weights_answers_the_last_iterate():
    g, _ = contraction(1)
    res = iterate(g, torch.zeros(3, 6, dtype=torch.float64), 4, keep_iterates=True)
    assert torch.equal(res.z, res.iterates[-1])
    assert iterate(g, torch.zeros(3, 6, dtype=torch.float64), 4).iterates is None


def test_readout_averages_the_y_and_reads_out_once():
    g, _ = contraction(2)
    seen = []

    def g2(z, k):
        z_next = g(z)
        return z_next, 10.0 * z_next + k

    def readout(y):
        seen.append(y)
        return y.sum(1)

    w = [0, 1, 3]
    res = iterate(g2, torch.zeros(3, 6, dtype=torch.float64), 3, weights=w, readout=readout, indexed=True,
                  keep_iterates=True)
    ys = [10.0 * z + k for k, z in enumerate(res.iterates)]
    ybar = (1 * ys[1] + 3 * ys[2]) / 4
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], ybar)
    torch.testing.assert_close(res.z, ybar.sum(1))
    last = iterate(g2, torch.zeros(3, 6, dtype=torch.float64), 3, readout=lambda y: y, indexed=True)
    torch.testing.assert_close(last.z, ys[-1])


@pytest.mark.parametrize("m", [0, 2])
def test_tol_freezes_converged_samples(m):
    """Three samples contracting at very different rates: each stops on its own, frozen."""
    rates = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)[:, None]
    target = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)[:, None].expand(3, 4)
    g = Counter(lambda z: target + rates * (z - target))
    res = iterate(g, torch.zeros(3, 4, dtype=torch.float64), 500, anderson=m, tol=1e-6, keep_iterates=True)
    assert g.calls == res.evals < 500 and res.residuals.shape == (res.evals, 3)
    stop = [int((res.residuals[:, b] > 1e-6).sum()) for b in range(3)]   # calls before converging
    if m == 0:
        assert stop[0] < stop[1] < stop[2] == res.evals - 1
    for b in range(3):
        frozen = res.iterates[stop[b]][b]
        for later in res.iterates[stop[b]:]:
            assert torch.equal(later[b], frozen)
        assert bool((res.residuals[stop[b] + 1:, b] == 0).all())
    torch.testing.assert_close(res.z, target, rtol=0, atol=1e-5)


def test_tol_with_weights_gives_remaining_weight_to_the_frozen_value():
    g, _ = contraction(3, rho=0.3)
    z0 = torch.zeros(3, 6, dtype=torch.float64)
    w = [1.0] * 50
    stopped = iterate(g, z0, 50, weights=w, tol=1e-12, keep_iterates=True)
    assert stopped.evals < 50
    full = iterate(g, z0, 50, weights=w)
    torch.testing.assert_close(stopped.z, full.z, rtol=1e-10, atol=1e-10)


def test_safeguarded_anderson_against_plain_on_a_nonlinear_map():
    """g(z) = c + 0.9·tanh(3z)/3: a contraction whose slope changes a lot along the way, so the
    secant model goes stale. At equal calls the safeguarded median error is never above plain
    iteration's, and from 10 calls on no sample is worse than plain."""
    gen = torch.Generator().manual_seed(5)
    c = torch.randn(64, 8, generator=gen, dtype=torch.float64)

    def g(z):
        return c + 0.9 * torch.tanh(3 * z) / 3

    z0 = torch.zeros(64, 8, dtype=torch.float64)
    exact = iterate(g, z0, 400).z
    err = lambda z: (z - exact).pow(2).mean(1).sqrt()  # noqa: E731
    for iters in (3, 5, 10, 15):
        plain = err(iterate(g, z0, iters).z)
        for m in (1, 3):
            mixed = err(iterate(g, z0, iters, anderson=m).z)
            assert mixed.median() <= plain.median(), (iters, m)
            if iters >= 10:
                assert bool((mixed <= plain).all()), (iters, m)


def test_rejected_mixed_steps_restart_from_the_plain_step():
    """Slope 0.9 towards 1 below z = 0.6, then slope 0.5 towards the true fixed point 0.7, and a
    trap (g = 100) above 0.9. After two plain steps the secant extrapolates straight to 1.0, into
    the trap: the safeguard must reject that proposal and go on to 0.7."""
    def g(z):
        low = 0.9 * z + 0.1
        high = 0.7 + 0.5 * (z - 0.7)
        return torch.where(z > 0.9, torch.full_like(z, 100.0), torch.where(z < 0.6, low, high))

    calls = []
    z0 = torch.zeros(4, 3, dtype=torch.float64)
    res = iterate(lambda z: calls.append(z.clone()) or g(z), z0, 30, anderson=2, keep_iterates=True)
    assert any(bool((c > 0.9).any()) for c in calls)                   # the trap was proposed ...
    assert all(bool((z <= 0.7 + 1e-12).all()) for z in res.iterates)  # ... and never accepted
    torch.testing.assert_close(res.z, torch.full_like(z0, 0.7), rtol=0, atol=1e-9)


def test_anderson_stays_with_the_fixed_point_plain_iteration_approaches():
    """g(x) = x + A·cos(πx/2) has fixed points at every odd x: 1, 5, 9 attract plain iteration
    (g' = 1 - A·π/2), 3, 7 repel it. From 0 plain iteration creeps towards 1, but the first two
    plain steps lie on the flat top of the cosine, and their secant (what unguarded Anderson
    does) extrapolates past 3 into another basin. The safeguarded steps must stay below 3 and reach
    1, from 6 calls on at least as close to it as plain iteration at equal calls (before that a
    rejected mixed step can leave them one call behind plain)."""
    A = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.3, 0.5], dtype=torch.float64)[:, None]
    g = lambda x: x + A * torch.cos(torch.pi * x / 2)  # noqa: E731
    z0 = torch.zeros(6, 1, dtype=torch.float64)
    x1 = g(z0)
    f0, f1 = x1 - z0, g(x1) - x1
    secant = x1 - f1 * (x1 - z0) / (f1 - f0)
    assert bool((secant[:4] > 3).all())                                  # unguarded: the wrong basin
    torch.testing.assert_close(iterate(g, z0, 400).z, torch.ones_like(z0), rtol=0, atol=1e-9)
    for m in (1, 2, 3):
        for iters in (4, 6, 10, 40):
            res = iterate(g, z0, iters, anderson=m, keep_iterates=True)
            assert all(bool((z < 2).all()) for z in res.iterates), (m, iters)
            plain = iterate(g, z0, iters).z
            if iters >= 6:
                assert bool(((res.z - 1).abs() <= (plain - 1).abs()).all()), (m, iters)
        torch.testing.assert_close(res.z, torch.ones_like(z0), rtol=0, atol=1e-12)
    # per sample: each sample alone takes the same steps as in the batch
    batched = iterate(g, z0, 8, anderson=3).z
    for b in range(6):
        alone = iterate(lambda x: x + A[b] * torch.cos(torch.pi * x / 2), z0[b:b + 1], 8, anderson=3).z
        torch.testing.assert_close(alone, batched[b:b + 1], rtol=0, atol=1e-14)


def test_anderson_reports_its_best_accepted_point():
    """best = (x, g(x), rms(g(x) - x)) at the accepted point of smallest residual, per sample. Slope
    -1.2 (sample 0) does not contract: its first plain step is accepted though the residual grows
    (1 -> 1.2), so after two calls its best point is the start, not the last point; slope 0.5
    (sample 1) contracts and its best is the last point. Plain iteration reports none."""
    slope = torch.tensor([-1.2, 0.5], dtype=torch.float64)[:, None]
    g = lambda z: slope * z + 1  # noqa: E731
    z0 = torch.zeros(2, 5, dtype=torch.float64)
    for iters in (2, 6):
        res = iterate(g, z0, iters, anderson=2)
        x, gx, r = res.best
        torch.testing.assert_close(gx, g(x), rtol=0, atol=0)
        torch.testing.assert_close(r, (gx - x).pow(2).mean(1).sqrt(), rtol=1e-12, atol=0)
        torch.testing.assert_close(r, res.residuals.min(0).values, rtol=0, atol=0)
    two = iterate(g, z0, 2, anderson=2).best[0]
    torch.testing.assert_close(two[0], z0[0], rtol=0, atol=0)          # the start: residual 1, then 1.2
    torch.testing.assert_close(two[1], g(z0)[1], rtol=0, atol=0)       # the last point: 1, then 0.5
    assert iterate(g, z0, 6).best is None


@pytest.mark.parametrize("m, relax", [(0, 1.0), (3, 1.0), (0, 2.0), (3, 2.0)])
def test_compiles_without_graph_breaks(m, relax):
    g, exact = contraction(4, B=2, n=5, rho=0.5)
    g32 = lambda z: g(z.double()).float()  # noqa: E731
    z0 = torch.zeros(2, 5)
    weights = [0, 0, 1, 1, 1, 1] if m == 0 else None
    run = lambda z: iterate(g32, z, 6, anderson=m, weights=weights, relax=relax).z  # noqa: E731
    compiled = torch.compile(run, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(z0), run(z0))
    explained = torch._dynamo.explain(run)(z0)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_bad_input_raises():
    g, _ = contraction(5)
    z0 = torch.zeros(3, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="iters"):
        iterate(g, z0, 0)
    with pytest.raises(ValueError, match="weights"):
        iterate(g, z0, 3, weights=[1, 1])
    with pytest.raises(ValueError, match="weights"):
        iterate(g, z0, 2, weights=[1, -1])
    with pytest.raises(ValueError, match="readout"):
        iterate(lambda z: (g(z), z), z0, 2, anderson=2, readout=lambda y: y)
    with pytest.raises(ValueError, match="anderson"):
        iterate(g, z0, 2, anderson=-1)
    with pytest.raises(ValueError, match="anderson_trust"):
        iterate(g, z0, 2, anderson=2, anderson_trust=0.0)
    for relax in (0.0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="relax"):
            iterate(g, z0, 2, relax=relax)
    with pytest.raises(ValueError, match="shape"):
        iterate(lambda z: z[:1], z0, 2)
    with pytest.raises(ValueError, match="pair"):
        iterate(g, z0, 2, readout=lambda y: y)
    with pytest.raises(ValueError, match="NaN"):
        iterate(g, torch.full_like(z0, float("nan")), 2)
    with pytest.raises(ValueError, match="non-finite.*samples \\[1\\]"):
        def bad(z):
            out = g(z).clone()
            out[1] = float("inf")
            return out
        iterate(bad, z0, 3, tol=1e-3)


def test_relax_start_picks_the_first_plain_step():
    """g(z) = t + λ(z - t), Anderson m = 3, relax = 2: relax_start="plain" calls g a second time
    at g(z0) (un-relaxed), "relaxed" at z0 + 2·(g(z0) - z0). Where relaxing overshoots (λ = -0.5:
    ratio |1 - 2·1.5| = 2) the relax guard rejects that step and the next call is g(z0) again."""
    lam = torch.tensor([0.9, -0.5], dtype=torch.float64)[:, None]
    t = torch.tensor([1.0, -2.0], dtype=torch.float64)[:, None].expand(2, 3)
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    seen = []

    def g(z):
        seen.append(z.clone())
        return t + lam * (z - t)

    g0 = g(z0)
    seen.clear()
    iterate(g, z0, 3, anderson=3, relax=2.0)
    torch.testing.assert_close(seen[1], g0, rtol=0, atol=1e-12)
    seen.clear()
    res = iterate(g, z0, 3, anderson=3, relax=2.0, relax_start="relaxed")
    torch.testing.assert_close(seen[1], z0 + 2 * (g0 - z0), rtol=0, atol=1e-12)
    torch.testing.assert_close(seen[2][1], g0[1], rtol=0, atol=1e-12)     # sample 1's overshoot rejected
    assert res.residuals[1, 1] == res.residuals[0, 1]                     # ... and it stayed at z0
    with pytest.raises(ValueError, match="relax_start"):
        iterate(g, z0, 3, anderson=3, relax=2.0, relax_start="fast")
