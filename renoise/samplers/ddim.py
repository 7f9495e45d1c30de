"""DDIM (Song et al., 2021), as diffusers' DDIMScheduler (no clipping), with explicit noise.

VP space: x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε. With x̂0, ε̂ from the model output (any prediction type),

    σ_η  = η·√((1-ᾱ_n)/(1-ᾱ_t)·(1 - ᾱ_t/ᾱ_n))
    x_n  = √ᾱ_n·x̂0 + √(1-ᾱ_n-σ_η²)·ε̂ + σ_η·noise

where n = t_next (ᾱ_n = final_alpha_cumprod when t_next is None). η = 0 is deterministic DDIM.
The update is affine in x: x_n = A·x + B·out + C·noise (see `coefficients`), which is how
`inverse_step` solves it exactly. Shapes: x, out, noise all [B, ...]; t, t_next numbers or 0-d
tensors (1-D tensors give per-sample timesteps).
"""
import torch

from . import _common

NAME = "ddim"
ADDS_NOISE = True      # can a step add fresh noise (eta > 0 adds fresh noise): noise correction needs it


def _check_eta(eta):
    if not 0 <= eta <= 1:
        raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")


def coefficients(t, t_next, schedule, eta=0.0):
    """(A, B, C) with step(x, out, t, t_next) = A·x + B·out + C·noise."""
    _common.check_pair(t, t_next)
    _check_eta(eta)
    a, an = schedule.abar(t), schedule.abar(t_next)
    p, q, r, s = _common.vp_x0_eps(schedule.prediction_type, a)
    std = eta * ((1 - an) / (1 - a) * (1 - a / an)) ** 0.5 if eta else 0.0
    d = (1 - an - std**2) ** 0.5
    return an**0.5 * p + d * r, an**0.5 * q + d * s, std


def is_stochastic(t_next=None, eta=0.0):
    """DDIM needs noise exactly when η > 0 (at every step, the last included)."""
    _check_eta(eta)
    return eta > 0


def noise_coeff(t, t_next, schedule, eta=0.0):
    """σ_η: step(..., noise=n) = step(..., noise=0) + σ_η·n."""
    return torch.as_tensor(coefficients(t, t_next, schedule, eta)[2], dtype=torch.float64)


def model_input(x, t, schedule):
    """DDIM feeds the sample unchanged."""
    return x


def step(x, out, t, t_next, schedule, noise=None, eta=0.0):
    """x at t -> x at t_next (None: the clean end). noise is required when eta > 0."""
    return _common.affine_step(coefficients(t, t_next, schedule, eta), x, out, noise, is_stochastic(t_next, eta))


def inverse_step(x_next, out, t, t_next, schedule, noise=None, eta=0.0):
    """The x with step(x, out, t, t_next, schedule, noise, eta) == x_next: (x_next - B·out - C·noise) / A."""
    if schedule.prediction_type == "sample" and t_next is None and schedule.final_alpha_cumprod == 1.0:
        raise ValueError("with prediction_type='sample' and final_alpha_cumprod = 1 the last DDIM step returns the "
                         "model output whatever x is, so it cannot be inverted")
    return _common.affine_inverse(coefficients(t, t_next, schedule, eta), x_next, out, noise, is_stochastic(t_next, eta))


def add_noise(x0, noise, t, schedule):
    """√ᾱ_t·x0 + √(1-ᾱ_t)·noise."""
    _common.check_like(x0, noise=noise)
    a = schedule.abar(t)
    return _common.combine(x0, (a**0.5, x0), ((1 - a) ** 0.5, noise))
