"""ReNoise inversion: z0 -> z_T one timestep at a time, each step a fixed-point solve.

For the denoising chain [(t_0, t_0'), ..., (t_{n-1}, None)] (t' the next, less noisy timestep),
the inversion walks it backwards. At (t, t') with the latent z_prev at t' it solves

    z = G_t(z) = sampler.inverse_step(z_prev, R(denoiser(z, t)), t, t', noise=n_t)

with `fixed_point.iterate` from z = z_prev (or, with the plan's warm_start="previous", from
inverse_step(z_prev, e_prev), e_prev the previous step's last model output: no extra call; with
"previous-noise", from inverse_step(z_prev, e_prev - c·n_t), c = the step's noise coefficient over
x's noise level at t', which takes the fresh noise of an ancestral step out of the guess; with
"extrapolate", on deterministic steps, from inverse_step(z_prev, ê), ê = e_1 + (t - t_1)/(t_1 - t_2)·(e_1 - e_2)
the straight line in t through the last two steps' model outputs e_1 at t_1 and e_2 at t_2), as the
plan says for t (renoise.presets): K + 1 model calls (K = 0: plain DDIM / Euler inversion; fewer
per sample once the residual reaches the plan's tol), then either the last iterate or — averaging — one
inverse step with the weighted mean of the window's *raw* model outputs (regularized when the
regularizer is on). R, the edit-enhancement regularizer, acts on iteration i's output when
i >= a (the window's start) or, with averaging off, when i > 0; it needs a reference map e_ref,
the model output at add_noise(z0, n_ref, t) (or at z0 with reference_noise="clean"), computed in
the same denoiser call as iteration 0 (the batch doubles there). Stochastic steps then get their
noise corrected (renoise.noise_correction) with one more model call.

Randomness, all from `generator` and only when needed, in this order: the noises of the stochastic
steps not given in `noises` (denoising order), then n_ref (when regularizing with
reference_noise="noised"), then the regularizer's shifts as the loop runs.

Gradients (`grad=`, see renoise.fixed_point): "none" (the default) runs under torch.no_grad;
"unrolled" records every model call; "phantom" only each step's last `phantom_steps` calls;
"implicit" differentiates each step's exact fixed point z_t = G_t(z_t) (one more model call per
step, at z_t, with a graph; the backward solves the adjoint fixed point). An averaging step's
answer, inverse_step(z_prev, ē), is then differentiated as inverse_step(z_prev, e(z_t)) — at the
fixed point all iterates agree. "implicit" refuses the edit-enhancement regularizer: it draws new
random shifts at every call, so G_t is not one fixed map. z_T is then differentiable with respect
to z0, the conditioning and the model's parameters (whatever the denoiser closes over); the
values are the same in every mode.

Diagnostics, per inversion step and sample: `contraction`, the ratio of the last two residuals
(how much one more iteration shrinks the step; NaN with a single call), and with
`jacobian_iters=n` the spectral norm ‖∂G_t/∂z‖₂ at the step's answer z_t by n power iterations
(fixed_point.spectral_norm: one more model call with a graph, then about two backward passes
of the denoiser per iteration). G_t there is inverse_step(z_prev, denoiser(z, t)) without the
regularizer (random). Below 1 the map contracts, which the paper's convergence argument assumes.

Speed (`compile=`, see renoise.speed): each inversion step — its K + 1 model calls, inverse steps,
averaging, regularizer and noise correction — runs as one compiled region (`_step`), timesteps as
0-d tensors so that one compiled region serves every step of a kind; the regularizer's shifts are
drawn before the step in the order the eager loop draws them, and the only host sync of a step is
its non-finite check. Values, model calls and generator draws are those of the eager loop.

Orders: `timesteps`, `noises` and `chain` follow the denoising order (index 0 is the noisiest
step; noises[i] is the noise step i adds, None where the step adds none). `trajectory` [n+1, B, ...]
and `residuals` (one [calls, B] tensor per step), `contraction` and `jacobian_norm` (one [B] tensor
per step) follow the inversion order: trajectory[0] = z0, trajectory[-1] = z_T.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from . import compiling, fixed_point, noise_correction, presets, regularizers, schedules
from . import samplers as _samplers
from .schedules import FlowSchedule, Schedule

FORMAT = "renoise.inversion/1"


class NonFiniteLatentError(FloatingPointError, ValueError):
    """The inversion produced NaN or inf; the message names the timestep and iteration."""


@dataclass
class InversionResult:
    """What `invert` returns (see the module docstring for the orders)."""

    z_T: torch.Tensor
    noises: list
    trajectory: torch.Tensor
    residuals: list
    model_calls: int
    timesteps: torch.Tensor
    plan: presets.Plan
    sampler: str
    sampler_opts: dict
    schedule: Schedule | FlowSchedule
    num_steps: int
    start: int = 0                         # index of the first chain step run (strength < 1: > 0)
    extra: dict = field(default_factory=dict)   # caller's JSON-able settings, saved in the file's metadata
    contraction: list = field(default_factory=list)   # one [B] per step: ratio of the last two residuals
    jacobian_norm: list | None = None      # one [B] per step: ‖∂G_t/∂z‖₂ at z_t (jacobian_iters > 0), else None

    def convergence(self) -> dict:
        """How each sample's solves ended (a sample is an image of the batch):

        calls [B]: the model calls each sample used (a sample frozen by the plan's tol stops
        counting; noise correction and other per-step calls count for all); budget [B]: calls over
        the most the plan allows (K + 1 a step, plus those extra calls); not_converged: one entry per
        (step, sample) that used all its calls and stopped above the plan's tol, {"step": index in inversion order,
        "timestep", "sample", "residual" (the last, in the model's input scale like tol), "tol",
        "calls"}, empty without a tol; advice: what to do about them (None when there are none)."""
        smod = _sampler(self.sampler)
        res = [r.detach().float().cpu() for r in self.residuals]
        other = self.model_calls - sum(r.shape[0] for r in res)
        calls = sum((r > 0).sum(0) for r in res) + other
        allowed = other + sum(self.plan.at(t)[0] + 1 for t in self.timesteps.flip(0).tolist())
        stalled = []
        if self.plan.tol is not None:
            for i, (t, r) in enumerate(zip(self.timesteps.flip(0).tolist(), res)):
                scale = float(smod.model_input(torch.ones((), dtype=torch.float64), t, self.schedule))
                tol = self.plan.tol_at(t)
                # above tol at every call, and every call used (tol_plain stops a sample early above tol)
                above = (r * scale > tol).all(0) & ((r > 0).sum(0) == self.plan.at(t)[0] + 1)
                for b in above.nonzero().flatten().tolist():
                    stalled.append({"step": i, "timestep": t, "sample": b, "residual": float(r[-1, b] * scale),
                                    "tol": tol, "calls": int((r[:, b] > 0).sum())})
        advice = None
        if stalled:
            tols = "/".join(f"{x:g}" for x in sorted({s["tol"] for s in stalled}))
            advice = (f"{len(stalled)} solve(s) used all their calls and stopped above tol = {tols}: "
                      "allow more calls (the plan's iters, --iters), or use another preset (plain iteration, "
                      "K = 9 without tolerance stopping, converges where this solver stalls)")
        return {"calls": calls.tolist(), "budget": (calls.double() / max(allowed, 1)).tolist(),
                "not_converged": stalled, "advice": advice}

    @property
    def chain(self) -> list:
        """The denoising chain [(t, t_next), ...] that `sample` runs."""
        return self.schedule.chain(self.num_steps, self.sampler)[self.start:]

    def to(self, device=None, dtype=None) -> "InversionResult":
        """A copy with the latents and noises moved (and cast, for floating-point ones)."""
        mv = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
        on = lambda rs: None if rs is None else [r.to(device) for r in rs]  # noqa: E731
        return InversionResult(mv(self.z_T), [mv(n) for n in self.noises], mv(self.trajectory),
                               on(self.residuals), self.model_calls, self.timesteps,
                               self.plan, self.sampler, dict(self.sampler_opts), self.schedule, self.num_steps,
                               self.start, dict(self.extra), on(self.contraction), on(self.jacobian_norm))

    def save(self, path) -> None:
        """One safetensors file: the tensors, and the plan, sampler, schedule and `extra` as metadata.
        A discrete Schedule is stored as its ᾱ table and fields; a FlowSchedule (schedule_kind "flow")
        as its fields (μ included), from which it is rebuilt exactly."""
        from safetensors.torch import save_file
        kind, sched, tables = schedules.schedule_state(self.schedule)
        t = {"z_T": self.z_T, "trajectory": self.trajectory, "timesteps": self.timesteps}
        t.update({f"schedule.{k}": v for k, v in tables.items()})
        t.update({f"noise.{i}": n for i, n in enumerate(self.noises) if n is not None})
        t.update({f"residuals.{k}": r for k, r in enumerate(self.residuals)})
        t.update({f"contraction.{k}": r for k, r in enumerate(self.contraction)})
        t.update({f"jacobian_norm.{k}": r for k, r in enumerate(self.jacobian_norm or [])})
        t = {k: v.detach().to("cpu").contiguous().clone() for k, v in t.items()}
        meta = {"format": FORMAT, "schedule_kind": kind,
                "plan": json.dumps(self.plan.to_dict()), "sampler": self.sampler,
                "sampler_opts": json.dumps(self.sampler_opts), "schedule": json.dumps(sched),
                "model_calls": str(self.model_calls), "num_steps": str(self.num_steps), "start": str(self.start),
                "num_noises": str(len(self.noises)), "num_residuals": str(len(self.residuals)),
                "num_contraction": str(len(self.contraction)),
                "num_jacobian_norm": "none" if self.jacobian_norm is None else str(len(self.jacobian_norm)),
                "extra": json.dumps(self.extra)}
        save_file(t, str(path), metadata=meta)

    @classmethod
    def load(cls, path, device="cpu") -> "InversionResult":
        """Read a file written by `save`. Everything is checked before it is returned, and every
        error (ValueError; FileNotFoundError) names the file: a folder, an empty, truncated or
        foreign file, missing or garbled metadata, tensors that disagree with num_steps, NaN/inf."""
        from pathlib import Path
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{path} is a folder, not an inversion file; pass the .safetensors file (e.g. "
                             f"{path / 'inversion.safetensors'})")
        if not path.is_file():
            raise FileNotFoundError(f"inversion file not found: {path}")
        if path.stat().st_size == 0:
            raise ValueError(f"inversion file {path} is empty; invert again")
        try:
            result = cls._read(path, device)
        except ValueError as e:
            message = str(e)
            raise ValueError(message if str(path) in message else f"inversion file {path}: {message}") from None
        except Exception as e:  # noqa: BLE001 -- safetensors' own errors for a damaged or foreign file
            raise ValueError(f"cannot read inversion file {path}: not a complete safetensors file "
                             f"({' '.join(str(e).split())}); invert again") from None
        result._check(path)
        return result

    @classmethod
    def _read(cls, path, device):
        from safetensors import safe_open
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a renoise inversion file (format {meta.get('format')!r}, "
                                 f"expected {FORMAT!r})")
            keys = set(f.keys())

            def get(key):
                if key not in keys:
                    raise ValueError(f"the tensor {key!r} is missing; the file is damaged, invert again")
                return f.get_tensor(key)

            def number(key, default=None):
                value = meta.get(key, default)
                if value is None:
                    raise ValueError(f"its metadata has no {key!r}; the file is damaged, invert again")
                try:
                    n = int(value)
                except ValueError:
                    raise ValueError(f"its metadata's {key!r} is {value!r}, not a number") from None
                if n < 0:
                    raise ValueError(f"its metadata's {key!r} is negative ({n})")
                return n

            def parsed(key, default=None):
                value = meta.get(key, default)
                if value is None:
                    raise ValueError(f"its metadata has no {key!r}; the file is damaged, invert again")
                try:
                    return json.loads(value)
                except json.JSONDecodeError:
                    raise ValueError(f"its metadata's {key!r} is not valid JSON") from None

            noises = [get(f"noise.{i}") if f"noise.{i}" in keys else None for i in range(number("num_noises"))]
            residuals = [get(f"residuals.{k}") for k in range(number("num_residuals"))]
            contraction = [get(f"contraction.{k}") for k in range(number("num_contraction", 0))]
            num_jac = meta.get("num_jacobian_norm", "none")
            jac = None if num_jac == "none" else [get(f"jacobian_norm.{k}") for k in range(number("num_jacobian_norm"))]
            try:
                schedule = schedules.schedule_from_state(meta.get("schedule_kind"), parsed("schedule"),
                                                         lambda name: get(f"schedule.{name}"))
                plan = presets.Plan.from_dict({k: tuple(v) if isinstance(v, list) else v
                                               for k, v in parsed("plan").items()})
            except (TypeError, AttributeError) as e:
                raise ValueError(f"its schedule or plan metadata does not fit this renoise ({e})") from None
            if "sampler" not in meta:
                raise ValueError("its metadata has no 'sampler'; the file is damaged, invert again")
            return cls(get("z_T"), noises, get("trajectory"), residuals, number("model_calls"), get("timesteps"),
                       plan, meta["sampler"], parsed("sampler_opts"), schedule, number("num_steps"),
                       number("start"), parsed("extra", "{}"), contraction, jac)

    def _check(self, path) -> None:
        """The loaded tensors agree with num_steps and with each other, and are finite."""
        def bad(what):
            return ValueError(f"inversion file {path}: {what}; the file is damaged or was edited, invert again")
        try:
            chain = self.chain
        except (ValueError, KeyError) as e:
            raise bad(f"num_steps {self.num_steps} / start {self.start} / sampler {self.sampler!r} give no "
                      f"chain ({e})") from None
        n = len(chain)
        if n < 1 or self.timesteps.shape != (n,) or [int(t) for t in self.timesteps] != [int(t) for t, _ in chain]:
            raise bad(f"its num_steps {self.num_steps} (start {self.start}) give {n} steps, but its timesteps are "
                      f"{self.timesteps.tolist()}")
        if self.trajectory.ndim < 2 or self.trajectory.shape[0] != n + 1 or self.trajectory.shape[1:] != self.z_T.shape:
            raise bad(f"its trajectory has shape {tuple(self.trajectory.shape)}, expected [{n + 1}, "
                      f"{', '.join(map(str, self.z_T.shape))}] for {n} steps")
        if len(self.noises) != n or len(self.residuals) != n:
            raise bad(f"it holds {len(self.noises)} noises and {len(self.residuals)} residuals for {n} steps")
        if any(x is not None and x.shape != self.z_T.shape for x in self.noises):
            raise bad("a noise's shape differs from z_T's")
        named = [("z_T", self.z_T), ("trajectory", self.trajectory)]
        named += [(f"noise.{i}", x) for i, x in enumerate(self.noises) if x is not None]
        for name, x in named:
            if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
                raise bad(f"its tensor {name!r} holds NaN or inf" if x.is_floating_point() else
                          f"its tensor {name!r} is not floating-point")


# ---------------------------------------------------------------------------------------------- helpers

def _sampler(sampler):
    if isinstance(sampler, str):
        return _samplers.get(sampler)
    if getattr(sampler, "NAME", None) in _samplers.NAMES:
        return sampler
    raise ValueError(f"sampler must be a name ({', '.join(_samplers.NAMES)}) or a renoise.samplers module, "
                     f"got {sampler!r}")


def _start(num_steps, strength):
    """diffusers' img2img rule: run the last int(n·strength) steps of the chain."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    run = min(int(num_steps * strength), num_steps)
    if run < 1:
        raise ValueError(f"strength {strength} with {num_steps} steps leaves no step to invert; raise one of them")
    return num_steps - run


def _randn(like, generator):
    dev = generator.device
    return torch.randn(like.shape, generator=generator, device=dev, dtype=torch.float32).to(like.device, like.dtype)


def _noises(noises, chain, stochastic, z0, generator):
    n = len(chain)
    if noises is None:
        noises = [None] * n
    elif isinstance(noises, torch.Tensor):
        if noises.dim() != z0.dim() + 1 or noises.shape[0] != n:
            raise ValueError(f"noises as one tensor must have shape [{n}, *z0.shape] (one per inverted step), "
                             f"got {tuple(noises.shape)}")
        noises = list(noises.unbind(0))
    else:
        noises = list(noises)
    if len(noises) != n:
        raise ValueError(f"noises must have one entry per inverted step ({n}, in denoising order; None where the "
                         f"step adds no noise), got {len(noises)}")
    out = []
    for i, ((t, tn), st, nz) in enumerate(zip(chain, stochastic, noises)):
        if nz is not None and (not isinstance(nz, torch.Tensor) or nz.shape != z0.shape):
            shape = tuple(nz.shape) if isinstance(nz, torch.Tensor) else type(nz).__name__
            raise ValueError(f"noises[{i}] (step t={t}) must have z0's shape {tuple(z0.shape)}, got {shape}")
        if not st:
            out.append(None)
        elif nz is not None:
            out.append(nz.to(z0.device, z0.dtype))
        elif generator is None:
            raise ValueError(f"step {i} (t={t}) is stochastic and has no noise: pass noises= or a torch.Generator "
                             "as generator=")
        else:
            out.append(_randn(z0, generator))
    return out


def _check_sampler(smod, schedule, plan, chain, opts):
    """Refuse early what cannot run: unknown sampler options, non-invertible steps, R on non-noise."""
    try:
        stochastic = [bool(smod.is_stochastic(tn, **opts)) for _, tn in chain]
    except TypeError as e:
        raise ValueError(f"sampler {smod.NAME!r} does not take the options {sorted(opts)}: {e}") from None
    probe = torch.zeros(1, 1)
    for (t, tn), st in zip(chain, stochastic):
        smod.inverse_step(probe, probe, t, tn, schedule, noise=probe if st else None, **opts)
    if plan.regularize and schedule.prediction_type != "epsilon":
        raise ValueError(f"the edit-enhancement regularizer acts on predicted noise, but the schedule's "
                         f"prediction_type is {schedule.prediction_type!r}; turn it off (reg_rounds=0) for this model")
    if plan.noise_correction != "none" and not smod.ADDS_NOISE:
        raise ValueError(f"noise_correction {plan.noise_correction!r} corrects the fresh noise of stochastic samplers; "
                         f"the {smod.NAME!r} step adds none: use noise_correction='none'")
    return stochastic


def _finite_or_raise(z, res, t, step_index, what):
    if bool(torch.isfinite(z).all()):
        return
    bad = (~torch.isfinite(res)).any(1).nonzero().flatten().tolist() if res is not None else []
    where = f"renoising iteration i={bad[0]} (of i=0..{res.shape[0] - 1})" if bad else what
    raise NonFiniteLatentError(f"non-finite latent at inversion step {step_index} (timestep t={t}), {where}; "
                               f"{HINT}")


HINT = ("check the model, its dtype (fp16 overflow), the guidance scale (large values overflow) and the plan's "
        "iterations")


def _non_finite_solve(e, t, step_index):
    """fixed_point's NonFiniteError inside inversion step `step_index` as a NonFiniteLatentError."""
    where = "the averaged answer" if e.call is None else f"renoising iteration i={e.call - 1}"
    return NonFiniteLatentError(f"non-finite latent at inversion step {step_index} (timestep t={t}), {where} "
                                f"(samples {e.samples}); {HINT}")


# ---------------------------------------------------------------------------------------------- the loop

def _regularized(plan, i, a):
    """Whether iteration i's output goes through the regularizer R (the reference's rule)."""
    return plan.regularize and (i >= a or (not plan.average and i > 0))


def _solve(denoiser, smod, schedule, plan, opts, z_prev, t, tn, noise, z_ref, generator, grad, grad_opts, at=None,
           shifts=None, e_prev=None):
    """One ReNoise step: the FixedPointResult of G_t (z_t = .z, residuals [calls, B]), inv(e), the
    inverse step G_t's last model output goes through, and that last raw model output. at:
    plan.at(t), given when t is a tensor; shifts: the regularizer's shifts, one entry per call of R
    in order (_step_shifts), else drawn from `generator` as R runs. e_prev: a model output to warm
    start from (the iteration starts at inv(warm_output(e_prev)) instead of z_prev; plan.warm_start)."""
    k, (a, _), weights = plan.at(t) if at is None else at
    reg = plan.regularize
    e_ref, last = [], {}
    draws = None if shifts is None else list(shifts)

    def R(e):
        return regularizers.regularize(e, e_ref[0], generator, lambda_kl=plan.lambda_kl, lambda_ac=plan.lambda_ac,
                                       rounds=plan.reg_rounds, rolls=plan.reg_rolls,
                                       shifts=None if draws is None else draws.pop(0))

    def inv(e):
        return smod.inverse_step(z_prev, e, t, tn, schedule, noise=noise, **opts)

    def g(z, i):
        if reg and i == 0:
            ref, e = denoiser(torch.cat([z_ref, z]), t).chunk(2)
            e_ref.append(ref)
        else:
            e = denoiser(z, t)
        last["e"] = e
        z_next = inv(R(e) if _regularized(plan, i, a) else e)
        return (z_next, e) if weights is not None else z_next

    z_start = z_prev if e_prev is None else inv(_warm_output(plan, smod, schedule, opts, e_prev, noise, t, tn))
    # tol applies to the residual in the model's input scale (Euler's x is the latent times √(σ² + 1))
    tol = _step_tol(plan, t)
    tol = None if tol is None else tol / smod.model_input(torch.ones(()), t, schedule)
    if weights is not None:
        res = fixed_point.iterate(g, z_start, k + 1, weights=weights, indexed=True, tol=tol,
                                  readout=lambda e_mean: inv(R(e_mean) if reg else e_mean), relax=plan.relax, grad=grad,
                                  **grad_opts)
    else:
        res = fixed_point.iterate(g, z_start, k + 1, indexed=True, anderson=plan.anderson, relax=plan.relax,
                                  relax_start=plan.relax_start, tol=tol, tol_plain=plan.tol_plain,
                                  grad=grad, **grad_opts)
    return res, inv, last["e"]


def _step_tol(plan, t):
    """plan.tol_at(t); a 0-d tensor where t is one (a compiled step: no host sync)."""
    if plan.first_tol is None or not isinstance(t, torch.Tensor):
        return plan.tol_at(t)
    first = torch.as_tensor(plan.first_tol, dtype=torch.float64, device=t.device)
    return torch.where(t < plan.first_until, first, torch.as_tensor(plan.tol, dtype=torch.float64, device=t.device))


def _extrapolated(e1, e2, t, t1, t2):
    """The model output at t on the straight line through e1 (at t1) and e2 (at t2):
    e1 + (t - t1)/(t1 - t2)·(e1 - e2). The steps' timesteps are numbers or 0-d tensors."""
    r = (t - t1) / (t1 - t2)
    if isinstance(r, torch.Tensor):
        r = r.to(e1.dtype)
    return e1 + r * (e1 - e2)


def _warm_output(plan, smod, schedule, opts, e_prev, noise, t, tn):
    """The model output a warm start guesses for step (t, t'): e_prev, or ("previous-noise", on a
    stochastic step) e_prev - c·n with c = noise_coeff(t, t') / (x's noise level at t'): e_prev was
    the output at z_prev, whose noise the step's own noise n is part of (Euler-ancestral:
    c = σ_up / σ_t')."""
    if plan.warm_start not in ("previous-noise", "extrapolate") or noise is None:
        return e_prev
    one = torch.ones((), dtype=torch.float64)
    level = smod.add_noise(torch.zeros((), dtype=torch.float64), one, tn, schedule)
    c = smod.noise_coeff(t, tn, schedule, **opts) / level
    return e_prev - c.to(e_prev.dtype) * noise


def _step_shifts(plan, at, like, generator):
    """The regularizer's random shifts for one step, drawn now in the order R would draw them while
    the step runs (one entry per call of R; None entries where R draws nothing), on like's device."""
    k, (a, _), weights = at
    n = sum(_regularized(plan, i, a) for i in range(k + 1)) + int(plan.regularize and weights is not None)
    if not (plan.lambda_ac > 0 and plan.reg_rolls > 0):
        return [None] * n
    b, c, h, w = like.shape
    return [regularizers.draw_shifts(generator, b, c, h, w, plan.reg_rounds, plan.reg_rolls).to(like.device)
            for _ in range(n)]


def _step(denoiser, smod, schedule, plan, opts, z_prev, t, tn, noise, z_ref, at, shifts, correct, e_prev=None):
    """One whole inversion step with no host sync, the region `compile=` compiles: the solve (K+1
    model calls, inverse steps, averaging, regularizer with pre-drawn shifts), then, with `correct`,
    noise correction (one more call). -> (z_t, residuals [K+1, B], noise, all finite: bool tensor,
    the step's last model output)."""
    fp, _, e_last = _solve(denoiser, smod, schedule, plan, opts, z_prev, t, tn, noise, z_ref, None, "none", {}, at,
                           shifts, e_prev)
    z = fp.z
    finite = torch.isfinite(z).all()
    if correct:
        e_last = denoiser(z, t)
        z, noise = _correct(plan, smod, schedule, opts, fp, noise, z, e_last, z_prev, t, tn)
        finite = finite & torch.isfinite(z).all() & torch.isfinite(noise).all()
    return z, fp.residuals, noise, finite, e_last


def _correct(plan, smod, schedule, opts, fp, noise, z, e, z_prev, t, tn):
    """Noise correction after a solve -> (z_t, corrected noise). The answer z = g(a) gets its n* (the
    noise that makes z's denoising step land on z_prev) from its model output e, the call noise
    correction makes; every point x the solve evaluated has its n* without a call
    (noise_correction.target_from_map, from g(x)). With Anderson (fp.best), the accepted point x of
    smallest residual replaces z, per sample, where its corrected noise ends closer to its n*: the
    step's denoising from it then misses z_prev by less (C·‖n - n*‖). On a step that does not contract,
    g(a) can sit farther from consistency than a, and noise correction moves the noise at most
    nc_steps·nc_lr. Not with the regularizer, whose g inverts R(e), not e."""
    target = noise_correction.target_noise(smod, z, e, z_prev, t, tn, schedule, **opts)
    fixed = noise_correction.toward(plan.noise_correction, noise, target, plan.nc_steps, plan.nc_lr)
    if fp.best is None or plan.regularize:
        return z, fixed
    x, gx, _ = fp.best
    alt = noise_correction.target_from_map(smod, noise, x, gx, t, tn, schedule, **opts)
    alt_fixed = noise_correction.toward(plan.noise_correction, noise, alt, plan.nc_steps, plan.nc_lr)
    miss = lambda n, goal: (n.to(goal.dtype) - goal).flatten(1).norm(dim=1)  # noqa: E731
    pick = (miss(alt_fixed, alt) < miss(fixed, target)).reshape(-1, *[1] * (z.ndim - 1))
    return torch.where(pick, x, z), torch.where(pick, alt_fixed, fixed)


def _as_tensor_t(t, device):
    """A timestep as a 0-d tensor (int64, or float64 for fractional ones) so that one compiled step
    serves every timestep; None stays None."""
    if t is None or isinstance(t, torch.Tensor):
        return t
    return torch.tensor(t, dtype=torch.int64 if isinstance(t, int) else torch.float64, device=device)


def _compiled_step(region, denoiser, smod, schedule, plan, opts, z_prev, t, tn, noise, z_ref, generator, stochastic,
                   step_index, e_prev=None):
    """One step through the compiled region: the shifts drawn first, timesteps as tensors, one host
    sync for the non-finite check. -> (z_t, residuals, noise, model calls, last model output)."""
    at = plan.at(t)
    correct = stochastic and plan.noise_correction != "none"
    shifts = _step_shifts(plan, at, z_prev, generator)
    schedule.table(z_prev.device)          # the region reads the device's schedule tables; made here, not there
    z, res, noise, finite, e_last = region(denoiser, smod, schedule, plan, opts, z_prev,
                                           _as_tensor_t(t, z_prev.device), _as_tensor_t(tn, z_prev.device), noise,
                                           z_ref, at, shifts, correct, e_prev)
    calls = at[0] + 1 + int(correct)
    _count_calls(denoiser, calls)
    if not bool(finite):
        _finite_or_raise(z, res, t, step_index, "the averaged answer")
        _finite_or_raise(noise, None, t, step_index, "noise correction")
    return z, res, noise, calls, e_last


def _count_calls(denoiser, n):
    """Tell a denoiser with a count_calls(n) method (GuidedDenoiser) the calls a compiled region made."""
    count = getattr(denoiser, "count_calls", None)
    if count is not None:
        count(n)


GRAD_OPTS = ("phantom_steps", "backward_iters", "backward_tol", "backward_anderson")


def invert(denoiser, z0, schedule, sampler, num_steps, plan="sdxl-turbo", *, noises=None, generator=None,
           strength=1.0, sampler_opts=None, callback=None, grad="none", grad_opts=None,
           jacobian_iters=0, compile=None) -> InversionResult:
    """Invert z0 [B, ...] to z_T along `schedule`'s `num_steps`-step chain for `sampler`.

    denoiser(x, t) -> model output for x in the sampler's space; it must accept a batch of 2B when
    the plan regularizes. plan: a preset name or a Plan. noises: the stochastic steps' noises, one
    per inverted step in denoising order (a list, None entries drawn from `generator`, or a tensor
    [n, *z0.shape]). strength < 1 inverts only the last int(num_steps·strength) steps.
    callback(step_index, t, z_t) runs after each inversion step. grad: "none" | "unrolled" |
    "phantom" | "implicit" (module docstring); grad_opts: fixed_point.iterate's gradient keywords
    (phantom_steps, backward_iters, backward_tol, backward_anderson). jacobian_iters > 0: power
    iterations for each step's Jacobian norm. compile: None (eager) or a renoise.speed mode
    ("compile", "max-autotune", "cuda-graphs"): each timestep's whole solve and noise correction run
    as one compiled region (renoise.speed.compiled_step; grad="none" only), with one host sync per
    step for the non-finite check; same values and model calls as eager (with the plan's tol: the
    same values, but each step runs all K + 1 calls, converged samples frozen, where eager stops
    once all have converged). Returns an InversionResult.
    """
    if grad not in fixed_point.GRAD_MODES:
        raise ValueError(f"unknown grad mode {grad!r}; expected one of {', '.join(map(repr, fixed_point.GRAD_MODES))}")
    grad_opts = dict(grad_opts or {})
    unknown = sorted(set(grad_opts) - set(GRAD_OPTS))
    if unknown:
        raise ValueError(f"unknown grad_opts {unknown}; expected some of {', '.join(GRAD_OPTS)}")
    if isinstance(jacobian_iters, bool) or not isinstance(jacobian_iters, int) or jacobian_iters < 0:
        raise ValueError(f"jacobian_iters (power iterations, 0: off) must be an int >= 0, got {jacobian_iters!r}")
    region = None
    if compile is not None:
        if grad != "none" or jacobian_iters:
            raise ValueError("compile= runs the inversion for inference only; use grad='none' and jacobian_iters=0, "
                             "or compile=None")
        region = compiling.compiled(_step, compile, z0.device if isinstance(z0, torch.Tensor) else None)
    with torch.set_grad_enabled(grad != "none" and torch.is_grad_enabled()):
        return _invert(denoiser, z0, schedule, sampler, num_steps, plan, noises, generator, strength, sampler_opts,
                       callback, grad, grad_opts, jacobian_iters, region)


def _invert(denoiser, z0, schedule, sampler, num_steps, plan, noises, generator, strength, sampler_opts, callback,
            grad, grad_opts, jacobian_iters, region=None):
    plan = presets.resolve(plan)
    smod = _sampler(sampler)
    opts = dict(sampler_opts or {})
    if not isinstance(z0, torch.Tensor) or not z0.is_floating_point() or z0.dim() < 2:
        raise ValueError("z0 must be a floating-point tensor [B, ...]")
    if not bool(torch.isfinite(z0).all()):
        raise ValueError("z0 contains NaN or inf")
    start = _start(num_steps, strength)
    chain = schedule.chain(num_steps, smod.NAME)[start:]
    stochastic = _check_sampler(smod, schedule, plan, chain, opts)
    noises = _noises(noises, chain, stochastic, z0, generator)
    z_ref_noise = None
    if plan.regularize:
        if generator is None:
            raise ValueError("the edit-enhancement regularizer draws random shifts (and the reference noise): "
                             "pass a torch.Generator as generator=")
        if plan.reference_noise == "noised":
            z_ref_noise = _randn(z0, generator)
    if plan.regularize and grad == "implicit":
        raise ValueError("grad='implicit' differentiates the fixed point of one map G_t, but the edit-enhancement "
                         "regularizer draws new random shifts at every call; turn it off (reg_rounds=0) or use "
                         "grad='unrolled' or 'phantom'")
    if jacobian_iters and torch.is_inference_mode_enabled():
        raise ValueError("jacobian_iters needs autograd, which torch.inference_mode turns off; use torch.no_grad")

    if plan.solver != "fixed-point":                 # a flow-inversion anchor (renoise.flow_anchors)
        return _invert_anchor(denoiser, z0, schedule, smod, num_steps, plan, generator, start, chain, opts, callback,
                              grad, jacobian_iters, region)

    z, trajectory, residuals, calls = z0, [z0], [], 0
    contraction, jacobian_norm = [], [] if jacobian_iters else None
    e_last, e_older, warm = None, None, plan.warm_start != "none"
    for step_index, i in enumerate(reversed(range(len(chain)))):
        t, tn = chain[i]
        z_ref = None
        if plan.regularize:
            z_ref = z0 if z_ref_noise is None else smod.add_noise(z0, z_ref_noise, t, schedule)
        z_prev = z
        e_guess = e_last if warm else None
        if plan.warm_start == "extrapolate" and e_older is not None and not any(stochastic[i:i + 3]):
            e_guess = _extrapolated(e_last, e_older, t, chain[i + 1][0], chain[i + 2][0])
        e_older = e_last
        if region is not None:
            z, res, noises[i], evals, e_last = _compiled_step(region, denoiser, smod, schedule, plan, opts, z_prev,
                                                              t, tn, noises[i], z_ref, generator, stochastic[i],
                                                              step_index, e_guess)
            calls += evals
            contraction.append(fixed_point.contraction(res))
        else:
            try:
                fp, inv, e_last = _solve(denoiser, smod, schedule, plan, opts, z_prev, t, tn, noises[i], z_ref,
                                         generator, grad, grad_opts, e_prev=e_guess)
            except fixed_point.NonFiniteError as e:
                raise _non_finite_solve(e, t, step_index) from None
            z, res = fp.z, fp.residuals
            calls += fp.evals + fp.graph_evals
            _finite_or_raise(z, res, t, step_index, "the averaged answer")
            contraction.append(fp.contraction())
            if jacobian_iters:
                jacobian_norm.append(fixed_point.spectral_norm(lambda x: inv(denoiser(x, t)), z, jacobian_iters))
                calls += 1
            if stochastic[i] and plan.noise_correction != "none":
                e_last = denoiser(z, t)
                calls += 1
                z, noises[i] = _correct(plan, smod, schedule, opts, fp, noises[i], z, e_last, z_prev, t, tn)
                _finite_or_raise(noises[i], None, t, step_index, "noise correction")
        trajectory.append(z)
        residuals.append(res)
        if callback is not None:
            callback(step_index, t, z)

    timesteps = torch.tensor([t for t, _ in chain])
    return InversionResult(z, noises, torch.stack(trajectory), residuals, calls, timesteps, plan, smod.NAME, opts,
                           schedule, int(num_steps), start, {}, contraction, jacobian_norm)


def _invert_anchor(denoiser, z0, schedule, smod, num_steps, plan, generator, start, chain, opts, callback, grad,
                   jacobian_iters, region):
    """The plan's flow-inversion anchor (plan.solver) over the same chain, as an InversionResult."""
    from . import flow_anchors
    if region is not None or grad not in ("none", "unrolled") or jacobian_iters:
        raise ValueError(f"solver {plan.solver!r} (a flow-inversion anchor) runs eager, with grad='none' or "
                         "'unrolled' and jacobian_iters=0")
    z, trajectory, residuals, calls = flow_anchors.invert_chain(denoiser, z0, schedule, chain, plan, generator,
                                                                callback)
    _finite_or_raise(z, None, chain[0][0], len(chain) - 1, f"the {plan.solver} step")
    timesteps = torch.tensor([t for t, _ in chain])
    return InversionResult(z, [None] * len(chain), trajectory, residuals, calls, timesteps, plan, smod.NAME, opts,
                           schedule, int(num_steps), start, {}, [fixed_point.contraction(r) for r in residuals],
                           None)


def sample(denoiser, result: InversionResult, *, z_T=None, callback=None, grad="none", compile=None) -> torch.Tensor:
    """Denoise from result.z_T (or `z_T`) along the inverted chain with the stored noises.

    For editing, pass a denoiser with another prompt. callback(step_index, t, x) after each step.
    grad: "none" (torch.no_grad) or "unrolled" (record the steps, e.g. to backpropagate a
    reconstruction loss through a differentiable inversion). compile: None (eager) or a
    renoise.speed mode: each step (model call and sampler step) runs as one compiled region.
    """
    if grad not in ("none", "unrolled"):
        raise ValueError(f"sample's grad must be 'none' or 'unrolled' (it has no fixed point to differentiate "
                         f"implicitly), got {grad!r}")
    region = None
    if compile is not None:
        if grad != "none":
            raise ValueError("compile= runs sampling for inference only; use grad='none' or compile=None")
        region = compiling.compiled(_denoise_step, compile, result.z_T.device)
    with torch.set_grad_enabled(grad != "none" and torch.is_grad_enabled()):
        return _sample(denoiser, result, z_T, callback, region)


def _denoise_step(denoiser, smod, schedule, opts, x, t, tn, noise):
    """One denoising step: the region sample(compile=) compiles."""
    return smod.step(x, denoiser(x, t), t, tn, schedule, noise=noise, **opts)


def _sample(denoiser, result, z_T, callback, region=None):
    smod = _sampler(result.sampler)
    x = result.z_T if z_T is None else z_T
    if x.shape != result.z_T.shape:
        raise ValueError(f"z_T must have the inverted latent's shape {tuple(result.z_T.shape)}, got {tuple(x.shape)}")
    if result.plan.solver != "fixed-point":          # the anchor's own sampler (renoise.flow_anchors)
        from . import flow_anchors
        if region is not None:
            raise ValueError(f"solver {result.plan.solver!r} (a flow-inversion anchor) samples eager: use compile=None")
        x = flow_anchors.sample_chain(denoiser, x, result.schedule, result.chain, result.plan,
                                      y0=result.trajectory[0], callback=callback)
        _check_sampled([torch.isfinite(x.detach()).all()], [result.chain[-1]])
        return x
    finite = []
    for i, (t, tn) in enumerate(result.chain):
        if region is None:
            x = _denoise_step(denoiser, smod, result.schedule, result.sampler_opts, x, t, tn, result.noises[i])
        else:
            result.schedule.table(x.device)
            x = region(denoiser, smod, result.schedule, result.sampler_opts, x, _as_tensor_t(t, x.device),
                       _as_tensor_t(tn, x.device), result.noises[i])
            _count_calls(denoiser, 1)
        if callback is not None:
            callback(i, t, x)
        finite.append(torch.isfinite(x.detach()).all())
    _check_sampled(finite, result.chain)
    return x


def _check_sampled(finite, chain):
    """One host sync after sampling: NonFiniteLatentError naming the first denoising step whose
    output was NaN or inf (skipped under torch.compile and CUDA graph capture)."""
    if not finite or not fixed_point._syncable():
        return
    ok = torch.stack(finite).cpu()
    if bool(ok.all()):
        return
    i = int((~ok).nonzero()[0])
    raise NonFiniteLatentError(f"non-finite latent at denoising step {i} (timestep t={chain[i][0]}) of "
                               f"{len(chain)}; check the model, its dtype (fp16 overflow) and the guidance scale "
                               "(large values overflow)")
