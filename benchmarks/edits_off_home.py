"""Editing off the demo model's home ground (issues 21 and 24), made by `renoise eval --set` and tabulated here.

    python benchmarks/edits_off_home.py [--sets other-renderer degraded unknown-words] [--set-size 8]
    python benchmarks/edits_off_home.py --peers [--sets other-renderer degraded]

Each set of `renoise eval --set` with edits (renoise.evaluation.sets: a colour swap of one shape per
image, judged inside the renderer's mask) runs once per editing mode as
`python -m renoise eval --model demo --set NAME --set-size N --steps 10 --methods preset FLAGS
--save-images` (the `demo` preset), into OUT/<set>/<mode>. Modes (the flags; see
benchmarks/edit_modes.py and docs/eval.md):
  swap            the prompt swap
  swap-g2         --edit-guidance 2 (the source prompt as the negative)
  p2p             --edit-mode p2p (cross-attention maps replaced for 0.8 of the steps)
  p2p-blend       p2p with --local-blend auto (threshold 0.3)
  swap-blend-g2   --local-blend auto --edit-guidance 2
  p2p.4-blend-g2  p2p, --cross-replace 0.4, --local-blend auto, --edit-guidance 2
  swap-mask       --mask-edits: the renderer's mask as the edit mask (outside it, the source's latents)
  swap-mask-g2    the same with --edit-guidance 2
  swap-mask-paste swap-mask with --paste-back: outside the mask, the input's pixels (not the VAE's)
  p2p-blend-paste p2p-blend with --paste-back: outside the blend mask, the input's pixels
With --peers: one run per set of `--methods peers` (the preset beside every peer, each with its own
edit protocol: the prompt swap at its paper's guidance) into OUT/<set>/peers.

Per set and background group (second renderer: the ground of its caption, plain / black / white /
patterned = gradient, stripes or checkerboard; degraded: the demo scene's ground, plain / two-tone /
black / white): edit success, background PSNR median and minimum (the edit against the input outside
the mask grown by 3 px), and beside it the reconstruction's background PSNR (from the saved PNGs) and
the VAE round trip's (encode, decode: no latent edit keeps more of the input), the edit's against the
reconstruction (what the edit itself changed outside the mask), and the UNet calls (invert + edit; a
pair mode's call is one UNet call on the [source; edit] batch).
Goal of issue 21: success >= 90 % and background PSNR >= 35 dB (median) in every group; "met vs
recon" reads the background PSNR of the edit against the reconstruction instead (the VAE's ceiling
taken out).
Writes JSON to OUT/edits_off_home.json (or edits_off_home_peers.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODES = {"swap": [], "swap-g2": ["--edit-guidance", "2"], "p2p": ["--edit-mode", "p2p"],
         "p2p-blend": ["--edit-mode", "p2p", "--local-blend", "auto"],
         "swap-blend-g2": ["--local-blend", "auto", "--edit-guidance", "2"],
         "p2p.4-blend-g2": ["--edit-mode", "p2p", "--cross-replace", "0.4", "--local-blend", "auto",
                            "--edit-guidance", "2"],
         "swap-mask": ["--mask-edits"], "swap-mask-g2": ["--mask-edits", "--edit-guidance", "2"],
         "swap-mask-paste": ["--mask-edits", "--paste-back"],
         "p2p-blend-paste": ["--edit-mode", "p2p", "--local-blend", "auto", "--paste-back"]}


def run_eval(data_set, n, steps, out, threads, flags, methods=("preset",)):
    cmd = [sys.executable, "-m", "renoise", "eval", "--model", "demo", "--set", data_set, "--set-size", str(n),
           "--steps", str(steps), "--methods", *methods, *flags, "--save-images", "--no-plots", "--quiet",
           "--out", str(out), "--threads", str(threads)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def groups(data_set, n, seed=0):
    """{image id: background group} of the set's first n images."""
    from renoise.demo import held_out
    from renoise.evaluation import sets
    out = {}
    for i, (ident, _, caption) in enumerate(sets.images(data_set, n, seed)):
        if data_set == "degraded":
            ground = held_out(i, max_shapes=3).background
            out[ident] = "two-tone" if len(ground) == 2 else ground[0] if ground[0] in ("black", "white") else "plain"
            continue
        if data_set == "unknown-words":                      # the same renderer's scene; its own caption names the ground
            caption = sets.other_scene(seed * 100_003 + 50_000 + i)[1]
        ground = caption.rsplit(" on ", 1)[1]
        words = ground.split()
        out[ident] = ("patterned" if words[-1] != "background" else words[1] if words[1] in ("black", "white")
                      else "plain")
    return out


def _png(path):
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"), np.float32).transpose(2, 0, 1) / 255


def vae_ceiling(folder, pipe):
    """{id: background PSNR of the VAE round trip (posterior mean)} outside each mask grown by 3 px."""
    import torch

    from renoise.evaluation.measure import background_psnr
    from renoise.pipeline import decode_latents, encode_images
    out = {}
    for r in map(json.loads, (folder / "captions.jsonl").read_text().splitlines()):
        if "mask" in r:
            x = torch.from_numpy(_png(folder / r["image"]))[None] * 2 - 1
            vae = decode_latents(pipe, encode_images(pipe, x, sample=False))
            out[r["id"]] = background_psnr(vae, x, torch.from_numpy(_png(folder / r["mask"])[0]))
    return out


def recon_ceiling(folder, images_dir):
    """{id: (background PSNR of the saved reconstruction against the input, of the saved edit against
    the reconstruction)} (8-bit PNGs) outside each mask grown by 3 px."""
    import torch

    from renoise.evaluation.measure import background_psnr
    out = {}
    for r in map(json.loads, (folder / "captions.jsonl").read_text().splitlines()):
        path, edit = (images_dir / f"{r['id']}_{part}.png" for part in ("reconstruction", "edit"))
        if "mask" in r and path.is_file() and edit.is_file():
            x, recon, edit = (torch.from_numpy(_png(p))[None] * 2 - 1 for p in (folder / r["image"], path, edit))
            mask = torch.from_numpy(_png(folder / r["mask"])[0])
            out[r["id"]] = (background_psnr(recon, x, mask), background_psnr(edit, recon, mask))
    return out


def rows_of(out):
    return [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]


def stats(rows, vae=None, recon=None):
    ok = [r for r in rows if r.get("status") == "ok" and "edit_success" in r]
    if not ok:
        return {"n": 0, "failed": len(rows)}
    bg = [r["edit_background_psnr"] for r in ok]
    s = {"n": len(ok), "failed": len(rows) - len(ok), "success": float(np.mean([r["edit_success"] for r in ok])),
         "bg_median": statistics.median(bg), "bg_min": min(bg), "recon_psnr": statistics.median(r["psnr"] for r in ok),
         "calls_invert": statistics.median(r["calls_invert"] for r in ok),
         "calls_edit": statistics.median(r["calls_edit"] for r in ok)}
    rec = [recon[r["image"]] for r in ok if r["image"] in (recon or {})]
    s["recon_bg"] = statistics.median(x for x, _ in rec) if rec else None
    s["edit_vs_recon_bg"] = statistics.median(y for _, y in rec) if rec else None
    s["vae_bg"] = statistics.median(vae[r["image"]] for r in ok) if vae else None
    s["goal_met"] = s["success"] >= 0.9 and s["bg_median"] >= 35
    s["goal_met_vs_recon"] = s["success"] >= 0.9 and (s["edit_vs_recon_bg"] or 0) >= 35
    return s


def fmt(s):
    if not s.get("n"):
        return "– (all failed)"
    cell = f"{s['success']:.0%}, {s['bg_median']:.1f} ({s['bg_min']:.1f})"
    return cell + (f" [{s['failed']} failed]" if s["failed"] else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["other-renderer", "degraded", "unknown-words"])
    ap.add_argument("--set-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--peers", action="store_true", help="the peers' edits (--methods peers) instead of the modes")
    ap.add_argument("--out", default="benchmarks/out/edits_off_home")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-run", action="store_true", help="tabulate the rows already in --out (no eval runs)")
    ap.add_argument("--grid", metavar="PNG", help="only write an image grid of the runs in --out: per set of --sets, "
                                                  "3 images as rows (96 px), input | mask | each of --modes")
    args = ap.parse_args()
    if args.grid:
        return grid(Path(args.out), args.sets, args.modes, 3, args.grid)
    import torch
    torch.set_num_threads(args.threads)
    from renoise.models import load_pipeline
    pipe = load_pipeline("demo")
    root = Path(args.out)
    result = {"machine": platform.processor() or platform.machine(), "set_size": args.set_size, "steps": args.steps,
              "sets": {}}
    for data_set in args.sets:
        group_of = groups(data_set, args.set_size)
        names = sorted(set(group_of.values()))
        per = result["sets"][data_set] = {"groups": {g: sum(v == g for v in group_of.values()) for g in names},
                                          "runs": {}}
        runs = {"peers": []} if args.peers else {m: MODES[m] for m in args.modes}
        vae = None
        for mode, flags in runs.items():
            out = root / data_set / mode
            methods = ("peers",) if args.peers else ("preset",)
            wall = None if args.no_run else run_eval(data_set, args.set_size, args.steps, out, args.threads, flags,
                                                     methods)
            rows = [r for r in rows_of(out) if r["image"] in group_of]     # this --set-size's images
            folder = out / "data" / data_set
            vae = vae if vae is not None else vae_ceiling(folder, pipe)
            for method in dict.fromkeys(r["method"] for r in rows):
                mine = [r for r in rows if r["method"] == method]
                recon = recon_ceiling(folder, out / "images" / method)
                key = method if args.peers else mode
                per["runs"][key] = {"wall_s": wall, "all": stats(mine, vae, recon),
                                    "groups": {g: stats([r for r in mine if group_of[r["image"]] == g], vae, recon)
                                               for g in names}}
        table(data_set, per, args.peers)
    name = "edits_off_home_peers.json" if args.peers else "edits_off_home.json"
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(result, indent=1))
    print(f"wrote {root / name}")


def grid(root, data_sets, modes, n, path):
    """PNG: per set, its first n images as rows: input | mask | the edit of each mode (from --save-images)."""
    from PIL import Image
    rows = []
    for data_set in data_sets:
        folder = root / data_set / modes[0] / "data" / data_set
        for r in list(map(json.loads, (folder / "captions.jsonl").read_text().splitlines()))[:n]:
            cells = [folder / r["image"], folder / r["mask"],
                     *(root / data_set / m / "images" / "preset" / f"{r['id']}_edit.png" for m in modes)]
            rows.append(np.concatenate([np.asarray(Image.open(c).convert("RGB").resize((96, 96), Image.Resampling.LANCZOS))
                                        for c in cells], 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, 0)).quantize(256).save(path, optimize=True)     # 256 colours: small
    print(f"wrote {path}")


def table(data_set, per, peers):
    names = list(per["groups"])
    print(f"\n#### {data_set} ({sum(per['groups'].values())} images: "
          + ", ".join(f"{g} {k}" for g, k in per["groups"].items()) + ")\n")
    head = ["method" if peers else "mode", "all: success, bg PSNR median (min)", *names,
            "recon PSNR", "recon bg / VAE bg / edit-vs-recon bg", "calls", "goal met in", "met vs recon in"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key, run in per["runs"].items():
        a = run["all"]
        met = [g for g in names if run["groups"][g].get("goal_met")]
        met_recon = [g for g in names if run["groups"][g].get("goal_met_vs_recon")]
        ceil = " / ".join("–" if a.get(k) is None else f"{a[k]:.1f}" for k in ("recon_bg", "vae_bg", "edit_vs_recon_bg"))
        cells = [key, fmt(a), *(fmt(run["groups"][g]) for g in names),
                 f"{a['recon_psnr']:.1f}" if a.get("n") else "–", ceil,
                 f"{a['calls_invert']:.0f} + {a['calls_edit']:.0f}" if a.get("n") else "–",
                 ", ".join(met) or "none", ", ".join(met_recon) or "none"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
