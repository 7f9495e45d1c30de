"""Gradients through renoise.fixed_point.iterate (grad= unrolled, implicit, phantom, none) and
the spectral-norm estimate, on maps whose fixed points and derivatives are known."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from renoise.fixed_point import FixedPointResult, iterate, rms, spectral_norm

F64 = torch.float64


def linear(seed, B=2, n=5, rho=0.6):
    """g(z) = A z + b per sample, A non-symmetric with ‖A‖₂ = rho exactly; A and b require grad."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(B, n, n, generator=gen, dtype=F64)
    A = (rho * A / torch.linalg.matrix_norm(A, 2)[:, None, None]).requires_grad_()
    b = torch.randn(B, n, generator=gen, dtype=F64).requires_grad_()
    c = torch.randn(B, n, generator=gen, dtype=F64)                 # L = Σ c·z*
    return A, b, c, (lambda z: torch.einsum("bij,bj->bi", A, z) + b)


def closed_form(A, b, c):
    """z* = (I - A)⁻¹ b and the adjoint u = (I - A)⁻ᵀ c: ∂L/∂b = u, ∂L/∂A = u z*ᵀ."""
    A, b = A.detach(), b.detach()
    eye = torch.eye(A.shape[-1], dtype=F64)
    z = torch.linalg.solve(eye - A, b)
    u = torch.linalg.solve((eye - A).transpose(1, 2), c)
    return z, u, u[:, :, None] * z[:, None, :]


def tanh_layer(seed, B=3, n=6, lip=0.8):
    """g(z) = tanh(W z + U x): a contraction (tanh is 1-Lipschitz, ‖W‖₂ = lip); W, U, x require grad."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=gen, dtype=F64)
    W = (lip * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()
    U = torch.randn(n, 4, generator=gen, dtype=F64).requires_grad_()
    x = torch.randn(B, 4, generator=gen, dtype=F64).requires_grad_()
    return W, U, x, (lambda z: torch.tanh(z @ W.T + x @ U.T))


# ------------------------------------------------------------------------------ implicit: exactness

@settings(max_examples=15)
@given(seed=st.integers(0, 10**6), rho=st.floats(0.05, 0.6), m=st.sampled_from([0, 3]),
       bm=st.sampled_from([0, 3]))
def test_implicit_gradient_is_the_closed_form_on_linear_contractions(seed, rho, m, bm):
    A, b, c, g = linear(seed, rho=rho)
    res = iterate(g, torch.zeros_like(c), 60, anderson=m, grad="implicit", backward_anderson=bm)
    gA, gb = torch.autograd.grad((c * res.z).sum(), (A, b))
    z, u, dA = closed_form(A, b, c)
    torch.testing.assert_close(res.z, z, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gb, u, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gA, dA, rtol=1e-9, atol=1e-9)
    assert res.graph_evals == 1 and len(res.backward) == 1 and res.backward[0].evals == 60


@settings(max_examples=10)
@given(seed=st.integers(0, 10**6), rho=st.floats(0.1, 0.8))
def test_unrolled_gradient_converges_to_the_implicit_one_as_k_grows(seed, rho):
    """Unrolled from z0 = 0: ∂L/∂b = Σ_{j<K} (Aᵀ)ʲ c, off the closed form by (Aᵀ)ᴷ u, at most
    rho^K·‖c‖/(1 - rho) per sample."""
    A, b, c, g = linear(seed, rho=rho)
    _, u, _ = closed_form(A, b, c)
    errs = []
    for K in (1, 2, 4, 8, 16, 32, 64):
        (gb,) = torch.autograd.grad((c * iterate(g, torch.zeros_like(c), K).z).sum(), b)
        err = (gb - u).norm(dim=1)
        assert bool((err <= rho**K * c.norm(dim=1) / (1 - rho) * (1 + 1e-9) + 1e-12).all()), K
        errs.append(float(err.max()))
    assert all(e2 <= e1 or e2 < 1e-12 for e1, e2 in zip(errs, errs[1:]))      # down to rounding
    # unrolled through safeguarded Anderson is finite (no NaN from its empty history) and converges too
    (ga,) = torch.autograd.grad((c * iterate(g, torch.zeros_like(c), 120, anderson=3).z).sum(), b)
    torch.testing.assert_close(ga, u, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("m", [0, 2])
def test_implicit_gradients_match_finite_differences_on_a_tanh_layer(m):
    W, U, x, g = tanh_layer(7)
    c = torch.randn(3, 6, generator=torch.Generator().manual_seed(8), dtype=F64)

    def loss(W, U, x):
        return (c * iterate(lambda z: torch.tanh(z @ W.T + x @ U.T), torch.zeros(3, 6, dtype=F64), 200,
                            anderson=m, grad="none").z).sum()

    res = iterate(g, torch.zeros(3, 6, dtype=F64), 200, anderson=m, grad="implicit", backward_iters=200)
    grads = torch.autograd.grad((c * res.z).sum(), (W, U, x))
    gen = torch.Generator().manual_seed(9)
    eps = 1e-6
    for i, p in enumerate((W, U, x)):
        d = torch.randn(p.shape, generator=gen, dtype=F64)
        args = [W.detach(), U.detach(), x.detach()]
        plus, minus = list(args), list(args)
        plus[i], minus[i] = args[i] + eps * d, args[i] - eps * d
        fd = (loss(*plus) - loss(*minus)) / (2 * eps)
        torch.testing.assert_close((grads[i] * d).sum(), fd, rtol=1e-7, atol=1e-9)


def test_gradients_reach_the_parameters_of_a_module():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 6, dtype=F64)
            with torch.no_grad():
                self.lin.weight.mul_(0.7 / torch.linalg.matrix_norm(self.lin.weight, 2))
            self.register_buffer("x", torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=F64))

        def forward(self, z):
            return torch.tanh(self.lin(z) + self.x)

    torch.manual_seed(0)          # nn.Linear's init; the library itself never draws from the global RNG
    g = Layer()
    z0 = torch.zeros(4, 6, dtype=F64)
    grads = {}
    for mode, kw in [("unrolled", {}), ("implicit", {}), ("phantom", dict(phantom_steps=120))]:
        g.zero_grad()
        iterate(g, z0, 120, grad=mode, **kw).z.pow(2).sum().backward()
        grads[mode] = [p.grad.clone() for p in g.parameters()]
        assert all(bool(p.abs().sum() > 0) for p in grads[mode])
    for a, b, c in zip(grads["unrolled"], grads["implicit"], grads["phantom"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert torch.equal(a, c)                      # phantom through every call is unrolled


def test_implicit_with_weights_and_readout_differentiates_at_the_fixed_point():
    """g returns (A z + b, C z); the answer is readout(ȳ) = Σ ȳ². At convergence the implicit
    gradient equals the unrolled one (the gradient of the converged computation), for A, b and C."""
    A, b, c, g0 = linear(3, rho=0.5)
    C = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(4), dtype=F64).requires_grad_()

    def g(z):
        return g0(z), torch.einsum("bij,bj->bi", C, z)

    w = [0.0] * 77 + [1.0, 2.0, 1.0]
    out = {}
    for mode in ("unrolled", "implicit"):
        res = iterate(g, torch.zeros(2, 5, dtype=F64), 80, weights=w, readout=lambda y: y.pow(2).sum(1), grad=mode)
        out[mode] = (res.z, torch.autograd.grad(res.z.sum(), (A, b, C)))
    assert torch.equal(out["unrolled"][0], out["implicit"][0])
    for a, i in zip(out["unrolled"][1], out["implicit"][1]):
        torch.testing.assert_close(i, a, rtol=1e-9, atol=1e-9)
    # weights without a readout: z̄ gets z*'s gradient
    res = iterate(g0, torch.zeros(2, 5, dtype=F64), 80, weights=w, grad="implicit")
    (gb,) = torch.autograd.grad((c * res.z).sum(), b)
    torch.testing.assert_close(gb, closed_form(A, b, c)[1], rtol=1e-9, atol=1e-9)


def test_implicit_backward_tolerance_and_indexed_maps():
    A, b, c, g = linear(5, rho=0.5)
    seen = []

    def gi(z, k):
        seen.append((k, torch.is_grad_enabled()))
        return g(z)

    res = iterate(gi, torch.zeros_like(c), 50, indexed=True, tol=1e-13, grad="implicit", backward_tol=1e-12,
                  backward_iters=500)
    assert res.evals < 50 and seen[-1] == (res.evals - 1, True)          # g(·, evals - 1) at z*, with a graph
    assert not any(on for _, on in seen[:-1])                            # the solve keeps no graph
    (gb,) = torch.autograd.grad((c * res.z).sum(), b)
    adj = res.backward[0]
    assert adj.evals < 500 and float(adj.residuals[-1].max()) <= 1e-12
    torch.testing.assert_close(gb, closed_form(A, b, c)[1], rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------ phantom, none, values

def test_phantom_backpropagates_through_the_last_k_calls_only():
    A, b, c, g = linear(6, rho=0.6)
    z0 = torch.zeros_like(c).requires_grad_()
    for k in (1, 3, 10):
        res = iterate(g, z0, 10, grad="phantom", phantom_steps=k)
        gb, gz0 = torch.autograd.grad((c * res.z).sum(), (b, z0), allow_unused=True)
        z = z0
        with torch.no_grad():
            for _ in range(10 - k):
                z = g(z)
        for _ in range(k):
            z = g(z)
        want = torch.autograd.grad((c * z).sum(), (b, z0), allow_unused=True)
        torch.testing.assert_close(gb, want[0], rtol=1e-12, atol=1e-12)
        assert (gz0 is None) == (k < 10)                              # z0 reached only when every call is kept


@pytest.mark.parametrize("m,paired", [(0, False), (2, False), (0, True)])     # anderson takes no readout
def test_the_value_is_the_same_in_every_grad_mode(m, paired):
    A, b, c, g0 = linear(9, rho=0.7)
    g = (lambda z: (g0(z), 3 * z)) if paired else g0
    kw = dict(weights=[0, 1, 1, 2, 0, 1], anderson=m, keep_iterates=True)
    if paired:
        kw["readout"] = lambda y: y.sum(1)
    values = {}
    for mode, extra in [("unrolled", {}), ("implicit", {}), ("phantom", dict(phantom_steps=2)), ("none", {})]:
        res = iterate(g, torch.zeros_like(c), 6, grad=mode, **kw, **extra)
        values[mode] = res.z
        assert res.z.requires_grad == (mode != "none")
        if not m:                                                      # which calls were recorded
            assert [z.requires_grad for z in res.iterates] == \
                [mode == "unrolled" or (mode == "phantom" and k >= 4) for k in range(6)]
    for mode in ("implicit", "phantom", "none"):
        assert torch.equal(values[mode], values["unrolled"]), mode
    with torch.no_grad():                                              # grad modes follow the ambient mode
        res = iterate(g, torch.zeros_like(c), 6, grad="implicit", **kw)
        assert not res.z.requires_grad and res.graph_evals == 0


def test_rms_has_a_finite_gradient_at_zero():
    d = torch.zeros(2, 3, requires_grad=True)
    (gd,) = torch.autograd.grad(rms(d).sum(), d)
    assert torch.equal(gd, torch.zeros_like(d))
    assert torch.equal(rms(torch.zeros(2, 3)), torch.zeros(2))


# ------------------------------------------------------------------------------ compile

@pytest.mark.parametrize("mode,kw", [("none", {}), ("unrolled", {}), ("phantom", dict(phantom_steps=2))])
@pytest.mark.parametrize("m", [0, 3])
def test_compiles_without_graph_breaks_in_every_recording_mode(mode, kw, m):
    A, b, c, g64 = linear(10, rho=0.5)
    g = lambda z: g64(z.double()).float()  # noqa: E731
    run = lambda z: iterate(g, z, 6, anderson=m, grad=mode, **kw).z  # noqa: E731
    z0 = torch.zeros(2, 5)
    explained = torch._dynamo.explain(run)(z0)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    got, want = torch.compile(run, fullgraph=True, backend="eager")(z0), run(z0)
    torch.testing.assert_close(got, want)
    if mode != "none":
        torch.testing.assert_close(torch.autograd.grad(got.sum(), b)[0], torch.autograd.grad(want.sum(), b)[0])


def test_implicit_runs_under_torch_compile():
    """The solve compiles; the implicit attachment (a custom autograd.Function whose backward
    runs the adjoint solve) is left to eager mode by graph breaks, with the same gradient."""
    A, b, c, g = linear(11, rho=0.5)
    run = lambda z: iterate(g, z, 40, grad="implicit").z  # noqa: E731
    z0 = torch.zeros_like(c)
    got = torch.compile(run, backend="eager")(z0)
    torch.testing.assert_close(torch.autograd.grad((c * got).sum(), b)[0], closed_form(A, b, c)[1],
                               rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------ spectral norm

@settings(max_examples=10)
@given(seed=st.integers(0, 10**6), rho=st.floats(0.1, 2.0))
def test_spectral_norm_of_a_linear_map(seed, rho):
    A, b, c, g = linear(seed, rho=rho)
    A2 = A.detach().clone()
    A2[0] *= 0.5                                             # per sample: norms rho/2 and rho
    lin = lambda z: torch.einsum("bij,bj->bi", A2, z) + b.detach()  # noqa: E731
    est = spectral_norm(lin, torch.zeros_like(c), 200)
    torch.testing.assert_close(est, torch.linalg.matrix_norm(A2, 2), rtol=1e-6, atol=0)
    assert torch.equal(spectral_norm(lambda z: b.detach() + 0 * z.detach(), torch.zeros_like(c)), torch.zeros(2, dtype=F64))


# ------------------------------------------------------------------------------ bad input

def test_bad_grad_options_are_refused():
    A, b, c, g = linear(12)
    z0 = torch.zeros_like(c)
    with pytest.raises(ValueError, match="unknown grad mode 'implict'"):
        iterate(g, z0, 3, grad="implict")
    with pytest.raises(ValueError, match="phantom_steps"):
        iterate(g, z0, 3, grad="phantom")
    with pytest.raises(ValueError, match="phantom_steps"):
        iterate(g, z0, 3, grad="phantom", phantom_steps=0)
    with pytest.raises(ValueError, match="tol"):
        iterate(g, z0, 3, grad="phantom", phantom_steps=1, tol=1e-6)
    with pytest.raises(ValueError, match="phantom_steps is for grad='phantom'"):
        iterate(g, z0, 3, grad="implicit", phantom_steps=2)
    with pytest.raises(ValueError, match="backward_iters.*grad='implicit'"):
        iterate(g, z0, 3, backward_iters=4)
    with pytest.raises(ValueError, match="backward_iters"):
        iterate(g, z0, 3, grad="implicit", backward_iters=0)
    with pytest.raises(ValueError, match="backward_anderson"):
        iterate(g, z0, 3, grad="implicit", backward_anderson=-1)
    with pytest.raises(ValueError, match="backward_tol"):
        iterate(g, z0, 3, grad="implicit", backward_tol=-1.0)
    with pytest.raises(ValueError, match="iters"):
        spectral_norm(g, z0, 0)
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        spectral_norm(g, z0, 3)
    assert isinstance(iterate(g, z0, 3, grad="none"), FixedPointResult)
