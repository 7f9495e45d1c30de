"""Edit-enhancement regularizers: gradient steps that pull a predicted noise map toward white noise.

ReNoise (after pix2pix-zero) nudges each model output `e` [B, C, H, W] before it is used, with two
losses, both summed over channels and computed per image (the batch is independent throughout):

patch-KL     split `e` and a reference map `e_ref` into p×p patches (p = 4), per patch and channel
             compare means m and unbiased variances v:
                 | log((v1 + ε) / (v0 + ε)) + (v0 + (m0 - m1)²) / (v1 + ε) - 1 |,   ε = 1e-6
             (0: `e`, 1: `e_ref`), summed over channels and patches. Rows/columns past the last
             whole patch are ignored.
auto-corr    for each channel, at every scale of a 2×2 average-pooling pyramid (pool until the
             height is <= 8, that scale included), add mean(x · roll(x, s, H))² + mean(x · roll(x, s, W))²
             with one shift s per (image, channel, scale), drawn uniformly from [0, h // 2), h the
             height at that scale.

`regularize` runs `rounds` rounds, each: one patch-KL step (gradient clipped to ±100, times λ_kl),
then `rolls` auto-correlation steps (gradient / rolls, times λ_ac), each with fresh shifts. The
gradients are closed-form (`patch_kl_grad`, `autocorr_grad`; tested against autograd of the
losses), so R runs under `torch.inference_mode` and needs no autograd graph. R is itself an
ordinary differentiable torch function of e and e_ref (autograd differentiates the closed-form
steps), so gradients through an inversion (renoise.invert(grad=...)) pass through it.

Shifts and the reference implementation: the reference draws one `randint(0, h // 2)` per
(round, roll, channel, scale), in that order, from the run's generator, and supports batch 1 only.
Here all shifts of one `regularize` call are drawn at once in the order
(round, roll, image, channel, scale); for batch 1 that is the reference's order and, on a CPU
generator, the very same numbers (one draw of `randint(0, lcm(highs))` reduced mod each high equals
the sequential draws, since each high divides the lcm). For a batch, image b's shifts are therefore
not those of a batch-1 run with the same generator; pass `shifts=` to control them.
"""
import math

import torch
import torch.nn.functional as F

from .compiling import nested_region

EPS = 1e-6
GRAD_CLIP = 100.0


def _check(e):
    if e.dim() != 4:
        raise ValueError(f"expected a noise map of shape [B, C, H, W], got shape {tuple(e.shape)}")


def pyramid_heights(height, width):
    """Heights (and widths) of the auto-correlation pyramid: pool 2×2 until the height is <= 8."""
    sizes = [(height, width)]
    while sizes[-1][0] > 8:
        h, w = sizes[-1]
        sizes.append((h // 2, w // 2))
    if any(h < 2 or w < 1 for h, w in sizes):
        raise ValueError(f"noise map of size {height}x{width} is too small for the auto-correlation "
                         "loss: every pyramid level needs height >= 2 and width >= 1")
    return sizes


def draw_shifts(generator, batch, channels, height, width, rounds, rolls):
    """Random shifts, int64 [rounds, rolls, batch, channels, scales], drawn in that (C) order.

    Each entry at scale k is uniform in [0, h_k // 2). Drawn on the generator's device.
    """
    highs = [h // 2 for h, _ in pyramid_heights(height, width)]
    n = rounds * rolls * batch * channels * len(highs)
    shape = (rounds, rolls, batch, channels, len(highs))
    device = generator.device if generator is not None else "cpu"
    high = torch.tensor(highs, dtype=torch.int64, device=device)
    lcm = math.lcm(*highs)
    if lcm < 2**32:
        raw = torch.randint(0, lcm, (n,), generator=generator, device=device, dtype=torch.int64)
        return (raw.view(-1, len(highs)) % high).view(shape)
    draws = [torch.randint(0, h, (1,), generator=generator, device=device, dtype=torch.int64)
             for _ in range(n // len(highs)) for h in highs]
    return torch.cat(draws).view(shape)


def patch_kl_loss(e, e_ref, patch_size=4):
    """Patch-wise KL-like loss of `e` against `e_ref`, per image: [B] (see module docstring)."""
    _check(e)
    if e_ref.shape != e.shape:
        raise ValueError(f"reference map shape {tuple(e_ref.shape)} differs from the noise map's {tuple(e.shape)}")
    b, c, h, w = e.shape
    hp, wp = h // patch_size, w // patch_size
    if hp == 0 or wp == 0:
        raise ValueError(f"noise map {h}x{w} is smaller than one {patch_size}x{patch_size} patch")

    def stats(x):
        x = x[..., : hp * patch_size, : wp * patch_size].reshape(b, c, hp, patch_size, wp, patch_size)
        return x.mean(dim=(3, 5)), x.var(dim=(3, 5), correction=1)

    m0, v0 = stats(e)
    m1, v1 = stats(e_ref.to(e.dtype))
    kl = torch.log((v1 + EPS) / (v0 + EPS)) + (v0 + (m0 - m1) ** 2) / (v1 + EPS) - 1
    return kl.abs().sum(dim=(1, 2, 3))


def _roll(x, shift, dim):
    """roll(x, s, dim) with a separate shift per (image, channel): out[i] = x[(i - s) mod n]."""
    n = x.shape[dim]
    idx = (torch.arange(n, device=x.device) - shift[..., None]) % n          # [B, C, n]
    idx = idx[..., :, None] if dim == 2 else idx[..., None, :]
    return torch.gather(x, dim, idx.expand_as(x))


def _check_shifts(e, shifts):
    """(number of pyramid scales, shifts on e's device); shifts must be int64 [B, C, scales]."""
    _check(e)
    b, c, h, w = e.shape
    scales = len(pyramid_heights(h, w))
    if tuple(shifts.shape) != (b, c, scales):
        raise ValueError(f"shifts must have shape {(b, c, scales)} for a {h}x{w} map, got {tuple(shifts.shape)}")
    return scales, shifts.to(e.device)


def autocorr_loss(e, shifts):
    """Pairwise auto-correlation loss per image: [B]. `shifts`: int64 [B, C, scales]."""
    scales, shifts = _check_shifts(e, shifts)
    loss = e.new_zeros(e.shape[0])
    x = e
    for k in range(scales):
        if k > 0:
            x = F.avg_pool2d(x, kernel_size=2)
        s = shifts[..., k]
        loss = loss + (x * _roll(x, s, 2)).mean(dim=(2, 3)).pow(2).sum(1)
        loss = loss + (x * _roll(x, s, 3)).mean(dim=(2, 3)).pow(2).sum(1)
    return loss


@nested_region   # compiled once per step, reused by every gradient step
def patch_kl_grad(e, e_ref, patch_size=4):
    """d(Σ patch_kl_loss)/de in closed form, [B, C, H, W] (no autograd: works under inference_mode).

    Per patch of n values, with d = x - m0:  ∂/∂x = sign(kl)·[(1/(v1+ε) - 1/(v0+ε))·2d/(n-1)
    + 2(m0 - m1)/(v1+ε)/n]; zero past the last whole patch.
    """
    _check(e)
    b, c, h, w = e.shape
    p = patch_size
    hp, wp, n = h // p, w // p, p * p
    if hp == 0 or wp == 0:
        raise ValueError(f"noise map {h}x{w} is smaller than one {p}x{p} patch")

    def patches(x):
        return x[..., : hp * p, : wp * p].reshape(b, c, hp, p, wp, p)

    x, r = patches(e), patches(e_ref.to(e.dtype))
    m0, m1 = x.mean(dim=(3, 5), keepdim=True), r.mean(dim=(3, 5), keepdim=True)
    d = x - m0
    v0 = d.pow(2).sum(dim=(3, 5), keepdim=True) / (n - 1)
    v1 = (r - m1).pow(2).sum(dim=(3, 5), keepdim=True) / (n - 1)
    kl = torch.log((v1 + EPS) / (v0 + EPS)) + (v0 + (m0 - m1) ** 2) / (v1 + EPS) - 1
    gx = torch.sign(kl) * ((1 / (v1 + EPS) - 1 / (v0 + EPS)) * 2 * d / (n - 1) + 2 * (m0 - m1) / (v1 + EPS) / n)
    g = torch.zeros_like(e)
    g[..., : hp * p, : wp * p] = gx.reshape(b, c, hp * p, wp * p)
    return g


@nested_region   # compiled once per step, reused by every gradient step
def autocorr_grad(e, shifts):
    """d(Σ autocorr_loss)/de in closed form, [B, C, H, W].

    At each scale, d mean(x·roll(x, s))²/dx = 2m·(roll(x, s) + roll(x, -s))/N; coarser levels flow
    back through the 2×2 average pooling (each value spread as 1/4 over its block).
    """
    scales, shifts = _check_shifts(e, shifts)
    levels = [e]
    for _ in range(1, scales):
        levels.append(F.avg_pool2d(levels[-1], kernel_size=2))
    g = None
    for k in reversed(range(scales)):
        x, s = levels[k], shifts[..., k]
        gk = torch.zeros_like(x)
        for dim in (2, 3):
            fwd, back = _roll(x, s, dim), _roll(x, -s, dim)
            m = (x * fwd).mean(dim=(2, 3), keepdim=True)
            gk = gk + 2 * m * (fwd + back) / (x.shape[2] * x.shape[3])
        if g is not None:
            up = g.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) / 4
            gk[..., : up.shape[2], : up.shape[3]] += up
        g = gk
    return g


def regularize(e, e_ref, generator=None, *, lambda_kl, lambda_ac, rounds=4, rolls=5, patch_size=4,
               shifts=None):
    """R(e): `rounds` × (one patch-KL step, then `rolls` auto-correlation steps), in float32.

    e, e_ref: [B, C, H, W]. shifts: optional int64 [rounds, rolls, B, C, scales]; drawn from
    `generator` when None (only if λ_ac > 0 and rounds > 0, as the reference does). Returns e's dtype.
    """
    _check(e)
    if rounds < 0 or rolls < 0 or lambda_kl < 0 or lambda_ac < 0:
        raise ValueError("regularizer rounds, rolls and weights must be non-negative")
    if rounds == 0 or (lambda_kl == 0 and lambda_ac == 0):
        return e
    dtype = e.dtype
    x = e.float()
    # a copy: e and e_ref are often halves of one model output, and the gradient steps, nested
    # compile regions under torch.compile, must not get aliased inputs
    ref = e_ref.float().clone() if lambda_kl > 0 else None
    if lambda_ac > 0 and rolls > 0 and shifts is None:
        b, c, h, w = e.shape
        shifts = draw_shifts(generator, b, c, h, w, rounds, rolls)
    for r in range(rounds):
        if lambda_kl > 0:
            x = x - lambda_kl * patch_kl_grad(x, ref, patch_size).clamp(-GRAD_CLIP, GRAD_CLIP)
        if lambda_ac > 0:
            for j in range(rolls):
                x = x - lambda_ac * (autocorr_grad(x, shifts[r, j]) / rolls)
    return x.to(dtype)
