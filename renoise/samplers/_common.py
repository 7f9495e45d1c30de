"""What the samplers share: prediction-type conversions and the affine update.

Every sampler step here is affine in the sample, the model output and the noise,

    x_next = A·x + B·out + C·noise,

with scalars A, B, C that depend only on (t, t_next, schedule, options). `step` evaluates it and
`inverse_step` solves it for x: x = (x_next - B·out - C·noise) / A. That is exact for every
prediction type, including v- and x0-prediction where the model output's meaning depends on x.

Coefficients are Python floats (timesteps given as numbers) or float64 tensors (timesteps given as
tensors; a 1-D tensor of B timesteps gives one coefficient per batch element). They are applied in
float32 (float64 for float64 inputs): fp16/bf16 samples are upcast for the arithmetic and the
result is cast back to the sample's dtype.
"""
import torch

from ..schedules import PREDICTION_TYPES, _is_number


def vp_x0_eps(prediction_type, abar):
    """(p, q, r, s) with x0 = p·x + q·out and ε = r·x + s·out for a VP sample x = √ᾱ·x0 + √(1-ᾱ)·ε.

    epsilon: out = ε;  sample: out = x0;  v_prediction: out = v = √ᾱ·ε - √(1-ᾱ)·x0.
    """
    a, b = abar**0.5, (1 - abar) ** 0.5
    if prediction_type == "epsilon":
        return 1 / a, -b / a, 0.0, 1.0
    if prediction_type == "sample":
        return 0.0, 1.0, 1 / b, -a / b
    if prediction_type == "v_prediction":
        return a, -b, b, a
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def check_pair(t, t_next):
    """t_next must be below t (None = the clean end). Checked only for Python numbers: comparing
    tensors would synchronise with the device, so tensor timesteps are trusted (Schedule.chain
    produces valid pairs)."""
    if t is None:
        raise ValueError("t is None; only t_next may be None (the end of the chain)")
    if _is_number(t) and _is_number(t_next) and not t_next < t:
        raise ValueError(f"t_next must be smaller than t (denoising goes down), got t={t}, t_next={t_next}")


def check_like(x, **others):
    """Every tensor in `others` (None allowed) must have x's shape."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"the sample must be a floating-point tensor, got {type(x).__name__}")
    for name, v in others.items():
        if v is not None and (not isinstance(v, torch.Tensor) or v.shape != x.shape):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{name} must have the sample's shape {tuple(x.shape)}, got {shape}")


def compute_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)


def _coef(c, x, dtype):
    """A scalar coefficient ready to multiply x: a Python float, or a tensor cast to the compute
    dtype and shaped to broadcast over x (a 1-D coefficient is one value per batch element)."""
    if isinstance(c, torch.Tensor):
        c = c.to(dtype)
        if c.ndim == 1:
            c = c.reshape(-1, *([1] * (x.ndim - 1)))
    return c


def combine(x, *terms):
    """Σ c·v over (c, v) in terms, computed in the compute dtype and cast back to x's dtype."""
    dt = compute_dtype(x)
    acc = None
    for c, v in terms:
        if v is None:
            continue
        term = _coef(c, x, dt) * v.to(dt)
        acc = term if acc is None else acc + term
    return acc.to(x.dtype)


def affine_step(coefs, x, out, noise, stochastic):
    A, B, C = coefs
    check_like(x, out=out, noise=noise)
    if stochastic and noise is None:
        raise ValueError("this step is stochastic: pass the explicit `noise` tensor (e.g. torch.randn_like(x, generator=...))")
    return combine(x, (A, x), (B, out), (C, noise if stochastic else None))


def affine_inverse(coefs, x_next, out, noise, stochastic):
    A, B, C = coefs
    check_like(x_next, out=out, noise=noise)
    if stochastic and noise is None:
        raise ValueError("this step is stochastic: inverse_step needs the same `noise` that step used")
    if _is_number(A) and A == 0:
        raise ValueError("this step does not depend on x (A = 0), so it has no inverse")
    inv = 1 / A
    return combine(x_next, (inv, x_next), (-B * inv, out), (-C * inv, noise if stochastic else None))
