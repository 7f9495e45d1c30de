"""Where a flow inversion's reconstruction error comes from: the defect of each step.

    python benchmarks/flow_step_defects.py --steps 24 --images 4 \
        "L2:first_until=66" "L10:first_until=66,first_iters=10,first_window=[10,11]"

Each method is `demo-flow-fast` with the given Plan overrides (tol off unless given), run by
`Editor.invert` on the demo flow model's held-out scenes. Per step i (bottom up, timestep t) the
defect is rms(step(z_i, v(z_i, t)) - z_{i-1}): how far sampling's own step from the inverted latent
lands from the latent below it (0 for an exact inversion). Prints, per method and image, the
reconstruction's latent PSNR, the calls, and the defects of the lowest --show steps; JSON to --json.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from renoise.demo import held_out, render_tensor
from renoise.evaluation.methods import parse_methods
from renoise.models import load_pipeline
from renoise.pipeline import Editor
from renoise.samplers import flow_euler


def psnr(a, b):
    return float(10 * torch.log10((b.max() - b.min()) ** 2 / ((a - b) ** 2).mean()))


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("methods", nargs="+", help="NAME:field=value,... overrides of demo-flow-fast")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--show", type=int, default=6, help="steps shown, from the image up")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="benchmarks/out/flow_step_defects.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline("demo-flow", dtype=torch.float32)
    specs = [spec if "preset=" in spec else spec.replace(":", ":preset=demo-flow-fast,tol=none,", 1)
             for spec in args.methods]
    rows = []
    for method in parse_methods(specs):
        plan = method.plan("demo-flow-fast", {"num_steps": args.steps})
        for i in range(args.images):
            scene = held_out(i)
            x = render_tensor(scene)
            editor = Editor(pipe, plan)
            inv = editor.invert(x, scene.caption, sample_posterior=False)
            res, den = inv.result, editor.denoiser([scene.caption], x.shape[-2:])
            defects = []
            for j, (t, tn) in enumerate(reversed(res.chain)):
                z = res.trajectory[j + 1]
                back = flow_euler.step(z, den(z, t), t, tn, res.schedule)
                defects.append((float(t), float((back - res.trajectory[j]).pow(2).mean().sqrt())))
            latent = psnr(editor.reconstruct_latents(inv)[0], res.trajectory[0])
            rows.append({"method": method.name, "image": i, "latent_psnr": latent, "calls": res.model_calls,
                         "defects": defects})
            print(f"{method.name:8} image {i}: {latent:6.2f} dB, {res.model_calls} calls; defect by t: " +
                  " ".join(f"{t:.0f}:{d:.1e}" for t, d in defects[:args.show]), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__,
                                           "steps": args.steps, "methods": specs, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
