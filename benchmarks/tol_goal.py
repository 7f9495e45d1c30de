"""Which stopping rule lets the DDIM demo presets meet issue 20's goal 3, made by `renoise eval`.

    python benchmarks/tol_goal.py [--steps 10] [--images 8] [--home 16] [--methods SPEC ...] [--threads 1]
    python benchmarks/tol_goal.py --steps 4 --sampler euler_ancestral --noise-correction optimize \
        --methods demo-euler-4 demo-exact      # the goal's Euler-ancestral 4 with noise correction

Goal 3, per set: the method's median latent PSNR within 0.1 dB of K = 9's (plain iteration, 10 calls a
step, no tol), its worst image within 1 dB of K = 9's worst, its median UNet calls of the inversion at
most 1/2 of K = 9's off home ground and 1/3 on the demo's own held-out scenes ("home", `--demo`).
Runs K = 9 and the methods (`renoise eval` specs; default: the candidates of benchmarks/RESULTS.md,
"tolerance for the goal") on home and the four `--set`s at `--steps` DDIM steps, then prints one
row per (set, method) and writes OUT/goal.json. Already-made rows are reused (eval resumes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from renoise.evaluation.store import ok_rows

SETS = ["home", "other-renderer", "unknown-words", "photos", "degraded"]
METHODS = ["demo", "t1e-3:preset=demo,tol=1e-3", "t3e-4:preset=demo,tol=3e-4", "t1e-4:preset=demo,tol=1e-4",
           "p9t1e-3:preset=demo,tol=1e-3,tol_plain=9", "p9t3e-4:preset=demo,tol=3e-4,tol_plain=9",
           "p6t3e-4:preset=demo,tol=3e-4,tol_plain=6", "demo-exact"]


def run_eval(data, steps, images, home, out, threads, methods, run_flags=()):
    source = ["--demo", str(home)] if data == "home" else ["--set", data, "--set-size", str(images)]
    cmd = [sys.executable, "-m", "renoise", "eval", "--model", "demo", *source, "--steps", str(steps), *run_flags,
           "--methods", "K9", *methods, "--out", str(out / data), "--quiet", "--no-plots", "--threads", str(threads)]
    subprocess.run(cmd, check=True)


def goal_rows(data, rows):
    """One dict per method beside K = 9 on the images both have."""
    k9 = rows["K9"]
    cap = 1 / 3 if data == "home" else 1 / 2
    out = []
    for method, per_image in rows.items():
        ids = [i for i in k9 if i in per_image]
        if method == "K9" or len(ids) < len(k9):
            continue
        lat = [per_image[i]["latent_psnr"] for i in ids]
        ref = [k9[i]["latent_psnr"] for i in ids]
        calls = [per_image[i]["calls_invert"] for i in ids]
        k9_calls = statistics.median(k9[i]["calls_invert"] for i in ids)
        row = {"set": data, "method": method, "images": len(ids), "calls_median": statistics.median(calls),
               "calls_max": max(calls), "k9_calls": k9_calls, "calls_share": statistics.median(calls) / k9_calls,
               "latent_median": statistics.median(lat), "k9_latent_median": statistics.median(ref),
               "latent_worst": min(lat), "k9_latent_worst": min(ref)}
        row["goal_met"] = (row["latent_median"] >= row["k9_latent_median"] - 0.1
                           and row["latent_worst"] >= row["k9_latent_worst"] - 1.0 and row["calls_share"] <= cap)
        out.append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--images", type=int, default=8, help="images of each --set")
    ap.add_argument("--home", type=int, default=16, help="held-out demo scenes")
    ap.add_argument("--sets", nargs="+", default=SETS, choices=SETS)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sampler", default=None, help="the run's sampler (default: the preset's, DDIM)")
    ap.add_argument("--noise-correction", default=None, help="every method's, e.g. optimize with euler_ancestral")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/out/tolgoal/ddim<steps>")
    ap.add_argument("--table-only", action="store_true", help="tabulate the runs already there")
    args = ap.parse_args(argv)
    run_flags = []
    if args.sampler:
        run_flags += ["--sampler", args.sampler]
    if args.noise_correction:
        run_flags += ["--noise-correction", args.noise_correction]
    kind = "ddim" if args.sampler in (None, "ddim") else args.sampler
    out = args.out or Path(__file__).parent / "out" / "tolgoal" / f"{kind}{args.steps}"
    table = []
    for data in args.sets:
        if not args.table_only:
            run_eval(data, args.steps, args.images, args.home, out, args.threads, args.methods, run_flags)
        if (out / data / "rows").is_dir():
            table += goal_rows(data, ok_rows(out / data))
    print("| set | method | images | calls median (max) / K = 9's | latent median (K = 9) | Δ median | "
          "worst (K = 9) | Δ worst | goal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['set']} | {r['method']} | {r['images']} | {r['calls_median']:.0f} ({r['calls_max']}) / "
              f"{r['k9_calls']:.0f} = {r['calls_share']:.2f} | {r['latent_median']:.1f} ({r['k9_latent_median']:.1f}) | "
              f"{r['latent_median'] - r['k9_latent_median']:+.1f} | {r['latent_worst']:.1f} ({r['k9_latent_worst']:.1f}) | "
              f"{r['latent_worst'] - r['k9_latent_worst']:+.1f} | {'met' if r['goal_met'] else 'no'} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "goal.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
