"""Fixed-point iteration z = g(z) on batched tensors: plain, weighted averaging, safeguarded Anderson.

    result = iterate(g, z0, iters, weights=None, anderson=0, tol=None)

Plain iteration calls g `iters` times: z_{k+1} = g(z_k), k = 0..iters-1, and answers z_iters, or
Σ_k w_k·z_{k+1} / Σ_k w_k with `weights` (ReNoise's averaging of chosen iterates). Every call of g
sees the whole batch [B, ...]; samples are independent problems that share the calls.

Anderson mixing (`anderson=m`) keeps, per sample, the last m accepted steps ΔX_i = x_{i+1} - x_i
and residual changes ΔF_i = f_{i+1} - f_i (f(x) = g(x) - x) and proposes, from the current point a,

    γ = argmin ‖f(a) - ΔF·γ‖² + λ‖γ‖²,    x' = g(a) - s·(ΔX + ΔF)·γ,    λ = reg·tr(ΔFᵀΔF)/m,

a trust-region step around the plain step g(a): s ≤ 1 keeps ‖s·(ΔX + ΔF)·γ‖ ≤ Δ·‖f(a)‖ with
Δ = ω·min(1/(1 - L̂), trust), or Δ = ω where plain steps do not contract. L̂ ≤ 1 is the residual
ratio of that sample's last plain step, so ‖f(a)‖/(1 - L̂) is how far plain iteration would still
travel at that rate: mixed points stay near the fixed point plain iteration is heading for instead
of extrapolating into another basin. Acceptance
is a ratio test, ρ = (‖f(a)‖ - ‖f(x')‖) / (‖f(a)‖ - ‖f(a) - s·ΔF·γ‖) (actual over predicted decrease):
  - ρ > 1/4: move to x' and keep the history; ω doubles when ρ > 3/4;
  - otherwise (also a non-finite g(x')): stay at a, divide ω by 4 (ω ∈ [1/16, 2], starting at 1/2),
    drop the history, and take the plain step g(a) next (the rejected call is the price).
Plain steps are always taken, as in plain iteration. Each sample answers g(x) at its last
accepted x, so z_{k+1} below means that answer after the k-th call.

`tol` stops samples whose residual reaches tol: they are frozen (their answer no longer changes,
their residual reads 0), the others go on, and the loop ends when all have converged. Checking it
synchronises with the device once per call; with tol=None the loop has no data-dependent Python
control flow, so it can be compiled (torch.compile(fullgraph=True)) or captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FixedPointResult:
    """z: the answer (readout(ȳ) with a readout); residuals: [evals, B] per-sample RMS of
    z_{k+1} - z_k (= [iters, B] unless tol stopped early); evals: calls to g; iterates: the
    z_{k+1} (k = 0..evals-1) when keep_iterates, else None."""

    z: object
    residuals: torch.Tensor
    evals: int
    iterates: list | None = None


def rms(d: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square of d [B, ...] -> [B] (float32 or float64), scaled by max |d| so
    that large finite values (|d| > 1e19 in float32) do not overflow in the squares."""
    d = d.to(torch.promote_types(d.dtype, torch.float32)).reshape(d.shape[0], -1)
    scale = d.abs().amax(1, keepdim=True).clamp_min(torch.finfo(d.dtype).tiny)
    return (d / scale).pow(2).mean(1).sqrt() * scale[:, 0]


def _bmask(mask, like):
    return mask.reshape(-1, *([1] * (like.ndim - 1)))


def _validate(g, z0, iters, weights, anderson, tol, readout):
    if not callable(g):
        raise ValueError(f"g must be callable, got {type(g).__name__}")
    if not isinstance(z0, torch.Tensor) or not z0.is_floating_point() or z0.ndim < 1:
        raise ValueError("z0 must be a floating-point tensor with a batch dimension [B, ...]")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters (the number of calls to g) must be an int >= 1, got {iters!r}")
    if isinstance(anderson, bool) or not isinstance(anderson, int) or anderson < 0:
        raise ValueError(f"anderson (the memory m) must be an int >= 0, got {anderson!r}")
    if anderson and readout is not None:
        raise ValueError("anderson mixing cannot be combined with readout; use plain iteration with a readout")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be >= 0 or None, got {tol!r}")
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != iters:
            raise ValueError(f"weights must have one entry per call of g ({iters}), got {len(weights)}")
        if any(not w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    if not torch.compiler.is_compiling() and z0.device.type == "cpu" and not bool(torch.isfinite(z0).all()):
        raise ValueError("z0 contains NaN or inf")
    return weights


def _check_output(z, z0, k):
    if not isinstance(z, torch.Tensor) or z.shape != z0.shape:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"g must return a tensor of z's shape {tuple(z0.shape)}, got {shape} at call {k}")


def _check_finite(r, k):
    bad = ~torch.isfinite(r)
    if bool(bad.any()):
        raise ValueError(f"g returned non-finite values at call {k} for samples {bad.nonzero().flatten().tolist()}")


def iterate(g, z0, iters, *, weights=None, anderson=0, tol=None, keep_iterates=False, indexed=False,
            readout=None, anderson_reg=1e-6, anderson_trust=20.0) -> FixedPointResult:
    """Solve z = g(z) from z0 [B, ...] with `iters` calls of g (see the module docstring).

    g(z) -> z_next (g(z, k) with indexed=True). With `readout`, g returns (z_next, y) with y
    [B, ...]; `weights` then average the y's and the answer is readout(ȳ) (readout(y_last) without
    weights). anderson=m > 0: safeguarded Anderson mixing with memory m, regularisation
    `anderson_reg` and largest trust radius `anderson_trust` (in plain-step lengths).
    """
    weights = _validate(g, z0, iters, weights, anderson, tol, readout)
    if not (anderson_reg >= 0 and anderson_trust > 0):
        raise ValueError(f"anderson_reg must be >= 0 and anderson_trust > 0, "
                         f"got {anderson_reg!r} and {anderson_trust!r}")
    if anderson:
        return _anderson(g, z0, iters, weights, anderson, tol, keep_iterates, indexed, anderson_reg, anderson_trust)
    return _plain(g, z0, iters, weights, tol, keep_iterates, indexed, readout)


class _Average:
    """Running Σ w_k·v_k, with the missing weights of an early stop given to the last v."""

    def __init__(self, weights):
        self.weights, self.acc = weights, None

    def add(self, k, v):
        if self.weights is None or self.weights[k] == 0:
            return
        term = self.weights[k] * v.to(torch.promote_types(v.dtype, torch.float32))
        self.acc = term if self.acc is None else self.acc + term

    def result(self, last, evals):
        if self.weights is None:
            return last
        for k in range(evals, len(self.weights)):
            self.add(k, last)
        return (self.acc / sum(self.weights)).to(last.dtype)


def _plain(g, z0, iters, weights, tol, keep_iterates, indexed, readout):
    z, y, done = z0, None, None
    avg, residuals, iterates = _Average(weights), [], [] if keep_iterates else None
    evals = 0
    for k in range(iters):
        out = g(z, k) if indexed else g(z)
        evals += 1
        if readout is not None:
            if not isinstance(out, tuple) or len(out) != 2:
                raise ValueError("with a readout, g must return a pair (z_next, y)")
            z_next, y_next = out
        else:
            z_next, y_next = out, None
        _check_output(z_next, z0, k)
        r = rms(z_next - z)
        if tol is not None:
            _check_finite(r, k)
            if done is not None:
                z_next = torch.where(_bmask(done, z), z, z_next)
                if y_next is not None:
                    y_next = torch.where(_bmask(done, y_next), y, y_next)
                r = torch.where(done, torch.zeros_like(r), r)
                done = done | (r <= tol)
            else:
                done = r <= tol
        residuals.append(r)
        z, y = z_next, y_next
        avg.add(k, y if readout is not None else z)
        if keep_iterates:
            iterates.append(z)
        if tol is not None and bool(done.all()):
            break
    answer = avg.result(y if readout is not None else z, evals)
    if readout is not None:
        answer = readout(answer)
    return FixedPointResult(answer, torch.stack(residuals), evals, iterates)


_ETA = 0.25                        # accept a mixed step if it achieves this share of the predicted decrease
_OMEGA = (1 / 16, 1 / 2, 2.0)      # trust scale ω: smallest, initial, largest


def _anderson(g, z0, iters, weights, m, tol, keep_iterates, indexed, reg, trust):
    shape, B = z0.shape, z0.shape[0]
    cd = torch.promote_types(z0.dtype, torch.float32)
    flat = lambda v: v.reshape(B, -1).to(cd)  # noqa: E731
    c = flat(z0)                        # the point g is called at next
    a = ga = fa = ra = None             # last accepted point, g(a), f(a) = g(a) - a, rms(f(a))
    dX = [torch.zeros_like(c) for _ in range(m)]
    dF = [torch.zeros_like(c) for _ in range(m)]
    valid = torch.zeros(m, B, dtype=torch.bool, device=c.device)
    done = torch.zeros(B, dtype=torch.bool, device=c.device)
    omega = torch.full((B,), _OMEGA[1], dtype=cd, device=c.device)   # trust scale ω
    rate = torch.ones(B, dtype=cd, device=c.device)                  # L̂: last plain step's ratio ≤ 1
    avg, residuals, iterates = _Average(weights), [], [] if keep_iterates else None
    evals = 0
    for k in range(iters):
        gc = g(c.reshape(shape).to(z0.dtype), k) if indexed else g(c.reshape(shape).to(z0.dtype))
        evals += 1
        _check_output(gc, z0, k)
        gc = flat(gc)
        fc = gc - c
        rc = rms(fc)
        if k == 0:
            a, ga, fa, ra = c, gc, fc, rc
        else:
            plain = ~valid.any(0)                      # c was the plain step g(a)
            rho = (ra - rc) / (ra - predicted).clamp_min(torch.finfo(cd).tiny)
            move = (plain | (rho > _ETA)) & ~done      # NaN residuals compare false: rejected
            mixed = ~plain & ~done
            grown = torch.where(rho > 0.75, omega * 2, torch.where(rho < 0.25, omega / 4, omega))
            omega = torch.where(mixed, grown.clamp(*_OMEGA[::2]), omega)
            rate = torch.where(plain & move, (rc / ra.clamp_min(torch.finfo(cd).tiny)).clamp(max=1.0), rate)
            valid = valid & move[None]                 # a rejected proposal restarts the history
            s, col = (k - 1) % m, move[:, None]
            dX[s] = torch.where(col, c - a, dX[s])
            dF[s] = torch.where(col, fc - fa, dF[s])
            valid[s] = valid[s] | move
            a, ga, fa = torch.where(col, c, a), torch.where(col, gc, ga), torch.where(col, fc, fa)
            ra = torch.where(move, rc, ra)
        r = torch.where(done, torch.zeros_like(ra), ra)
        if tol is not None:
            _check_finite(r, k)
            done = done | (r <= tol)
        residuals.append(r)
        z = ga.reshape(shape).to(z0.dtype)
        avg.add(k, z)
        if keep_iterates:
            iterates.append(z)
        if tol is not None and bool(done.all()):
            break
        if k < iters - 1:
            reach = torch.where(rate < 1, (1 / (1 - rate).clamp_min(1e-12)).clamp(max=trust), 1.0)
            radius = omega * reach
            c, predicted = _propose(a, ga, fa, dX, dF, valid, reg, radius)
            c = torch.where(done[:, None], a, c)
    z = ga.reshape(shape).to(z0.dtype)
    return FixedPointResult(avg.result(z, evals), torch.stack(residuals), evals, iterates)


def _propose(a, ga, fa, dX, dF, valid, reg, radius):
    """The Anderson point g(a) - s·(ΔX + ΔF)·γ for every sample ([B, N] tensors), with s ≤ 1 keeping
    the correction within radius·‖f(a)‖, and the linear model's residual there, ‖f(a) - s·ΔF·γ‖."""
    # the least squares is scaled by 1/rms(f) so that the Gram matrix stays O(1) (no denormals)
    unit = 1 / rms(fa).clamp_min(torch.finfo(fa.dtype).tiny ** 0.5)[:, None]
    mask = valid[..., None]                                        # [m, B, 1]
    F = torch.where(mask, torch.stack(dF), 0) * unit               # [m, B, N]
    G = torch.where(mask, torch.stack(dF) + torch.stack(dX), 0) * unit   # ΔG = ΔX + ΔF
    gram = torch.einsum("ibn,jbn->bij", F, F).double()             # [B, m, m]
    rhs = torch.einsum("ibn,bn->bi", F, fa * unit).double()        # [B, m]
    m = gram.shape[-1]
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    lam = reg * gram.diagonal(dim1=-2, dim2=-1).sum(-1) / m + 1e-12
    unused = (~valid).T.double()                                   # keeps empty slots' γ at 0
    system = gram + (lam[:, None] + unused)[..., None] * eye
    gamma = torch.linalg.solve(system, rhs).to(fa.dtype)           # [B, m]
    corr = torch.einsum("ibn,bi->bn", G, gamma) / unit             # (ΔX + ΔF)·γ
    scale = (radius * rms(fa) / rms(corr).clamp_min(torch.finfo(fa.dtype).tiny)).clamp(max=1.0)
    predicted = rms(fa - scale[:, None] * torch.einsum("ibn,bi->bn", F, gamma) / unit)
    return ga - scale[:, None] * corr, predicted
