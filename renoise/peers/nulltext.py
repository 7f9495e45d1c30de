"""Null-text inversion and negative-prompt inversion: classifier-free guidance made to follow a
plain DDIM inversion's trajectory.

Null-text inversion (Mokady, Hertz, Aberman, Pritch, Cohen-Or, "Null-text Inversion for Editing
Real Images using Guided Diffusion Models", CVPR 2023; Sec. 3.3 and Algorithm 1, settings in its
implementation details): the pivot trajectory z*_0 .. z*_T is DDIM inversion with guidance 1. Then,
down the chain from z̄_T = z*_T, each step's unconditional embedding ∅_t (initialised with the
previous step's, the first with the empty prompt's) is optimised with N = 10 Adam steps
(lr 0.01, stopped early once the loss is below 1e-5) so that the guided step lands on the pivot:

    min_∅  ‖ step(z̄_t, ε_u(z̄_t, ∅) + w·(ε_c(z̄_t) - ε_u(z̄_t, ∅)), t, t') - z*_{t'} ‖²,   w = 7.5

and z̄_{t'} is that step with the optimised ∅_t. Reconstruction and editing then sample with the
per-step ∅_t as the unconditional branch at guidance w (editing: the edit prompt as condition).
Costs, per step: one conditional call, one unconditional call and one backward per Adam step,
one unconditional call for the final step (the conditional output is reused: z̄_t does not change).

Negative-prompt inversion (Miyake, Iohara, Saito, Tanaka, "Negative-prompt Inversion: Fast Image
Inversion for Editing with Text-guided Diffusion Models", 2023; Sec. 3): null-text's optimum is
approximated by the source prompt's own embedding, so no optimisation: DDIM inversion at guidance
1, reconstruction with the source prompt as both condition and negative (= the conditional output,
one call a step), editing with the edit prompt as condition, the source prompt as negative and
guidance w = 7.5. It is the run's plain inversion with that editing protocol, so it needs no loop
of its own here (renoise.peers.editors).

`optimize_nulls` is model-agnostic: it sees only cond(x, t) (the conditional output) and
uncond(x, t, null) (the unconditional output, differentiable in the embedding `null`).
"""
from __future__ import annotations

import torch

from ._common import deterministic

NULL_TEXT = dict(guidance=7.5, inner_steps=10, lr=1e-2, early_stop=1e-5)


def optimize_nulls(cond, uncond, null0, pivots, schedule, sampler="ddim", num_steps=50, *, guidance=7.5,
                   inner_steps=10, lr=1e-2, early_stop=1e-5):
    """Null-text's per-step optimisation along `pivots` [n+1, B, ...] (inversion order: [0] = z0,
    [-1] = z_T). Returns (nulls, log, counts): nulls, one embedding per step in denoising order
    (detached); log: per step "before" / "after" (the loss at the initial and at the optimised
    embedding) and "inner" (Adam steps run); counts: {"cond": calls, "uncond": calls, "backward": passes}.
    """
    if inner_steps < 0 or not lr > 0:
        raise ValueError(f"null-text needs inner_steps >= 0 and lr > 0, got {inner_steps} and {lr}")
    chain = schedule.chain(num_steps, sampler if isinstance(sampler, str) else sampler.NAME)
    smod = deterministic(sampler, schedule, chain, "null-text inversion")
    n = len(chain)
    if pivots.shape[0] != n + 1:
        raise ValueError(f"pivots must hold the {n + 1} latents of a {n}-step inversion, got {pivots.shape[0]}")
    null = null0.detach().clone()
    z, nulls = pivots[-1], []
    log = {"before": [], "after": [], "inner": []}
    counts = {"cond": 0, "uncond": 0, "backward": 0}

    def guided_step(e_c, e_u, t, tn):
        return smod.step(z, e_u + guidance * (e_c - e_u), t, tn, schedule)

    def loss_of(x, target):
        return (x.float() - target.float()).pow(2).mean()

    for i, (t, tn) in enumerate(chain):
        target = pivots[n - 1 - i]
        with torch.no_grad():
            e_c = cond(z, t)
        counts["cond"] += 1
        null = null.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([null], lr=lr)
        inner = 0
        for j in range(inner_steps):
            with torch.enable_grad():
                loss = loss_of(guided_step(e_c, uncond(z, t, null), t, tn), target)
                (grad,) = torch.autograd.grad(loss, null)
            counts["uncond"] += 1
            counts["backward"] += 1
            if j == 0:
                log["before"].append(float(loss.detach()))
            null.grad = grad
            opt.step()
            inner += 1
            if float(loss.detach()) < early_stop:
                break
        with torch.no_grad():
            e_u = uncond(z, t, null)
            counts["uncond"] += 1
            z = guided_step(e_c, e_u, t, tn)
            after = float(loss_of(z, target))
        if inner == 0:
            log["before"].append(after)
        log["after"].append(after)
        log["inner"].append(inner)
        nulls.append(null.detach())
    return nulls, log, counts


def sample(denoisers, result, *, z_T=None) -> torch.Tensor:
    """Denoise result.z_T along its chain, step i with denoisers(i) (a denoiser(x, t) per step:
    null-text's per-step unconditional embeddings)."""
    smod = deterministic(result.sampler, result.schedule, result.chain, "null-text inversion")
    x = result.z_T if z_T is None else z_T
    for i, (t, tn) in enumerate(result.chain):
        x = smod.step(x, denoisers(i)(x, t), t, tn, result.schedule)
    return x
