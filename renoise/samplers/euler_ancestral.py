"""Euler-ancestral, as diffusers' EulerAncestralDiscreteScheduler, with explicit noise.

σ-space: x = x0 + σ·ε (the network sees x / √(σ²+1)). With σ = σ(t), σ_n = σ(t_next) (0 at the end)
and x̂0 from the model output,

    σ_up   = √(σ_n²·(σ² - σ_n²)/σ²),   σ_down = √(σ_n² - σ_up²) = σ_n²/σ
    x_n    = x + (x - x̂0)/σ·(σ_down - σ) + σ_up·noise

x̂0 = x - σ·out (epsilon), x/(σ²+1) - σ/√(σ²+1)·out (v_prediction), out (sample). The update is
affine in x: x_n = A·x + B·out + C·noise (`coefficients`); `inverse_step` solves it exactly.
Timesteps may be fractional (diffusers' linspace spacing); σ(t) is interpolated as diffusers does.
"""
import torch

from . import _common

NAME = "euler_ancestral"
ADDS_NOISE = True      # can a step add fresh noise (the ancestral step adds fresh noise): noise correction needs it


def _sigmas(t, t_next, schedule):
    _common.check_pair(t, t_next)
    sg, sn = schedule.sig(t), schedule.sig(t_next)
    up = (sn**2 * (sg**2 - sn**2) / sg**2) ** 0.5
    return sg, sn, up, sn**2 / sg


def coefficients(t, t_next, schedule):
    """(A, B, C) with step(x, out, t, t_next) = A·x + B·out + C·noise."""
    sg, _, up, down = _sigmas(t, t_next, schedule)
    kind = schedule.prediction_type
    if kind == "epsilon":
        p, q = 1.0, -sg
    elif kind == "v_prediction":
        p, q = 1 / (sg**2 + 1), -sg / (sg**2 + 1) ** 0.5
    elif kind == "sample":
        p, q = 0.0, 1.0
    else:
        raise ValueError(f"unknown prediction_type {kind!r}")
    h = (down - sg) / sg
    return 1 + (1 - p) * h, -q * h, up


def is_stochastic(t_next=None):
    """Noise is added on every step but the last (σ_up = 0 when σ_n = 0)."""
    return t_next is not None


def noise_coeff(t, t_next, schedule):
    """σ_up: step(..., noise=n) = step(..., noise=0) + σ_up·n."""
    return torch.as_tensor(_sigmas(t, t_next, schedule)[2], dtype=torch.float64)


def model_input(x, t, schedule):
    """x / √(σ(t)² + 1): the VP-space sample the network was trained on."""
    _common.check_like(x)
    return _common.combine(x, ((schedule.sig(t) ** 2 + 1) ** -0.5, x))


def step(x, out, t, t_next, schedule, noise=None):
    """x at t -> x at t_next (None: σ = 0, the clean end). noise is required unless t_next is None."""
    return _common.affine_step(coefficients(t, t_next, schedule), x, out, noise, is_stochastic(t_next))


def inverse_step(x_next, out, t, t_next, schedule, noise=None):
    """The x with step(x, out, t, t_next, schedule, noise) == x_next: (x_next - B·out - C·noise) / A."""
    if schedule.prediction_type == "sample" and t_next is None:
        raise ValueError("with prediction_type='sample' the last Euler step returns the model output whatever x is, "
                         "so it cannot be inverted")
    return _common.affine_inverse(coefficients(t, t_next, schedule), x_next, out, noise, is_stochastic(t_next))


def add_noise(x0, noise, t, schedule):
    """x0 + σ(t)·noise (σ-space)."""
    _common.check_like(x0, noise=noise)
    return _common.combine(x0, (1.0, x0), (schedule.sig(t), noise))
