"""ReNoise plans: how many renoising iterations each inversion step runs, what is averaged, and the
edit-enhancement and noise-correction settings; with the paper's Table 1 values as named presets.

One inversion step at timestep t (see renoise.inversion) runs iterations i = 0..K, each one model
call; iteration i's inverse step gives the estimate the paper calls z_t^(i+1). So the paper's
1-based weights w_k belong to iteration index i = k - 1:

    paper  w1, w2        -> window (0, 2)      paper  w8..w10  -> window (7, 10)
    paper  w1..w4        -> window (0, 4)      paper  w6..w8   -> window (5, 8)
    paper  w2 = 1.0      -> window (1, 2)  (the last iterate of K = 1: no averaging in effect)

`window = (a, b)` is half-open over iteration indices. Steps with t < `first_until` (250) use
`first_iters` / `first_window` / `first_weights`, all others `iters` / `window` / `weights`.
Averaging (`average=True`) takes the weighted mean of the *raw model outputs* of the window's
iterations (uniform weights unless given) and the step's answer is one inverse step with it
(regularized when the regularizer is on). The regularizer acts on iteration i's output when
i >= a, or, with averaging off, also when i > 0 — the reference implementation's rule.

The paper's table gives no first-step cap; iterations past the window cannot change an averaged
answer, so the paper presets run the first steps only up to their window's end
(first_iters = b - 1). Every field can be overridden: `Plan.preset("sdxl-turbo").replace(iters=5,
window=(3, 6))` or `resolve("sdxl", lambda_kl=0.0)`; an inconsistent plan is refused on creation.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from . import samplers as _samplers

NOISE_CORRECTIONS = ("none", "override", "optimize", "clip")
REFERENCE_NOISES = ("noised", "clean")
WARM_STARTS = ("none", "previous", "previous-noise", "extrapolate")
RELAX_STARTS = ("plain", "relaxed")
SOLVERS = ("fixed-point", "euler", "rf-solver", "fireflow", "rf-inversion", "uni-inv",
           "ftedit")   # = renoise.flow_anchors.SOLVERS


@dataclass(frozen=True)
class Plan:
    """A full ReNoise configuration (defaults: plain DDIM inversion, 50 steps).

    sampler, num_steps, guidance_scale  what the preset was tuned with (guidance <= 1: no CFG; FLUX.1-dev: the
                                        guidance value its embedding takes, one call either way)
    iters, window, weights              K, averaging window [a, b) and weights for t >= first_until
    first_iters, first_window, first_weights, first_tol   the same for t < first_until (None: as the main
                                        ones; first_tol needs tol)
    average                             average the window (False: the answer is the last iterate)
    lambda_ac, lambda_kl, reg_rounds, reg_rolls   edit-enhancement regularizer (off: reg_rounds = 0
                                        or both weights 0); see renoise.regularizers
    reference_noise                     "noised": e_ref = model output at add_noise(z0, n, t);
                                        "clean": at z0 itself (the reference's SD 1.x oddity)
    noise_correction, nc_steps, nc_lr   "none" | "override" | "optimize" | "clip" (stochastic samplers only;
                                        a flow sampler's plan refuses it, and the regularizer, on creation;
                                        renoise.noise_correction). "clip" moves at most nc_steps·nc_lr
    anderson                            m > 0: safeguarded Anderson mixing of the iterates (no averaging)
    relax                               β: each iteration moves to z + β·(G(z) - z) (1: plain; the
                                        answer is still the last G(z)); over-relaxation (β ≈ 2) speeds up
                                        the slow steps, whose Jacobian has eigenvalues near 1 (use it with
                                        Anderson, whose safeguard keeps the fast steps from overshooting;
                                        there β is adaptive per sample, relax its upper bound, and a sample
                                        whose relaxed step grows its residual goes on un-relaxed:
                                        renoise.fixed_point); β < 1 damps instead, shrinking an error
                                        with eigenvalue λ by |1 - β(1 - λ)|: steps where plain iteration
                                        oscillates (λ near -1) settle, slow ones (λ near 1) slow down more
    relax_start                         how that adaptive β starts (Anderson with relax > 1 only): "plain":
                                        the first plain step un-relaxed, its contraction sets β (safest off
                                        home ground; costs one un-relaxed call a step); "relaxed": the first
                                        step at β = relax, β then set from its ratio (keeps short budgets,
                                        K <= 2, fast on slow steps)
    tol                                 stop a step's iterations for a sample once its residual (RMS of the
                                        latent's last change, in the model's input scale: Euler's x over
                                        √(σ² + 1)) is <= tol; K + 1 calls at most (None: always K + 1)
    tol_plain                           Anderson only: a sample also stops once its residual is <= r₀·L̂^n
                                        (n = tol_plain), what n plain iterations would leave at the contraction
                                        L̂ its plain step measured, r₀ its first residual (renoise.fixed_point):
                                        on slow steps that comes long before a tight tol (None: tol alone)
    warm_start                          "none": iterate from z_{t'} (the paper); "previous": from
                                        inverse_step(z_{t'}, e_prev), e_prev the previous step's last model
                                        output (no extra call; the first step starts from z_{t'});
                                        "previous-noise": the same with the step's fresh noise taken out
                                        of e_prev on stochastic steps (renoise.inversion._warm_output);
                                        "extrapolate": from the straight line in t through the last two
                                        steps' model outputs, on a deterministic step after two others
                                        (else as "previous-noise"): one order closer on smooth ODE paths
    solver                              "fixed-point" (ReNoise, everything above); or a flow-inversion anchor
                                        (flow_euler only, none of the fixed-point fields): "euler" (plain
                                        Euler inversion, v at the known point's own σ), "rf-solver",
                                        "fireflow", "rf-inversion", "uni-inv" (UniEdit-Flow), "ftedit"
                                        (FTEdit's Stage I) (renoise.flow_anchors); renoise.sample
                                        then samples with the anchor's own steps
    rf_gamma, rf_eta, rf_eta_window     RF-Inversion's controllers: γ pulls the inversion towards a fixed
                                        noise (0.5, its paper's default); η pulls sampling towards the
                                        inverted image on the steps [start·n, stop·n) of rf_eta_window
                                        (0 = off, our default: with η > 0 the image itself steers the
                                        reconstruction; its edit example uses η = 0.9 on (0, 0.25))
    """

    name: str = "custom"
    sampler: str = "ddim"
    num_steps: int = 50
    guidance_scale: float = 1.0
    iters: int = 0
    window: tuple = (0, 1)
    weights: tuple | None = None
    first_iters: int | None = None
    first_window: tuple | None = None
    first_weights: tuple | None = None
    first_until: float = 250
    average: bool = True
    lambda_ac: float = 0.0
    lambda_kl: float = 0.0
    reg_rounds: int = 0
    reg_rolls: int = 5
    reference_noise: str = "noised"
    noise_correction: str = "none"
    nc_steps: int = 10
    nc_lr: float = 1.8
    anderson: int = 0
    relax: float = 1.0
    relax_start: str = "plain"
    tol: float | None = None
    first_tol: float | None = None
    tol_plain: int | None = None
    warm_start: str = "none"
    solver: str = "fixed-point"
    rf_gamma: float = 0.5
    rf_eta: float = 0.0
    rf_eta_window: tuple = (0.0, 0.25)

    def __post_init__(self):
        for f in ("window", "first_window", "weights", "first_weights", "rf_eta_window"):
            v = getattr(self, f)
            if v is not None:
                object.__setattr__(self, f, tuple(v))
        if self.sampler not in _samplers.NAMES:
            raise ValueError(f"plan {self.name!r}: unknown sampler {self.sampler!r}; expected one of "
                             f"{', '.join(_samplers.NAMES)}")
        _int(self, "num_steps", 1)
        _int(self, "iters", 0)
        if self.first_iters is not None:
            _int(self, "first_iters", 0)
        for main, (k, win, w) in (("", self.regime(True)), ("first_", self.regime(False))):
            _check_window(self, main, k, win, w)
        for f in ("guidance_scale", "lambda_ac", "lambda_kl", "first_until"):
            if not (math.isfinite(getattr(self, f)) and getattr(self, f) >= 0):
                raise ValueError(f"plan {self.name!r}: {f} must be a finite number >= 0, got {getattr(self, f)!r}")
        _int(self, "reg_rounds", 0)
        _int(self, "reg_rolls", 1)
        _int(self, "nc_steps", 0)
        _int(self, "anderson", 0)
        if isinstance(self.relax, bool) or not isinstance(self.relax, (int, float)) or not (
                math.isfinite(self.relax) and self.relax > 0):
            raise ValueError(f"plan {self.name!r}: relax must be a finite number > 0 (1: plain iteration), "
                             f"got {self.relax!r}")
        if self.relax_start not in RELAX_STARTS:
            raise ValueError(f"plan {self.name!r}: relax_start must be one of {', '.join(RELAX_STARTS)}, "
                             f"got {self.relax_start!r}")
        if not (math.isfinite(self.nc_lr) and self.nc_lr > 0):
            raise ValueError(f"plan {self.name!r}: nc_lr must be > 0, got {self.nc_lr!r}")
        if self.noise_correction not in NOISE_CORRECTIONS:
            raise ValueError(f"plan {self.name!r}: noise_correction must be one of {', '.join(NOISE_CORRECTIONS)}, "
                             f"got {self.noise_correction!r}")
        if self.reference_noise not in REFERENCE_NOISES:
            raise ValueError(f"plan {self.name!r}: reference_noise must be one of {', '.join(REFERENCE_NOISES)}, "
                             f"got {self.reference_noise!r}")
        for f in ("tol", "first_tol"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not (math.isfinite(v) and v >= 0)):
                raise ValueError(f"plan {self.name!r}: {f} must be a finite number >= 0 or None, got {v!r}")
        if self.first_tol is not None and self.tol is None:
            raise ValueError(f"plan {self.name!r}: first_tol (the tol of steps with t < first_until) needs a tol for "
                             "the other steps; set tol too, or first_tol=None (--first-tol none) to run all K + 1 "
                             "calls everywhere")
        if self.tol_plain is not None:
            _int(self, "tol_plain", 1)
            if not self.anderson:
                raise ValueError(f"plan {self.name!r}: tol_plain={self.tol_plain} compares Anderson's residual with "
                                 "plain iteration's; it needs anderson > 0 (plain iteration: set iters instead)")
        if self.warm_start not in WARM_STARTS:
            raise ValueError(f"plan {self.name!r}: warm_start must be one of {', '.join(WARM_STARTS)}, "
                             f"got {self.warm_start!r}")
        if self.sampler in FLOW_SAMPLERS:
            _check_flow(self)
        if self.anderson and self.average:
            raise ValueError(f"plan {self.name!r}: Anderson mixing (anderson={self.anderson}) returns the last "
                             "iterate and cannot be combined with averaging; set average=False")
        self._check_solver()

    def _check_solver(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"plan {self.name!r}: solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        for f in ("rf_gamma", "rf_eta"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 <= v <= 1):
                raise ValueError(f"plan {self.name!r}: {f} (RF-Inversion's controller) must be a number in [0, 1], "
                                 f"got {v!r}")
        w = self.rf_eta_window
        if len(w) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w) or not (
                0 <= w[0] <= w[1] <= 1):
            raise ValueError(f"plan {self.name!r}: rf_eta_window must be fractions (start, stop) of the sampling steps "
                             f"with 0 <= start <= stop <= 1, got {w!r}")
        if self.solver == "fixed-point":
            return
        if self.sampler != "flow_euler":
            raise ValueError(f"plan {self.name!r}: solver {self.solver!r} is a flow-inversion anchor and runs with the "
                             f"flow_euler sampler (SD3 / FLUX.1), not {self.sampler!r}")
        fp = {"iters": 0, "first_iters": None, "anderson": 0, "relax": 1.0, "tol": None, "first_tol": None,
              "warm_start": "none", "noise_correction": "none"}
        bad = [f for f, v in fp.items() if getattr(self, f) != v and not (f == "first_iters" and self.first_iters == 0)]
        if bad or self.regularize:
            raise ValueError(f"plan {self.name!r}: solver {self.solver!r} takes no fixed-point settings "
                             f"({', '.join(bad or ['the regularizer'])}); leave them at their defaults or use "
                             "solver='fixed-point'")

    # ------------------------------------------------------------------ use
    @property
    def regularize(self) -> bool:
        """Whether the edit-enhancement regularizer runs (and the reference map is computed)."""
        return self.reg_rounds > 0 and (self.lambda_ac > 0 or self.lambda_kl > 0)

    def regime(self, main: bool):
        """(K, window, weights-over-window or None) for the main (t >= first_until) or first steps."""
        if main:
            return self.iters, self.window, self.weights
        k = self.iters if self.first_iters is None else self.first_iters
        win = self.window if self.first_window is None else self.first_window
        w = self.weights if self.first_window is None and self.first_weights is None else self.first_weights
        return k, win, w

    def tol_at(self, t):
        """The residual tolerance of the inversion step at timestep t: first_tol where t < first_until (if
        set), else tol (None: none)."""
        return self.first_tol if self.first_tol is not None and float(t) < self.first_until else self.tol

    def at(self, t):
        """(K, window, weights over iterations 0..K or None) for the inversion step at timestep t.

        The weights are None when averaging is off; otherwise K+1 numbers, zero outside the window.
        """
        k, (a, b), w = self.regime(float(t) >= self.first_until)
        if not self.average:
            return k, (a, b), None
        w = [1.0] * (b - a) if w is None else list(w)
        return k, (a, b), [0.0] * a + [float(x) for x in w] + [0.0] * (k + 1 - b)

    def replace(self, **changes) -> "Plan":
        """A copy with `changes` applied (validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown plan field(s) {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> "Plan":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        return PRESETS[name]

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(**d)


# samplers of flow-matching (velocity) models: they run on a FlowSchedule and add no noise
FLOW_SAMPLERS = ("flow_euler",)


def _check_flow(plan):
    """Refuse the plan parts that do not apply to a velocity model's deterministic flow step."""
    if plan.noise_correction != "none":
        raise ValueError(f"plan {plan.name!r}: noise_correction {plan.noise_correction!r} corrects the fresh noise of "
                         f"stochastic samplers; the flow Euler step adds none: use noise_correction='none' with "
                         f"the {plan.sampler!r} sampler (SD3 / FLUX.1)")
    if plan.regularize:
        raise ValueError(f"plan {plan.name!r}: the edit-enhancement regularizer acts on predicted noise (epsilon "
                         f"models); SD3 / FLUX.1 (sampler {plan.sampler!r}, prediction_type 'flow') predict velocity: "
                         "turn it off (reg_rounds=0 or lambda_ac = lambda_kl = 0)")


# the fields whose values are words, "none" among them (not None): written as they are
WORD_FIELDS = frozenset(f.name for f in dataclasses.fields(Plan) if isinstance(f.default, str)) - {"name"}


def _int(plan, field, low):
    v = getattr(plan, field)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"plan {plan.name!r}: {field} must be an int >= {low}, got {v!r}")


def _check_window(plan, prefix, k, win, w):
    if len(win) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in win):
        raise ValueError(f"plan {plan.name!r}: {prefix}window must be a pair of ints (a, b), got {win!r}")
    a, b = win
    if not 0 <= a < b <= k + 1:
        raise ValueError(f"plan {plan.name!r}: {prefix}window {win} lies outside the iterations 0..{k} of "
                         f"{prefix}iters={k}; need 0 <= a < b <= {k + 1}")
    if w is not None:
        if len(w) != b - a:
            raise ValueError(f"plan {plan.name!r}: {prefix}weights has {len(w)} entries but {prefix}window {win} "
                             f"covers {b - a} iterations")
        if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"plan {plan.name!r}: {prefix}weights must be finite, non-negative and not all zero, "
                             f"got {w!r}")


_SD = dict(sampler="ddim", num_steps=50, iters=1, window=(1, 2), first_iters=1, first_window=(0, 2),
           lambda_ac=10.0, reg_rounds=4, reg_rolls=5)

PRESETS = {
    # Table 1, SD 1.4 (used for 1.5 too): DDIM 50 steps, K = 1, w1, w2 = 0.5 (t < 250), w2 = 1.0 after
    "sd14": Plan(name="sd14", lambda_kl=0.05, **_SD),
    "sd15": Plan(name="sd15", lambda_kl=0.05, **_SD),
    # Table 1, SDXL: as SD with λ_patch-KL = 0.055
    "sdxl": Plan(name="sdxl", lambda_kl=0.055, **_SD),
    # Table 1, SDXL Turbo: Euler-ancestral 4 steps, K = 9, w1..w4 = 0.25 (t < 250), w8..w10 = 1/3 after;
    # the paper's full method: noise correction by optimisation
    "sdxl-turbo": Plan(name="sdxl-turbo", sampler="euler_ancestral", num_steps=4, guidance_scale=0.0,
                       iters=9, window=(7, 10), first_iters=3, first_window=(0, 4),
                       lambda_ac=10.0, lambda_kl=0.055, reg_rounds=4, reg_rolls=5, noise_correction="optimize"),
    # Table 1, LCM LoRA: 4 steps, K = 7, w1..w4 (t < 250), w6..w8 after, λ 20 / 0.075 (the table lists
    # "DDIM" as its noise sampler; LCM-LoRA samples with the LCM sampler, which is what runs here)
    "lcm-lora": Plan(name="lcm-lora", sampler="lcm", num_steps=4, guidance_scale=1.0,
                     iters=7, window=(5, 8), first_iters=3, first_window=(0, 4),
                     lambda_ac=20.0, lambda_kl=0.075, reg_rounds=4, reg_rolls=5, noise_correction="optimize"),
    # the reference code's own SDXL-Turbo defaults: K = 9 (5 on the first steps), windows [0, 5) and
    # [8, 10), λ_ac = 20, λ_kl = 0.065, 4 rounds × 5 rolls, noise correction optimize (10 × lr 1.8)
    "sdxl-turbo-reference": Plan(name="sdxl-turbo-reference", sampler="euler_ancestral", num_steps=4,
                                 guidance_scale=0.0, iters=9, window=(8, 10), first_iters=5, first_window=(0, 5),
                                 lambda_ac=20.0, lambda_kl=0.065, reg_rounds=4, reg_rolls=5,
                                 noise_correction="optimize", nc_steps=10, nc_lr=1.8),
    # renoise's own demo model (renoise.demo): DDIM, 10 steps; each step warm-started from the previous
    # step's model output (less the step's fresh noise, for stochastic samplers), Anderson mixing
    # (m = 3) around over-relaxed steps (relax = 2), stopped at residual 1e-2 or 10 calls: K = 9's
    # reconstruction with 15 calls instead of 100 (51 instead of 500 at 50 steps) on held-out scenes
    # (benchmarks/quality_per_call.py, benchmarks/RESULTS.md). Off home ground (other renderer, unknown
    # words, photographs, degraded scenes; benchmarks/off_home_ground.py): no image more than 0.5 dB
    # latent PSNR below plain iteration at equal calls, at 15-28 % of K = 9's calls (with the relax guard
    # and adaptive β of renoise.fixed_point; before them, up to 25 dB below)
    "demo": Plan(name="demo", sampler="ddim", num_steps=10, iters=9, window=(9, 10), average=False, anderson=3,
                 relax=2.0, tol=1e-2, warm_start="previous-noise"),
    # demo at a fixed two calls a step (issue 24: GNRI's budget, 20 calls at DDIM 10): the warm start, one call,
    # then the second at the damped point z + ½·(G(z) - z), no Anderson, no tol. Per image never more than 1.6 dB
    # of image PSNR under the VAE's ceiling on the home and off-home sets, where demo's solver at this budget
    # (plain iteration from the warm start) falls 4-19.5 dB under it on some and GNRI 4.7; beats GNRI at its
    # 20 calls in latent PSNR everywhere, in image PSNR but for 0.01 dB at the ceiling on two sets (DDIM 10;
    # at DDIM 50 it loses other-renderer's image p10 by 0.14 dB; benchmarks/RESULTS.md)
    "demo-damped": Plan(name="demo-damped", sampler="ddim", num_steps=10, iters=1, window=(1, 2), average=False,
                        relax=0.5, warm_start="previous-noise"),
    # demo, chasing K = 9's accuracy (issue 20's goal 3): tol 3e-4, and a step also stops once its residual is what
    # 6 plain iterations would leave (tol_plain = 6; renoise.fixed_point), so the slow steps, where K = 9 itself
    # gets nowhere, do not spend every call on a tol they cannot reach. DDIM 10 (benchmarks/RESULTS.md, "tolerance
    # for the goal"): K = 9's median latent PSNR or better on home scenes and on the four off-home sets, worst image
    # no lower than K = 9's, with 32 % of its calls at home and 33-38 % off home (demo: 15 % / 15-22 %, 6-28 dB
    # below K = 9's median on three of the four off-home sets); not met at DDIM 4 or 50 (RESULTS)
    "demo-exact": Plan(name="demo-exact", sampler="ddim", num_steps=10, iters=9, window=(9, 10), average=False,
                       anderson=3, relax=2.0, tol=3e-4, tol_plain=6, warm_start="previous-noise"),
    # the same at 4 DDIM steps, stopped at residual 1.5e-2 (a looser tol than demo's loses reconstruction at
    # 50 steps, so it is a preset of its own). Home scenes: K = 9's reconstruction with 11-15 calls instead
    # of 40. Off home ground (issue 20, benchmarks/off_home_ground.py): 2e-2 lost 2.2 dB latent PSNR to plain
    # iteration at equal calls on an unknown-words image; 1.5e-2 is never more than 0.5 dB below it on
    # the sets measured, at 35-37 % of K = 9's calls (benchmarks/RESULTS.md)
    "demo-4": Plan(name="demo-4", sampler="ddim", num_steps=4, iters=9, window=(9, 10), average=False, anderson=3,
                   relax=2.0, tol=1.5e-2, warm_start="previous-noise"),
    # and Euler-ancestral at 4 steps with noise correction (SDXL-Turbo's sampler): demo's solver with noise
    # correction "clip" (the reference's 18 of travel toward n*, without its overshoot) and its first step (t < 250:
    # deterministic, the one step noise correction cannot mend) solved to first_tol 1e-5; with Anderson, noise
    # correction keeps the solve's best point where it lands closer (inversion._correct). Issue 20: an exact
    # chain, latent PSNR 118-142 dB (fp32 round-off) on 343 of 360 images (home and off), with 24-25 of K = 9's
    # 43 calls (noise correction's 3 included; 22-33 off home); no image more than 0.5 dB below plain iteration
    # at equal calls on 15 noise draws x 4 off-home sets x 4 images (benchmarks/euler_nc_lottery.py, RESULTS).
    # Before (2026-12-07): the reference's "optimize" and tol 1e-2 everywhere: 20 calls, 64.7 dB at home, and
    # the rule broken on 1 of 20 set x draw cells (2.7 dB, an empty caption); earlier still <= 3 calls a step,
    # which lost up to 12 dB to plain iteration off home
    "demo-euler-4": Plan(name="demo-euler-4", sampler="euler_ancestral", num_steps=4, iters=9, window=(9, 10),
                         average=False, anderson=3, relax=2.0, tol=1e-2, first_tol=1e-5, warm_start="previous-noise",
                         noise_correction="clip"),
    # flow-matching models (SD3 / SD 3.5 / FLUX.1, issue 22): the SD plan (K = 1, the paper's windows) with the
    # flow Euler step at 28 steps (the pipelines' default), without the edit-enhancement regularizer (it acts on
    # predicted noise) and without noise correction (the step adds no noise). Not tuned on real flow models yet
    "flow": Plan(name="flow", sampler="flow_euler", num_steps=28, guidance_scale=1.0, iters=1, window=(1, 2),
                 first_iters=1, first_window=(0, 2)),
    # Per-model flow presets (issue 23). What comes from where:
    # - steps: the models' own (FLUX.1-schnell 4: BFL's CLI, diffusers' docs; FLUX.1-dev 28: FluxPipeline's default;
    #   SD 3.5 large-turbo 4: Stability's reference CONFIGS and HF Space; SD3-medium 28: StableDiffusion3Pipeline's)
    # - inversion guidance: FLUX.1-dev 1.0, the embedded guidance RF-Solver's and FireFlow's edit.py invert (and
    #   reconstruct) with (RF-Inversion's source_guidance_scale defaults to 0; generation uses 3.5, diffusers' default);
    #   schnell and large-turbo 0.0 (no guidance: diffusers' docs for schnell, the turbo Space's 0.0); SD3-medium 1.0:
    #   no CFG while inverting, as the paper's SD rows (one call per iteration; generation uses true CFG 7.0, and an
    #   edit's true CFG comes from edit_guidance_scale > 1 with the source prompt as negative)
    # - K, windows, weights: OURS, by analogy with ReNoise's Table 1 — the 4-step models take its SDXL-Turbo row
    #   (K = 9, w1..w4 = 0.25 on the first steps, w8..w10 = 1/3 after), the 28-step models its SD row (K = 1) — no
    #   paper gives ReNoise settings for flow models, and these are not tuned on real SD3 / FLUX.1 weights
    # - first_until 300 on the 4-step presets: OURS, so that schnell's lowest step (t = 250, σ = 0.25) takes the
    #   first-step regime as SDXL-Turbo's t = 249 does under the paper's t < 250 (large-turbo's lowest is t ≈ 9)
    # - no edit-enhancement regularizer (it acts on predicted noise) and no noise correction (no noise is added)
    "flux-schnell": Plan(name="flux-schnell", sampler="flow_euler", num_steps=4, guidance_scale=0.0, iters=9,
                         window=(7, 10), first_iters=3, first_window=(0, 4), first_until=300),
    "flux-dev": Plan(name="flux-dev", sampler="flow_euler", num_steps=28, guidance_scale=1.0, iters=1,
                     window=(1, 2), first_iters=1, first_window=(0, 2)),
    "sd35-large-turbo": Plan(name="sd35-large-turbo", sampler="flow_euler", num_steps=4, guidance_scale=0.0,
                             iters=9, window=(7, 10), first_iters=3, first_window=(0, 4), first_until=300),
    "sd3-medium": Plan(name="sd3-medium", sampler="flow_euler", num_steps=28, guidance_scale=1.0, iters=1,
                       window=(1, 2), first_iters=1, first_window=(0, 2)),
    # renoise's own demo flow model (renoise.demo, "demo-flow"): the demo preset's fixed-point machinery (K <= 9,
    # warm start, Anderson m = 3, relax 2, tol 1e-2) with the flow Euler step at 10 steps, no CFG while inverting.
    # OURS, carried over from the demo model; not tuned on the flow model
    "demo-flow": Plan(name="demo-flow", sampler="flow_euler", num_steps=10, guidance_scale=1.0, iters=9,
                      window=(9, 10), average=False, anderson=3, relax=2.0, tol=1e-2, warm_start="previous"),
    # the demo flow model at about one call a step (issue 23): each step starts from the straight line through the
    # last two steps' velocities (warm_start="extrapolate") and takes one call; the step that leaves the image
    # (t = 112 -> 1 at 10 steps, where the fixed-point map contracts worst and no history exists) takes up to 3,
    # the first (t = 1: sigma 0 -> 0.001) stops after one at tol. 12 calls at 10 steps. OURS, measured on the demo
    # flow model (benchmarks/RESULTS.md); first_until = 150 fits 10 steps (at 4 steps the same step is t = 334)
    "demo-flow-fast": Plan(name="demo-flow-fast", sampler="flow_euler", num_steps=10, guidance_scale=1.0, iters=0,
                           window=(0, 1), average=False, first_iters=2, first_window=(2, 3), first_until=150,
                           tol=1e-2, warm_start="extrapolate"),
    # the flow-inversion anchors (issue 23, renoise.flow_anchors) at their repositories' step counts: plain Euler
    # inversion and RF-Inversion (γ = 0.5, η = 0.9 on the first 25 % of the sampling steps) at 28 steps, RF-Solver
    # at 25 (its edit.py default), FireFlow at 8 (its README: "8-step inversion and 8-step editing")
    "euler-inversion": Plan(name="euler-inversion", sampler="flow_euler", num_steps=28, solver="euler"),
    "rf-solver": Plan(name="rf-solver", sampler="flow_euler", num_steps=25, solver="rf-solver"),
    "fireflow": Plan(name="fireflow", sampler="flow_euler", num_steps=8, solver="fireflow"),
    "rf-inversion": Plan(name="rf-inversion", sampler="flow_euler", num_steps=28, solver="rf-inversion", rf_gamma=0.5,
                         rf_eta=0.9, rf_eta_window=(0.0, 0.25)),
    # the newer iterative inversions: Uni-Inv (UniEdit-Flow) at its FLUX README's reconstruction example's 30 steps,
    # FTEdit's fixed-point Stage I (K = 2, all 3 velocities averaged) at its edit_real_sd35.py default of 30
    "uni-inv": Plan(name="uni-inv", sampler="flow_euler", num_steps=30, solver="uni-inv"),
    "ftedit": Plan(name="ftedit", sampler="flow_euler", num_steps=30, solver="ftedit"),
}


def for_model(pipe, model=None) -> str:
    """The preset a pipeline defaults to: the demo models' own ("demo", "demo-flow"), SDXL-Turbo for SDXL with
    trailing timesteps, SDXL, else SD 1.5. `model` is what was loaded (a name, folder or id).

    Flow models: FLUX.1 with a guidance embedding is "flux-dev", without one "flux-schnell"; SD3 / 3.5 is
    "sd35-large-turbo" when `model` names a turbo model ("turbo" in its id or folder name: the turbo's
    transformer and scheduler configs are those of SD 3.5 large), else "sd3-medium"."""
    if model == "demo":
        return "demo"
    if model == "demo-flow":
        return "demo-flow"
    if pipe.kind == "flux":
        return "flux-dev" if pipe.guidance_embeds else "flux-schnell"
    if pipe.kind == "sd3":
        return "sd35-large-turbo" if "turbo" in str(model or "").lower() else "sd3-medium"
    if pipe.kind == "sdxl":
        return "sdxl-turbo" if pipe.scheduler_config.get("timestep_spacing") == "trailing" else "sdxl"
    return "sd15"


def names() -> list[str]:
    return list(PRESETS)


def resolve(plan="sdxl-turbo", **overrides) -> Plan:
    """A Plan from a preset name or a Plan, with `overrides` applied (validated)."""
    if isinstance(plan, str):
        plan = Plan.preset(plan)
    elif not isinstance(plan, Plan):
        raise ValueError(f"plan must be a preset name ({', '.join(PRESETS)}) or a renoise.presets.Plan, "
                         f"got {type(plan).__name__}")
    return plan.replace(**overrides) if overrides else plan
