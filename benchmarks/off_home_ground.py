"""The demo presets off the demo model's home ground (issue 20), made by `renoise eval` and tabulated here.

    python benchmarks/off_home_ground.py [--images 4] [--configs ddim-4 ddim-10 euler_ancestral-4-nc]

For every set of `renoise eval --set` (other-renderer, unknown-words, photos, degraded) and the
demo's own held-out scenes (`--demo`, "home"), and for DDIM at 4, 10 (and 50) steps and
Euler-ancestral at 4 steps with noise correction ("clip", demo-euler-4's since 2026-12-07, for every
method: the run's flag applies to the preset too), runs plain iteration K = 0, 1, 2, 3, 5, 9
(`anderson=0, relax=1, tol=None, warm_start="none"`) and the demo presets, then prints per
method: UNet calls of the inversion (median, and the mean over K = 9's), median latent PSNR and
its difference to K = 9's, the worst image's difference to K = 9, and the worst image's shortfall
against plain iteration at equal calls (plain K = 0..9's latent PSNR interpolated linearly in
calls at the method's own calls, per image, minus the method's; > 0.5 dB breaks the issue's rule).
Already-made rows are reused (eval resumes). Writes JSON beside the runs.
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
           "euler_ancestral-4-nc": ["--sampler", "euler_ancestral", "--steps", "4", "--noise-correction", "clip"]}
SETS = ["home", "other-renderer", "unknown-words", "photos", "degraded"]
PLAIN = ["plain", "K1", "K2", "K3", "K5", "K9"]                 # plain iteration, K = 0..9
PRESETS = ["demo", "demo-4", "demo-euler-4"]


def run_eval(config, data, images, out, threads, methods):
    source = ["--demo", str(images), "--demo-shapes", "3"] if data == "home" else ["--set", data, "--set-size",
                                                                                    str(images)]
    cmd = [sys.executable, "-m", "renoise", "eval", "--model", "demo", *source, *CONFIGS[config],
           "--methods", *methods, "--out", str(out / config / data), "--quiet", "--no-plots"]
    if threads:
        cmd += ["--threads", str(threads)]
    subprocess.run(cmd, check=True)


def table(rows):
    k9 = rows["K9"]
    out = []
    for method, per_image in rows.items():
        ids = [i for i in per_image if i in k9]
        lat = np.array([per_image[i]["latent_psnr"] for i in ids])
        calls = np.array([per_image[i]["calls_invert"] for i in ids], dtype=float)
        ref = np.array([k9[i]["latent_psnr"] for i in ids])
        short = [at_calls(rows, i, c, PLAIN) - v for i, v, c in zip(ids, lat, calls)]
        stalls = sum(len(per_image[i].get("not_converged") or []) > 0 for i in ids)
        out.append({"method": method, "images": len(ids), "calls_median": float(np.median(calls)),
                    "calls_vs_k9": float(calls.mean() / np.mean([k9[i]["calls_invert"] for i in ids])),
                    "latent_median": float(np.median(lat)), "median_vs_k9": float(np.median(lat) - np.median(ref)),
                    "worst_vs_k9": float((lat - ref).min()), "worst_vs_plain": float(max(short)),
                    "images_not_converged": stalls})
    return sorted(out, key=lambda r: (r["calls_vs_k9"], r["method"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4, help="images per set (default: 4)")
    p.add_argument("--configs", nargs="+", default=["ddim-4", "ddim-10", "euler_ancestral-4-nc"], choices=list(CONFIGS))
    p.add_argument("--sets", nargs="+", default=SETS, choices=SETS)
    p.add_argument("--methods", nargs="+", default=PLAIN + PRESETS)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/off_home"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tabulate-only", action="store_true", help="only read the runs already in --out")
    a = p.parse_args(argv)
    result = {"date": time.strftime("%Y-%m-%d"), "images": a.images, "configs": {}}
    for config in a.configs:
        for data in a.sets:
            t0 = time.perf_counter()
            if not a.tabulate_only:
                run_eval(config, data, a.images, a.out, a.threads, a.methods)
            rows = table(ok_rows(a.out / config / data))
            result["configs"].setdefault(config, {})[data] = {"seconds": time.perf_counter() - t0, "rows": rows}
            print(f"\n#### {config}, {data} ({a.images} images)\n")
            print("| method | calls (median) | calls / K9's | latent PSNR median | vs K9 median | worst vs K9 | "
                  "worst vs plain at equal calls | images not converged |")
            print("|---|---|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['method']} | {r['calls_median']:.0f} | {r['calls_vs_k9']:.2f} | {r['latent_median']:.2f} | "
                      f"{r['median_vs_k9']:+.2f} | {r['worst_vs_k9']:+.2f} | {r['worst_vs_plain']:+.2f} | "
                      f"{r['images_not_converged']} |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "off_home.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {a.out / 'off_home.json'}")


if __name__ == "__main__":
    main()
