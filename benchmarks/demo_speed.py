"""Seconds per image at equal reconstruction on the demo model: renoise against the official loop.

    python benchmarks/demo_speed.py [--images 16] [--configs ddim:10 ddim:4 euler_ancestral:4]
                                    [--out benchmarks/out/demo_speed.json]

The demo model's held-out scenes, one image at a time (the official loop is batch-1), DDIM, or
Euler-ancestral with noise correction (optimize) as the paper runs SDXL-Turbo. The official ReNoise
algorithm written against diffusers (tests/official_renoise.py) runs on diffusers'
UNet2DConditionModel loaded from the demo folder with K = 9 (the last iterate, no regularizer: the
paper's best reconstruction); renoise runs the same plan, its preset for the setting (`demo` at 10
DDIM steps, `demo-4` at 4, `demo-euler-4` for Euler-ancestral at 4; otherwise `demo` with the
setting's sampler and steps), and plain inversion. Every method reconstructs with our sampler and
UNet, from its own z_T and noises; the table gives seconds per inversion (median, encoding the
image and the caption included for every method), UNet calls (noise correction's included), and
median image / latent PSNR of the reconstruction. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # test helpers and the official-loop oracle (tests/), not the repo root

import official_renoise as official  # noqa: E402
from renoise import metrics  # noqa: E402
from renoise.demo import MODEL_DIR, held_out, render_tensor  # noqa: E402
from renoise.models import load_pipeline  # noqa: E402
from renoise.pipeline import Editor, decode_latents, encode_images, encode_prompts  # noqa: E402
from renoise.presets import Plan  # noqa: E402


PRESETS = {("ddim", 4): "demo-4", ("euler_ancestral", 4): "demo-euler-4"}


def gen():
    """The noises of stochastic steps (renoise draws its own; the official loop's come from its seed)."""
    return torch.Generator().manual_seed(0)


def plans(sampler, steps):
    nc = "none" if sampler == "ddim" else "optimize"
    preset = PRESETS.get((sampler, steps), "demo")
    base = dict(sampler=sampler, num_steps=steps, average=False, noise_correction=nc)
    return {"plain inversion": Plan(name="plain", **base),
            "ReNoise K=9": Plan(name="K9", iters=9, window=(9, 10), **base),
            f"preset {preset}": Plan.preset(preset).replace(sampler=sampler, num_steps=steps, noise_correction=nc)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--configs", nargs="+", default=["ddim:10", "ddim:4", "euler_ancestral:4"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/demo_speed.json"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from diffusers import UNet2DConditionModel
    pipe = load_pipeline("demo")
    theirs = UNet2DConditionModel.from_pretrained(MODEL_DIR, subfolder="unet", torch_dtype=torch.float32).eval()
    scenes = [held_out(i, max_shapes=3) for i in range(a.images)]
    rows = []
    for config in a.configs:
        sampler, steps = config.split(":")
        steps = int(steps)
        sched = official.Scheduler(sampler, steps, dict(pipe.scheduler_config))
        results = {}
        for name, plan in {"official loop, diffusers UNet, K=9": None, **plans(sampler, steps)}.items():
            secs, psnr, lat, calls = [], [], [], []
            editor = Editor(pipe, plan or plans(sampler, steps)["ReNoise K=9"])
            for s in scenes:
                x = render_tensor([s])
                with torch.no_grad():
                    if plan is None:
                        t0 = time.perf_counter()        # encoding included, as in Editor.invert
                        z0 = encode_images(pipe, x, sample=False)
                        cond = encode_prompts(pipe, [s.caption], size=tuple(x.shape[-2:]))
                        net = official.diffusers_net(theirs, cond.context)
                        with torch.enable_grad():       # its noise correction optimises with autograd
                            traj, noises, n = official.invert(net, sched, z0, torch.Generator().manual_seed(0), K=9,
                                                              K_first_max=9, avg_first=(9, 10), avg_main=(9, 10),
                                                              average=False, reg=None,
                                                              nc=None if sampler == "ddim" else "optimize")
                        secs.append(time.perf_counter() - t0)
                        inv = editor.invert(x, s.caption, sample_posterior=False, generator=gen())     # for its chain
                        inv.result.z_T = traj[-1]
                        inv.result.noises = [None if v is None else v.to(z0) for v in noises]
                    else:
                        t0 = time.perf_counter()
                        inv = editor.invert(x, s.caption, sample_posterior=False, generator=gen())
                        secs.append(time.perf_counter() - t0)
                        z0, n = inv.z0, inv.result.model_calls
                    z, _ = editor.reconstruct_latents(inv)
                    y = decode_latents(pipe, z)
                psnr.append(float(metrics.psnr((y.clamp(-1, 1) + 1) / 2, (x + 1) / 2, data_range=1.0)[0]))
                lat.append(float(metrics.latent_metrics(z, z0)["psnr"][0]))
                calls.append(n)
            results[name] = dict(config=config, method=name, seconds=statistics.median(secs),
                                 calls=statistics.median(calls), psnr=statistics.median(psnr),
                                 latent_psnr=statistics.median(lat))
        base = results["official loop, diffusers UNet, K=9"]["seconds"]
        for r in results.values():
            r["speedup"] = base / r["seconds"]
            rows.append(r)
    print(f"\nseconds per image (median of {a.images}), demo model, {torch.get_num_threads()} threads\n")
    print("| config | method | calls | s/image | speed-up | median PSNR | latent PSNR |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['method']} | {r['calls']:.0f} | {r['seconds']:.3f} | {r['speedup']:.2f}x | "
              f"{r['psnr']:.2f} | {r['latent_psnr']:.2f} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
                                 platform.machine(), "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
