"""How close the demo VAE's decoder can come to each background group of benchmarks/edit_modes.py.

    python benchmarks/vae_ceiling.py                  # 3 scenes per group, 150 Adam steps
    python benchmarks/vae_ceiling.py --n 8 --steps 300

Every latent edit ends in the decoder, so the decoder's reach caps background PSNR. Per scene:
  round trip   PSNR of decode(encode(x)) against x (the ceiling edit_modes.py reports as "VAE bg")
  optimised    PSNR of decode(z*) against x, z* found by Adam on ‖decode(z) - x‖² from encode(x):
               the best any latent can do, not just the encoder's
both over the whole image and over its background (outside the shape's mask grown by 3 px).
Writes JSON (--json) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from edit_modes import GROUPS, caption, draw, scene_for
from renoise.evaluation.measure import background_psnr
from renoise.models import load_pipeline
from renoise.pipeline import encode_images


def psnr(a, b):
    return float(10 * torch.log10(4 / ((a - b) ** 2).mean()))


def best_latent(vae, z, x, steps, lr):
    """argmin_z ‖decode(z) - x‖² by Adam from z (the decoder's weights untouched)."""
    z = z.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = ((vae.decode_latents(z) - x) ** 2).mean()
            loss.backward()
            opt.step()
    return z.detach()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3, help="scenes per group")
    ap.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS)
    ap.add_argument("--steps", type=int, default=150, help="Adam steps on the latent")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="benchmarks/out/vae_ceiling.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline("demo", dtype=torch.float32)
    for p in pipe.vae.parameters():
        p.requires_grad_(False)
    rows = []
    for group in args.groups:
        for i in range(args.n):
            scene, rgbs, words = scene_for(i, group)
            img, mask = draw(scene, rgbs)
            x = torch.from_numpy(img)[None] * 2 - 1
            with torch.no_grad():
                z = encode_images(pipe, x, sample=False)
                trip = pipe.vae.decode_latents(z)
            with torch.no_grad():
                best = pipe.vae.decode_latents(best_latent(pipe.vae, z, x, args.steps, args.lr))
            m = torch.from_numpy(mask)
            rows.append({"group": group, "scene": i, "caption": caption(scene, words),
                         "round_trip": psnr(trip, x), "optimised": psnr(best, x),
                         "round_trip_bg": background_psnr(trip, x, m), "optimised_bg": background_psnr(best, x, m)})
            print(f"{group:9} {i}: round trip {rows[-1]['round_trip']:5.1f} dB (bg {rows[-1]['round_trip_bg']:5.1f}),"
                  f" optimised {rows[-1]['optimised']:5.1f} dB (bg {rows[-1]['optimised_bg']:5.1f})", flush=True)
    print(f"\n| group | scenes | round trip: image / background PSNR, median (min) | optimised latent: image / "
          f"background |\n|---|---|---|---|")
    for group in args.groups:
        rs = [r for r in rows if r["group"] == group]
        cell = lambda k: f"{statistics.median(r[k] for r in rs):.1f} ({min(r[k] for r in rs):.1f})"
        print(f"| {group} | {len(rs)} | {cell('round_trip')} / {cell('round_trip_bg')} | "
              f"{cell('optimised')} / {cell('optimised_bg')} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__,
                                           "steps": args.steps, "lr": args.lr, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
