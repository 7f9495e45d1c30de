"""Where a masked edit loses background: PSNR against the input in bands of distance from the edit mask.

    python benchmarks/mask_edit_bands.py --scenes 16

On the demo model's held-out scenes (the `demo` preset, DDIM 10, the colour swap of `renoise eval --demo`),
compares the reconstruction, the prompt swap and the swap under the scene's mask (EditControl(mask=...),
`--mask-edits`), each against the input, and the masked edit against the reconstruction, in bands of
Chebyshev distance (px) from the mask. Prints the median over scenes per band.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from renoise.demo import held_out, render_tensor, shape_masks
from renoise.editing import EditControl
from renoise.evaluation.data import demo_edit
from renoise.models import load_pipeline
from renoise.pipeline import Editor, decode_latents

BANDS = ((4, 8), (8, 16), (16, 32), (32, None))


def distance(mask, reach=40):
    """Chebyshev distance [H, W] in px from the mask (> 0.5), `reach` for farther pixels."""
    d = torch.full(mask.shape, float(reach))
    grown = (mask > 0.5).float()[None, None]
    d[grown[0, 0] > 0] = 0
    for r in range(1, reach):
        grown = F.max_pool2d(grown, 3, 1, 1)
        d[(grown[0, 0] > 0) & (d == reach)] = r
    return d


def psnr(a, b, where):
    """PSNR in [0, 1] units of images in [-1, 1] over the pixels `where` [H, W]."""
    mse = ((a - b)[0][:, where] / 2).pow(2).mean()
    return float(10 * torch.log10(1 / mse.clamp_min(1e-12)))


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline("demo", dtype=torch.float32)
    editor = Editor(pipe, "demo")
    rows = {k: {b: [] for b in BANDS} for k in ("reconstruction", "swap", "swap + mask", "swap + mask vs recon")}
    for i in range(args.scenes):
        scene = held_out(i)
        x, mask = render_tensor(scene), torch.from_numpy(shape_masks(scene)[0]).float()
        edit, _ = demo_edit(i)
        inv = editor.invert(x, scene.caption, generator=torch.Generator().manual_seed(0), sample_posterior=False)
        recon = decode_latents(pipe, editor.reconstruct_latents(inv)[0])
        swap = editor.edit(inv, edit)
        masked = editor.edit(inv, edit, control=EditControl(mask=mask))
        d = distance(mask, reach=BANDS[-1][0] + 1)
        for lo, hi in BANDS:
            where = (d >= lo) & (d < (hi if hi is not None else float("inf")))
            for name, a, b in (("reconstruction", recon, x), ("swap", swap, x), ("swap + mask", masked, x),
                               ("swap + mask vs recon", masked, recon)):
                rows[name][(lo, hi)].append(psnr(a, b, where))
    print(f"median over {args.scenes} scenes, PSNR (dB) by distance from the mask:")
    for name, bands in rows.items():
        print(f"{name:22s} " + "  ".join(f"{lo}-{hi if hi else '…'} px: {np.median(v):5.1f}" for (lo, hi), v in
                                          bands.items()))


if __name__ == "__main__":
    main()
