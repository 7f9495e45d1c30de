"""GNRI: each inversion step solved by Newton–Raphson on a scalar objective with a prior term.

GNRI (Samuel, Meiri, Maron, Atzmon, Chechik, Darshan et al., "Lightning-Fast Image Inversion and
Editing for Text-to-Image Diffusion Models" / "Regularized Newton Raphson Inversion", arXiv
2312.12540; Sec. 3-4). The step (t, t') of the inversion looks for the z with G_t(z) = z, G_t the
same map ReNoise iterates (renoise.inversion: G_t(z) = inverse_step(z_{t'}, ε(z, t), t, t')). GNRI
turns it into one scalar function

    F(z) = mean |z - G_t(z)|  +  λ · mean (z - μ)² / (2σ²),
    μ = √(ᾱ_t/ᾱ_{t'})·z_{t'},   σ² = 1 - ᾱ_t/ᾱ_{t'}     (the forward kernel q(z_t | z_{t'}))

and runs Newton–Raphson for F(z) = 0 from the DDIM guess z = G_t(z_{t'}), the minimal-norm step
for a scalar function of many variables:

    z ← z - F(z) · ∇F(z) / ‖∇F(z)‖²

Each iteration is one model call with a graph and one backward pass through the model (∇F by
autograd); the guess is one call. The prior term keeps z where the diffusion puts z_t given z_{t'}
(the paper's regularisation toward the forward kernel, which we read as that Gaussian's negative
log-density; no copy of the paper was at hand to check the exact form or its λ). 2 iterations a
step (the paper's few-iteration setting); λ = 0.01: on the analytic mixture λ = 0.1 already costs
reconstruction (renoise.toy, 10 DDIM steps: 30.2 dB against 35.9). F = 0 has no root once λ > 0,
so the Newton step can overshoot where σ² is small (many steps): there F need not fall, which the
tests and benchmarks/RESULTS.md show rather than hide. Samples of a batch are separate problems.
"""
from __future__ import annotations

import torch

from ._common import PeerResult, check_latent, deterministic, timesteps

GNRI = dict(iters=2, lam=0.01)


def _flat_mean(x):
    return x.reshape(x.shape[0], -1).mean(1)


def prior_terms(schedule, z_prev, t, tn):
    """(μ, σ²) of the forward kernel q(z_t | z_{t'})."""
    ratio = schedule.abar(t) / schedule.abar(tn)
    return ratio ** 0.5 * z_prev, 1 - ratio


def objective(G, z, mu, var, lam):
    """F(z) per sample [B] and G(z) (the model call)."""
    g = G(z)
    return _flat_mean((z - g).abs()) + lam * _flat_mean((z - mu).pow(2)) / (2 * var), g


def gnri_step(denoiser, smod, schedule, z_prev, t, tn, *, iters=2, lam=0.01):
    """One GNRI step: (z_t, F per iteration [iters + 1, B], model calls, backward passes)."""
    def G(z):
        return smod.inverse_step(z_prev, denoiser(z, t), t, tn, schedule)

    mu, var = prior_terms(schedule, z_prev, t, tn)
    with torch.no_grad():
        z = G(z_prev)
    calls, backward, history = 1, 0, []
    for _ in range(iters):
        x = z.detach().requires_grad_(True)
        with torch.enable_grad():
            F, _ = objective(G, x, mu, var, lam)
            (grad,) = torch.autograd.grad(F.sum(), x)
        calls += 1
        backward += 1
        history.append(F.detach())
        norm2 = grad.reshape(grad.shape[0], -1).pow(2).sum(1).clamp_min(torch.finfo(grad.dtype).tiny)
        z = (x - (F / norm2).reshape(-1, *[1] * (x.ndim - 1)) * grad).detach()
    return z, history, calls, backward


def gnri_invert(denoiser, z0, schedule, sampler="ddim", num_steps=50, *, iters=2, lam=0.01,
                track_objective=False) -> PeerResult:
    """z0 -> z_T, each step a GNRI solve. track_objective: one more call per step to log F at the
    answer (log["objective"]: per step, F at each iterate and at the answer [iters + 1, B]; not
    counted as a cost, it is a diagnostic)."""
    check_latent(z0)
    if iters < 0 or lam < 0:
        raise ValueError(f"GNRI needs iters >= 0 and lam >= 0, got {iters} and {lam}")
    chain = schedule.chain(num_steps, sampler if isinstance(sampler, str) else sampler.NAME)
    smod = deterministic(sampler, schedule, chain, "GNRI")
    z, traj, calls, backward, objective_log, residuals = z0, [z0], 0, 0, [], []
    for t, tn in reversed(chain):
        z_prev = z
        z, hist, c, b = gnri_step(denoiser, smod, schedule, z_prev, t, tn, iters=iters, lam=lam)
        calls, backward = calls + c, backward + b
        if track_objective:
            mu, var = prior_terms(schedule, z_prev, t, tn)
            with torch.no_grad():
                F, _ = objective(lambda x: smod.inverse_step(z_prev, denoiser(x, t), t, tn, schedule), z, mu, var,
                                 lam)
            objective_log.append(torch.stack(hist + [F]))
        residuals.append(torch.stack(hist) if hist else torch.zeros(1, z.shape[0]))
        traj.append(z)
    return PeerResult("gnri", z, torch.stack(traj), schedule, smod.NAME, num_steps, timesteps(chain),
                      model_calls=calls, backward=backward, residuals=residuals,
                      log={"objective": objective_log} if track_objective else {})
