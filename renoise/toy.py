"""Analytic models on which inversion error is known exactly.

GaussianMixture: data x0 ~ Σ_j π_j N(μ_j, s²·I) in d dimensions. Noised to VP level ᾱ,
x = √ᾱ·x0 + √(1-ᾱ)·ε is again a mixture, x | j ~ N(√ᾱ·μ_j, v·I) with v = ᾱs² + 1 - ᾱ, and the
posterior mean (the exact MMSE denoiser) is

    E[x0 | x] = Σ_j r_j(x)·(μ_j + (√ᾱ·s²/v)·(x - √ᾱ·μ_j)),
    r_j(x)    = softmax_j(log π_j - ‖x - √ᾱ·μ_j‖²/(2v)).

`GaussianMixture.denoiser(schedule, sampler)` turns it into a `denoiser(x, t)` that takes the
sample in the sampler's own space and returns the model output for the schedule's prediction type
(ε̂ = (x - √ᾱ·x̂0)/√(1-ᾱ), v̂ = √ᾱ·ε̂ - √(1-ᾱ)·x̂0, or x̂0), so it works with every sampler.

Under rectified flow / flow matching, x_σ = (1-σ)·x0 + σ·ε (σ ∈ [0, 1], σ = 1 pure noise), the same
mixture gives x_σ | j ~ N((1-σ)·μ_j, V·I) with V = (1-σ)²s² + σ², and the exact velocity is

    v(x, σ) = E[ε - x0 | x_σ = x] = Σ_j r_j(x)·(c·(x - (1-σ)·μ_j) - μ_j),   c = (σ - (1-σ)s²)/V,
    r_j(x)  = softmax_j(log π_j - ‖x - (1-σ)·μ_j‖²/(2V))

(given j: E[x0 | x, j] = μ_j + (1-σ)s²/V·(x - (1-σ)μ_j), E[ε | x, j] = σ/V·(x - (1-σ)μ_j)).
`GaussianMixture.velocity(x, σ)` evaluates it; `GaussianMixture.flow_denoiser(schedule)` is a
denoiser(x, t) -> v with σ = schedule.sig(t), the convention of renoise.invert's flow_euler sampler
and of renoise.flow_anchors.

ShiftedGaussian: the supplementary's toy, μ0 = N(a, I) diffused to μ_t = N(a·e^{-t}, I), whose
probability-flow ODE is dz/dt = -a·e^{-t}. One Euler step backwards from the naive forward
estimate misses z_t; one renoising iteration finds the exact pre-image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import samplers as _samplers


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """Isotropic Gaussian mixture: means [K, d], component std s, log-weights [K]."""

    means: torch.Tensor
    std: float
    log_weights: torch.Tensor | None = None

    def __post_init__(self):
        if self.means.ndim != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(self.means.shape)}")
        if not self.std > 0:
            raise ValueError(f"std must be positive, got {self.std}")
        lw = torch.zeros(self.means.shape[0], dtype=self.means.dtype) if self.log_weights is None else self.log_weights
        if lw.shape != self.means.shape[:1]:
            raise ValueError(f"log_weights must be [K] = [{self.means.shape[0]}], got {tuple(lw.shape)}")
        object.__setattr__(self, "log_weights", torch.log_softmax(lw.to(self.means.dtype), 0))

    @classmethod
    def random(cls, num_components=16, dim=64, std=0.05, scale=0.5, generator=None, dtype=torch.float64):
        """K equally weighted components with means drawn i.i.d. from N(0, scale²) by `generator`."""
        if generator is None:
            raise ValueError("pass an explicit torch.Generator: renoise never draws from the global RNG")
        means = scale * torch.randn(num_components, dim, generator=generator, dtype=dtype)
        return cls(means, std)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n, generator):
        """n samples [n, d] drawn with `generator`."""
        j = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[j] + self.std * noise

    def posterior_mean(self, x, abar):
        """E[x0 | x] for x [B, d] (or [B, ...] with d elements per sample) at VP level ᾱ."""
        shape = x.shape
        x = x.reshape(shape[0], -1)
        if x.shape[1] != self.dim:
            raise ValueError(f"the mixture lives in {self.dim} dimensions, got samples of {x.shape[1]}")
        mu = self.means.to(x.dtype)
        abar = torch.as_tensor(abar, dtype=x.dtype)
        sa = abar.sqrt()
        v = abar * self.std**2 + 1 - abar
        d2 = (x.pow(2).sum(1, keepdim=True) - 2 * sa * x @ mu.T + abar * mu.pow(2).sum(1))  # [B, K]
        r = torch.softmax(self.log_weights.to(x.dtype) - d2 / (2 * v), dim=1)
        x0 = r @ mu + (sa * self.std**2 / v) * (x - sa * (r @ mu))
        return x0.reshape(shape)

    def denoiser(self, schedule, sampler="ddim"):
        """A `denoiser(x, t) -> out` for `sampler` (a name or module) and schedule.prediction_type."""
        mod = _samplers.get(sampler) if isinstance(sampler, str) else sampler

        def denoise(x, t):
            xv = mod.model_input(x, t, schedule)  # the VP-space sample
            abar = torch.as_tensor(schedule.abar(t), dtype=xv.dtype, device=xv.device)
            x0 = self.posterior_mean(xv, abar)
            eps = (xv - abar.sqrt() * x0) / (1 - abar).sqrt()
            kind = schedule.prediction_type
            if kind == "epsilon":
                return eps
            if kind == "v_prediction":
                return abar.sqrt() * eps - (1 - abar).sqrt() * x0
            return x0

        return denoise

    # ------------------------------------------------------------------ rectified flow
    def velocity(self, x, sigma):
        """The exact flow-matching velocity E[ε - x0 | x_σ = x] (module docstring) for x [B, ...]
        with d elements per sample, σ a number in [0, 1] or a tensor (0-d, or [B] one per sample)."""
        shape = x.shape
        x = x.reshape(shape[0], -1)
        if x.shape[1] != self.dim:
            raise ValueError(f"the mixture lives in {self.dim} dimensions, got samples of {x.shape[1]}")
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if s.ndim == 1:
            s = s[:, None]
        elif s.ndim > 1:
            raise ValueError(f"sigma must be a number, a 0-d or a [B] tensor, got shape {tuple(s.shape)}")
        mu = self.means.to(device=x.device, dtype=x.dtype)
        a = 1 - s                                                          # the data's scale (1 - σ)
        var = a**2 * self.std**2 + s**2
        d2 = x.pow(2).sum(1, keepdim=True) - 2 * a * x @ mu.T + a**2 * mu.pow(2).sum(1)   # [B, K]
        r = torch.softmax(self.log_weights.to(device=x.device, dtype=x.dtype) - d2 / (2 * var), dim=1)
        mbar = r @ mu                                                      # Σ_j r_j μ_j
        c = (s - a * self.std**2) / var
        return (c * (x - a * mbar) - mbar).reshape(shape)

    def flow_denoiser(self, schedule):
        """denoiser(x, t) -> the exact velocity at σ = schedule.sig(t) (a renoise.schedules.FlowSchedule,
        or anything with sig(t)); t a number, a 0-d tensor or None (σ = 0). Counts its calls in `.calls`."""
        mix = self

        def denoise(x, t):
            denoise.calls += 1
            return mix.velocity(x, schedule.sig(t)).to(x.dtype)

        denoise.calls = 0
        return denoise

    def flow_noise(self, x0, num_steps=2000):
        """The exact ODE's noise end z_1 for data x0 [B, ...]: dx/dσ = v(x, σ) from σ = 0 to 1, classical
        RK4 on `num_steps` uniform steps (float64 recommended; the reference the anchors' noises are
        compared with)."""
        x, h = x0, 1.0 / num_steps
        for i in range(num_steps):
            s = i * h
            k1 = self.velocity(x, s)
            k2 = self.velocity(x + h / 2 * k1, s + h / 2)
            k3 = self.velocity(x + h / 2 * k2, s + h / 2)
            k4 = self.velocity(x + h * k3, s + h)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x


@dataclass(frozen=True)
class ShiftedGaussian:
    """μ0 = N(a, I) diffused to μ_t = N(a·e^{-t}, I): the ODE dz/dt = -a·e^{-t}, a [d]."""

    a: torch.Tensor

    def drift(self, z, t):
        """dz/dt at (z, t): -a·e^{-t}, broadcast to z's shape (it does not depend on z)."""
        return (-self.a * math.exp(-t)).expand_as(z).to(z.dtype)

    def euler(self, z, t, dt):
        """One Euler step of the ODE from (z, t) to t + dt (dt may be negative)."""
        return z + dt * self.drift(z, t)

    def renoise_map(self, z_t, t, dt):
        """The ReNoise map G(z) = z_t + dt·drift(z, t + dt), whose fixed point z is the exact
        pre-image: the backward Euler step from (z, t + dt) lands on z_t."""
        return lambda z: z_t + dt * self.drift(z, t + dt)
