"""renoise.invert(grad=...): gradients of z_T with respect to z0, the conditioning and the model's
parameters on the analytic Gaussian mixture; the per-step contraction and Jacobian-norm
diagnostics; the plot helper."""
import pytest
import torch

import renoise
from renoise.inversion import InversionResult
from renoise.presets import Plan
from renoise.samplers import ddim
from renoise.schedules import Schedule
from renoise.toy import GaussianMixture

F64 = torch.float64


class Conditioned(torch.nn.Module):
    """The mixture's exact denoiser with learnable component log-weights: a stand-in for a model
    whose conditioning (which components a prompt favours) is a parameter."""

    def __init__(self, gm, schedule, sampler="ddim"):
        super().__init__()
        self.means, self.std, self.schedule, self.sampler = gm.means, gm.std, schedule, sampler
        self.logits = torch.nn.Parameter(torch.linspace(-1, 1, gm.means.shape[0], dtype=gm.means.dtype))

    def forward(self, x, t):
        return GaussianMixture(self.means, self.std, self.logits).denoiser(self.schedule, self.sampler)(x, t)


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    gm = GaussianMixture.random(8, 16, std=0.3, generator=g)
    return gm, gm.sample(4, g), Schedule.create(timestep_spacing="trailing")


def plan(**kw):
    return Plan(sampler="ddim", num_steps=4, **kw)


LAST = dict(iters=3, window=(3, 4), average=False)
AVG = dict(iters=4, window=(2, 5))


def directional_fd(f, x, d, eps=1e-6):
    return (f(x + eps * d) - f(x - eps * d)) / (2 * eps)


# ------------------------------------------------------------------------------ gradients

def test_default_keeps_no_graph(problem):
    gm, x0, sch = problem
    den = Conditioned(gm, sch)
    res = renoise.invert(den, x0.clone().requires_grad_(), sch, "ddim", 4, plan(**LAST))
    assert not res.z_T.requires_grad and res.model_calls == 16
    with pytest.raises(RuntimeError):
        res.z_T.sum().backward()


@pytest.mark.parametrize("kw", [LAST, AVG], ids=["last", "avg"])
def test_unrolled_gradient_matches_finite_differences(problem, kw):
    gm, x0, sch = problem
    den = Conditioned(gm, sch)
    c = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    z0 = x0.clone().requires_grad_()
    res = renoise.invert(den, z0, sch, "ddim", 4, plan(**kw), grad="unrolled")
    gz0, glog = torch.autograd.grad((c * res.z_T).sum(), (z0, den.logits))

    def loss(z0=x0, logits=None):
        with torch.no_grad():
            if logits is not None:
                den.logits.copy_(logits)
            return (c * renoise.invert(den, z0, sch, "ddim", 4, plan(**kw)).z_T).sum()

    gen = torch.Generator().manual_seed(2)
    d = torch.randn(x0.shape, generator=gen, dtype=F64)
    torch.testing.assert_close((gz0 * d).sum(), directional_fd(loss, x0, d), rtol=1e-6, atol=1e-8)
    d = torch.randn(den.logits.shape, generator=gen, dtype=F64)
    start = den.logits.detach().clone()
    fd = directional_fd(lambda v: loss(logits=v), start, d)
    loss(logits=start)
    torch.testing.assert_close((glog * d).sum(), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kw", [dict(iters=100, window=(100, 101), average=False), dict(iters=100, window=(98, 101)),
                                dict(iters=60, window=(60, 61), average=False, anderson=3)],
                         ids=["last", "avg", "anderson"])
def test_implicit_gradient_is_the_converged_unrolled_one(problem, kw):
    """With each step converged (the slowest contracts at 0.81 per call), unrolling and implicit
    differentiation differentiate the same function; implicit keeps one model call's graph per
    step instead of 101."""
    gm, x0, sch = problem
    den = Conditioned(gm, sch)
    c = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    grads, values = {}, {}
    for mode in ("unrolled", "implicit"):
        z0 = x0.clone().requires_grad_()
        res = renoise.invert(den, z0, sch, "ddim", 4, plan(**kw), grad=mode)
        grads[mode] = torch.autograd.grad((c * res.z_T).sum(), (z0, den.logits))
        values[mode] = res.z_T
        assert res.model_calls == 4 * (kw["iters"] + 1) + (4 if mode == "implicit" else 0)
    assert torch.equal(values["unrolled"], values["implicit"])
    for u, i in zip(grads["unrolled"], grads["implicit"]):
        torch.testing.assert_close(i, u, rtol=1e-7, atol=1e-9)


def test_phantom_and_values_in_every_mode(problem):
    gm, x0, sch = problem
    den = Conditioned(gm, sch)
    c = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    out = {}
    for mode, opts in [("none", {}), ("unrolled", {}), ("phantom", dict(phantom_steps=4)),
                       ("phantom-1", dict(phantom_steps=1)), ("implicit", {})]:
        res = renoise.invert(den, x0, sch, "ddim", 4, plan(**LAST), grad=mode.split("-")[0], grad_opts=opts)
        out[mode] = res.z_T
    for mode in out:
        assert torch.equal(out[mode], out["none"]), mode
    g = {m: torch.autograd.grad((c * out[m]).sum(), den.logits)[0] for m in ("unrolled", "phantom", "phantom-1")}
    assert torch.equal(g["phantom"], g["unrolled"])         # 4 calls per step: all of them
    assert not torch.allclose(g["phantom-1"], g["unrolled"])


def test_gradients_pass_the_regularizer_and_noise_correction():
    """A regularized Euler-ancestral plan with optimize noise correction: unrolled gradients reach z0
    and the model, the random shifts are drawn exactly as without gradients, and implicit is refused."""
    g = torch.Generator().manual_seed(5)
    gm = GaussianMixture.random(8, 64, std=0.3, generator=g)
    x0 = gm.sample(2, g).view(2, 4, 4, 4).float()
    sch = Schedule.create(timestep_spacing="trailing")
    den = Conditioned(GaussianMixture(gm.means.float(), gm.std), sch, "euler_ancestral")
    p = Plan.preset("sdxl-turbo").replace(iters=3, window=(1, 4), first_iters=2, first_window=(0, 3),
                                          lambda_ac=0.2, lambda_kl=0.001, reg_rounds=2, reg_rolls=2)
    want = renoise.invert(den, x0, sch, "euler_ancestral", 4, p, generator=torch.Generator().manual_seed(6))
    z0 = x0.clone().requires_grad_()
    got = renoise.invert(den, z0, sch, "euler_ancestral", 4, p, generator=torch.Generator().manual_seed(6),
                         grad="unrolled")
    assert torch.equal(got.z_T, want.z_T)
    loss = got.z_T.square().sum() + sum(n.square().sum() for n in got.noises if n is not None)
    gz0, glog = torch.autograd.grad(loss, (z0, den.logits))
    assert bool(torch.isfinite(gz0).all()) and float(gz0.abs().sum()) > 0 and float(glog.abs().sum()) > 0
    with pytest.raises(ValueError, match="regularizer draws new random shifts"):
        renoise.invert(den, x0, sch, "euler_ancestral", 4, p, generator=torch.Generator(), grad="implicit")


def test_regularizer_is_differentiable():
    from renoise.regularizers import regularize
    gen = torch.Generator().manual_seed(7)
    e = torch.randn(1, 2, 8, 8, generator=gen, dtype=F64)
    ref = torch.randn(1, 2, 8, 8, generator=gen, dtype=F64)
    shifts = torch.randint(0, 4, (2, 2, 1, 2, 1), generator=gen)
    c = torch.randn(e.shape, generator=gen, dtype=F64)
    d = torch.randn(e.shape, generator=gen, dtype=F64)

    def f(x):
        return (c * regularize(x, ref, lambda_kl=0.05, lambda_ac=0.5, rounds=2, rolls=2, shifts=shifts)).sum()

    x = e.clone().requires_grad_()
    (ge,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close((ge * d).sum(), directional_fd(f, e, d, eps=1e-2), rtol=2e-2, atol=1e-3)


def test_sample_with_grad_reconstructs_differentiably(problem):
    gm, x0, sch = problem
    den = Conditioned(gm, sch)
    res = renoise.invert(den, x0, sch, "ddim", 4, plan(**LAST), grad="unrolled")
    assert not renoise.sample(den, res).requires_grad
    rec = renoise.sample(den, res, grad="unrolled")
    (glog,) = torch.autograd.grad((rec - x0).square().sum(), den.logits)
    assert float(glog.abs().sum()) > 0
    with pytest.raises(ValueError, match="'none' or 'unrolled'"):
        renoise.sample(den, res, grad="implicit")


def test_bad_grad_input_is_refused(problem):
    gm, x0, sch = problem
    den = gm.denoiser(sch, "ddim")
    with pytest.raises(ValueError, match="unknown grad mode 'implicitly'"):
        renoise.invert(den, x0, sch, "ddim", 4, plan(), grad="implicitly")
    with pytest.raises(ValueError, match="unknown grad_opts \\['phantom'\\]"):
        renoise.invert(den, x0, sch, "ddim", 4, plan(), grad="phantom", grad_opts={"phantom": 2})
    with pytest.raises(ValueError, match="phantom_steps"):
        renoise.invert(den, x0, sch, "ddim", 4, plan(**LAST), grad="phantom")
    with pytest.raises(ValueError, match="jacobian_iters"):
        renoise.invert(den, x0, sch, "ddim", 4, plan(), jacobian_iters=-1)
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        renoise.invert(den, x0, sch, "ddim", 4, plan(), jacobian_iters=2)


# ------------------------------------------------------------------------------ diagnostics

def test_contraction_is_the_ratio_of_the_last_two_residuals(problem):
    gm, x0, sch = problem
    den = gm.denoiser(sch, "ddim")
    res = renoise.invert(den, x0, sch, "ddim", 4, plan(**LAST))
    assert len(res.contraction) == 4 and res.jacobian_norm is None
    for c, r in zip(res.contraction, res.residuals):
        assert c.shape == (4,)
        torch.testing.assert_close(c, r[-1] / r[-2], rtol=0, atol=0)
    plain = renoise.invert(den, x0, sch, "ddim", 4, plan())
    assert all(bool(c.isnan().all()) for c in plain.contraction)       # one call: nothing to compare


def test_jacobian_norm_matches_the_dense_jacobian(problem):
    """‖∂G_t/∂z‖₂ by 100 power iterations against the SVD of the dense per-sample Jacobian blocks
    (computed by autograd): a lower bound within 0.5 % (the top singular values nearly coincide,
    which slows power iteration down)."""
    gm, x0, sch = problem
    den = gm.denoiser(sch, "ddim")
    res = renoise.invert(den, x0, sch, "ddim", 4, plan(**LAST), jacobian_iters=100)
    assert res.model_calls == 4 * 4 + 4
    chain = res.chain
    for s, i in enumerate(reversed(range(len(chain)))):
        t, tn = chain[i]
        z_prev, z_t = res.trajectory[s], res.trajectory[s + 1]
        J = torch.autograd.functional.jacobian(lambda z: ddim.inverse_step(z_prev, den(z, t), t, tn, sch), z_t)
        dense = torch.linalg.matrix_norm(torch.stack([J[b, :, b] for b in range(4)]), 2)
        est = res.jacobian_norm[s]
        assert bool((est <= dense * (1 + 1e-9)).all()) and bool((est >= dense * (1 - 5e-3)).all()), (s, est, dense)


def test_diagnostics_save_load_and_move(problem, tmp_path):
    gm, x0, sch = problem
    den = gm.denoiser(sch, "ddim")
    res = renoise.invert(den, x0, sch, "ddim", 4, plan(**LAST), jacobian_iters=3)
    res.save(tmp_path / "inv.safetensors")
    back = InversionResult.load(tmp_path / "inv.safetensors")
    for name in ("contraction", "jacobian_norm"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(back, name), getattr(res, name)))
        assert len(getattr(back, name)) == 4
    moved = res.to("cpu", torch.float32)
    assert len(moved.contraction) == 4 and len(moved.jacobian_norm) == 4
    # files written before the diagnostics existed load with none
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(tmp_path / "inv.safetensors"), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in ("num_contraction", "num_jacobian_norm")}
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(("contraction", "jacobian_norm"))}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    old = InversionResult.load(tmp_path / "old.safetensors")
    assert old.contraction == [] and old.jacobian_norm is None


def test_plot_convergence_writes_a_png(problem, tmp_path):
    pytest.importorskip("matplotlib")
    from renoise.diagnostics import plot_convergence
    gm, x0, sch = problem
    den = gm.denoiser(sch, "ddim")
    res = renoise.invert(den, x0, sch, "ddim", 4, plan(**LAST), jacobian_iters=3)
    path = plot_convergence(res, tmp_path / "conv.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plain = renoise.invert(den, x0, sch, "ddim", 4, plan())           # one call per step: no ratios
    assert plot_convergence(plain, tmp_path / "plain.png").stat().st_size > 0
