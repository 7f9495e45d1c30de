"""Inversion on a trained model: the demo model's held-out scenes, the paper's Table 2 measured on it.

    python benchmarks/demo_model.py [--images 32] [--model demo] [--out benchmarks/out/demo_model.json]

For each sampler / step count and method: UNet calls of the inversion, seconds, median and p10 image
PSNR of invert + reconstruct (data range 1), median latent PSNR, and — for DDIM — the success rate of
the red → green colour edit and its background PSNR. Also the demo model's own health: VAE
round-trip PSNR and how often generations follow their captions. Prints a markdown table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from renoise.demo import evaluate  # noqa: E402
from renoise.models import load_pipeline  # noqa: E402
from renoise.presets import Plan  # noqa: E402


def methods(sampler: str, steps: int):
    """(name, Plan) pairs compared at this sampler and step count."""
    base = dict(sampler=sampler, num_steps=steps)
    if sampler == "euler_ancestral":
        base.update(noise_correction="optimize")
    out = [("plain inversion", Plan(name="plain", **base))]
    if sampler == "ddim" and steps == 50:
        out.append(("preset sd15 (K=1, avg, reg)", Plan.preset("sd15")))
    if sampler == "euler_ancestral":
        out.append(("preset sdxl-turbo (K=9, avg, reg, NC)", Plan.preset("sdxl-turbo")))
    for k in (1, 3, 9):
        out.append((f"ReNoise K={k}", Plan(name=f"K{k}", iters=k, window=(k, k + 1), **base)))
    for k in (2, 3):
        out.append((f"Anderson m=3 K={k}", Plan(name=f"A{k}", iters=k, window=(k, k + 1), anderson=3, average=False,
                                                **base)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--edits", type=int, default=32)
    p.add_argument("--configs", default="ddim:4,ddim:10,ddim:50,euler_ancestral:4")
    p.add_argument("--out", default="benchmarks/out/demo_model.json")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.model)
    info = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "images": a.images, "model": a.model}
    health = {"vae_psnr_median": float(evaluate.vae_psnr(pipe, a.images).median())}
    t0 = time.perf_counter()
    cap = evaluate.follows_caption(pipe, 64)
    health.update(caption_colour=cap["colour"], caption_shape=cap["shape"],
                  generate_seconds_64=time.perf_counter() - t0)
    print(f"VAE PSNR {health['vae_psnr_median']:.2f} dB; captions followed: colour {cap['colour']:.0%}, "
          f"shape {cap['shape']:.0%} (64 generations, DDIM 20, CFG 4)")
    rows = []
    for config in a.configs.split(","):
        sampler, steps = config.split(":")
        for name, plan in methods(sampler, int(steps)):
            r = evaluate.reconstruction(pipe, plan, a.images, sampler=sampler, num_steps=int(steps))
            psnr = r["psnr"].numpy()
            row = {"sampler": sampler, "steps": int(steps), "method": name, "calls_per_image": r["calls"],
                   "seconds": r["seconds"], "psnr_median": float(np.median(psnr)),
                   "psnr_p10": float(np.percentile(psnr, 10)), "latent_psnr_median": float(r["latent_psnr"].median()),
                   "z_T_std": r["z_T_std"]}
            if sampler == "ddim" and a.edits:
                e = evaluate.colour_edits(pipe, plan, a.edits, sampler=sampler, num_steps=int(steps))
                row.update(edit_success=e["success"], edit_background_psnr=float(np.median(e["background_psnr"])))
            rows.append(row)
            print(f"{sampler:>15} {steps:>3} {name:<38} calls {row['calls_per_image']:>4}  "
                  f"{row['seconds']:6.2f} s  PSNR {row['psnr_median']:6.2f} (p10 {row['psnr_p10']:6.2f})"
                  + (f"  edit {row['edit_success']:.0%} bg {row['edit_background_psnr']:.1f}" if "edit_success" in row
                     else ""), flush=True)
    print("\n| sampler | steps | method | calls | s | median PSNR | p10 PSNR | latent PSNR | edit ok | edit bg PSNR |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        e = (f"{r['edit_success']:.0%} | {r['edit_background_psnr']:.1f}" if "edit_success" in r else "– | –")
        print(f"| {r['sampler']} | {r['steps']} | {r['method']} | {r['calls_per_image']} | {r['seconds']:.2f} | "
              f"{r['psnr_median']:.2f} | {r['psnr_p10']:.2f} | {r['latent_psnr_median']:.2f} | {e} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "health": health, "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
