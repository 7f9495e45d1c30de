"""Inversion benchmark.

Part one (`--part accuracy`, this file): reconstruction quality against model calls on the analytic
Gaussian-mixture model (renoise.toy), where the exact denoiser is known, so all error is the
inversion's. Methods, all at the same number of denoising steps (default 4, trailing spacing):

    plain-N      plain inversion with N = steps·(K+1) inversion steps (K+1 times the calls), then
                 denoising with the usual `steps` (the paper's "sampler reversing" baseline;
                 deterministic samplers only: a stochastic sampler's noises belong to one chain)
    renoise-K    K renoising iterations per step, the last iterate (plain fixed-point iteration)
    avg-K        the same iterations, the answer from the average of the last min(3, K+1) raw
                 model outputs (as the paper's w8..w10 for K = 9)
    anderson-K   K+1 calls of safeguarded Anderson mixing (memory 3) per step

For each method and budget: median / 10th-percentile PSNR over the samples and how many samples end
more than 3 dB below plain fixed-point iteration (renoise-K) at the same number of calls (the target
is none). Stochastic samplers use override noise correction for every method (one more call per
stochastic step). Writes a table to stdout, JSON and a PNG plot into benchmarks/out/.

Part two (`--part speed`, to be written with issue 6): seconds per image of renoise against the
official ReNoise loop on diffusers, same weights and inputs. `speed()` below is the place for it.

    python benchmarks/inversion.py                       # DDIM, 64 samples
    python benchmarks/inversion.py --sampler euler_ancestral --std 0.1
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import renoise
from renoise.presets import Plan
from renoise.schedules import Schedule
from renoise.toy import GaussianMixture, psnr

OUT = Path(__file__).resolve().parent / "out"


def methods(max_k):
    """(name, K, plan kwargs) for every ReNoise-style method and K = 1..max_k."""
    for k in range(1, max_k + 1):
        yield f"renoise-{k}", k, dict(iters=k, window=(k, k + 1), average=False)
        yield f"avg-{k}", k, dict(iters=k, window=(max(0, k + 1 - 3), k + 1), average=True)
        yield f"anderson-{k}", k, dict(iters=k, window=(k, k + 1), average=False, anderson=3)


def denoise(den, smod, schedule, z, steps, opts):
    """Denoise z along the `steps`-step chain (deterministic samplers)."""
    for t, tn in schedule.chain(steps, smod.NAME):
        z = smod.step(z, den(z, t), t, tn, schedule, **opts)
    return z


def accuracy(args):
    g = torch.Generator().manual_seed(args.seed)
    gm = GaussianMixture.random(args.components, args.dim, std=args.std, scale=args.scale, generator=g)
    side = int(round(math.sqrt(args.dim / 4)))
    if 4 * side * side != args.dim:
        raise SystemExit("--dim must be 4·s² (the latent is shaped [B, 4, s, s])")
    x0 = gm.sample(args.samples, g).view(args.samples, 4, side, side).to(torch.float32)
    schedule = Schedule.create(timestep_spacing="trailing", steps_offset=1)
    smod = renoise.samplers.get(args.sampler)
    opts = {"eta": args.eta} if args.sampler == "ddim" and args.eta else {}
    stochastic = any(smod.is_stochastic(tn, **opts) for _, tn in schedule.chain(args.steps, args.sampler))
    nc = "override" if stochastic else "none"
    den = gm.denoiser(schedule, args.sampler)

    def run(name, k, z0hat, model_calls):
        score = psnr(z0hat.flatten(1), x0.flatten(1)).float()
        return dict(method=name.rsplit("-", 1)[0], name=name, K=k, calls=model_calls, psnr=score.tolist())

    rows = []
    t0 = time.perf_counter()
    for k in range(0, args.max_k + 1):
        if stochastic and k > 0:
            break
        n = args.steps * (k + 1)
        res = renoise.invert(den, x0, schedule, args.sampler, n, Plan(sampler=args.sampler, num_steps=n,
                             noise_correction=nc), generator=torch.Generator().manual_seed(1), sampler_opts=opts)
        z = renoise.sample(den, res) if n == args.steps else denoise(den, smod, schedule, res.z_T, args.steps, opts)
        rows.append(run(f"plain-{n}", k, z, res.model_calls + args.steps))
    for name, k, kw in methods(args.max_k):
        plan = Plan(sampler=args.sampler, num_steps=args.steps, noise_correction=nc, **kw)
        res = renoise.invert(den, x0, schedule, args.sampler, args.steps, plan,
                             generator=torch.Generator().manual_seed(1), sampler_opts=opts)
        rows.append(run(name, k, renoise.sample(den, res), res.model_calls + args.steps))
    seconds = time.perf_counter() - t0

    plain_iter = {r["calls"]: torch.tensor(r["psnr"]) for r in rows if r["method"] == "renoise"}
    plain_iter[rows[0]["calls"]] = torch.tensor(rows[0]["psnr"])     # K = 0: plain inversion is the iteration
    for r in rows:
        p = torch.tensor(r["psnr"])
        r["median"], r["p10"] = p.median().item(), p.quantile(0.1).item()
        ref = plain_iter.get(r["calls"])
        r["worse_3db"] = None if ref is None else int((p < ref - 3).sum())
    return dict(config=vars(args) | {"seconds": seconds, "noise_correction": nc}, rows=rows)


def table(result):
    lines = [f"{'method':<14}{'K':>3}{'calls':>7}{'median dB':>11}{'p10 dB':>9}{'>3dB below plain iter':>23}"]
    for r in result["rows"]:
        worse = "-" if r["worse_3db"] is None else f"{r['worse_3db']}/{len(r['psnr'])}"
        lines.append(f"{r['name']:<14}{r['K']:>3}{r['calls']:>7}{r['median']:>11.2f}{r['p10']:>9.2f}{worse:>23}")
    return "\n".join(lines)


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, style in (("plain", "k-o"), ("renoise", "b-s"), ("avg", "g-^"), ("anderson", "r-d")):
        rows = [r for r in result["rows"] if r["method"] == method]
        if rows:
            ax.plot([r["calls"] for r in rows], [r["median"] for r in rows], style, label=method, ms=4)
    c = result["config"]
    ax.set_xlabel("model calls per sample (inversion + denoising)")
    ax.set_ylabel("median reconstruction PSNR (dB)")
    ax.set_title(f"{c['sampler']}, {c['steps']} steps, mixture d={c['dim']} std={c['std']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def speed(args):
    """Part two (issue 6): seconds per image, renoise vs the official ReNoise loop on diffusers."""
    raise SystemExit("--part speed is not written yet (issue 6): it will time renoise.invert against the "
                     "official ReNoise loop on diffusers with the same weights and inputs")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("accuracy", "speed"), default="accuracy")
    ap.add_argument("--sampler", default="ddim", choices=renoise.samplers.NAMES)
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM eta (> 0: stochastic)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-k", type=int, default=9)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--components", type=int, default=16)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--std", type=float, default=0.3, help="component std of the mixture")
    ap.add_argument("--scale", type=float, default=0.5, help="std of the component means")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.part == "speed":
        return speed(args)
    torch.set_num_threads(1)
    result = accuracy(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"inversion_{args.sampler}"
    (args.out / f"{stem}.json").write_text(json.dumps(result | {"config": {k: str(v) if isinstance(v, Path) else v
                                                                              for k, v in result["config"].items()}},
                                                      indent=1))
    plot(result, args.out / f"{stem}.png")
    print(table(result))
    print(f"\n{result['config']['seconds']:.1f} s; wrote {args.out / stem}.json and .png")


if __name__ == "__main__":
    main()
