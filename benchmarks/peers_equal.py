"""The `demo` preset's solver at each non-exact peer's budget (issue 24's goal), made by `renoise eval`.

    python benchmarks/peers_equal.py --steps 10 --home 16 --sets other-renderer unknown-words photos degraded
    python benchmarks/peers_equal.py --steps 50 --home 8 --sets photos --set-images 6

Per data set (`--demo N` for the home scenes, `--set NAME --set-size N` off home) two `renoise eval`
runs into one folder (eval resumes, so the second reuses the first's rows):
1. the non-exact peers (PEERS), the `preset` and BDIA (exact: its image PSNR is the VAE's ceiling);
2. for each peer of median cost c call-equivalents (backward passes included, at the run's measured
   ratio) at S steps, the largest K with S·(K + 1) <= c, and our variants at that K: the preset's
   solver with that budget and no tolerance (`demo-K{K}:preset=demo,iters=K,window=[K,K+1],tol=none`)
   and with the preset's tolerance kept (`demo-K{K}-tol`); at K = 0 (and for every peer that makes
   one call a step) one call a step, from the preset's warm start `previous-noise` (`demo-K0`) and
   from `extrapolate` (`demo-K0-extrap`); at K >= 1 also the `demo-damped` preset (2 calls a step).
Then per peer the verdict: the best of our variants within its median cost (by median latent PSNR;
plain DDIM inversion, our K = 0 without warm start, counts as ours), and the preset itself if its
median seconds are at most the peer's (else the best of ours within the peer's seconds), against the
peer: ">" / "=" / "<" (by 0.005 dB) and the differences in image PSNR median, p10 and latent PSNR
median, p10; seconds of both (median per inversion; peers from run 1, our variants from run 2, on
a loaded machine). And per method the image-PSNR gap to BDIA's on the same image (the VAE's ceiling).
Prints markdown; JSON to OUT/peers_equal_ddim{S}.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PEERS = ["ddim-inversion", "ddim-inversion-cfg", "fixed-point-cfg",
         "fixed-point-cfg-K9:peer=fixed-point-cfg,iters=9", "aidi", "negative-prompt", "null-text",
         "null-text-g4:peer=null-text,guidance=4,edit_guidance=4", "gnri"]
CEILING = "bdia"
SETS = ["other-renderer", "unknown-words", "photos", "degraded"]
OURS_FIXED = ["preset", "ddim-inversion"]       # ddim-inversion = Plan(iters=0): our K = 0, not judged
NEAR = (40.0, 50.0, 60.0)   # latent PSNR (dB) floors: rows above one, image PSNR against the ceiling's (decoder noise)
COLS = [("psnr", "median"), ("psnr", "p10"), ("latent_psnr", "median"), ("latent_psnr", "p10")]


def variants(k: int, one_call: bool) -> dict[str, str]:
    """{name: eval spec} of the preset's solver at K = k (and at one call a step when one_call)."""
    out = {}
    if k >= 1:
        out[f"demo-K{k}"] = f"demo-K{k}:preset=demo,iters={k},window=[{k},{k + 1}],tol=none"
        out[f"demo-K{k}-tol"] = f"demo-K{k}-tol:preset=demo,iters={k},window=[{k},{k + 1}]"
        out["demo-damped"] = "demo-damped"
    if k == 0 or one_call:
        out["demo-K0"] = "demo-K0:preset=demo,iters=0,window=[0,1],warm_start=previous-noise"
        out["demo-K0-extrap"] = "demo-K0-extrap:preset=demo,iters=0,window=[0,1],warm_start=extrapolate"
    return out


def run_eval(data, steps, methods, out, threads):
    cmd = [sys.executable, "-m", "renoise", "eval", "--model", "demo", *data, "--steps", str(steps),
           "--methods", *methods, "--out", str(out), "--quiet", "--no-plots", "--threads", str(threads)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def stat(summary, name, key, which="median"):
    return summary["methods"][name]["metrics"].get(key, {}).get(which)


def rows_of(out):
    rows = {}
    for line in (Path(out) / "rows.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["status"] == "ok":
            rows.setdefault(r["method"], {})[r["image"]] = r
    return rows


def _cmp(a, b):
    return ">" if a > b + 0.005 else "=" if abs(a - b) <= 0.005 else "<"


def judge(summary, ours, peer):
    return {"signs": "".join(_cmp(stat(summary, ours, k, w), stat(summary, peer, k, w)) for k, w in COLS),
            "diff": [stat(summary, ours, k, w) - stat(summary, peer, k, w) for k, w in COLS],
            "seconds": [stat(summary, ours, "seconds_invert"), stat(summary, peer, "seconds_invert")],
            "cost": [stat(summary, ours, "cost_invert"), stat(summary, peer, "cost_invert")]}


def one_set(label, data, steps, args):
    out = Path(args.out) / f"ddim{steps}" / label
    peers = [p.split(":")[0] for p in PEERS]
    wall1 = run_eval(data, steps, ["preset", CEILING, *PEERS], out, args.threads)
    s1 = json.loads((out / "summary.json").read_text())
    budget, specs = {}, {}
    for p in peers:
        if p == "ddim-inversion":
            continue
        cost = stat(s1, p, "cost_invert")
        k = int(cost * 1.0001 // steps) - 1
        one_call = stat(s1, p, "calls_invert") <= steps
        budget[p] = {"cost": cost, "K": k, "one_call": one_call, "variants": list(variants(k, one_call))}
        specs.update(variants(k, one_call))
    wall2 = run_eval(data, steps, ["preset", CEILING, *PEERS, *specs.values()], out, args.threads)
    s = json.loads((out / "summary.json").read_text())
    rows = rows_of(out)
    ceiling = rows.get(CEILING, {})
    gap = {}
    for name, per in rows.items():
        g = [per[i]["psnr"] - ceiling[i]["psnr"] for i in per if i in ceiling]
        if g:
            gap[name] = {"median": statistics.median(g), "min": min(g), "max": max(g)}
    noise = []
    for floor in NEAR:
        near = [per[i]["psnr"] - ceiling[i]["psnr"] for n, per in rows.items() if n != CEILING
                for i in per if i in ceiling and per[i]["latent_psnr"] >= floor]
        if near:
            noise.append({"latent_at_least": floor, "n": len(near), "min": min(near), "max": max(near)})
    verdicts = {}
    for p, b in budget.items():
        cands = [n for n in [*OURS_FIXED, *specs] if n in s["methods"]
                 and stat(s, n, "cost_invert") <= stat(s, p, "cost_invert") * 1.0001]
        best = max(cands, key=lambda n: stat(s, n, "latent_psnr"))
        v = {"budget": b, "best": best, "vs": judge(s, best, p),
             "win_all": [n for n in cands if judge(s, n, p)["signs"] == ">>>>"]}
        if stat(s, "preset", "seconds_invert") <= stat(s, p, "seconds_invert"):
            v["by_seconds"] = "preset"
        else:
            quick = [n for n in [*OURS_FIXED, *specs] if n in s["methods"]
                     and stat(s, n, "seconds_invert") <= stat(s, p, "seconds_invert")]
            v["by_seconds"] = max(quick, key=lambda n: stat(s, n, "latent_psnr")) if quick else None
        if v["by_seconds"]:
            v["vs_seconds"] = judge(s, v["by_seconds"], p)
        verdicts[p] = v
    return {"label": label, "steps": steps, "wall": [wall1, wall2], "summary": s["methods"], "gap": gap,
            "budget": budget, "verdicts": verdicts,
            "near_ceiling": noise}


def table(r):
    s = r["summary"]
    lines = [f"#### DDIM {r['steps']}, {r['label']} (eval runs {r['wall'][0]:.0f} s + {r['wall'][1]:.0f} s)", "",
             "| method | img med | p10 | gap to ceiling med / min | latent med | p10 | calls | cost | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, m in s.items():
        g = r["gap"].get(n)
        f = lambda k, w="median": m["metrics"].get(k, {}).get(w)  # noqa: E731
        gs = f"{g['median']:+.3f} / {g['min']:+.3f}" if g else "–"
        lines.append(f"| {n} | {f('psnr'):.2f} | {f('psnr', 'p10'):.2f} | {gs} | {f('latent_psnr'):.2f} | "
                     f"{f('latent_psnr', 'p10'):.2f} | {f('calls_invert'):.0f} | {f('cost_invert'):.1f} | "
                     f"{f('seconds_invert'):.3f} |")
    for nz in r.get("near_ceiling") or []:
        lines += ["", f"Image PSNR minus BDIA's (the VAE's ceiling) on the same image, over the {nz['n']} rows of "
                      f"non-exact methods with latent PSNR >= {nz['latent_at_least']:.0f} dB: {nz['min']:+.3f} to "
                      f"{nz['max']:+.3f} dB."]
    return "\n".join(lines)


def _few(names, n=3):
    return "none" if not names else ", ".join(names[:n]) + (f" (+{len(names) - n})" if len(names) > n else "")


def verdict_rows(results):
    lines = ["| DDIM | set | peer (cost) | K | best ours ≤ cost | img med, p10; lat med, p10 "
             "| Δ dB (img med, p10; lat med, p10) | s ours / peer | ≤ seconds | vs | Δ dB | ours ≤ cost winning all four |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for p, v in r["verdicts"].items():
            d = " ".join(f"{x:+.2f}" for x in v["vs"]["diff"])
            sec = "{:.3f} / {:.3f}".format(*v["vs"]["seconds"])
            q = v.get("vs_seconds")
            lines.append(f"| {r['steps']} | {r['label']} | {p} ({v['budget']['cost']:.0f}) | {v['budget']['K']} | "
                         f"{v['best']} | {v['vs']['signs']} | {d} | {sec} | {v['by_seconds'] or '–'} | "
                         f"{q['signs'] if q else ''} | {' '.join(f'{x:+.2f}' for x in q['diff']) if q else ''} | "
                         f"{_few(v['win_all'])} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps (default: 10)")
    ap.add_argument("--home", type=int, default=16, help="held-out demo scenes (--demo N; 0: none; default: 16)")
    ap.add_argument("--sets", nargs="*", choices=SETS, default=[], help="off-distribution sets (renoise eval --set)")
    ap.add_argument("--set-images", type=int, default=8, help="images per set (default: 8)")
    ap.add_argument("--out", default="benchmarks/out/peers_equal")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per eval (default: 1)")
    ap.add_argument("--jobs", type=int, default=1, help="data sets run side by side (default: 1)")
    args = ap.parse_args()
    jobs = ([("home", ["--demo", str(args.home)])] if args.home else []) + [
        (n, ["--set", n, "--set-size", str(args.set_images)]) for n in args.sets]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: one_set(j[0], j[1], args.steps, args), jobs))
    for r in results:
        print("\n" + table(r))
    print("\n" + verdict_rows(results))
    path = Path(args.out) / f"peers_equal_ddim{args.steps}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"steps": args.steps, "sets": results}, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
