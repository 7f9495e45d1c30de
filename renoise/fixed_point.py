"""Fixed-point iteration z = g(z) on batched tensors: plain, weighted averaging, safeguarded Anderson.

    result = iterate(g, z0, iters, weights=None, anderson=0, tol=None)

Plain iteration calls g `iters` times: z_{k+1} = g(z_k), k = 0..iters-1, and answers z_iters, or
Σ_k w_k·z_{k+1} / Σ_k w_k with `weights` (ReNoise's averaging of chosen iterates). Every call of g
sees the whole batch [B, ...]; samples are independent problems that share the calls.

Over-relaxation (`relax=β`, default 1) calls g at c_{k+1} = c_k + β·(g(c_k) - c_k) instead; the
iterates and the answer are still the g(c_k), the residuals g(c_k) - c_k. Along an eigenvector of
g's Jacobian with eigenvalue λ < 1 the error shrinks by |1 - β(1 - λ)| a call: β ≈ 2 halves the
calls where λ is near 1 (ReNoise's slow steps) but makes λ near 0 oscillate (|1 - β|); Anderson's
safeguard (below) keeps those in check. Under Anderson, β > 1 is adaptive, per sample, with `relax`
its upper bound: the first plain step is un-relaxed, and its residual ratio L̂ sets β = 2/(2 - L̂)
(≤ relax; 1 where L̂ ≥ 1), the best fixed step length for eigenvalues in [0, L̂]: ≈ 1 on fast steps,
where relaxing only oscillates, up to 2 on slow ones. `relax_start="relaxed"` takes that first plain
step relaxed instead (β = relax) and reads L̂ = 1 - (1 - ρ)/relax off its residual ratio ρ (exact along
one eigenvector with 1 - β(1 - λ) ≥ 0): no call is spent un-relaxed, which matters when a step has
only 2 or 3 calls, at the risk of one overshooting step where relaxing was wrong (the relax guard
below then rejects it, if it grew the residual).

Anderson mixing (`anderson=m`) keeps, per sample, the last m accepted steps ΔX_i = x_{i+1} - x_i
and residual changes ΔF_i = f_{i+1} - f_i (f(x) = g(x) - x) and proposes, from the current point a,

    γ = argmin ‖f(a) - ΔF·γ‖² + λ‖γ‖²,    x' = a + β·f(a) - s·(ΔX + β·ΔF)·γ,    λ = reg·tr(ΔFᵀΔF)/m,

a trust-region step around the plain step a + β·f(a) (= g(a) at β = 1): s ≤ 1 keeps
‖s·(ΔX + β·ΔF)·γ‖ ≤ Δ·‖f(a)‖ with Δ = ω·min(1/(1 - L̂), trust), or Δ = ω where plain steps do not
contract. L̂ ≤ 1 is the residual ratio of that sample's last plain step, so ‖f(a)‖/(1 - L̂) is how
far plain iteration would still travel at that rate: mixed points stay near the fixed point plain
iteration is heading for instead of extrapolating into another basin. Acceptance is a ratio
test, ρ = (‖f(a)‖ - ‖f(x')‖) / (‖f(a)‖ - ‖f(a) - s·ΔF·γ‖) (actual over predicted decrease):
  - ρ > 1/4: move to x' and keep the history; ω doubles when ρ > 3/4;
  - otherwise (also a non-finite g(x')): stay at a, divide ω by 4 (ω ∈ [1/16, 2], starting at 1/2),
    drop the history, and take the plain step a + β·f(a) next (the rejected call is the price).
Plain steps are always taken, as in plain iteration, with one exception (the relax guard): a
relaxed plain step (β ≠ 1) that does not shrink the residual is rejected like a mixed one, and
from then on that sample's steps are un-relaxed (β = 1, Anderson around plain iteration). Off the
map's home ground its Jacobian can have eigenvalues near 0 or below, where β = 2 gives
|1 - β(1 - λ)| ≥ 1: without the guard the relaxed fallback itself diverged there. Each sample
answers g(x) at its last accepted x, so z_{k+1} below means that answer after the k-th call.

`tol` (a number, or a 0-d tensor computed in a compiled caller) stops samples whose residual
reaches tol: they are frozen (their answer no longer changes, their residual reads 0), the others
go on, and the loop ends when all have converged. Checking it synchronises with the device once
per call. Without tol the loop has no data-dependent Python control flow, so it can be compiled
(torch.compile(fullgraph=True)) or captured in a CUDA graph; compiled with tol, samples are frozen
alike but every one of the `iters` calls runs (the same answer, no early exit, no sync).

`tol_plain=K` (Anderson only) also stops a sample once it is as far as K plain iterations would get:
r <= r₀·L̂^K, r₀ its first residual and L̂ the contraction λ its last accepted plain step measured
(its ratio, or 1 - (1 - ratio)/β for a relaxed one; none yet: no stop). Where plain iteration
contracts slowly (λ near 1: K plain calls barely move) that stops long before a tight tol, which
cannot be reached in the calls there are; where it contracts fast, r₀·λ^K is far below tol and tol
decides. So a tight tol chases plain iteration's accuracy on fast steps without spending every
call on slow ones.

NaN and inf: `NonFiniteError` (a ValueError) names the first call of g (counted from 1) that
returned them and the samples concerned. With tol it is raised at that call; without tol the loop
checks once, after its last call, whether the answer is finite (one host sync per solve; skipped
under torch.compile and while a CUDA graph is captured, where the caller checks). Anderson's
rejected non-finite proposals are not errors: the answer stays at the last accepted point.

Gradients (`grad=`); the answer's value is the same in every mode, only its gradient differs:
  - "unrolled" (default): autograd records every call and the averaging, as for any torch code.
    Memory grows with the calls; the gradient is that of the truncated iteration. Through
    Anderson, the mixing coefficients γ and the trust scale s are constants to autograd: the
    gradient is Anderson's own combination applied to the iterates' derivatives, which converges
    to the fixed point's gradient. (Differentiating γ too, a least squares over residual
    differences that vanish near convergence, gives derivatives that need not converge.)
  - "none": the whole solve runs under torch.no_grad.
  - "phantom" (`phantom_steps=k`): the first iters - k calls run under no_grad, the last k are
    recorded: backpropagation through the last k calls only (truncated backprop).
  - "implicit": the solve runs under no_grad and keeps no graph. Then g is called once more at the
    solver's z* (the last iterate, or Anderson's answer) with a graph, and the backward solves the
    adjoint fixed point

        u = J_g(z*)ᵀ u + v,        v = ∂L/∂z*,        then ∂L/∂θ = uᵀ ∂g/∂θ (z*),

    with vector-Jacobian products through that one call, by `iterate` itself (plain or Anderson,
    `backward_iters` calls, `backward_tol`). θ is anything g's output depends on: its parameters,
    the tensors it closes over (z0 itself drops out: the fixed point does not depend on the start).
    This is the gradient of the exact fixed point z*(θ) = g(z*(θ); θ); memory does not grow with
    the forward calls. Averages are differentiated at the fixed point, where all iterates agree:
    with `weights`, z̄ gets z*'s gradient; with a `readout`, ȳ gets the gradient of y(z*) (the y
    that g returns at z*, its dependence on z* included) and readout(ȳ) is recorded as usual.
    With indexed=True the map differentiated is g(·, evals - 1), the last one called. Not twice
    differentiable (no create_graph through the adjoint).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

GRAD_MODES = ("unrolled", "implicit", "phantom", "none")
RELAX_STARTS = ("plain", "relaxed")


class NonFiniteError(ValueError):
    """g returned NaN or inf (or the answer is not finite); `call` is the first bad call of g,
    counted from 1 (None where only the answer is), `samples` the batch indices concerned."""

    def __init__(self, message, call=None, samples=()):
        super().__init__(message)
        self.call, self.samples = call, list(samples)


@dataclass
class FixedPointResult:
    """z: the answer (readout(ȳ) with a readout); residuals: [evals, B] per-sample RMS of
    z_{k+1} - z_k (= [iters, B] unless tol stopped early, never part of a graph); evals: calls
    to g by the solve; iterates: the z_{k+1} (k = 0..evals-1) when keep_iterates, else None.
    graph_evals: the extra call of g that grad="implicit" records at z* (0 or 1); backward: one
    FixedPointResult (z=None) per adjoint solve run by a backward pass (implicit mode). best (Anderson
    only, else None): (x, g(x), rms(g(x) - x)) per sample at the accepted point x with the smallest
    residual, [B, ...], [B, ...], [B]: the one answer whose own residual is known without another call."""

    z: object
    residuals: torch.Tensor
    evals: int
    iterates: list | None = None
    graph_evals: int = 0
    backward: list = field(default_factory=list)
    best: tuple | None = None

    def contraction(self) -> torch.Tensor:
        """contraction(self.residuals)."""
        return contraction(self.residuals)


def contraction(residuals: torch.Tensor) -> torch.Tensor:
    """Per-sample contraction estimate [B] from residuals [calls, B]: the ratio of the last two
    (NaN with one call; 0/0 = NaN for samples frozen by tol)."""
    if residuals.shape[0] < 2:
        return torch.full_like(residuals[0], float("nan"))
    return residuals[-1] / residuals[-2]


def rms(d: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square of d [B, ...] -> [B] (float32 or float64), scaled by max |d| so
    that large finite values (|d| > 1e19 in float32) do not overflow in the squares. The clamp
    before the root only acts at d = 0 (the mean is >= 1/N otherwise): its gradient there is 0,
    not NaN, so backpropagating through Anderson's empty history is finite."""
    d = d.to(torch.promote_types(d.dtype, torch.float32)).reshape(d.shape[0], -1)
    tiny = torch.finfo(d.dtype).tiny
    scale = d.abs().amax(1, keepdim=True).clamp_min(tiny)
    return (d / scale).pow(2).mean(1).clamp_min(tiny).sqrt() * scale[:, 0]


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
    if tol is not None and not isinstance(tol, torch.Tensor) and not tol >= 0:    # a 0-d tensor: the caller's
        raise ValueError(f"tol must be >= 0 or None, got {tol!r}")
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != iters:
            raise ValueError(f"weights must have one entry per call of g ({iters}), got {len(weights)}")
        if any(not (w >= 0 and math.isfinite(w)) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be finite and non-negative with a positive sum, got {weights}")
    if not torch.compiler.is_compiling() and z0.device.type == "cpu" and not bool(torch.isfinite(z0).all()):
        raise ValueError("z0 contains NaN or inf")
    return weights


def _check_output(z, z0, k):
    if not isinstance(z, torch.Tensor) or z.shape != z0.shape:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"g must return a tensor of z's shape {tuple(z0.shape)}, got {shape} at call {k + 1}")


def _all_done(tol, done):
    """Whether tol froze every sample; a host sync, so never inside a compiled region (no early exit)."""
    return tol is not None and not torch.compiler.is_compiling() and bool(done.all())


def _syncable() -> bool:
    """Whether a host sync is allowed here: not inside torch.compile, not while capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _check_finite(r, k):
    """Raise NonFiniteError at non-finite residuals of call k (0-based); a host sync, so skipped
    inside a compiled region or a CUDA graph capture."""
    if not _syncable():
        return
    bad = ~torch.isfinite(r)
    if bool(bad.any()):
        samples = bad.nonzero().flatten().tolist()
        raise NonFiniteError(f"g returned non-finite values (NaN or inf) at call {k + 1} for samples {samples}",
                             k + 1, samples)


def _check_answer(value, residuals):
    """After the loop (no tol): one host sync; NonFiniteError naming the first call whose residual
    was not finite, where the answer is not finite. Skipped where a sync is not allowed."""
    if not _syncable() or not isinstance(value, torch.Tensor):
        return
    finite = torch.isfinite(value.detach()).reshape(value.shape[0], -1).all(1)
    if bool(finite.all()):
        return
    samples = (~finite).nonzero().flatten().tolist()
    bad_calls = (~torch.isfinite(residuals[:, samples])).any(1).nonzero().flatten().tolist()
    if bad_calls:
        call = bad_calls[0] + 1
        raise NonFiniteError(f"g returned non-finite values (NaN or inf) at call {call} (of {residuals.shape[0]}) "
                             f"for samples {samples}", call, samples)
    raise NonFiniteError(f"the answer is NaN or inf for samples {samples} (every call of g returned finite "
                         "values: the averaging overflowed)", None, samples)


def iterate(g, z0, iters, *, weights=None, anderson=0, tol=None, tol_plain=None, keep_iterates=False, indexed=False,
            readout=None, anderson_reg=1e-6, anderson_trust=20.0, relax=1.0, relax_start="plain", grad="unrolled",
            phantom_steps=None,
            backward_iters=None, backward_tol=None, backward_anderson=None) -> FixedPointResult:
    """Solve z = g(z) from z0 [B, ...] with `iters` calls of g (see the module docstring).

    g(z) -> z_next (g(z, k) with indexed=True). With `readout`, g returns (z_next, y) with y
    [B, ...]; `weights` then average the y's and the answer is readout(ȳ) (readout(y_last) without
    weights). anderson=m > 0: safeguarded Anderson mixing with memory m, regularisation
    `anderson_reg` and largest trust radius `anderson_trust` (in plain-step lengths). relax=β: the
    step length of the plain (and Anderson's base) step, z + β·(g(z) - z); with Anderson and β > 1,
    the largest step length of the adaptive one (module docstring); relax_start: "plain" (its first
    plain step un-relaxed) | "relaxed" (β = relax from the first step; module docstring).
    grad: "unrolled" | "implicit" | "phantom" | "none" (module docstring). phantom_steps=k: the
    calls recorded by "phantom" (k >= iters: all of them). backward_iters / backward_tol /
    backward_anderson: the implicit backward's adjoint solve (default: iters, None, anderson).
    tol_plain=K (Anderson only): a sample also stops once r <= r₀·L̂^K (module docstring); with tol
    None, only then.
    """
    weights = _validate(g, z0, iters, weights, anderson, tol, readout)
    if tol_plain is not None:
        if isinstance(tol_plain, bool) or not isinstance(tol_plain, int) or tol_plain < 1:
            raise ValueError(f"tol_plain (the plain iterations whose residual a sample must reach) must be an int "
                             f">= 1 or None, got {tol_plain!r}")
        if not anderson:
            raise ValueError("tol_plain needs Anderson mixing (anderson > 0): it compares the residual with plain "
                             "iteration's, which plain iteration matches by running K calls")
        if tol is None:
            tol = 0.0
    if not (anderson_reg >= 0 and anderson_trust > 0):
        raise ValueError(f"anderson_reg must be >= 0 and anderson_trust > 0, "
                         f"got {anderson_reg!r} and {anderson_trust!r}")
    if isinstance(relax, bool) or not isinstance(relax, (int, float)) or not 0 < relax < float("inf"):
        raise ValueError(f"relax (the step length β, 1: plain iteration) must be a finite number > 0, got {relax!r}")
    if relax_start not in RELAX_STARTS:
        raise ValueError(f"relax_start must be one of {', '.join(map(repr, RELAX_STARTS))} (how Anderson's adaptive "
                         f"relaxation takes its first plain step), got {relax_start!r}")
    adjoint = _validate_grad(grad, phantom_steps, tol, iters, anderson, backward_iters, backward_tol,
                             backward_anderson)
    record = torch.is_grad_enabled() and grad != "none"
    first = {"unrolled": 0, "phantom": iters - min(phantom_steps or 0, iters)}.get(grad, iters)

    def call(z, k):                    # calls k < first run without a graph
        with torch.set_grad_enabled(record and k >= first):
            return g(z, k) if indexed else g(z)

    best = None
    if anderson:
        value, z_last, residuals, evals, iterates, best = _anderson(call, z0, iters, weights, anderson, tol,
                                                                    keep_iterates, anderson_reg, anderson_trust, relax,
                                                                    relax_start, tol_plain)
    else:
        value, z_last, residuals, evals, iterates = _plain(call, z0, iters, weights, tol, keep_iterates,
                                                           readout is not None, relax)
    _check_answer(value, residuals)
    result = FixedPointResult(value, residuals, evals, iterates, best=best)
    with torch.set_grad_enabled(record):
        if grad == "implicit" and record:
            index = evals - 1 if indexed else None
            result.z = _implicit(g, z_last, index, readout is not None, value, adjoint, result.backward)
            result.graph_evals = 1
        if readout is not None:
            result.z = readout(result.z)
    return result


def _validate_grad(grad, phantom_steps, tol, iters, anderson, backward_iters, backward_tol, backward_anderson):
    """Checks the gradient options; returns the adjoint solve's iterate() keywords."""
    if grad not in GRAD_MODES:
        raise ValueError(f"unknown grad mode {grad!r}; expected one of {', '.join(map(repr, GRAD_MODES))}")
    if grad == "phantom":
        if isinstance(phantom_steps, bool) or not isinstance(phantom_steps, int) or phantom_steps < 1:
            raise ValueError(f"grad='phantom' needs phantom_steps, the number of last calls to backpropagate "
                             f"through, as an int >= 1; got {phantom_steps!r}")
        if tol is not None:
            raise ValueError("grad='phantom' cannot be combined with tol: the last calls must be known before they "
                             "run; use tol=None, or grad='implicit'")
    elif phantom_steps is not None:
        raise ValueError(f"phantom_steps is for grad='phantom', not grad={grad!r}")
    given = {k: v for k, v in [("backward_iters", backward_iters), ("backward_tol", backward_tol),
                               ("backward_anderson", backward_anderson)] if v is not None}
    if grad != "implicit":
        if given:
            raise ValueError(f"{', '.join(given)} configure the adjoint solve of grad='implicit', not grad={grad!r}")
        return None
    opts = dict(iters=iters if backward_iters is None else backward_iters, tol=backward_tol,
                anderson=anderson if backward_anderson is None else backward_anderson)
    if isinstance(opts["iters"], bool) or not isinstance(opts["iters"], int) or opts["iters"] < 1:
        raise ValueError(f"backward_iters (calls of the adjoint map) must be an int >= 1, got {backward_iters!r}")
    if isinstance(opts["anderson"], bool) or not isinstance(opts["anderson"], int) or opts["anderson"] < 0:
        raise ValueError(f"backward_anderson (the adjoint's Anderson memory) must be an int >= 0, "
                         f"got {backward_anderson!r}")
    if backward_tol is not None and not backward_tol >= 0:
        raise ValueError(f"backward_tol must be >= 0 or None, got {backward_tol!r}")
    return opts


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


def _plain(call, z0, iters, weights, tol, keep_iterates, paired, relax=1.0):
    """-> (z̄ or ȳ, last z, residuals [evals, B], evals, iterates). g is called at c: c_0 = z0,
    c_{k+1} = c_k + relax·(g(c_k) - c_k) (= g(c_k) when relax = 1); the iterates are the g(c_k)."""
    z, y, done, c = z0, None, None, z0
    avg, residuals, iterates = _Average(weights), [], [] if keep_iterates else None
    evals = 0
    for k in range(iters):
        out = call(c, k)
        evals += 1
        if paired:
            if not isinstance(out, tuple) or len(out) != 2:
                raise ValueError("with a readout, g must return a pair (z_next, y)")
            z_next, y_next = out
        else:
            z_next, y_next = out, None
        _check_output(z_next, z0, k)
        r = rms(z_next.detach() - c.detach())
        c_next = z_next if relax == 1 else c + relax * (z_next - c)
        if tol is not None:
            _check_finite(r, k)
            if done is not None:
                z_next = torch.where(_bmask(done, z), z, z_next)
                c_next = torch.where(_bmask(done, c), c, c_next)
                if y_next is not None:
                    y_next = torch.where(_bmask(done, y_next), y, y_next)
                r = torch.where(done, torch.zeros_like(r), r)
                done = done | (r <= tol)
            else:
                done = r <= tol
        residuals.append(r)
        z, y, c = z_next, y_next, c_next
        avg.add(k, y if paired else z)
        if keep_iterates:
            iterates.append(z)
        if _all_done(tol, done):
            break
    return avg.result(y if paired else z, evals), z, torch.stack(residuals), evals, iterates


class _Adjoint(torch.autograd.Function):
    """value -> value; the backward hands the value's gradient to solve(), which returns the
    gradients of g's outputs at z* (`outputs`), through which autograd then reaches θ."""

    @staticmethod
    def forward(ctx, solve, value, *outputs):
        ctx.solve = solve
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *ctx.solve(grad))


def _implicit(g, z_star, index, paired, value, opts, log):
    """Attach the implicit gradient to `value` (z̄, z* or ȳ): one call of g at z* with a graph."""
    z_in = z_star.detach().requires_grad_()
    with torch.enable_grad():
        out = g(z_in) if index is None else g(z_in, index)
    z_next, y = out if paired else (out, None)
    outputs = (z_next,) if y is None else (z_next, y)
    if not any(o.requires_grad for o in outputs):
        return value

    def vjp(of, u):
        (d,) = torch.autograd.grad(of, z_in, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(z_in) if d is None else d

    def solve(v):
        """u = J_gᵀ u + rhs with rhs = v (z̄, z*) or v·∂y/∂z (ȳ); returns the grads of (z_next[, y])."""
        v = v.to(z_in.dtype) if y is None else v.to(y.dtype)
        rhs = v if y is None else vjp(y, v)
        with torch.no_grad():
            res = iterate(lambda u: vjp(z_next, u) + rhs, rhs, **opts)
        log.append(FixedPointResult(None, res.residuals, res.evals))
        return (res.z,) if y is None else (res.z, v)

    return _Adjoint.apply(solve, value.detach(), *outputs)


_ETA = 0.25                        # accept a mixed step if it achieves this share of the predicted decrease
_OMEGA = (1 / 16, 1 / 2, 2.0)      # trust scale ω: smallest, initial, largest
_GROW = 1.0                        # a relaxed plain step must shrink the residual below this share


def _anderson(call, z0, iters, weights, m, tol, keep_iterates, reg, trust, relax=1.0, relax_start="plain",
              tol_plain=None):
    """-> (z̄, answer g(a), residuals [evals, B], evals, iterates, (x, g(x), rms(f(x))) at the accepted x
    with the smallest residual)."""
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
    start = float(relax) if relax_start == "relaxed" else min(float(relax), 1.0)
    beta = torch.full((B,), start, dtype=cd, device=c.device)        # each sample's step length
    measured = torch.zeros(B, dtype=torch.bool, device=c.device)      # whether β was set from a plain step
    lhat = torch.full((B,), float("nan"), dtype=cd, device=c.device)  # tol_plain's L̂ (NaN: none measured yet)
    avg, residuals, iterates = _Average(weights), [], [] if keep_iterates else None
    evals = 0
    for k in range(iters):
        gc = call(c.reshape(shape).to(z0.dtype), k)
        evals += 1
        _check_output(gc, z0, k)
        gc = flat(gc)
        fc = gc - c
        rc = rms(fc)
        if k == 0:
            a, ga, fa, ra = c, gc, fc, rc
            r0 = rc
            xb, gb, rb = c, gc, rc
        else:
            plain = ~valid.any(0)                      # c was the plain step a + β·f(a)
            rho = (ra - rc) / (ra - predicted).clamp_min(torch.finfo(cd).tiny)
            # a relaxed plain step that did not shrink the residual (NaN: neither) is rejected, and
            # that sample's steps are un-relaxed (β = 1) for the rest of the solve: plain iteration
            grew = plain & (beta != 1) & ~(rc < _GROW * ra) & ~done
            move = ((plain & ~grew) | (rho > _ETA)) & ~done      # NaN residuals compare false: rejected
            beta = torch.where(grew, torch.ones_like(beta), beta)
            mixed = ~plain & ~done
            grown = torch.where(rho > 0.75, omega * 2, torch.where(rho < 0.25, omega / 4, omega))
            omega = torch.where(mixed, grown.clamp(*_OMEGA[::2]), omega)
            rate = torch.where(plain & move, (rc / ra.clamp_min(torch.finfo(cd).tiny)).clamp(max=1.0), rate)
            lam = 1 - (1 - rate) / beta                        # L̂ from ρ = 1 - β(1 - L̂); = rate when un-relaxed
            lhat = torch.where(plain & move, lam, lhat)
            if relax > 1:              # β from the first plain step's L̂: 2/(2 - L̂) ≤ relax
                first = plain & move & ~measured
                adapt = (2 / (2 - lam)).clamp(min=1.0, max=float(relax))
                beta = torch.where(first, torch.where(lam < 1, adapt, torch.ones_like(beta)), beta)
                measured = measured | first | grew       # a sample whose relaxed step grew stays un-relaxed
            valid = valid & move[None]                 # a rejected proposal restarts the history
            s, col = (k - 1) % m, move[:, None]
            dX[s] = torch.where(col, c - a, dX[s])
            dF[s] = torch.where(col, fc - fa, dF[s])
            valid[s] = valid[s] | move
            a, ga, fa = torch.where(col, c, a), torch.where(col, gc, ga), torch.where(col, fc, fa)
            ra = torch.where(move, rc, ra)
            better = (move & (rc < rb))[:, None]
            xb, gb, rb = torch.where(better, c, xb), torch.where(better, gc, gb), torch.where(better[:, 0], rc, rb)
        r = torch.where(done, torch.zeros_like(ra), ra)
        if tol is not None:
            _check_finite(r, k)
            reached = r <= tol
            if tol_plain is not None:             # NaN L̂ (no plain ratio yet) compares false
                reached = reached | (r <= r0 * lhat.clamp(min=0.0) ** tol_plain)
            done = done | reached
        residuals.append(r.detach())
        z = ga.reshape(shape).to(z0.dtype)
        avg.add(k, z)
        if keep_iterates:
            iterates.append(z)
        if _all_done(tol, done):
            break
        if k < iters - 1:
            reach = torch.where(rate < 1, (1 / (1 - rate).clamp_min(1e-12)).clamp(max=trust), 1.0)
            radius = omega * reach
            c, predicted = _propose(a, ga, fa, dX, dF, valid, reg, radius, beta if relax != 1 else 1.0)
            c = torch.where(done[:, None], a, c)
    z = ga.reshape(shape).to(z0.dtype)
    best = (xb.detach().reshape(shape).to(z0.dtype), gb.detach().reshape(shape).to(z0.dtype), rb.detach())
    return avg.result(z, evals), z, torch.stack(residuals), evals, iterates, best


def _propose(a, ga, fa, dX, dF, valid, reg, radius, relax=1.0):
    """The Anderson point a + β·f(a) - s·(ΔX + β·ΔF)·γ (β = relax; g(a) - s·(ΔX + ΔF)·γ at β = 1) for
    every sample ([B, N] tensors), with s ≤ 1 keeping the correction within radius·‖f(a)‖, and the
    linear model's residual there, ‖f(a) - s·ΔF·γ‖."""
    # the least squares is scaled by 1/rms(f) so that the Gram matrix stays O(1) (no denormals)
    unit = 1 / rms(fa).clamp_min(torch.finfo(fa.dtype).tiny ** 0.5)[:, None]
    mask = valid[..., None]                                        # [m, B, 1]
    F = torch.where(mask, torch.stack(dF), 0) * unit               # [m, B, N]
    if isinstance(relax, torch.Tensor):
        relax = relax[:, None]                                     # per sample: [B, 1]
    G = torch.where(mask, relax * torch.stack(dF) + torch.stack(dX), 0) * unit   # ΔX + β·ΔF
    gram = torch.einsum("ibn,jbn->bij", F, F).double()             # [B, m, m]
    rhs = torch.einsum("ibn,bn->bi", F, fa * unit).double()        # [B, m]
    m = gram.shape[-1]
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    lam = reg * gram.diagonal(dim1=-2, dim2=-1).sum(-1) / m + 1e-12
    unused = (~valid).T.double()                                   # keeps empty slots' γ at 0
    system = gram + (lam[:, None] + unused)[..., None] * eye
    # solve_ex: the system is positive definite (λ > 0), so no error check, and no host sync (CUDA graphs)
    gamma = torch.linalg.solve_ex(system, rhs)[0].to(fa.dtype).detach()  # [B, m], a constant to autograd
    corr = torch.einsum("ibn,bi->bn", G, gamma) / unit             # (ΔX + ΔF)·γ
    scale = (radius * rms(fa) / rms(corr).clamp_min(torch.finfo(fa.dtype).tiny)).clamp(max=1.0).detach()
    predicted = rms(fa - scale[:, None] * torch.einsum("ibn,bi->bn", F, gamma) / unit)
    base = ga if not isinstance(relax, torch.Tensor) and relax == 1 else a + relax * fa
    return base - scale[:, None] * corr, predicted


def spectral_norm(g, z, iters=20, *, seed=0) -> torch.Tensor:
    """Per-sample spectral norm ‖J_g(z)‖₂ [B] of the Jacobian of g at z [B, ...], by power iteration
    on JᵀJ (g must treat samples independently, so J is block-diagonal over the batch).

    Cost: one call of g recording a graph, its backward with create_graph, then `iters`
    Jacobian-vector products (backwards through that double-backward graph, J·v = ∂⟨Jᵀu, v⟩/∂u)
    and iters - 1 vector-Jacobian products (backwards of the call): about two backward passes of
    g (≈ 4 calls' worth of compute) per iteration, no further calls of g. The start
    vector is drawn from a local generator seeded with `seed` (never the global RNG). The estimate
    approaches ‖J‖₂ from below, at the rate (σ₂/σ₁)^(2·iters).
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters (power iterations) must be an int >= 1, got {iters!r}")
    if torch.is_inference_mode_enabled():
        raise ValueError("spectral_norm needs autograd, which torch.inference_mode turns off; call it outside "
                         "inference_mode (torch.no_grad is fine)")
    z = z.detach().requires_grad_()
    with torch.enable_grad():
        out = g(z)
        _check_output(out, z, 0)
        jtu = None
        if out.requires_grad:
            u = torch.zeros_like(out, requires_grad=True)
            (jtu,) = torch.autograd.grad(out, z, u, create_graph=True, allow_unused=True)
    if jtu is None or not jtu.requires_grad:          # g does not depend on z
        return torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)

    def unit(x):
        return x / x.flatten(1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny).reshape(-1, *[1] * (x.ndim - 1))

    gen = torch.Generator().manual_seed(seed)
    v = unit(torch.randn(z.shape, generator=gen, dtype=torch.float64).to(z.device, z.dtype))
    for i in range(iters):
        (jv,) = torch.autograd.grad(jtu, u, v, retain_graph=True)                 # J v
        if i == iters - 1:
            return jv.flatten(1).norm(dim=1).detach()
        v = unit(torch.autograd.grad(out, z, jv, retain_graph=True)[0])           # Jᵀ J v, normalised
