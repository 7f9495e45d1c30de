"""Optimise a null-text embedding through a differentiable ReNoise inversion and reconstruction.

The model is the analytic Gaussian mixture (renoise.toy) made text-conditional: an "embedding"
c [K] sets the mixture's component log-weights, so a prompt's embedding favours the components
it describes and the empty prompt's (the null embedding) weighs them all alike. Sampling uses
classifier-free guidance,

    ε(x, t) = ε(x, t; c_null) + s·(ε(x, t; c) - ε(x, t; c_null)),

which at a high scale s makes each inversion step's map G_t less contractive: with few renoising
iterations the inversion misses its fixed points and the reconstruction drifts. As in null-text
inversion, we then learn one null embedding per timestep, but here the loss

    L = ‖sample(invert(x0; c_null), c_null) - x0‖²

is differentiated through both halves: renoise.invert(..., grad="unrolled") (or "phantom") and
renoise.sample(..., grad="unrolled"). With the defaults (guidance 3, two renoising iterations,
8 steps) the MSE falls from 1.2e-1 to 6.0e-3 in 30 Adam steps, 20x; over seeds 0-5 the final
error is 1.03x to 32x lower (largest where guidance made some samples' inversions diverge).
The path is not monotone: the guided maps are barely contractive, so the loss surface is rough.
The loss is a property of the truncated solve (an exact inversion reconstructs exactly for
any embedding), which is why it is unrolled, not differentiated implicitly.

    python examples/optimize_embedding.py                     # about 1 s of compute on a CPU
    python examples/optimize_embedding.py --grad phantom --phantom-steps 1
"""
from __future__ import annotations

import argparse

import torch

import renoise
from renoise.presets import Plan
from renoise.schedules import Schedule
from renoise.toy import GaussianMixture


def posterior_mean(mixture, x, abar, logits):
    """E[x0 | x] at VP level ᾱ when the prior's component log-weights are logits [B, K] (per sample):
    renoise.toy's formula with a per-sample prior."""
    mu, s2 = mixture.means, mixture.std**2
    v = abar * s2 + 1 - abar
    d2 = (x.pow(2).sum(1, keepdim=True) - 2 * abar.sqrt() * x @ mu.T + abar * mu.pow(2).sum(1))   # [B, K]
    r = torch.softmax(torch.log_softmax(logits, 1) - d2 / (2 * v), dim=1)
    return r @ mu + (abar.sqrt() * s2 / v) * (x - abar.sqrt() * (r @ mu))


def guided_denoiser(mixture, schedule, cond, null, timesteps, scale):
    """A DDIM denoiser(x, t) -> ε with classifier-free guidance between the embeddings `cond`
    [B, K] and null[i] [K], i the index of t in `timesteps` (one null embedding per timestep)."""
    index = {int(t): i for i, t in enumerate(timesteps)}

    def denoise(x, t):
        abar = torch.as_tensor(schedule.abar(t), dtype=x.dtype)
        both = posterior_mean(mixture, x.repeat(2, 1), abar,
                              torch.cat([cond, null[index[int(t)]].expand_as(cond)]))
        eps = (x.repeat(2, 1) - abar.sqrt() * both) / (1 - abar).sqrt()
        e_cond, e_null = eps.chunk(2)
        return e_null + scale * (e_cond - e_null)

    return denoise


def main(iters=30, lr=0.1, num_steps=8, renoise_iters=2, scale=3.0, batch=32, grad="unrolled", phantom_steps=1,
         seed=1, verbose=True):
    """Run the optimisation; returns the reconstruction MSE before each step and after the last."""
    gen = torch.Generator().manual_seed(seed)
    mixture = GaussianMixture.random(num_components=6, dim=8, std=0.15, scale=1.0, generator=gen)
    k = mixture.means.shape[0]
    comp = torch.randint(0, k, (batch,), generator=gen)
    x0 = mixture.means[comp] + mixture.std * torch.randn(batch, mixture.dim, generator=gen, dtype=torch.float64)
    cond = 3.0 * torch.nn.functional.one_hot(comp, k).double()          # "a photo of component j"

    schedule = Schedule.create(timestep_spacing="trailing")
    plan = Plan(sampler="ddim", num_steps=num_steps, iters=renoise_iters, window=(renoise_iters, renoise_iters + 1),
                average=False)
    timesteps = schedule.timesteps(num_steps, "ddim")
    null = torch.zeros(num_steps, k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([null], lr=lr)
    grad_opts = {"phantom_steps": phantom_steps} if grad == "phantom" else None

    def reconstruction_error(record):
        den = guided_denoiser(mixture, schedule, cond, null, timesteps, scale)
        with torch.set_grad_enabled(record):
            inv = renoise.invert(den, x0, schedule, "ddim", num_steps, plan, grad=grad if record else "none",
                                 grad_opts=grad_opts if record else None)
            rec = renoise.sample(den, inv, grad="unrolled" if record else "none")
            return (rec - x0).pow(2).mean()

    losses = []
    for step in range(iters):
        opt.zero_grad()
        loss = reconstruction_error(True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if verbose and (step % 5 == 0 or step == iters - 1):
            print(f"step {step:3d}  reconstruction MSE {losses[-1]:.3e}")
    losses.append(float(reconstruction_error(False)))
    if verbose:
        print(f"final     reconstruction MSE {losses[-1]:.3e}  ({losses[0] / losses[-1]:.1f}x lower than with "
              f"the empty prompt's embedding)")
    return losses


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--num-steps", type=int, default=8)
    p.add_argument("--renoise-iters", type=int, default=2, help="renoising iterations K per inversion step")
    p.add_argument("--scale", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--grad", choices=["unrolled", "phantom"], default="unrolled")
    p.add_argument("--phantom-steps", type=int, default=1)
    a = p.parse_args()
    main(a.iters, a.lr, a.num_steps, a.renoise_iters, a.scale, grad=a.grad, phantom_steps=a.phantom_steps,
         seed=a.seed)
