"""Noise correction for stochastic samplers: make the stored noise fit the inverted latent.

A stochastic step is affine in its noise, step(z_t, e, noise=n) = step(z_t, e, noise=0) + c·n with
c = sampler.noise_coeff(t, t_next). Once an inversion step has found z_t, with e = denoiser(z_t, t),
the noise that makes the denoising step land exactly on z_prev is

    n* = (z_prev - step(z_t, e, noise=0)) / c.

"override" stores n*; "optimize" (the reference's default) moves the stored noise toward it by
gradient descent on the plain L2 norm ‖n - n*‖ per sample: `steps` moves of length `lr` along the
unit direction (n* - n)/‖n* - n‖ (no move where n = n* already). Started within steps·lr of n*, it
overshoots and ends on a triangle wave of the start distance, up to lr away (so a better solve can
be left with more error). "clip" goes the same distance without overshooting: n* where it is within
steps·lr, else steps·lr along the same line, n + min(1, steps·lr/‖n* - n‖)·(n* - n), in closed
form (what "optimize" tends to as lr -> 0 at equal steps·lr). Generic over samplers: works for
Euler-ancestral, LCM and DDIM with eta > 0 alike. All math in float32 (float64 for float64 input).
target_from_map gives n* for any point the inversion's fixed-point map was evaluated at, with no call.
"""
import torch

METHODS = ("override", "optimize", "clip")


def target_noise(sampler, z_t, out, z_prev, t, t_next, schedule, **opts):
    """n* [B, ...]: the noise with sampler.step(z_t, out, t, t_next, noise=n*) == z_prev."""
    if not sampler.is_stochastic(t_next, **opts):
        raise ValueError(f"the {sampler.NAME} step at t={t} -> {t_next} adds no noise, so there is no noise to "
                         "correct; skip noise correction there")
    dt = torch.promote_types(z_t.dtype, torch.float32)
    det = sampler.step(z_t, out, t, t_next, schedule, noise=torch.zeros_like(z_t), **opts)
    c = torch.as_tensor(sampler.noise_coeff(t, t_next, schedule, **opts), dtype=dt, device=z_t.device)
    return (z_prev.to(dt) - det.to(dt)) / c


def target_from_map(sampler, noise, x, gx, t, t_next, schedule, **opts):
    """n* for z_t = x without a model call, from gx = inverse_step(z_prev, e(x), noise=noise) (the
    inversion map at x). The step is affine, step(x, e, n) = A·x + B·e + C·n with scalars A, C, and gx
    solves A·gx + B·e(x) + C·noise = z_prev, so n*(x) = noise + (A/C)·(gx - x)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    probe = torch.zeros_like(x[:1], dtype=dt)
    a = (sampler.step(probe + 1, probe, t, t_next, schedule, noise=probe, **opts) -
         sampler.step(probe, probe, t, t_next, schedule, noise=probe, **opts))
    c = torch.as_tensor(sampler.noise_coeff(t, t_next, schedule, **opts), dtype=dt, device=x.device)
    return noise.to(dt) + a / c * (gx.to(dt) - x.to(dt))


def optimize(noise, target, steps=10, lr=1.8):
    """`steps` SGD steps of size lr on ‖noise - target‖ (per sample): returns the moved noise."""
    dt = torch.promote_types(noise.dtype, torch.float32)
    n, tgt = noise.to(dt), target.to(dt)
    for _ in range(steps):
        d = n - tgt
        norm = d.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1)))
        n = n - lr * torch.where(norm > 0, d / norm.clamp_min(torch.finfo(dt).tiny), torch.zeros_like(d))
    return n.to(noise.dtype)


def toward(method, noise, target, steps=10, lr=1.8):
    """The stored noise corrected toward a known n* = `target`: n* itself ("override"), or `noise` moved
    toward it by optimize() ("optimize") or clip() ("clip", at most steps·lr)."""
    if method not in METHODS:
        raise ValueError(f"unknown noise correction {method!r}; expected one of {', '.join(METHODS)}")
    if method == "override":
        return target.to(noise.dtype if noise is not None else target.dtype)
    if noise is None:
        raise ValueError(f"noise correction {method!r} needs the stored noise to start from")
    return optimize(noise, target, steps, lr) if method == "optimize" else clip(noise, target, steps * lr)


def clip(noise, target, reach):
    """noise moved straight toward target by at most `reach` (per sample): target where it is that close."""
    dt = torch.promote_types(noise.dtype, torch.float32)
    n, d = noise.to(dt), target.to(dt) - noise.to(dt)
    norm = d.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1)))
    return (n + d * (reach / norm.clamp_min(torch.finfo(dt).tiny)).clamp(max=1.0)).to(noise.dtype)
