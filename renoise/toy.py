"""Analytic models on which inversion error is known exactly.

GaussianMixture: data x0 ~ Σ_j π_j N(μ_j, s²·I) in d dimensions. Noised to VP level ᾱ,
x = √ᾱ·x0 + √(1-ᾱ)·ε is again a mixture, x | j ~ N(√ᾱ·μ_j, v·I) with v = ᾱs² + 1 - ᾱ, and the
posterior mean (the exact MMSE denoiser) is

    E[x0 | x] = Σ_j r_j(x)·(μ_j + (√ᾱ·s²/v)·(x - √ᾱ·μ_j)),
    r_j(x)    = softmax_j(log π_j - ‖x - √ᾱ·μ_j‖²/(2v)).

`GaussianMixture.denoiser(schedule, sampler)` turns it into a `denoiser(x, t)` that takes the
sample in the sampler's own space and returns the model output for the schedule's prediction type
(ε̂ = (x - √ᾱ·x̂0)/√(1-ᾱ), v̂ = √ᾱ·ε̂ - √(1-ᾱ)·x̂0, or x̂0), so it works with every sampler.

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
