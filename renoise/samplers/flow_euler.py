"""The flow-matching Euler step (SD3 / SD3.5 / FLUX.1), as diffusers' FlowMatchEulerDiscreteScheduler.step.

Rectified flow: x_σ = (1 - σ)·x0 + σ·ε, and the model output is the velocity v = dx/dσ = ε - x0.
One Euler step from σ = σ(t) to σ' = σ(t_next) (σ(None) = 0, the clean end) is

    x_next = x + (σ' - σ)·v,

affine in x with A = 1, B = σ' - σ, C = 0 (no noise), so `inverse_step` x = x_next - (σ' - σ)·v is
exact. `schedule` is a renoise.schedules.FlowSchedule (σ(t) = t / T); t, t_next are its timesteps
(numbers, or tensors: one per batch element for 1-D). Shapes: x, out [B, ...].
"""
import torch

from . import _common

NAME = "flow_euler"
ADDS_NOISE = False      # can a step add fresh noise (a deterministic ODE step): noise correction needs it


def _check_schedule(schedule):
    if getattr(schedule, "prediction_type", None) != "flow":
        raise ValueError(f"the flow_euler sampler needs a FlowSchedule (a flow-matching model's schedule), got "
                         f"{type(schedule).__name__} with prediction_type {getattr(schedule, 'prediction_type', None)!r}")


def coefficients(t, t_next, schedule):
    """(A, B, C) = (1, σ(t_next) - σ(t), 0) with step(x, v, t, t_next) = A·x + B·v + C·noise."""
    _check_schedule(schedule)
    _common.check_pair(t, t_next)
    return 1.0, schedule.sig(t_next) - schedule.sig(t), 0.0


def is_stochastic(t_next=None):
    """The flow Euler step adds no noise."""
    return False


def noise_coeff(t, t_next, schedule):
    """0: the step has no noise term."""
    return torch.zeros((), dtype=torch.float64)


def model_input(x, t, schedule):
    """Flow transformers take the sample unchanged."""
    return x


def step(x, out, t, t_next, schedule, noise=None):
    """x at t -> x + (σ(t_next) - σ(t))·out; `noise` is ignored (accepted for the shared signature)."""
    return _common.affine_step(coefficients(t, t_next, schedule), x, out, None, False)


def inverse_step(x_next, out, t, t_next, schedule, noise=None):
    """The x with step(x, out, t, t_next) == x_next: x_next - (σ(t_next) - σ(t))·out."""
    return _common.affine_inverse(coefficients(t, t_next, schedule), x_next, out, None, False)


def add_noise(x0, noise, t, schedule):
    """(1 - σ)·x0 + σ·noise, σ = σ(t) (diffusers' scale_noise)."""
    _check_schedule(schedule)
    _common.check_like(x0, noise=noise)
    s = schedule.sig(t)
    return _common.combine(x0, (1 - s, x0), (s, noise))
