"""Flow inversion on a schedule with a finer low end: every method, the same shifted sigmas (issue 23).

    python benchmarks/flow_schedule_shift.py --shift 1 0.5 --steps 10 24 --images 16 \
        --methods fireflow rf-solver "fast:preset=demo-flow-fast,first_until=low2" ...

The demo flow model's scheduler has shift 1. A static shift s < 1 (diffusers' FlowMatchEulerDiscreteScheduler
`shift`, σ <- s·σ / (1 + (s - 1)·σ)) moves the sigmas towards 0, so the step that leaves the image ends at a
smaller σ₁. Each method inverts and reconstructs with its own sampler on the shifted schedule (`renoise.
inversion.invert` / `sample` with the shifted FlowSchedule; the pipeline's own schedule is not changed) and
is scored like `renoise eval` (latent PSNR of the reconstruction against the encoded image, posterior mean,
held-out home scenes). Method specs are `renoise eval`'s; `first_until=lowL` stands for a threshold between
the L-th and (L+1)-th lowest timesteps of the unshifted N-step schedule, and every first_until is moved by
the shift, so a method's first regime covers the same steps at every shift. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics

import torch

from renoise import inversion, metrics
from renoise.demo import held_out, render_tensor
from renoise.evaluation.methods import parse_methods
from renoise.models import load_pipeline
from renoise.pipeline import Editor, encode_images
from renoise.presets import resolve


def plan_for(spec, n, base_schedule, schedule):
    """spec (with first_until=lowL resolved on the unshifted N-step schedule) -> its Plan on the shifted
    `schedule`, first_until moved by its static shift as the sigmas are."""
    ts = base_schedule.timesteps(n).tolist()
    spec = re.sub(r"first_until=low(\d+)", lambda m: f"first_until={(ts[-int(m[1])] + ts[-int(m[1]) - 1]) / 2}",
                  spec)
    plan = parse_methods([spec])[0].plan("demo-flow-fast", {"num_steps": n})
    if plan.solver == "fixed-point":
        T = schedule.num_train_timesteps
        plan = plan.replace(first_until=T * schedule.static_shift(plan.first_until / T))
    return plan


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shift", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 24])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--methods", nargs="+", default=["fireflow", "rf-solver",
                                                     "fast:preset=demo-flow-fast,first_until=low2"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/out/flow_schedule_shift.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline("demo-flow", dtype=torch.float32)
    editor = Editor(pipe, resolve("demo-flow-fast"))
    scenes = [held_out(i) for i in range(args.images)]
    images = [render_tensor(s) for s in scenes]
    latents = [encode_images(pipe, x, None, sample=False) for x in images]
    dens = [editor.denoiser([s.caption], x.shape[-2:]) for s, x in zip(scenes, images)]
    base = editor.family.schedule(tuple(latents[0].shape[-2:]))
    rows = []
    for shift in args.shift:
        schedule = dataclasses.replace(base, shift=shift)
        for n in args.steps:
            for spec in args.methods:
                plan = plan_for(spec, n, base, schedule)
                for i, (den, z0) in enumerate(zip(dens, latents)):
                    with torch.no_grad():
                        res = inversion.invert(den, z0, schedule, "flow_euler", n, plan)
                        z = inversion.sample(den, res)
                    rows.append({"shift": shift, "steps": n, "method": plan.name, "image": i,
                                 "calls": res.model_calls, "sigma_1": float(schedule.sigmas(n)[-3]),
                                 "latent_psnr": float(metrics.latent_metrics(z, z0)["psnr"][0])})
                r = [row for row in rows if (row["shift"], row["steps"], row["method"]) == (shift, n, plan.name)]
                p = sorted(row["latent_psnr"] for row in r)
                print(f"shift {shift} N {n} σ₁ {r[0]['sigma_1']:.4f} {plan.name}: "
                      f"{statistics.median([row['calls'] for row in r]):g} calls, latent PSNR median {statistics.median(p):.2f}, "
                      f"p10 {p[len(p) // 10]:.2f}, worst {p[0]:.2f}", flush=True)
    names = list(dict.fromkeys(row["method"] for row in rows))
    print("\nCells: inversion calls: latent PSNR median / worst (dB)\n")
    print("| shift | N | σ₁ | " + " | ".join(names) + " |")
    print("|---" * (3 + len(names)) + "|")
    for shift in args.shift:
        for n in args.steps:
            cells = []
            for name in names:
                r = [row for row in rows if (row["shift"], row["steps"], row["method"]) == (shift, n, name)]
                p = [row["latent_psnr"] for row in r]
                cells.append(f"{statistics.median([row['calls'] for row in r]):g}: "
                             f"{statistics.median(p):.2f} / {min(p):.2f}")
            print(f"| {shift:g} | {n} | {r[0]['sigma_1']:.4f} | " + " | ".join(cells) + " |")
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
