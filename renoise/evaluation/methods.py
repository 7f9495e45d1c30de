"""Methods for `renoise eval`: named Plan overrides, written on the command line, and built-in grids.

    NAME:field=value,field=value      a Plan override (any renoise.presets.Plan field)
    NAME                              a built-in grid (paper-grid, ablation, convergence, per-call, peers,
                                      flow-anchors: flow models), a
                                      method of one (plain, K3, anderson-K3, no-patch-kl, ...), a preset
                                      name, `preset` (the run's --preset), or a peer (edict, null-text, ...)
    NAME:peer=PEER,field=value        a peer (renoise.peers) with its settings changed

An override starts from plain inversion (`Plan()`: K = 0, no averaging window beyond the last
iterate, no regularizer, no noise correction) unless it names a base with `preset=NAME`. The
run's sampler, step count and guidance (from --preset, --sampler, --steps, --guidance) apply to
every method, so that methods compare at equal steps; a method may still set them itself.

Values: integers, floats, true/false, none, words, and lists in brackets: `window=[3,4]`.

    K3:iters=3,average=false                      three renoising iterations, the last iterate
    anderson-K3:iters=3,anderson=3,average=false  the same with Anderson mixing (memory 3)
    no-kl:preset=sd15,lambda_kl=0                 the SD 1.5 preset without patch-KL

    edict-g1:peer=edict,guidance=1,edit_guidance=none   EDICT at guidance 1, edited at the run's guidance

A file of methods, one a line (`#` comments), is passed as `@FILE`.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import presets
from ..presets import PRESETS, WORD_FIELDS, Plan

__all__ = ["Method", "parse_methods", "parse_spec", "builtin_methods", "GRIDS", "RUN_PRESET"]

RUN_PRESET = "preset"                      # the method name that means "the run's --preset as it is"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


@dataclass(frozen=True)
class Method:
    """A named plan: `base` is None (plain inversion), a preset name, or RUN_PRESET; or a peer
    (`peer`: a resolved renoise.peers spec, run by renoise.peers.editors on the run's sampler and steps)."""
    name: str
    base: str | None = None
    overrides: dict = field(default_factory=dict)
    peer: dict | None = None

    def plan(self, run_preset: str, run_settings: dict) -> Plan:
        """The Plan this method runs: its base, the run's sampler/steps/guidance, then its overrides
        (a peer: plain inversion with the run's sampler and steps, its own plan fields and guidance)."""
        if self.peer is not None:
            own = {**self.peer.get("plan", {}), "guidance_scale": float(self.peer["guidance"]), "name": self.name}
            try:
                return Plan().replace(**{**run_settings, **own})
            except (TypeError, ValueError) as e:
                raise ValueError(f"method {self.name!r}: {e}") from None
        base = {None: None, RUN_PRESET: run_preset}.get(self.base, self.base)
        plan = Plan() if base is None else Plan.preset(base)
        try:
            return plan.replace(**{**run_settings, **self.overrides, "name": self.name})
        except (TypeError, ValueError) as e:
            raise ValueError(f"method {self.name!r}: {e}") from None


def _plain(name, **overrides):
    return Method(name, None, overrides)


def _preset(name, **overrides):
    return Method(name, RUN_PRESET, overrides)


def _paper_grid():
    """The paper's comparison (Table 2, Fig. 5/6): plain inversion, the preset, K ∈ {1, 3, 9}, and
    Anderson mixing (m = 3) at K ∈ {2, 3, 5}; tolerance stopping at 1e-3 (tol-K9)."""
    grid = [_plain("plain", iters=0), _preset(RUN_PRESET)]
    grid += [_plain(f"K{k}", iters=k, average=False) for k in (1, 3, 9)]
    grid += [_plain(f"anderson-K{k}", iters=k, anderson=3, average=False) for k in (2, 3, 5)]
    grid.append(_plain("tol-K9", iters=9, average=False, tol=1e-3))
    return grid


def _ablation():
    """The editability ablation: the run's preset with one enhancement switched off at a time."""
    return [_preset("full"), _preset("no-pairwise", lambda_ac=0.0), _preset("no-patch-kl", lambda_kl=0.0),
            _preset("no-noise-correction", noise_correction="none"), _preset("no-regularizer", reg_rounds=0)]


def _convergence():
    """Residual against iteration at every timestep: nine plain iterations, with and without Anderson."""
    return [_plain("K9", iters=9, average=False), _plain("anderson-K9", iters=9, anderson=3, average=False)]


def _per_call():
    """Quality per UNet call (issue 14): plain iteration at K = 1..9, Anderson, warm starts,
    tolerance stopping, over-relaxation and their combinations, beside plain inversion and the run's
    preset."""
    warm = dict(average=False, warm_start="previous")
    grid = [_plain("plain", iters=0), _preset(RUN_PRESET)]
    grid += [_plain(f"K{k}", iters=k, average=False) for k in (1, 2, 3, 5, 9)]
    grid += [_plain(f"anderson-K{k}", iters=k, anderson=3, average=False) for k in (3, 9)]
    grid += [_plain(f"warm-K{k}", iters=k, **warm) for k in (1, 2, 3)]
    grid += [_plain(f"warm-anderson-K{k}", iters=k, anderson=3, **warm) for k in (2, 3)]
    grid += [_plain("warm-tol", iters=9, tol=3e-3, **warm),
             _plain("warm-anderson-tol", iters=9, anderson=3, tol=3e-3, **warm),
             _plain("warm-anderson-tol-1e-2", iters=9, anderson=3, tol=1e-2, **warm)]
    relaxed = dict(anderson=3, relax=2.0, **warm)
    grid += [_plain("relax2-K3", iters=3, relax=2.0, average=False),
             _plain("warm-relax2-tol-1.5e-2", iters=9, relax=2.0, tol=1.5e-2, **warm)]
    grid += [_plain(f"warm-anderson-relax2-K{k}", iters=k, **relaxed) for k in (2, 3)]
    grid += [_plain(f"warm-anderson-relax2-tol-{tol}", iters=9, tol=float(tol), **relaxed)
             for tol in ("1e-2", "1.5e-2", "2e-2", "7e-2")]
    grid.append(_plain("warm-anderson-relax2-K2-tol-1e-2", iters=2, tol=1e-2, **relaxed))
    noisy = dict(relaxed, warm_start="previous-noise")        # = warm-* on deterministic steps
    for tol in ("1e-2", "2e-2"):
        grid += [_plain(f"warmnoise-anderson-relax2-tol-{tol}", iters=9, tol=float(tol), **noisy),
                 _plain(f"warmnoise-anderson-relax2-K2-tol-{tol}", iters=2, tol=float(tol), **noisy)]
    grid.append(_plain("warmnoise-K2", iters=2, average=False, warm_start="previous-noise"))
    return grid


def _peers():
    """The peers of ReNoise (renoise.peers, each at its paper's settings) beside the run's preset."""
    from .. import peers
    return [_preset(RUN_PRESET)] + [Method(name, None, {}, peers.resolve(name)) for name in peers.GROUP]


def _flow_anchors():
    """Flow-matching models (issue 23): the published plain Euler inversion and ReNoise's K = 0 (v at the
    noisier end), ReNoise K = 1..9 (plain iteration), each flow-inversion anchor (renoise.flow_anchors:
    euler-inversion, rf-solver, fireflow, rf-inversion at its paper's γ = 0.5 and η = 0.9 on the first
    quarter of the sampling steps; rf-inversion-eta0 without η, so that the image does not steer the
    reconstruction; the newer iterative uni-inv (UniEdit-Flow) and ftedit (FTEdit's Stage I)), our best
    (warm start, Anderson, over-relaxation, tolerance stopping) at budgets K = 2 and 9, one call a step from
    the previous step's velocity (warm-K0) or the line through the last two (extrap-K0), the demo-flow-fast
    preset (extrapolated, one call a step, up to 3 on the step leaving the image) and the run's preset; all at
    the run's steps. Calls per row are recorded: compare at equal calls (fireflow and uni-inv n + 1,
    rf-solver 2n, euler-inversion and rf-inversion n, ftedit 3n, K: n(K + 1) at most)."""
    grid = [Method("euler-inversion", "euler-inversion"), _plain("plain", iters=0)]
    grid += [_plain(f"K{k}", iters=k, average=False) for k in range(1, 10)]
    grid += [Method(name, name) for name in ("rf-solver", "fireflow", "rf-inversion", "uni-inv", "ftedit")]
    grid.append(Method("rf-inversion-eta0", "rf-inversion", {"rf_eta": 0.0}))
    relaxed = dict(anderson=3, relax=2.0, average=False, warm_start="previous")
    grid += [_plain("warm-anderson-relax2-K2-tol-1e-2", iters=2, tol=1e-2, **relaxed),
             _plain("warm-anderson-relax2-tol-1e-2", iters=9, tol=1e-2, **relaxed)]
    grid += [_plain(f"{name}-K0", iters=0, average=False, warm_start=ws)
             for name, ws in (("warm", "previous"), ("extrap", "extrapolate"))]
    grid += [Method("demo-flow-fast", "demo-flow-fast"), _preset(RUN_PRESET)]
    return grid


GRIDS = {"paper-grid": _paper_grid, "ablation": _ablation, "convergence": _convergence, "per-call": _per_call,
         "peers": _peers, "flow-anchors": _flow_anchors}


def builtin_methods() -> dict:
    """{name: Method} of every grid's methods (a name means the same method in every grid)."""
    return {m.name: m for grid in GRIDS.values() for m in grid()}


def parse_spec(spec: str) -> list[Method]:
    """One method spec (or a grid name) -> methods."""
    spec = spec.strip()
    if not spec:
        raise ValueError("empty method spec")
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not sep:
        if name in GRIDS:
            return GRIDS[name]()
        builtin = builtin_methods()
        if name in builtin:
            return [builtin[name]]
        if name in PRESETS:
            return [Method(name, name)]
        raise ValueError(f"method {name!r} is not a grid ({', '.join(GRIDS)}), a built-in method "
                         f"({', '.join(builtin)}) or a preset ({', '.join(PRESETS)}); write an override as "
                         "NAME:field=value,... (e.g. K3:iters=3,average=false)")
    _check_name(name)
    overrides = {}
    for item in _split(rest, spec):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"method {name!r}: {item.strip()!r} is not field=value")
        if key in overrides:
            raise ValueError(f"method {name!r}: field {key!r} given twice")
        words = WORD_FIELDS | {"peer", "edit_negative"}
        overrides[key] = value.strip() if key in words else _value(value.strip(), name, key)
    if "peer" in overrides:
        from .. import peers
        kind = overrides.pop("peer")
        try:
            return [Method(name, None, {}, peers.resolve(kind, **overrides))]
        except ValueError as e:
            raise ValueError(f"method {name!r}: {e}") from None
    base = overrides.pop("preset", None)
    if base is not None and base != RUN_PRESET and base not in PRESETS:
        raise ValueError(f"method {name!r}: unknown preset {base!r}; expected one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(Plan)} - {"name"})
    if unknown or "name" in overrides:
        known = ", ".join(f.name for f in dataclasses.fields(Plan) if f.name != "name")
        raise ValueError(f"method {name!r}: unknown plan field(s) {', '.join(unknown or ['name'])}; known: "
                         f"preset, {known}")
    return [Method(name, base, overrides)]


def parse_methods(specs) -> list[Method]:
    """Several specs (`@FILE` reads one spec a line) -> methods with unique names, in order."""
    methods = []
    for spec in specs:
        if spec.startswith("@"):
            path = Path(spec[1:])
            if not path.is_file():
                raise FileNotFoundError(f"methods file not found: {path}")
            from .data import read_utf8
            lines = [ln.split("#", 1)[0].strip() for ln in read_utf8(path, "methods file").splitlines()]
            methods += parse_methods([ln for ln in lines if ln])
        else:
            methods += parse_spec(spec)
    seen, unique = {}, []
    for m in methods:                      # grids share methods: the same method twice runs once
        if m.name in seen and seen[m.name] != m:
            raise ValueError(f"method name {m.name!r} appears twice; give each method its own name")
        if m.name not in seen:
            seen[m.name] = m
            unique.append(m)
    methods = unique
    if not methods:
        raise ValueError("no methods given")
    return methods


def _check_name(name):
    if not _NAME.match(name):
        raise ValueError(f"method name {name!r}: use letters, digits and . _ + = - (it names output files)")


def _split(text, spec):
    """Split on commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0:
            raise ValueError(f"method spec {spec!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"method spec {spec!r}: unbalanced '['")
    items.append(text[start:])
    return [s for s in items if s.strip()]


def _value(text, name, key):
    low = text.lower()
    if low == "none":
        return None
    if low in ("true", "false"):
        return low == "true"
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError(f"method {name!r}: {key}={text}: a list is written [a,b]")
        return tuple(_value(x.strip(), name, key) for x in text[1:-1].split(",") if x.strip())
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if not text:
        raise ValueError(f"method {name!r}: {key} has no value")
    return text


def run_plans(args, pipe, methods):
    """(run preset name, {method: Plan}) with the run's sampler/steps/guidance applied to every method."""
    preset = args.preset or presets.for_model(pipe, args.model)
    given = {"sampler": args.sampler, "num_steps": args.steps, "guidance_scale": args.guidance}
    base = presets.resolve(preset, **{k: v for k, v in given.items() if v is not None})
    run_settings = {"sampler": base.sampler, "num_steps": base.num_steps, "guidance_scale": base.guidance_scale}
    if args.noise_correction is not None:
        run_settings["noise_correction"] = args.noise_correction
    return preset, {m.name: m.plan(preset, run_settings) for m in methods}
