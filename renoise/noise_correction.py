"""Noise correction for stochastic samplers: make the stored noise fit the inverted latent.

A stochastic step is affine in its noise, step(z_t, e, noise=n) = step(z_t, e, noise=0) + c·n with
c = sampler.noise_coeff(t, t_next). Once an inversion step has found z_t, with e = denoiser(z_t, t),
the noise that makes the denoising step land exactly on z_prev is

    n* = (z_prev - step(z_t, e, noise=0)) / c.

"override" stores n*; "optimize" (the reference's default) moves the stored noise toward it by
gradient descent on the plain L2 norm ‖n - n*‖ per sample: `steps` moves of length `lr` along the
unit direction (n* - n)/‖n* - n‖ (no move where n = n* already). Generic over samplers: works for
Euler-ancestral, LCM and DDIM with eta > 0 alike. All math in float32 (float64 for float64 input).
"""
import torch

METHODS = ("override", "optimize")


def target_noise(sampler, z_t, out, z_prev, t, t_next, schedule, **opts):
    """n* [B, ...]: the noise with sampler.step(z_t, out, t, t_next, noise=n*) == z_prev."""
    if not sampler.is_stochastic(t_next, **opts):
        raise ValueError(f"the {sampler.NAME} step at t={t} -> {t_next} adds no noise, so there is no noise to "
                         "correct; skip noise correction there")
    dt = torch.promote_types(z_t.dtype, torch.float32)
    det = sampler.step(z_t, out, t, t_next, schedule, noise=torch.zeros_like(z_t), **opts)
    c = torch.as_tensor(sampler.noise_coeff(t, t_next, schedule, **opts), dtype=dt, device=z_t.device)
    return (z_prev.to(dt) - det.to(dt)) / c


def optimize(noise, target, steps=10, lr=1.8):
    """`steps` SGD steps of size lr on ‖noise - target‖ (per sample): returns the moved noise."""
    dt = torch.promote_types(noise.dtype, torch.float32)
    n, tgt = noise.to(dt), target.to(dt)
    for _ in range(steps):
        d = n - tgt
        norm = d.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1)))
        n = n - lr * torch.where(norm > 0, d / norm.clamp_min(torch.finfo(dt).tiny), torch.zeros_like(d))
    return n.to(noise.dtype)


def correct(method, sampler, noise, z_t, out, z_prev, t, t_next, schedule, *, steps=10, lr=1.8, **opts):
    """The corrected noise for one step: n* ("override") or `noise` moved toward it ("optimize")."""
    if method not in METHODS:
        raise ValueError(f"unknown noise correction {method!r}; expected one of {', '.join(METHODS)}")
    target = target_noise(sampler, z_t, out, z_prev, t, t_next, schedule, **opts)
    if method == "override":
        return target.to(noise.dtype if noise is not None else z_t.dtype)
    if noise is None:
        raise ValueError("noise correction 'optimize' needs the stored noise to start from")
    return optimize(noise, target, steps, lr)
