"""Editing modes on the demo model's held-out scenes: success, background PSNR and UNet calls.

    python benchmarks/edit_modes.py                       # 8 scenes × 5 background groups × 3 edits, demo preset
    python benchmarks/edit_modes.py --n 4 --presets demo sd15 sd15-noreg --modes swap p2p-blend

Scenes: held-out one-shape scenes (renoise.demo.held_out) redrawn on five background groups:
  plain     one palette colour (not black or white)
  two-tone  two palette colours, top and bottom
  black, white
  unknown   a colour the model has no word for (teal, pink, brown, grey, cyan), named in the caption
Edits of the shape: colour (to one not in the scene), shape (another kind), position (another slot).
Success, judged with the renderer's masks of the *target* scene: the dominant palette colour inside
the target shape's mask is the shape's (target) colour, and the foreground (pixels farther than
0.25 from the background image) covers the target mask with IoU >= 0.5; a shape edit also needs
the shape classifier (renoise.demo.checks.classify_shape) to name the target kind. Background PSNR:
the edit against the input image outside the source and target masks grown by 3 px.

Modes (renoise.editing.EditControl):
  swap        the prompt swap (Editor.edit as before)
  p2p         Prompt-to-Prompt: cross-attention maps replaced for 0.8 of the steps
  swap-blend  the swap with local blending on the changed words (auto)
  p2p-blend   p2p with local blending
  p2p-inject  p2p with local blending and self-attention maps injected for 0.2 of the steps
  swap-mask   the swap with the user mask (EditControl.mask) = the source's and target's shape masks
  swap-mask-paste  swap-mask, then the input's pixels outside that mask (renoise.editing.paste_back)
Each (scene, preset) is inverted once; every mode denoises the same inversion. Calls: the
inversion's and the edit's (a pair mode's call is one UNet call on the [source; edit] batch).
Writes JSON (benchmarks/out/edit_modes.json), a table, and an image grid (--grid PNG).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from renoise.demo import COLOURS, SHAPES, POSITIONS, held_out
from renoise.demo.checks import classify_shape, dominant_colour
from renoise.demo.scenes import render, shape_masks
from renoise.editing import EditControl, paste_back
from renoise.evaluation.measure import background_psnr
from renoise.models import load_pipeline
from renoise.pipeline import Editor, decode_latents

GROUPS = ("plain", "two-tone", "black", "white", "unknown")
EDITS = ("colour", "shape", "position")
UNKNOWN = {"teal": (0, 128, 128), "pink": (250, 160, 200), "brown": (140, 90, 40), "grey": (128, 128, 128),
           "cyan": (60, 220, 230)}
MODES = {                   # name: (control, edit guidance)
    "swap": (None, 1.0),
    "p2p": (EditControl(mode="p2p"), 1.0),
    "swap-blend": (EditControl(local_blend=("auto",)), 1.0),
    "p2p-blend": (EditControl(mode="p2p", local_blend=("auto",)), 1.0),
    "p2p-inject": (EditControl(mode="p2p", local_blend=("auto",), self_inject=0.2), 1.0),
    "p2p.4-blend": (EditControl(mode="p2p", cross_replace=0.4, local_blend=("auto",)), 1.0),
    "swap-g2": (None, 2.0),
    "swap-blend-g2": (EditControl(local_blend=("auto",)), 2.0),
    "p2p-blend-g2": (EditControl(mode="p2p", local_blend=("auto",)), 2.0),
    "p2p.4-blend-g2": (EditControl(mode="p2p", cross_replace=0.4, local_blend=("auto",)), 2.0),
    "swap-mask": (EditControl(), 1.0),            # + the user mask: both shapes' masks (below)
    "swap-mask-paste": (EditControl(), 1.0),      # + the mask, then the input's pixels outside it
}
MASKED = {"swap-mask", "swap-mask-paste"}
PASTED = {"swap-mask-paste"}
PRESETS = {"demo": ("demo", {}), "sd15": ("sd15", {}), "sd15-noreg": ("sd15", {"reg_rounds": 0})}


def scene_for(i: int, group: str):
    """(scene, background RGBs [0, 1] per band, background words) of held-out scene i in `group`."""
    base = held_out(i)
    rng = random.Random(1000 * GROUPS.index(group) + i)
    shape = base.shapes[0]
    if group in ("black", "white") and shape.colour == group:
        shape = shape.__class__(shape.kind, "red", shape.size, shape.position, shape.dx, shape.dy, shape.scale)
    free = [c for c in COLOURS if c != shape.colour]
    if group == "plain":
        words = (rng.choice([c for c in free if c not in ("black", "white")]),)
    elif group == "two-tone":
        words = tuple(rng.sample(free, 2))
    elif group in ("black", "white"):
        words = (group,)
    else:
        words = (rng.choice(list(UNKNOWN)),)
    rgbs = [np.asarray(UNKNOWN.get(w) or COLOURS[w], np.float32) / 255 for w in words]
    # the renderer needs palette names: draw on a palette stand-in, then paint the real background
    stand_in = tuple(w if w in COLOURS else free[0] for w in words)
    scene = base.__class__((shape,), stand_in)
    return scene, rgbs, words


def background_image(rgbs, size=128):
    if len(rgbs) == 1:
        return np.broadcast_to(rgbs[0][:, None, None], (3, size, size)).copy()
    split = (np.arange(size) < size // 2).astype(np.float32)[:, None]
    return rgbs[0][:, None, None] * split + rgbs[1][:, None, None] * (1 - split)


def draw(scene, rgbs):
    """Image [3, S, S] in [0, 1] and the shape's coverage mask."""
    m = shape_masks(scene)[0]
    img = render(scene) * m + background_image(rgbs) * (1 - m)
    return img.astype(np.float32), m


def caption(scene, words):
    text = scene.caption
    return text.rsplit(" on a ", 1)[0] + f" on a {' and '.join(words)} background"


def target_for(scene, edit, rng):
    s = scene.shapes[0]
    if edit == "colour":
        return scene.replace_shape(0, colour=rng.choice([c for c in COLOURS if c not in (s.colour,) + scene.background
                                                         and c not in ("black", "white")]))
    if edit == "shape":
        return scene.replace_shape(0, kind=rng.choice([k for k in SHAPES if k != s.kind]))
    return scene.replace_shape(0, position=rng.choice([p for p in POSITIONS if p != s.position]))


def judge(edited, source, target, rgbs, edit):
    """Success of an edit [3, S, S] in [0, 1], read with the renderer's masks of the source and
    target scenes: the foreground (pixels farther than 0.25 from the background image) has the
    target colour (its dominant palette colour), holds 0.3-3x the target shape's area, and
      colour:   covers the target (= source) mask with IoU >= 0.5
      shape:    is classified as the target kind (renoise.demo.checks.classify_shape)
      position: has its centroid nearest the target slot and IoU < 0.2 with the source's mask."""
    want = target.shapes[0]
    tmask, smask = shape_masks(target)[0] > 0.5, shape_masks(source)[0] > 0.5
    fg = np.sqrt(((edited - background_image(rgbs)) ** 2).sum(0)) > 0.25
    colour = dominant_colour(edited, fg)
    area = fg.sum() / max(tmask.sum(), 1)
    iou = lambda a, b: float((a & b).sum() / max((a | b).sum(), 1))
    info = {"colour": colour, "area_ratio": float(area), "iou": iou(fg, tmask), "kind": None, "slot": None}
    ok = colour == want.colour and 0.3 <= area <= 3.0
    if edit == "colour":
        ok = ok and info["iou"] >= 0.5
    elif edit == "shape":
        info["kind"] = classify_shape(fg)[0]
        ok = ok and info["kind"] == want.kind
    else:
        cx = (np.nonzero(fg)[1].mean() + 0.5) / fg.shape[1] if fg.any() else -1.0
        info["slot"] = min(POSITIONS, key=lambda p: abs(POSITIONS[p] - cx))
        ok = ok and info["slot"] == want.position and iou(fg, smask) < 0.2
    return bool(ok), info


def to01(x):
    return ((x[0].float().cpu().clamp(-1, 1) + 1) / 2).numpy()


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="scenes per background group")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS)
    ap.add_argument("--edits", nargs="+", default=list(EDITS), choices=EDITS)
    ap.add_argument("--modes", nargs="+", default=["swap", "p2p", "swap-blend", "p2p-blend", "p2p-inject"],
                    choices=list(MODES))
    ap.add_argument("--presets", nargs="+", default=["demo"], choices=list(PRESETS))
    ap.add_argument("--steps", type=int, default=None, help="inversion and edit steps (default: the preset's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="benchmarks/out/edit_modes.json")
    ap.add_argument("--grid", default=None, help="write an image grid (one scene per group) to this PNG")
    ap.add_argument("--save", default=None, help="folder: write every edit as PNG (debugging)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pipe = load_pipeline("demo", dtype=torch.float32, device=device)
    rows, grid = [], []
    t_start = time.perf_counter()
    for preset_name in args.presets:
        preset, overrides = PRESETS[preset_name]
        editor = Editor(pipe, preset, num_steps=args.steps, plan_overrides=overrides)
        for group in args.groups:
            for i in range(args.first, args.first + args.n):
                scene, rgbs, words = scene_for(i, group)
                img, smask = draw(scene, rgbs)
                x = torch.from_numpy(img)[None].to(device) * 2 - 1
                gen = torch.Generator(device).manual_seed(i)
                inv = editor.invert(x, caption(scene, words), generator=gen, sample_posterior=False)
                recon = decode_latents(pipe, editor.reconstruct_latents(inv)[0])
                vae = decode_latents(pipe, inv.z0)              # the VAE's round trip: no latent edit does better
                rec_psnr = float(10 * torch.log10(4 / ((recon - x) ** 2).mean()))
                rng = random.Random(i)
                for edit in args.edits:
                    target = target_for(scene, edit, rng)
                    prompt = caption(target, words)
                    union = torch.from_numpy(np.maximum(smask, shape_masks(target)[0]))
                    for mode in args.modes:
                        control, guidance = MODES[mode]
                        if mode in MASKED:
                            control = dataclasses.replace(control, mask=union)
                        t0 = time.perf_counter()
                        z, den = editor.edit_latents(inv, prompt, control=control, edit_guidance_scale=guidance)
                        edited = decode_latents(pipe, z)
                        if mode in PASTED:
                            edited = paste_back(edited, x, union)
                        seconds = time.perf_counter() - t0
                        ok, info = judge(to01(edited), scene, target, rgbs, edit)
                        row = {"preset": preset_name, "steps": editor.plan.num_steps, "group": group, "scene": i, "edit": edit, "mode": mode,
                               "prompt": caption(scene, words), "edit_prompt": prompt, "success": ok, **info,
                               "background_psnr": background_psnr(edited, x, union),
                               "recon_background_psnr": background_psnr(recon, x, union),
                               "vae_background_psnr": background_psnr(vae, x, union),
                               "recon_psnr": rec_psnr, "calls_invert": inv.result.model_calls,
                               "calls_edit": den.calls, "seconds_edit": seconds}
                        rows.append(row)
                        if args.save:
                            from renoise.images import save_image, to_pil
                            Path(args.save).mkdir(parents=True, exist_ok=True)
                            save_image(to_pil(torch.cat([x, recon, edited], -1))[0], Path(args.save) /
                                       f"{preset_name}_{group}_{i}_{edit}_{mode}_{'ok' if ok else 'FAIL'}.png")
                        if args.grid and i == args.first and edit == "colour" and preset_name == args.presets[0]:
                            mask = getattr(den, "mask", None)
                            grid.append((group, mode, img, to01(recon), to01(edited), mask))
                print(f"{preset_name} {group} scene {i}: {time.perf_counter() - t_start:.0f} s", flush=True)
    summary = summarise(rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": platform.platform(), "device": str(device),
                                           "threads": args.threads, "torch": torch.__version__,
                                           "summary": summary, "rows": rows}, indent=1))
    print_table(summary)
    if args.grid:
        save_grid(grid, args.grid)


def summarise(rows):
    out = {}
    for r in rows:
        out.setdefault((r["preset"], r["mode"], r["group"]), []).append(r)
        out.setdefault((r["preset"], r["mode"], "all"), []).append(r)
        out.setdefault((r["preset"], r["mode"], r["group"] + ":" + r["edit"]), []).append(r)
    table = []
    for (preset, mode, group), rs in out.items():
        bg = [r["background_psnr"] for r in rs]
        table.append({"preset": preset, "mode": mode, "group": group, "n": len(rs),
                      "success": sum(r["success"] for r in rs) / len(rs),
                      "bg_psnr_median": statistics.median(bg), "bg_psnr_min": min(bg),
                      "bg_psnr_recon_median": statistics.median(r["recon_background_psnr"] for r in rs),
                      "bg_psnr_vae_median": statistics.median(r["vae_background_psnr"] for r in rs),
                      "recon_psnr_median": statistics.median(r["recon_psnr"] for r in rs),
                      "calls_invert": statistics.mean(r["calls_invert"] for r in rs),
                      "calls_edit": statistics.mean(r["calls_edit"] for r in rs)})
    return table


def print_table(summary):
    print(f"{'preset':10} {'mode':11} {'group':22} {'n':>3} {'success':>8} {'bgPSNR med':>10} {'min':>6} "
          f"{'recon bg':>8} {'VAE bg':>6} {'inv calls':>9} {'edit calls':>10}")
    for r in summary:
        print(f"{r['preset']:10} {r['mode']:11} {r['group']:22} {r['n']:3d} {100 * r['success']:7.0f}% "
              f"{r['bg_psnr_median']:10.1f} {r['bg_psnr_min']:6.1f} {r['bg_psnr_recon_median']:8.1f} "
              f"{r['bg_psnr_vae_median']:6.1f} {r['calls_invert']:9.1f} {r['calls_edit']:10.1f}")


def save_grid(grid, path):
    """One row per (group, mode): source | reconstruction | edit | blend mask."""
    from PIL import Image, ImageDraw
    cell, label_w = 128, 150
    sheet = Image.new("RGB", (label_w + 4 * cell, len(grid) * cell), "white")
    draw_ = ImageDraw.Draw(sheet)
    for r, (group, mode, src, rec, edit, mask) in enumerate(grid):
        draw_.text((4, r * cell + 56), f"{group}\n{mode}", fill="black")
        for c, a in enumerate((src, rec, edit)):
            sheet.paste(Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)),
                        (label_w + c * cell, r * cell))
        if mask is not None:
            m = (mask[0, 0].float().cpu().numpy() * 255).astype(np.uint8)
            sheet.paste(Image.fromarray(m, "L").resize((cell, cell), Image.NEAREST).convert("RGB"),
                        (label_w + 3 * cell, r * cell))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


if __name__ == "__main__":
    main()
