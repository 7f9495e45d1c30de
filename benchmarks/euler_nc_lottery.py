"""Does demo-euler-4 (or a candidate) keep issue 20's rule against plain iteration? Noise draws, noise correction.

    python benchmarks/euler_nc_lottery.py [--images 2] [--seeds 0 1 2] [--sets other-renderer photos]
                                          [--variants reference fine clip]

Euler-ancestral 4 steps with noise correction, made by `renoise eval` (one run per set, seed and
noise-correction variant). Noise correction "optimize" (the reference's: 10 SGD steps of length
lr = 1.8 on ‖n - n*‖) leaves a distance that is a triangle wave of the distance d0 it starts from
(period 2·lr = 3.6, for d0 < 10·lr = 18): a better solve (smaller d0) can leave more error than a worse
one, so each image's latent PSNR at 2-3 calls a step is partly a draw. The script compares, per seed
(`--seed`: the inversion's noise draws), the variants:

  - "reference": "optimize", nc_steps 10, nc_lr 1.8 (the paper's presets);
  - "fine": "optimize", nc_steps 1000, nc_lr 0.018 (the same distance travelled, 100 times shorter
    steps: what is left is max(0, d0 - 18) up to 0.018, monotone in d0);
  - "clip": noise correction "clip" (the same distance, 18, without overshooting, in closed form:
    max(0, d0 - 18) exactly; demo-euler-4's since 2026-12-07),

each with plain iteration K = 0, 1, 2, 3, 4, 5, 9 (`anderson=0, relax=1, tol=None, warm_start="none"`) and
demo-euler-4 under the same correction, and prints the preset's worst and median shortfall against plain
iteration at equal calls per set (> 0.5 dB breaks issue 20's rule; latent PSNR capped at `--cap`, 120 dB: an
exact chain reconstructs to 137-145 dB in fp32, its round-off, and "clip" makes plain K >= 4 and the
preset exact), and on `home` (the demo's held-out
scenes) the preset's latent median beside K = 9's. `--candidates` adds `renoise eval` methods judged the
same way (how the 2026-12-07 `demo-euler-4` was picked). Writes JSON beside the runs.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from renoise.evaluation.store import at_calls, ok_rows

PLAIN = {"plain": 0, "K1": 1, "K2": 2, "K3": 3, "K4": 4, "K5": 5, "K9": 9}
NC = {"reference": ("optimize", 10, 1.8), "fine": ("optimize", 1000, 0.018), "clip": ("clip", 10, 1.8)}


def methods(variant, candidates=()):
    kind, steps, lr = NC[variant]
    nc = f"noise_correction={kind},nc_steps={steps},nc_lr={lr}"
    plain = [f"{name}:iters={k},window=[{k},{k + 1}],average=false,{nc}" for name, k in PLAIN.items()]
    return plain + [f"demo-euler-4:preset=demo-euler-4,{nc}"] + [f"{c},{nc}" for c in candidates]


def run(data, images, seed, variant, out, threads, candidates=()):
    source = ["--demo", str(images), "--demo-shapes", "3"] if data == "home" else ["--set", data, "--set-size",
                                                                                    str(images)]
    folder = out / f"{data}-seed{seed}-{variant}"
    cmd = [sys.executable, "-m", "renoise", "eval", "--model", "demo", *source, "--sampler", "euler_ancestral",
           "--steps", "4", "--noise-correction", NC[variant][0], "--seed", str(seed),
           "--methods", *methods(variant, candidates),
           "--out", str(folder), "--quiet", "--no-plots", "--threads", str(threads)]
    subprocess.run(cmd, check=True)
    return ok_rows(folder)


def shortfall(rows, method="demo-euler-4", cap=None):
    """Per image: plain iteration's latent PSNR (K = 0..9 interpolated in calls) at the method's calls, minus
    the method's, both capped at `cap` dB (None: not); and the method's latent PSNR and K = 9's."""
    out = {}
    for i, r in rows[method].items():
        plain = at_calls(rows, i, r["calls_invert"], PLAIN, cap=cap)
        out[i] = {"short": plain - min(r["latent_psnr"], cap or math.inf),
                  "latent": r["latent_psnr"], "k9": rows["K9"][i]["latent_psnr"], "calls": r["calls_invert"]}
    return out


def summarise(per):
    """A set's row from shortfall()'s per-image numbers: worst and median shortfall, medians of the rest."""
    col = {k: np.array([v[k] for v in per.values()]) for k in ("short", "latent", "k9", "calls")}
    return {"worst_vs_plain": float(col["short"].max()), "median_vs_plain": float(np.median(col["short"])),
            "latent_median": float(np.median(col["latent"])), "k9_median": float(np.median(col["k9"])),
            "calls_median": float(np.median(col["calls"])), "images": per}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2, help="images per set (default: 2, as tests/test_offdist.py)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sets", nargs="+", default=["other-renderer", "photos", "unknown-words", "degraded"])
    p.add_argument("--home", type=int, default=8, help="held-out home scenes (0: skip)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/euler_nc_lottery"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cap", type=float, default=120.0,
                   help="latent PSNR cap in dB for the comparison (default 120: fp32 round-off of an exact chain "
                        "scatters 137-145 dB on the demo model; 0: no cap)")
    p.add_argument("--variants", nargs="+", choices=list(NC), default=list(NC), help="noise corrections to run")
    p.add_argument("--candidates", nargs="+", default=[], metavar="NAME:preset=P,FIELD=V",
                   help="more `renoise eval` methods judged as demo-euler-4 is (each spec needs a field after the "
                        "name, e.g. 'x-K3:preset=demo-exact,iters=3,window=[3,4]')")
    a = p.parse_args(argv)
    judged = ["demo-euler-4"] + [c.split(":")[0] for c in a.candidates]
    a.cap = a.cap or None
    result = {"date": time.strftime("%Y-%m-%d"), "images": a.images, "cap": a.cap, "runs": []}
    print("| method | seed | noise correction | set | worst vs plain | median vs plain | latent median (K9) | calls |")
    print("|---|---|---|---|---|---|---|---|")
    for seed in a.seeds:
        for variant in a.variants:
            for name, n in ([("home", a.home)] if a.home else []) + [(s, a.images) for s in a.sets]:
                rows = run(name, n, seed, variant, a.out, a.threads, a.candidates)
                for method in judged:
                    row = summarise(shortfall(rows, method, a.cap))
                    row.update(method=method, seed=seed, nc=variant, set=name)
                    result["runs"].append(row)
                    print(f"| {method} | {seed} | {variant} | {name} | {row['worst_vs_plain']:+.2f} | "
                          f"{row['median_vs_plain']:+.2f} | {row['latent_median']:.2f} ({row['k9_median']:.2f}) | "
                          f"{row['calls_median']:.0f} |", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "euler_nc_lottery.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {a.out / 'euler_nc_lottery.json'}")


if __name__ == "__main__":
    main()
