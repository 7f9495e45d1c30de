"""tol_plain: Anderson stops a sample only once its residual is also what K plain iterations would reach."""
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
def test_fast_samples_reach_plain_iterations_accuracy_slow_ones_stop_at_tol(seed):
    g, exact = two_speeds(seed=seed)
    z0 = torch.zeros_like(exact)
    opts = dict(anderson=3, relax=2.0)
    plain9 = iterate(g, z0, 10)                                    # K = 9: 10 plain calls
    tol = 0.3 * float(iterate(g, z0, 1).residuals[0].max())        # a fixed tol, loose for the fast sample
    alone = iterate(g, z0, 10, tol=tol, **opts)
    both = iterate(g, z0, 10, tol=tol, tol_plain=9, **opts)
    err = lambda r: (r.z - exact).norm(dim=1)                      # noqa: E731
    calls = lambda r: (r.residuals > 0).sum(0)                     # noqa: E731  per sample
    # the slow sample: r0·L̂^9 is no stricter than tol, so tol decides, as without tol_plain
    assert calls(both)[1] == calls(alone)[1] < 10
    # the fast sample goes on: as accurate as K = 9 plain iteration, far more than tol alone, fewer calls
    assert err(both)[0] <= err(plain9)[0]
    assert err(both)[0] < err(alone)[0] / 100
    assert calls(alone)[0] < calls(both)[0] < 10
    # it stopped where its residual was within r0·L̂^9 (L̂ <= 0.3 here)
    r = both.residuals[:, 0]
    assert float(r[r > 0][-1]) <= float(r[0]) * 0.3 ** 9


def test_tol_plain_alone_and_bad_values():
    g, exact = two_speeds()
    z0 = torch.zeros_like(exact)
    res = iterate(g, z0, 10, anderson=3, tol_plain=4)             # tol None: only r <= r0·L̂^4
    assert res.evals < 10                                          # both stopped early
    with pytest.raises(ValueError, match="needs Anderson"):
        iterate(g, z0, 5, tol=1e-3, tol_plain=3)
    with pytest.raises(ValueError, match="tol_plain"):
        iterate(g, z0, 5, anderson=3, tol_plain=0)
    with pytest.raises(ValueError, match="needs anderson > 0"):
        Plan(iters=9, window=(9, 10), average=False, tol=1e-2, tol_plain=9)
    with pytest.raises(ValueError, match="tol_plain must be an int >= 1"):
        Plan(iters=9, window=(9, 10), average=False, anderson=3, tol_plain=2.5)
