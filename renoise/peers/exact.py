"""Exact inversions: EDICT and BDIA. Each is an invert / sample pair over any denoiser(x, t) and a
deterministic sampler (renoise.samplers: `step`, `inverse_step`), whose sample() undoes invert()
up to floating-point rounding — whatever the denoiser is, trained or random.

EDICT (Wallace, Gokul, Naik, "EDICT: Exact Diffusion Inversion via Coupled Transformations",
CVPR 2023; Sec. 3, Eqs. 14-15 and Algorithm 1): two coupled latents x, y (both z0 at the start),
each updated with the model output at the other, then mixed with p (Sec. 4: p = 0.93):

    denoise (t -> t'):  x_i = step(x, ε(y, t));   y_i = step(y, ε(x_i, t))
                        x'  = p·x_i + (1-p)·y_i;   y'  = p·y_i + (1-p)·x'
    invert  (t' -> t):  y_i = (y' - (1-p)·x')/p;   x_i = (x' - (1-p)·y_i)/p
                        y   = inverse_step(y_i, ε(x_i, t));   x = inverse_step(x_i, ε(y, t))

Two model calls a step both ways. The paper inverts and edits with guidance 3 (its Sec. 4 default).

BDIA (Zhang, Lewis, Kleijn, "Exact Diffusion Inversion via Bi-directional Integration
Approximation", ECCV 2024; Sec. 4, the BDIA-DDIM update): a two-step recursion over the chain's
latents x_0 (= z_T) ... x_n (= z0). With e = ε(x_k, t_k), down(x_k) = step(x_k, e, t_k, t_{k+1})
and up(x_k) = the same model output integrated the other way, to t_{k-1} (inverse_step(x_k, e,
t_{k-1}, t_k)):

    denoise:  x_{k+1} = down(x_k) + γ·(x_{k-1} - up(x_k))                        (k >= 1)
    invert:   x_{k-1} = up(x_k) + (x_{k+1} - down(x_k))/γ

one model call a step both ways. The first latent below z0 comes from one plain DDIM inversion
step (ε taken at z0), and the recursion's state at the top is the pair (x_0, x_1): both are kept,
so that sample() starts the recursion exactly where invert() ended it (the paper's first denoising
step is a plain DDIM step; we keep x_1 instead so that the pair is exact). γ = 1 (the paper's
image-editing setting, as we read Sec. 5; its generation experiments use γ < 1).

Settings were taken from the papers as we read them; no copy of either paper or its code was at
hand to check the numbers against while this module was written.
"""
from __future__ import annotations

import torch

from ._common import PeerResult, check_latent, deterministic, timesteps

EDICT_P = 0.93
BDIA_GAMMA = 1.0


# ------------------------------------------------------------------------------------------ EDICT

def _check_p(p):
    if not 0 < p <= 1:
        raise ValueError(f"EDICT's mixing p must be in (0, 1], got {p}")


def edict_invert(denoiser, z0, schedule, sampler="ddim", num_steps=50, *, p=EDICT_P) -> PeerResult:
    """z0 [B, ...] -> (x_T, y_T) by EDICT's inverse coupled steps: 2 calls a step."""
    check_latent(z0)
    _check_p(p)
    chain = schedule.chain(num_steps, sampler if isinstance(sampler, str) else sampler.NAME)
    smod = deterministic(sampler, schedule, chain, "EDICT")
    x, y, traj = z0, z0, [z0]
    for t, tn in reversed(chain):
        y_i = (y - (1 - p) * x) / p
        x_i = (x - (1 - p) * y_i) / p
        y = smod.inverse_step(y_i, denoiser(x_i, t), t, tn, schedule)
        x = smod.inverse_step(x_i, denoiser(y, t), t, tn, schedule)
        traj.append(x)
    n = len(chain)
    return PeerResult("edict", x, torch.stack(traj), schedule, smod.NAME, num_steps, timesteps(chain),
                      model_calls=2 * n, state={"y_T": y, "p": p})


def edict_step(denoiser, smod, schedule, x, y, t, tn, p):
    """One coupled denoising step (t -> t'), 2 calls: (x, y) -> (x', y')."""
    x_i = smod.step(x, denoiser(y, t), t, tn, schedule)
    y_i = smod.step(y, denoiser(x_i, t), t, tn, schedule)
    x = p * x_i + (1 - p) * y_i
    return x, p * y_i + (1 - p) * x


def edict_sample(denoiser, result: PeerResult, *, x_T=None, y_T=None, p=None) -> torch.Tensor:
    """(x_T, y_T) -> z0' by EDICT's coupled denoising steps (2 calls a step); returns x."""
    p = result.state["p"] if p is None else p
    x = result.z_T if x_T is None else x_T
    y = result.state["y_T"] if y_T is None else y_T
    smod = deterministic(result.sampler, result.schedule, result.chain, "EDICT")
    for t, tn in result.chain:
        x, y = edict_step(denoiser, smod, result.schedule, x, y, t, tn, p)
    return x


# ------------------------------------------------------------------------------------------- BDIA

def _check_gamma(gamma):
    if not 0 < gamma <= 1:
        raise ValueError(f"BDIA's gamma must be in (0, 1] (it is divided by when inverting), got {gamma}")


def _down_up(smod, schedule, chain, k, x, e):
    """(step of x_k down to t_{k+1}, x_k integrated up to t_{k-1}) with the same model output e."""
    t, tn = chain[k]
    down = smod.step(x, e, t, tn, schedule)
    up = smod.inverse_step(x, e, chain[k - 1][0], t, schedule) if k > 0 else None
    return down, up


def bdia_invert(denoiser, z0, schedule, sampler="ddim", num_steps=50, *, gamma=BDIA_GAMMA) -> PeerResult:
    """z0 -> the recursion's top pair (x_0 = z_T, x_1): one plain DDIM step, then the inverse BDIA
    recursion; one call a step."""
    check_latent(z0)
    _check_gamma(gamma)
    chain = schedule.chain(num_steps, sampler if isinstance(sampler, str) else sampler.NAME)
    smod = deterministic(sampler, schedule, chain, "BDIA")
    n = len(chain)
    xs = [None] * (n + 1)
    xs[n] = z0
    t, tn = chain[n - 1]
    xs[n - 1] = smod.inverse_step(z0, denoiser(z0, t), t, tn, schedule)
    for k in range(n - 1, 0, -1):                   # x_{k-1} from x_k, x_{k+1}
        e = denoiser(xs[k], chain[k][0])
        down, up = _down_up(smod, schedule, chain, k, xs[k], e)
        xs[k - 1] = up + (xs[k + 1] - down) / gamma
    traj = torch.stack(xs[::-1])
    return PeerResult("bdia", xs[0], traj, schedule, smod.NAME, num_steps, timesteps(chain), model_calls=n,
                      state={"x_1": xs[1] if n > 1 else None, "gamma": gamma})


def bdia_step(denoiser, smod, schedule, chain, k, prev, x, gamma):
    """The recursion's step k of the chain, one call: (x_{k-1}, x_k) -> (x_k, x_{k+1}); at k = 0 (a
    one-step chain: no stored x_1) x_1 is the plain step of prev = z_T."""
    if k == 0:
        t, tn = chain[0]
        return prev, smod.step(prev, denoiser(prev, t), t, tn, schedule)
    down, up = _down_up(smod, schedule, chain, k, x, denoiser(x, chain[k][0]))
    return x, down + gamma * (prev - up)


def bdia_sample(denoiser, result: PeerResult, *, z_T=None, x_1=None, gamma=None) -> torch.Tensor:
    """The BDIA recursion from the stored pair (x_0, x_1) down to z0' (n - 1 calls)."""
    gamma = result.state["gamma"] if gamma is None else gamma
    chain = result.chain
    smod = deterministic(result.sampler, result.schedule, chain, "BDIA")
    prev = result.z_T if z_T is None else z_T
    if len(chain) == 1:
        return bdia_step(denoiser, smod, result.schedule, chain, 0, prev, None, gamma)[1]
    x = result.state["x_1"] if x_1 is None else x_1
    for k in range(1, len(chain)):
        prev, x = bdia_step(denoiser, smod, result.schedule, chain, k, prev, x, gamma)
    return x
