"""LCM (latent consistency model) multistep sampling, as diffusers' LCMScheduler, with explicit noise.

VP space. With x̂0 from the model output and the boundary-condition scalings at u = timestep_scaling·t,

    c_skip = σd²/(u² + σd²),   c_out = u/√(u² + σd²),   x̃0 = c_out·x̂0 + c_skip·x
    x_n    = √ᾱ_n·x̃0 + √(1-ᾱ_n)·noise      (t_next a timestep)
    x_n    = x̃0                            (t_next None: the last step returns the denoised sample)

The update is affine in x: x_n = A·x + B·out + C·noise (`coefficients`); `inverse_step` solves it
exactly (for x0-prediction A = √ᾱ_n·c_skip is tiny at large t, so the inverse amplifies errors).
"""
import torch

from . import _common

NAME = "lcm"
ADDS_NOISE = True      # can a step add fresh noise (each step re-noises its x0 estimate): noise correction needs it


def scalings(t, schedule):
    """(c_skip, c_out) at timestep t."""
    u = schedule.timestep_scaling * (t.double() if hasattr(t, "double") else t)
    sd2 = schedule.sigma_data**2
    return sd2 / (u**2 + sd2), u / (u**2 + sd2) ** 0.5


def coefficients(t, t_next, schedule):
    """(A, B, C) with step(x, out, t, t_next) = A·x + B·out + C·noise."""
    _common.check_pair(t, t_next)
    p, q, _, _ = _common.vp_x0_eps(schedule.prediction_type, schedule.abar(t))
    c_skip, c_out = scalings(t, schedule)
    if t_next is None:
        a, c = 1.0, 0.0
    else:
        an = schedule.abar(t_next)
        a, c = an**0.5, (1 - an) ** 0.5
    return a * (c_out * p + c_skip), a * c_out * q, c


def is_stochastic(t_next=None):
    """Noise is added on every step but the last."""
    return t_next is not None


def noise_coeff(t, t_next, schedule):
    """√(1-ᾱ_n) (0 at the last step)."""
    return torch.as_tensor(coefficients(t, t_next, schedule)[2], dtype=torch.float64)


def model_input(x, t, schedule):
    """LCM feeds the sample unchanged."""
    return x


def step(x, out, t, t_next, schedule, noise=None):
    """x at t -> x at t_next (None: the denoised sample). noise is required unless t_next is None."""
    return _common.affine_step(coefficients(t, t_next, schedule), x, out, noise, is_stochastic(t_next))


def inverse_step(x_next, out, t, t_next, schedule, noise=None):
    """The x with step(x, out, t, t_next, schedule, noise) == x_next: (x_next - B·out - C·noise) / A."""
    return _common.affine_inverse(coefficients(t, t_next, schedule), x_next, out, noise, is_stochastic(t_next))


def add_noise(x0, noise, t, schedule):
    """√ᾱ_t·x0 + √(1-ᾱ_t)·noise."""
    _common.check_like(x0, noise=noise)
    a = schedule.abar(t)
    return _common.combine(x0, (a**0.5, x0), ((1 - a) ** 0.5, noise))
