"""ReNoise beside its peers (issue 24), made by `renoise eval` and tabulated here.

    python benchmarks/peers.py [--images 16 8] [--out benchmarks/out/peers] [--threads 1]

Runs `python -m renoise eval --methods peers K1 anderson-K3 K9 edict-g1:...` on the demo model's
held-out scenes at DDIM 10 and 50 steps (16 and 8 images by default), then prints per method:
image and latent PSNR (median, p10), edit success and background PSNR (prompt swap), UNet calls,
UNet evaluations (CFG counted twice), cost in call-equivalents (backward passes at the run's
measured backward/forward ratio) and seconds (median per inversion). Then, per peer, the verdict:
the best ReNoise method (the preset and plain iterations) whose median cost, and the best whose
median seconds, is at most the peer's, and whether it beats the peer in median and p10 image and
latent PSNR. Writes the plots of PSNR against calls, cost and seconds (every method on one plot)
to benchmarks/plots/peers_ddim<N>_*.png and JSON beside the runs. Rows are reused (eval resumes).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

RENOISE = ["preset", "K1", "anderson-K3", "K9"]
EXTRA = ["edict-g1:peer=edict,guidance=1,edit_guidance=none,edit_negative=source",
         "null-text-g4:peer=null-text,guidance=4,edit_guidance=4"]
KEYS = [("psnr", "median"), ("psnr", "p10"), ("latent_psnr", "median"), ("latent_psnr", "p10"),
        ("edit_success", "mean"), ("edit_background_psnr", "median"), ("calls_invert", "median"),
        ("evals_invert", "median"), ("cost_invert", "median"), ("seconds_invert", "median")]


def run_eval(steps, images, out, threads):
    cmd = [sys.executable, "-m", "renoise", "eval", "--model", "demo", "--demo", str(images), "--steps", str(steps),
           "--methods", "peers", *RENOISE, *EXTRA, "--out", str(out), "--quiet"]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def stat(m, key, which):
    return m["metrics"].get(key, {}).get(which)


def table(summary):
    lines = ["| method | PSNR med | p10 | latent med | p10 | edit success | bg PSNR | calls | evals | cost | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in summary["methods"].items():
        vals = [stat(m, k, w) for k, w in KEYS]
        cells = [("–" if v is None else f"{v:.0%}" if k == "edit_success" else f"{v:.0f}" if k.startswith(("calls", "evals"))
                  else f"{v:.1f}" if k == "cost_invert" else f"{v:.3f}" if k == "seconds_invert" else f"{v:.2f}")
                 for v, (k, _) in zip(vals, KEYS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(summary):
    ms = summary["methods"]
    ours = {n: ms[n] for n in RENOISE if n in ms}
    out = []
    for name, m in ms.items():
        if name in ours:
            continue
        line = {"peer": name}
        for axis in ("cost_invert", "seconds_invert"):
            budget = stat(m, axis, "median")
            within = {n: o for n, o in ours.items() if stat(o, axis, "median") <= budget * 1.0001}
            if not within:
                line[axis] = None
                continue
            best = max(within, key=lambda n: stat(within[n], "psnr", "median"))
            o = within[best]
            beats = {f"{k}_{w}": stat(o, k, w) > stat(m, k, w) for k in ("psnr", "latent_psnr") for w in ("median", "p10")}
            line[axis] = {"ours": best, **beats}
        out.append(line)
    return out


def verdict_lines(vs):
    lines = ["| peer | ReNoise at ≤ its cost | beats (img med/p10, latent med/p10) | at ≤ its seconds | beats |",
             "|---|---|---|---|---|"]
    mark = lambda d: " ".join("✓" if d[k] else "✗" for k in ("psnr_median", "psnr_p10", "latent_psnr_median",  # noqa: E731
                                                              "latent_psnr_p10"))
    for v in vs:
        c, s = v["cost_invert"], v["seconds_invert"]
        lines.append(f"| {v['peer']} | {c['ours'] if c else 'none'} | {mark(c) if c else '–'} | "
                     f"{s['ours'] if s else 'none'} | {mark(s) if s else '–'} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, nargs=2, default=[16, 8], metavar=("N10", "N50"))
    ap.add_argument("--out", default="benchmarks/out/peers")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plots", default="benchmarks/plots")
    args = ap.parse_args()
    report = {}
    for steps, images in zip((10, 50), args.images):
        out = Path(args.out) / f"ddim{steps}"
        wall = run_eval(steps, images, out, args.threads)
        summary = json.loads((out / "summary.json").read_text())
        vs = verdicts(summary)
        print(f"\n## DDIM {steps}: {images} held-out scenes ({wall:.0f} s)\n\n{table(summary)}\n\n{verdict_lines(vs)}")
        for plot in ("psnr_vs_calls", "psnr_vs_cost", "psnr_vs_seconds"):
            src = out / "plots" / f"{plot}.png"
            if src.is_file():
                Path(args.plots).mkdir(parents=True, exist_ok=True)
                shutil.copy(src, Path(args.plots) / f"peers_ddim{steps}_{plot}.png")
        report[f"ddim{steps}"] = {"images": images, "wall_seconds": wall, "summary": summary["methods"],
                                  "verdicts": vs}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "peers.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
