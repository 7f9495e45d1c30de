"""ReNoise against the flow-inversion anchors at equal model calls, on the analytic flow (issue 23).

The data are a Gaussian mixture (16 components in 64 dimensions, shaped [4, 4, 4] like a latent) whose
exact flow-matching velocity is known (renoise.toy.GaussianMixture.velocity); the schedule is FLUX.1-dev's
at 512² (dynamic shift, μ = 0.63). Each method inverts 32 data points and samples them back with its own
sampler (ReNoise, Uni-Inv, FTEdit: the flow Euler chain; RF-Solver, FireFlow: their own steps; RF-Inversion:
Algorithm 2).
Calls = inversion + sampling model calls (the most any sample used). Per sample: the reconstruction error
e = ‖x̂0 - x0‖ / ‖x0‖ (dB = -20·log10 e), and the noise error ‖z_T - z1‖ / ‖z1‖ against the exact
ODE's noise end z1 (RK4, 1000 steps): how far the inverted noise is from the flow's own.

Budgets B (total calls): each anchor at the step count that fits (Euler 2n, RF-Solver 4n, FireFlow
2n + 2, RF-Inversion 2n, Uni-Inv 2n + 1, FTEdit's Stage I 4n), ReNoise K = 0..9 at n = B // (K + 2) steps
(K = 0: v at the known point but the step's upper σ, DDIM inversion's convention), and "ours": the fixed-point
configuration (K, steps, Anderson, warm start, relax, tol) with the lowest worst-case error on a
*different* mixture (seed 1) whose worst case fits B, then run on the evaluation mixture (seed 0).
Two regimes: sharp modes (component std 0.05) and broad ones (0.3).

    python benchmarks/flow_anchors.py [--samples 32] [--budgets 16,32,64,128] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import renoise
from renoise.flow_anchors import sample_calls
from renoise.presets import Plan
from renoise.schedules import FlowSchedule
from renoise.toy import GaussianMixture

SCHEDULE = FlowSchedule(shift=3.0, use_dynamic_shifting=True, spacing="flux").for_image(1024)


def problem(seed, std, samples):
    g = torch.Generator().manual_seed(seed)
    mix = GaussianMixture.random(16, 64, std=std, scale=1.0, generator=g)
    x0 = mix.sample(samples, g).reshape(samples, 4, 4, 4)
    return mix, x0, mix.flow_noise(x0, 1000)


def evaluate(mix, x0, z1, plan):
    den = mix.flow_denoiser(SCHEDULE)
    n = plan.num_steps
    try:
        r = renoise.invert(den, x0, SCHEDULE, "flow_euler", n, plan, generator=torch.Generator().manual_seed(1))
        xr = renoise.sample(den, r)
    except FloatingPointError:                        # NonFiniteLatentError: the iteration diverged
        return None
    e = (xr - x0).flatten(1).norm(dim=1) / x0.flatten(1).norm(dim=1)
    e = torch.nan_to_num(e, nan=float("inf"))
    inv = torch.tensor(r.convergence()["calls"], dtype=torch.float64)
    sc = sample_calls(plan.solver, n) if plan.solver != "fixed-point" else n
    noise = (r.z_T - z1).flatten(1).norm(dim=1) / z1.flatten(1).norm(dim=1)
    return {"calls": int(inv.max()) + sc, "mean_calls": float(inv.mean()) + sc, "steps": n,
            "median": float(e.median()), "p90": float(e.quantile(0.9)), "worst": float(e.max()),
            "noise_median": float(noise.median())}


def fp_plan(n, k, **kw):
    return Plan(name="fixed-point", sampler="flow_euler", num_steps=n, iters=k, window=(k, k + 1), average=False, **kw)


def anchors(budget):
    """(name, plan) of each anchor at the steps that fit `budget` total calls (None: none fits)."""
    def fit(n, solver, **kw):
        return Plan(name=solver, sampler="flow_euler", num_steps=n, solver=solver, **kw) if n >= 1 else None
    return [("euler-inversion", fit(budget // 2, "euler")),
            ("rf-solver", fit(budget // 4, "rf-solver")),
            ("fireflow", fit(budget // 2 - 1, "fireflow")),
            ("rf-inversion (γ=0.5, η=0)", fit(budget // 2, "rf-inversion", rf_gamma=0.5)),
            ("rf-inversion (γ=0.5, η=0.9 on 25 %)*", fit(budget // 2, "rf-inversion", rf_gamma=0.5, rf_eta=0.9)),
            ("uni-inv", fit((budget - 1) // 2, "uni-inv")),
            ("ftedit (stage I)", fit(budget // 4, "ftedit"))]


OURS = {"plain": {}, "anderson": dict(anderson=3), "warm+anderson": dict(anderson=3, warm_start="previous"),
        "anderson+relax2": dict(anderson=3, relax=2.0),
        "warm+anderson+relax2": dict(anderson=3, relax=2.0, warm_start="previous"),
        "warm+anderson+tol": dict(anderson=3, warm_start="previous", tol=1e-4),
        "warm": dict(warm_start="previous"), "damped0.5": dict(relax=0.5),
        "anderson+damped0.5": dict(anderson=3, relax=0.5),
        "warm+anderson+damped0.5": dict(anderson=3, relax=0.5, warm_start="previous"),
        "anderson+damped0.5+tol": dict(anderson=3, relax=0.5, tol=1e-6), "averaged-last-2": None}


def ours_candidates(budget):
    """Every fixed-point configuration whose worst case ((K + 2)·n calls) fits `budget` (and K = 0 with the
    warm start at n = budget // 2)."""
    out = [(f"warm K=0 n={budget // 2}", fp_plan(budget // 2, 0, warm_start="previous"))]
    for n in (2, 4, 6, 8, 16, 32):
        k = min(budget // n - 2, 19)
        if k < 1:
            continue
        for name, kw in OURS.items():
            plan = (Plan(name="fixed-point", sampler="flow_euler", num_steps=n, iters=k, window=(k - 1, k + 1))
                    if kw is None else fp_plan(n, k, **kw))
            out.append((f"{name} K={k} n={n}", plan))
    return out


def select_ours(tune, budget):
    """The candidate with the lowest worst-case error on the tuning mixture (ties: the lower 90th percentile).
    (Selecting by the 90th percentile alone picked configurations that flipped modes on the other mixture.)"""
    best = None
    for name, plan in ours_candidates(budget):
        r = evaluate(*tune, plan)
        if r is not None and r["calls"] <= budget and (
                best is None or (r["worst"], r["p90"]) < (best[2]["worst"], best[2]["p90"])):
            best = (name, plan, r)
    return best


def run(std, samples, budgets):
    ev, tune = problem(0, std, samples), problem(1, std, samples)
    rows = []
    for b in budgets:
        for name, plan in anchors(b):
            if plan is not None:
                rows.append({"budget": b, "method": name, **(evaluate(*ev, plan) or {"diverged": True})})
        for k in range(0, 10):
            n = b // (k + 2)
            if n >= 1:
                rows.append({"budget": b, "method": f"renoise K={k}",
                             **(evaluate(*ev, fp_plan(n, k)) or {"diverged": True})})
        # K = 0 from the previous step's velocity (warm start, one call a step): Uni-Inv with its zero_init
        # option (the first step's predictor velocity 0, so v(x0, σ_1)), one call fewer than the uni-inv row
        rows.append({"budget": b, "method": "renoise K=0 warm (= Uni-Inv zero_init)",
                     **(evaluate(*ev, fp_plan(b // 2, 0, warm_start="previous")) or {"diverged": True})})
        pick = select_ours(tune, b)
        if pick is not None:
            rows.append({"budget": b, "method": f"ours: {pick[0]}", **(evaluate(*ev, pick[1]) or {"diverged": True}),
                         "tuning_p90": pick[2]["p90"]})
    return rows


def db(e):
    import math
    return float("inf") if e == 0 else -20 * math.log10(e)


def table(rows):
    lines = [f"{'B':>4} {'method':<44} {'calls':>5} {'n':>3} {'median e':>9} {'dB':>6} {'p90 e':>9} {'worst e':>9} "
             f"{'noise e':>8}"]
    for r in rows:
        if r.get("diverged"):
            lines.append(f"{r['budget']:>4} {r['method']:<44} diverged")
            continue
        lines.append(f"{r['budget']:>4} {r['method']:<44} {r['calls']:>5} {r['steps']:>3} {r['median']:>9.2e} "
                     f"{db(r['median']):>6.1f} {r['p90']:>9.2e} {r['worst']:>9.2e} {r['noise_median']:>8.2e}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--budgets", default="16,32,64,128")
    ap.add_argument("--stds", default="0.05,0.3")
    ap.add_argument("--json", default="benchmarks/out/flow_anchors.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    budgets = [int(b) for b in args.budgets.split(",")]
    out = {"schedule": SCHEDULE.to_dict(), "samples": args.samples, "regimes": {}}
    t0 = time.perf_counter()
    for std in (float(s) for s in args.stds.split(",")):
        rows = run(std, args.samples, budgets)
        out["regimes"][str(std)] = rows
        print(f"\ncomponent std {std} (16 components, 64 dims, {args.samples} samples; * = η steers sampling "
              f"towards the image itself)\n" + table(rows))
    out["seconds"] = time.perf_counter() - t0
    print(f"\n{out['seconds']:.1f} s")
    from pathlib import Path
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
