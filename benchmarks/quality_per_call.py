"""Quality per UNet call on the demo model (issue 14), made by `renoise eval` and tabulated here.

    python benchmarks/quality_per_call.py [--images 16] [--out benchmarks/out/per_call]

Runs `python -m renoise eval --methods per-call paper-grid` on the demo model's held-out scenes for
DDIM at 4, 10 and 50 steps and Euler-ancestral at 4 steps with noise correction (optimize), then
prints, per configuration and method: UNet calls of the inversion (median; tolerance stopping makes
them vary per image), median and p10 image PSNR, median and p10 latent PSNR, edit success, and the
worst per-image shortfall against plain iteration at equal calls ("vs plain": plain K = 0..9's PSNR
interpolated linearly in calls at the method's own calls, per image, minus the method's; > 1 dB
breaks the issue's rule). Already-made rows are reused (eval resumes). Writes JSON beside the runs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from renoise.evaluation.store import at_calls, ok_rows

CONFIGS = {"ddim-4": ["--sampler", "ddim", "--steps", "4"],
           "ddim-10": ["--sampler", "ddim", "--steps", "10"],
           "ddim-50": ["--sampler", "ddim", "--steps", "50"],
           "euler_ancestral-4-nc": ["--sampler", "euler_ancestral", "--steps", "4", "--noise-correction", "optimize"]}
PLAIN = ["plain", "K1", "K2", "K3", "K5", "K9"]       # plain iteration, K = 0..9


def run_eval(name, images, out, threads, methods):
    cmd = [sys.executable, "-m", "renoise", "eval", "--model", "demo", "--demo", str(images), *CONFIGS[name],
           "--methods", *methods, "--out", str(out / name), "--quiet", "--no-plots"]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def shortfall(rows, method, key):
    """Worst over images of (plain iteration's `key` at the method's calls) - (the method's)."""
    return max((at_calls(rows, image, r["calls_invert"], PLAIN, key) - r[key] for image, r in rows[method].items()),
               default=-np.inf)


def table(name, rows):
    out = []
    for method, per_image in rows.items():
        v = lambda k: np.array([r[k] for r in per_image.values() if r.get(k) is not None], dtype=float)  # noqa: E731
        edits = v("edit_success")
        out.append({"config": name, "method": method, "images": len(per_image),
                    "calls_median": float(np.median(v("calls_invert"))), "calls_mean": float(v("calls_invert").mean()),
                    "psnr_median": float(np.median(v("psnr"))), "psnr_p10": float(np.percentile(v("psnr"), 10)),
                    "latent_psnr_median": float(np.median(v("latent_psnr"))),
                    "latent_psnr_p10": float(np.percentile(v("latent_psnr"), 10)),
                    "edit_success": float(edits.mean()) if edits.size else None,
                    "edit_background_psnr": float(np.median(v("edit_background_psnr"))),
                    "shortfall_psnr": shortfall(rows, method, "psnr"),
                    "shortfall_latent_psnr": shortfall(rows, method, "latent_psnr")})
    return sorted(out, key=lambda r: (r["calls_mean"], r["method"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--methods", nargs="+", default=["per-call", "paper-grid"])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/per_call"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tabulate-only", action="store_true", help="only read the runs already in --out")
    a = p.parse_args(argv)
    result = {"date": time.strftime("%Y-%m-%d"), "images": a.images, "configs": {}}
    for name in a.configs:
        seconds = None if a.tabulate_only else run_eval(name, a.images, a.out, a.threads, a.methods)
        rows = table(name, ok_rows(a.out / name))
        result["configs"][name] = {"seconds": seconds, "rows": rows}
        print(f"\n### {name} ({a.images} held-out scenes)\n")
        print("| method | calls | median PSNR | p10 PSNR | latent PSNR median | p10 | edit ok | vs plain (dB) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            ok = "–" if r["edit_success"] is None else f"{r['edit_success']:.0%}"
            print(f"| {r['method']} | {r['calls_median']:.0f} | {r['psnr_median']:.2f} | {r['psnr_p10']:.2f} | "
                  f"{r['latent_psnr_median']:.2f} | {r['latent_psnr_p10']:.2f} | {ok} | "
                  f"{r['shortfall_psnr']:+.2f} / {r['shortfall_latent_psnr']:+.2f} |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "per_call.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {a.out / 'per_call.json'}")


if __name__ == "__main__":
    main()
