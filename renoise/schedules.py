"""Discrete noise schedules and timestep selection, matching diffusers number for number.

A schedule is the table ᾱ[t] = Π_{s≤t} (1 - β_s), t = 0..T-1 (float64 here; the betas and the
cumulative product are computed in float32 first, exactly as diffusers does, so that the values
are bit-identical to a diffusers scheduler built from the same config). Samplers read from it

    ᾱ(t)  (`alpha`)      the signal level at integer t (VP space: x_t = √ᾱ·x0 + √(1-ᾱ)·ε)
    σ(t)  (`sigma`)      √((1-ᾱ)/ᾱ), linearly interpolated at fractional t (σ-space: x = x0 + σ·ε)

and pick timesteps with `timesteps(n, sampler)` / `chain(n, sampler)` the way diffusers'
DDIMScheduler, EulerAncestralDiscreteScheduler and LCMScheduler do for the same config.

Timesteps are Python numbers or tensors. Python numbers give Python-float coefficients (free in
eager mode, constants under `torch.compile`); tensors give 0-d float64 tensors on their device
(one compiled graph for all steps, no host synchronisation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddim", "euler_ancestral", "lcm")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# the spacing diffusers' scheduler class uses when a config has no `timestep_spacing`
DEFAULT_SPACING = {"ddim": "leading", "euler_ancestral": "linspace", "lcm": "leading"}


def betas(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000):
    """β_t as diffusers computes them (float32 [T]).

    linear:            linspace(β0, β1, T)
    scaled_linear:     linspace(√β0, √β1, T)²   (Stable Diffusion)
    squaredcos_cap_v2: β_i = min(1 - f((i+1)/T) / f(i/T), 0.999), f(s) = cos((s+0.008)/1.008·π/2)²
    """
    T = int(num_train_timesteps)
    if T < 2:
        raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float32)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {', '.join(BETA_SCHEDULES)}")


def _is_number(t):
    return isinstance(t, (int, float, np.integer, np.floating)) and not isinstance(t, bool)


def _lookup(table, index):
    """table[index] for an integer tensor index of any shape, as a gather: no host sync and no
    guard on the index's value under torch.compile (which torch.take and 0-d indexing have)."""
    return table[index.reshape(-1)].reshape(index.shape)


@dataclass(frozen=True, eq=False)
class Schedule:
    """An immutable discrete noise schedule.

    alphas_cumprod        float64 [T], ᾱ[t]
    prediction_type       what the model predicts: "epsilon" | "v_prediction" | "sample"
    final_alpha_cumprod   ᾱ used after the last DDIM step; None means ᾱ[0] (diffusers'
                          set_alpha_to_one=False, as in every Stable Diffusion config)
    timestep_spacing      "leading" | "trailing" | "linspace"; None: the sampler's diffusers default
                          (DDIM/LCM "leading", Euler-ancestral "linspace")
    steps_offset          added to "leading" timesteps
    original_inference_steps, timestep_scaling, sigma_data   LCM's skipping schedule and boundary
                          condition c_skip = σd²/((s·t)² + σd²), c_out = s·t/√((s·t)² + σd²)
    """

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    final_alpha_cumprod: float | None = None
    timestep_spacing: str | None = None
    steps_offset: int = 0
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    sigma_data: float = 0.5
    _tables: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        ac = torch.as_tensor(self.alphas_cumprod)
        if ac.ndim != 1 or ac.numel() < 2 or not ac.is_floating_point():
            raise ValueError(f"alphas_cumprod must be a 1-D float tensor with T >= 2 entries, got shape {tuple(ac.shape)}")
        ac = ac.detach().to("cpu", torch.float64).clone()
        if not bool(torch.isfinite(ac).all()) or not bool(((ac > 0) & (ac <= 1)).all()):
            raise ValueError("alphas_cumprod must be finite and in (0, 1]")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
        if self.timestep_spacing is not None and self.timestep_spacing not in SPACINGS:
            raise ValueError(f"unknown timestep_spacing {self.timestep_spacing!r}; expected one of {', '.join(SPACINGS)} (or None)")
        final = float(ac[0]) if self.final_alpha_cumprod is None else float(self.final_alpha_cumprod)
        if not 0 < final <= 1:
            raise ValueError(f"final_alpha_cumprod must be in (0, 1], got {final}")
        if int(self.original_inference_steps) < 1 or int(self.original_inference_steps) > ac.numel():
            raise ValueError(f"original_inference_steps must be in [1, {ac.numel()}], got {self.original_inference_steps}")
        object.__setattr__(self, "alphas_cumprod", ac)
        object.__setattr__(self, "final_alpha_cumprod", final)
        object.__setattr__(self, "steps_offset", int(self.steps_offset))
        object.__setattr__(self, "original_inference_steps", int(self.original_inference_steps))
        sig = ((1 - ac) / ac).sqrt()
        object.__setattr__(self, "_abar", ac.tolist())
        object.__setattr__(self, "_sig", sig.tolist())
        self._tables["cpu"] = (ac, sig)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
               *, set_alpha_to_one=False, trained_betas=None, **fields):
        """From the diffusers constructor arguments (defaults: Stable Diffusion's schedule)."""
        if trained_betas is not None:
            b = torch.tensor(trained_betas, dtype=torch.float32)
        else:
            b = betas(beta_schedule, beta_start, beta_end, num_train_timesteps)
        ac32 = torch.cumprod(1.0 - b, dim=0)  # float32, as diffusers
        final = 1.0 if set_alpha_to_one else float(ac32[0])
        return cls(ac32.to(torch.float64), final_alpha_cumprod=final, **fields)

    @classmethod
    def from_config(cls, cfg: dict) -> "Schedule":
        """From a diffusers `scheduler_config.json` dict (any scheduler class).

        Missing keys take diffusers' DDIM/Euler defaults (linear betas 1e-4..0.02, T = 1000,
        set_alpha_to_one True, steps_offset 0, epsilon); a missing `timestep_spacing` stays None so
        that each sampler uses its own diffusers default. Clipping, thresholding and zero-SNR
        rescaling are not supported (they make the step non-invertible) and raise ValueError.
        """
        if not isinstance(cfg, dict):
            raise ValueError(f"from_config expects a dict (a scheduler_config.json), got {type(cfg).__name__}")
        for key in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
            if cfg.get(key):
                raise ValueError(f"scheduler config has {key}=true, which renoise does not support; set it to false")
        return cls.create(
            cfg.get("beta_schedule", "linear"), cfg.get("beta_start", 0.0001), cfg.get("beta_end", 0.02),
            cfg.get("num_train_timesteps", 1000),
            set_alpha_to_one=cfg.get("set_alpha_to_one", True),
            trained_betas=cfg.get("trained_betas"),
            prediction_type=cfg.get("prediction_type", "epsilon"),
            timestep_spacing=cfg.get("timestep_spacing"),
            steps_offset=cfg.get("steps_offset", 0) or 0,
            original_inference_steps=cfg.get("original_inference_steps", 50) or 50,
            timestep_scaling=cfg.get("timestep_scaling", 10.0),
        )

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    # ------------------------------------------------------------------ timestep selection
    def timesteps(self, num_steps: int, sampler: str) -> torch.Tensor:
        """Descending timesteps, identical to diffusers' `set_timesteps(num_steps)` for `sampler`.

        int64 for "ddim" and "lcm", float32 for "euler_ancestral" (as diffusers).
        """
        n, T = self._check_steps(num_steps, sampler), self.num_train_timesteps
        if sampler == "lcm":
            orig = self.original_inference_steps
            if n > orig:
                raise ValueError(f"LCM needs num_steps <= original_inference_steps ({orig}), got {n}")
            k = T // orig
            origin = (np.arange(1, orig + 1) * k - 1)[::-1]
            idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
            return torch.from_numpy(origin[idx].copy()).to(torch.int64)
        spacing = self.timestep_spacing or DEFAULT_SPACING[sampler]
        dtype = np.float32 if sampler == "euler_ancestral" else np.int64
        if spacing == "linspace":
            if sampler == "euler_ancestral":
                ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1]
            else:
                ts = np.linspace(0, T - 1, n).round()[::-1]
        elif spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(dtype) + self.steps_offset
        else:  # trailing
            ts = np.round(np.arange(T, 0, -T / n)).astype(dtype) - 1
        return torch.from_numpy(np.ascontiguousarray(ts).astype(dtype))

    def chain(self, num_steps: int, sampler: str) -> list:
        """The denoising chain [(t, t_next), ...] as Python numbers; t_next is None at the end.

        t_next follows each diffusers scheduler's own rule: DDIM uses t - T // n (None when < 0),
        whatever the spacing; Euler-ancestral and LCM use the next timestep of the list.
        """
        ts = self.timesteps(num_steps, sampler).tolist()
        if sampler == "ddim":
            step = self.num_train_timesteps // len(ts)
            return [(t, t - step if t - step >= 0 else None) for t in ts]
        return list(zip(ts, ts[1:] + [None]))

    def _check_steps(self, num_steps, sampler):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(f"num_steps must be an int in [1, {self.num_train_timesteps}], got {num_steps!r}")
        return int(num_steps)

    # ------------------------------------------------------------------ ᾱ(t), σ(t)
    def table(self, device) -> tuple:
        """(ᾱ, σ) as float64 [T] tensors on `device` (cached per device)."""
        key = str(torch.device(device))
        if key not in self._tables:
            ac, sig = self._tables["cpu"]
            self._tables[key] = (ac.to(device), sig.to(device))
        return self._tables[key]

    def abar(self, t):
        """ᾱ(t) as a Python float (t a number or None) or a float64 tensor on t's device.

        Integer t reads the table; fractional t gives 1 / (1 + σ(t)²), consistent with `sigma`.
        None gives `final_alpha_cumprod`.
        """
        if t is None:
            return self.final_alpha_cumprod
        if _is_number(t):
            self._check_range(t)
            if float(t).is_integer():
                return self._abar[int(t)]
            return 1.0 / (1.0 + self.sig(t) ** 2)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"timestep must be a number, a tensor or None, got {type(t).__name__}")
        if t.is_floating_point():
            return 1.0 / (1.0 + self.sig(t) ** 2)
        return _lookup(self.table(t.device)[0], t)

    def sig(self, t):
        """σ(t) = √((1-ᾱ)/ᾱ) as a Python float or float64 tensor, linearly interpolated between
        integer timesteps (as diffusers' Euler schedulers, `np.interp`); σ(None) = 0."""
        if t is None:
            return 0.0
        if _is_number(t):
            self._check_range(t)
            t = float(t)
            i = min(int(math.floor(t)), self.num_train_timesteps - 2)
            return self._sig[i] + (t - i) * (self._sig[i + 1] - self._sig[i])
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"timestep must be a number, a tensor or None, got {type(t).__name__}")
        sig = self.table(t.device)[1]
        if not t.is_floating_point():
            return _lookup(sig, t)
        tf = t.to(torch.float64).clamp(0, self.num_train_timesteps - 1)
        i = tf.floor().clamp(max=self.num_train_timesteps - 2).long()
        lo, hi = _lookup(sig, i), _lookup(sig, i + 1)
        return lo + (tf - i) * (hi - lo)

    def alpha(self, t) -> torch.Tensor:
        """ᾱ(t) as a float64 tensor (0-d for a number or None); alpha(None) = final_alpha_cumprod."""
        return torch.as_tensor(self.abar(t), dtype=torch.float64)

    def sigma(self, t) -> torch.Tensor:
        """σ(t) as a float64 tensor (0-d for a number or None), interpolated as diffusers' Euler."""
        return torch.as_tensor(self.sig(t), dtype=torch.float64)

    def _check_range(self, t):
        if not 0 <= t <= self.num_train_timesteps - 1:
            raise ValueError(f"timestep {t} is outside [0, {self.num_train_timesteps - 1}]")

    def __repr__(self):
        return (f"Schedule(T={self.num_train_timesteps}, prediction_type={self.prediction_type!r}, "
                f"final_alpha_cumprod={self.final_alpha_cumprod:.6g}, timestep_spacing={self.timestep_spacing!r}, "
                f"steps_offset={self.steps_offset})")
