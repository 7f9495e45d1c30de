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
from dataclasses import dataclass, field, fields as _fields

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
        if _is_flow_config(cfg):
            raise ValueError(f"this is a flow-matching scheduler config ({cfg.get('_class_name', 'shift, no betas')}), "
                             "not a discrete noise schedule; use renoise.schedules.FlowSchedule.from_config(cfg) "
                             "and the 'flow_euler' sampler")
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
        if sampler == "flow_euler":
            raise ValueError("the 'flow_euler' sampler needs a FlowSchedule (renoise.schedules.FlowSchedule), "
                             "not a discrete Schedule")
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


# ============================================================================ flow matching

FLOW_SPACINGS = ("default", "flux")
TIME_SHIFT_TYPES = ("exponential", "linear")
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
# config switches of diffusers' flow scheduler that renoise does not implement (value -> refused)
_FLOW_UNSUPPORTED = ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                     "stochastic_sampling")


def _is_flow_config(cfg: dict) -> bool:
    name = str(cfg.get("_class_name", ""))
    return name.startswith("FlowMatch") or ("shift" in cfg and "beta_start" not in cfg and "trained_betas" not in cfg)


def _read_config(source) -> dict:
    """A scheduler config: a dict, a scheduler_config.json path, or a folder holding one
    (directly or in `scheduler/`)."""
    if isinstance(source, dict):
        return source
    import json
    from pathlib import Path
    p = Path(source)
    for cand in (p, p / "scheduler_config.json", p / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            try:
                return json.loads(cand.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{cand} is not valid JSON: {e}") from None
    raise FileNotFoundError(f"no scheduler_config.json at {p} (nor in {p / 'scheduler'})")


@dataclass(frozen=True)
class FlowSchedule:
    """A rectified-flow schedule (SD3 / SD3.5 / FLUX.1), equal to diffusers' FlowMatchEulerDiscreteScheduler.

    The sample at noise level σ ∈ [0, 1] is x_σ = (1 - σ)·x0 + σ·ε; the model predicts the velocity
    v = ε - x0 (prediction_type "flow"); the timestep the model sees is t = σ·T (T = 1000), so
    σ(t) = t / T.

    Sigmas for n steps (`sigmas(n)`, n + 1 values ending in 0, float32 as diffusers):
      spacing "default" (SD3's pipeline):  s = linspace(σ_max·T, σ_min·T, n) / T, with σ_max, σ_min the
                                            ends of the (statically shifted) 1000-step training grid
      spacing "flux" (FluxPipeline):      s = linspace(1, 1/n, n), in float32
    then the shift — static: s ← shift·s / (1 + (shift - 1)·s); dynamic (use_dynamic_shifting):
    s ← e^μ / (e^μ + (1/s - 1)) ("exponential") or μ / (μ + (1/s - 1)) ("linear"), where μ comes from
    the image's token count L by `mu(L)` = base_shift + (L - base_image_seq_len)·(max_shift -
    base_shift)/(max_image_seq_len - base_image_seq_len) — then, with shift_terminal, the stretch
    s ← 1 - (1 - s)/((1 - s[-1])/(1 - shift_terminal)) so that the last sigma is shift_terminal.

    A dynamic schedule needs μ before it can give sigmas: `for_image(seq_len)` or `with_mu(mu)`
    return a copy that carries it.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"
    spacing: str = "default"
    mu: float | None = None

    prediction_type = "flow"     # class constant: what the model outputs (velocity ε - x0)

    def __post_init__(self):
        if isinstance(self.num_train_timesteps, bool) or int(self.num_train_timesteps) < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {self.num_train_timesteps!r}")
        if self.spacing not in FLOW_SPACINGS:
            raise ValueError(f"unknown flow spacing {self.spacing!r}; expected one of {', '.join(FLOW_SPACINGS)} "
                             "('flux' = FluxPipeline's sigmas linspace(1, 1/n, n))")
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type must be one of {', '.join(TIME_SHIFT_TYPES)}, got {self.time_shift_type!r}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in [0, 1) or None, got {self.shift_terminal}")
        if self.use_dynamic_shifting and self.base_image_seq_len == self.max_image_seq_len:
            raise ValueError("base_image_seq_len and max_image_seq_len must differ for dynamic shifting")
        object.__setattr__(self, "num_train_timesteps", int(self.num_train_timesteps))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config, *, spacing: str = "default", mu: float | None = None) -> "FlowSchedule":
        """From a diffusers FlowMatchEulerDiscreteScheduler config: a dict, a `scheduler_config.json`
        path, or a pipeline folder. Missing keys take diffusers' defaults. `spacing="flux"` for FLUX.1
        models (FluxPipeline passes its own sigmas; a config with `use_flow_sigmas` keeps "default").
        Karras/exponential/beta sigmas, inverted sigmas and stochastic sampling are refused."""
        cfg = _read_config(config)
        name = cfg.get("_class_name", FLOW_SCHEDULER)
        if name != FLOW_SCHEDULER:
            raise ValueError(f"FlowSchedule reads a {FLOW_SCHEDULER} config, got {name!r}"
                             + ("; use renoise.schedules.Schedule.from_config for it" if not _is_flow_config(cfg) else ""))
        for key in _FLOW_UNSUPPORTED:
            if cfg.get(key):
                raise ValueError(f"flow scheduler config has {key}=true, which renoise does not support; set it to false")
        if cfg.get("use_flow_sigmas"):
            spacing = "default"
        kw = {k: cfg[k] for k in ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                                  "base_image_seq_len", "max_image_seq_len", "shift_terminal", "time_shift_type")
              if cfg.get(k) is not None}
        return cls(spacing=spacing, mu=mu, **kw)

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict (`FlowSchedule(**d)` rebuilds it)."""
        return {f.name: getattr(self, f.name) for f in _fields(self)}

    def calculate_mu(self, image_seq_len: int) -> float:
        """μ for an image of `image_seq_len` transformer tokens (FLUX: (H/16)·(W/16); SD3: (H/16)·(W/16)
        with H, W in pixels, i.e. latent size over the patch size), linear in the token count."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        b = self.base_shift - m * self.base_image_seq_len
        return image_seq_len * m + b

    def for_image(self, image_seq_len: int) -> "FlowSchedule":
        """A copy with μ = calculate_mu(image_seq_len) (used only when use_dynamic_shifting)."""
        return self.with_mu(self.calculate_mu(image_seq_len))

    def with_mu(self, mu: float) -> "FlowSchedule":
        from dataclasses import replace
        return replace(self, mu=float(mu))

    # ------------------------------------------------------------------ sigmas and timesteps
    def _grid_ends(self):
        """(σ_max, σ_min): the ends of diffusers' 1000-step training grid, shifted in float32 when static."""
        T = self.num_train_timesteps
        s = torch.tensor([float(T), 1.0], dtype=torch.float32) / T
        if not self.use_dynamic_shifting:
            s = self.static_shift(s)
        return s[0].item(), s[1].item()

    def static_shift(self, s):
        """The static shift of sigmas s (a number, array or tensor): shift·s / (1 + (shift - 1)·s)."""
        return self.shift * s / (1 + (self.shift - 1) * s)

    def _time_shift(self, s):
        mu = self.mu
        if self.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
        return mu / (mu + (1 / s - 1) ** 1.0)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """float32 [n + 1]: the shifted sigmas of n steps and a final 0 (diffusers' `scheduler.sigmas`
        after `set_timesteps`, with the spacing's pipeline arguments)."""
        n, T = self._check_steps(num_steps), self.num_train_timesteps
        if self.use_dynamic_shifting and self.mu is None:
            raise ValueError("this flow schedule shifts by the image size (use_dynamic_shifting): call "
                             ".for_image(image_seq_len) or .with_mu(mu) first")
        if self.spacing == "flux":
            s = np.array(np.linspace(1.0, 1 / n, n)).astype(np.float32)
        else:
            hi, lo = self._grid_ends()
            s = np.linspace(hi * T, lo * T, n) / T
        if self.use_dynamic_shifting:
            s = self._time_shift(s)
        else:
            s = self.static_shift(s)
        if self.shift_terminal:
            one_minus = 1 - s
            if one_minus[-1] == 0:
                raise ValueError(f"shift_terminal stretches the sigmas by 1 - σ_last, which is 0 here ({n} step): "
                                 "use more steps or a config without shift_terminal")
            s = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        s = torch.from_numpy(np.asarray(s)).to(torch.float32)
        return torch.cat([s, torch.zeros(1)])

    def timesteps(self, num_steps: int, sampler: str = "flow_euler") -> torch.Tensor:
        """float32 [n]: σ·T for the n sigmas (diffusers' `scheduler.timesteps`), descending."""
        self._check_sampler(sampler)
        return self.sigmas(num_steps)[:-1] * self.num_train_timesteps

    def chain(self, num_steps: int, sampler: str = "flow_euler") -> list:
        """The denoising chain [(t, t_next), ...] of timesteps as Python floats; t_next is None at the
        end (σ = 0)."""
        ts = self.timesteps(num_steps, sampler).tolist()
        return list(zip(ts, ts[1:] + [None]))

    def _check_steps(self, num_steps):
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(f"num_steps must be an int in [1, {self.num_train_timesteps}], got {num_steps!r}")
        return int(num_steps)

    @staticmethod
    def _check_sampler(sampler):
        if sampler != "flow_euler":
            raise ValueError(f"a FlowSchedule (flow-matching model) runs with the 'flow_euler' sampler, not {sampler!r}")

    # ------------------------------------------------------------------ σ(t)
    def sig(self, t):
        """σ(t) = t / T as a Python float (t a number), a float64 tensor (t a tensor), 0 for None."""
        if t is None:
            return 0.0
        if _is_number(t):
            # float32 shifting can put σ_max a rounding error above 1, as in diffusers
            if not 0 <= t <= self.num_train_timesteps * (1 + 1e-6):
                raise ValueError(f"timestep {t} is outside [0, {self.num_train_timesteps}]")
            return float(t) / self.num_train_timesteps
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"timestep must be a number, a tensor or None, got {type(t).__name__}")
        return t.to(torch.float64) / self.num_train_timesteps

    def sigma(self, t) -> torch.Tensor:
        """σ(t) as a float64 tensor (0-d for a number or None)."""
        return torch.as_tensor(self.sig(t), dtype=torch.float64)

    def table(self, device) -> tuple:
        """Nothing to cache (σ(t) = t / T is computed); kept so that code written for `Schedule` runs."""
        return ()


# ---------------------------------------------------------------------------------------------- storing

# How a file (renoise.inversion.InversionResult.save) names each schedule class, and which of its
# fields are tensors (stored as "schedule.<field>"); the other init fields go into JSON metadata.
# A new kind of schedule registers here; the inversion module names none.
SCHEDULE_KINDS = {"discrete": (Schedule, ("alphas_cumprod",)), "flow": (FlowSchedule, ())}


def schedule_state(schedule) -> tuple:
    """(kind, fields, tensors) of `schedule` for a file: its SCHEDULE_KINDS name, its other init fields
    as a JSON-able dict, its tensor fields {name: tensor}; `schedule_from_state` rebuilds it exactly."""
    kind = next((k for k, (cls, _) in SCHEDULE_KINDS.items() if type(schedule) is cls), None)
    if kind is None:
        raise ValueError(f"cannot store a schedule of type {type(schedule).__name__}; known: "
                         f"{', '.join(cls.__name__ for cls, _ in SCHEDULE_KINDS.values())}")
    names = SCHEDULE_KINDS[kind][1]
    fields = {f.name: getattr(schedule, f.name) for f in _fields(schedule) if f.init and f.name not in names}
    return kind, fields, {n: getattr(schedule, n) for n in names}


def schedule_from_state(kind: str | None, fields: dict, tensor):
    """The schedule `schedule_state` described; tensor(name) reads its stored tensor field `name`.
    kind None: "discrete" (files written before there were other kinds name none)."""
    kind = "discrete" if kind is None else kind
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"its schedule_kind is {kind!r} (expected {' or '.join(map(repr, SCHEDULE_KINDS))}); "
                         "was it written by a newer renoise?")
    cls, names = SCHEDULE_KINDS[kind]
    return cls(**{n: tensor(n).cpu() for n in names}, **fields)
