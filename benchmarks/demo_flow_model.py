"""The demo flow model's health and its inversions: `python benchmarks/demo_flow_model.py [--images 16]`.

Generation: held-out one-shape captions (flow Euler, true CFG), judged by `renoise.demo.checks`
(captioned colour / shape), for a few step counts and guidance scales. Inversion: held-out scenes (one
to three shapes) inverted with their captions and reconstructed at 10 flow Euler steps — plain Euler
inversion against ReNoise K = 1, 3, 9 and the `demo-flow` preset — image PSNR (data range 1, median /
p10), latent PSNR (median), model calls of the inversion; and red → green circle edits with the
`demo-flow` preset (success, median background PSNR). Prints markdown tables, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from renoise.demo import evaluate
from renoise.models import load_pipeline
from renoise.presets import Plan


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo-flow")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--captions", type=int, default=64)
    p.add_argument("--edits", type=int, default=16)
    p.add_argument("--out", default="benchmarks/out/demo_flow_model.json")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.model)
    info = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "model": a.model}
    gen_rows = []
    for steps, g in ((10, 1.0), (10, 4.0), (20, 4.0), (20, 7.0)):
        t0 = time.perf_counter()
        r = evaluate.follows_caption(pipe, a.captions, num_steps=steps, guidance_scale=g)
        gen_rows.append({"steps": steps, "guidance": g, "colour": r["colour"], "shape": r["shape"],
                         "seconds": time.perf_counter() - t0})
    print(f"\nGeneration, {a.captions} held-out one-shape captions:\n")
    print("| steps | guidance | colour right | shape right | s |\n|---|---|---|---|---|")
    for r in gen_rows:
        print(f"| {r['steps']} | {r['guidance']:g} | {r['colour']:.0%} | {r['shape']:.0%} | {r['seconds']:.1f} |")

    base = dict(sampler="flow_euler", num_steps=10, guidance_scale=1.0)
    methods = [("plain Euler inversion", Plan(name="euler", solver="euler", **base))]
    methods += [(f"ReNoise K={k}", Plan(name=f"K{k}", iters=k, window=(k, k + 1), **base)) for k in (1, 3, 9)]
    methods += [("preset demo-flow", Plan.preset("demo-flow"))]
    inv_rows = []
    for name, plan in methods:
        r = evaluate.reconstruction(pipe, plan, a.images)
        psnr = r["psnr"].numpy()
        inv_rows.append({"method": name, "calls": int(r["calls"]), "seconds": r["seconds"],
                         "psnr_median": float(np.median(psnr)), "psnr_p10": float(np.percentile(psnr, 10)),
                         "latent_psnr_median": float(r["latent_psnr"].median())})
    vae = float(evaluate.vae_psnr(pipe, a.images).median())
    print(f"\nInversion, {a.images} held-out scenes, flow Euler 10 steps (VAE round trip {vae:.2f} dB median):\n")
    print("| method | calls | s | median PSNR | p10 PSNR | latent PSNR |\n|---|---|---|---|---|---|")
    for r in inv_rows:
        print(f"| {r['method']} | {r['calls']} | {r['seconds']:.2f} | {r['psnr_median']:.2f} | {r['psnr_p10']:.2f} | "
              f"{r['latent_psnr_median']:.2f} |")
    edits = {}
    for g in (1.0, 3.0):
        e = evaluate.colour_edits(pipe, "demo-flow", a.edits, edit_guidance_scale=g)
        edits[g] = {"success": e["success"], "background_psnr_median": float(np.median(e["background_psnr"]))}
        print(f"\nred → green edits (demo-flow, edit guidance {g:g}), {a.edits} scenes: success {e['success']:.0%}, "
              f"background PSNR median {edits[g]['background_psnr_median']:.1f} dB")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "generation": gen_rows, "vae_psnr_median": vae, "inversion": inv_rows,
                               "edits": {str(k): v for k, v in edits.items()}}, indent=1))


if __name__ == "__main__":
    main()
