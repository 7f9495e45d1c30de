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
    relax2-K     plain iteration over-relaxed, relax = 2 (z + 2·(G(z) - z)), the last iterate
    warm-anderson-relax2-K   the demo preset's solver without its tolerance: warm start, Anderson
                 (memory 3) around relax = 2 steps, K+1 calls per step

For each method and budget: median / 10th-percentile PSNR over the samples, how many samples end
more than 3 dB below plain fixed-point iteration (renoise-K) at the same number of calls (the target
is none; a run that stops on a non-finite latent counts every sample as worse), the median std of
z_T relative to the prior's (1 in VP space, σ_max in Euler's; far from 1 means an implausible
fixed point), and, as a noise floor for that count, how many samples plain iteration itself loses
more than 3 dB by one more call (renoise-K against renoise-(K-1)). Stochastic samplers run without
noise correction by default: override correction makes every stochastic step land exactly whatever
z_t is, so reconstruction PSNR would no longer measure the fixed-point solve
(`--noise-correction override` to see it anyway). Writes a table to stdout, JSON and a PNG plot
into benchmarks/out/.

Part two (`--part speed`): seconds per image of renoise.invert against the official ReNoise loop
written against diffusers (tests/official_renoise.py), on one set of random UNet weights loaded
into both, same conditioning, latent and seeds; with the results' agreement (see `speed`).

    python benchmarks/inversion.py                       # DDIM, 64 samples
    python benchmarks/inversion.py --sampler euler_ancestral --std 0.1
    python benchmarks/inversion.py --part speed          # tiny UNet on CPU (under a minute)
    python benchmarks/inversion.py --part speed --compile --half bfloat16   # + compiled steps, bf16 UNet
    python benchmarks/inversion.py --part speed --size sdxl-turbo --compile compile cuda-graphs   # GPU, fp16
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import renoise
from renoise.inversion import NonFiniteLatentError
from renoise.presets import Plan
from renoise.schedules import Schedule
from renoise.metrics import psnr
from renoise.toy import GaussianMixture

OUT = Path(__file__).resolve().parent / "out"


def methods(max_k):
    """(name, K, plan kwargs) for every ReNoise-style method and K = 1..max_k."""
    for k in range(1, max_k + 1):
        yield f"renoise-{k}", k, dict(iters=k, window=(k, k + 1), average=False)
        yield f"avg-{k}", k, dict(iters=k, window=(max(0, k + 1 - 3), k + 1), average=True)
        yield f"anderson-{k}", k, dict(iters=k, window=(k, k + 1), average=False, anderson=3)
        yield f"relax2-{k}", k, dict(iters=k, window=(k, k + 1), average=False, relax=2.0)
        yield f"warm-anderson-relax2-{k}", k, dict(iters=k, window=(k, k + 1), average=False, anderson=3, relax=2.0,
                                                   warm_start="previous")


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
    nc = args.noise_correction if stochastic else "none"
    den = gm.denoiser(schedule, args.sampler)
    prior_std = float(schedule.sigma(schedule.chain(args.steps, args.sampler)[0][0])) \
        if args.sampler == "euler_ancestral" else 1.0

    def run(name, k, plan, n, calls_of):
        """Invert with `plan` over n steps, denoise over args.steps, score against x0."""
        try:
            res = renoise.invert(den, x0, schedule, args.sampler, n, plan, generator=torch.Generator().manual_seed(1),
                                 sampler_opts=opts)
        except NonFiniteLatentError as e:
            print(f"{name}: {e}")
            score, zstd, calls = torch.full((args.samples,), -math.inf), math.inf, calls_of(None)
        else:
            z = renoise.sample(den, res) if n == args.steps else denoise(den, smod, schedule, res.z_T, args.steps, opts)
            score = psnr(z.flatten(1), x0.flatten(1), data_range=1.0).float()
            zstd, calls = res.z_T.flatten(1).std(1).median().item() / prior_std, calls_of(res)
        return dict(method=name.rsplit("-", 1)[0], name=name, K=k, calls=calls, psnr=score.tolist(), z_T_std=zstd)

    rows = []
    t0 = time.perf_counter()
    for k in range(0, args.max_k + 1):
        if stochastic and k > 0:
            break
        n = args.steps * (k + 1)
        plan = Plan(sampler=args.sampler, num_steps=n, noise_correction=nc)
        rows.append(run(f"plain-{n}", k, plan, n, lambda res, n=n: n + args.steps))
    nc_calls = args.steps if nc != "none" else 0      # one more call per (stochastic) step when correcting
    for name, k, kw in methods(args.max_k):
        plan = Plan(sampler=args.sampler, num_steps=args.steps, noise_correction=nc, **kw)
        rows.append(run(name, k, plan, args.steps, lambda res, k=k: args.steps * (k + 2) + nc_calls))
    seconds = time.perf_counter() - t0

    plain_iter = {r["calls"]: torch.tensor(r["psnr"]) for r in rows if r["method"] == "renoise"}
    plain_iter[rows[0]["calls"]] = torch.tensor(rows[0]["psnr"])     # K = 0: plain inversion is the iteration
    for r in rows:
        p = torch.tensor(r["psnr"])
        r["median"], r["p10"] = p.median().item(), p.quantile(0.1).item()
        ref = plain_iter.get(r["calls"])
        r["worse_3db"] = None if ref is None else int((p < ref - 3).sum())
        prev = plain_iter.get(r["calls"] - args.steps) if r["method"] == "renoise" else None
        r["floor_3db"] = None if prev is None else int((p < prev - 3).sum())
    return dict(config=vars(args) | {"seconds": seconds, "noise_correction": nc}, rows=rows)


def table(result):
    lines = [f"{'method':<26}{'K':>3}{'calls':>7}{'median dB':>11}{'p10 dB':>9}{'>3dB below plain':>18}"
             f"{'z_T std':>9}{'plain K vs K-1':>16}"]
    n = lambda v, total: "-" if v is None else f"{v}/{total}"  # noqa: E731
    for r in result["rows"]:
        total = len(r["psnr"])
        lines.append(f"{r['name']:<26}{r['K']:>3}{r['calls']:>7}{r['median']:>11.2f}{r['p10']:>9.2f}"
                     f"{n(r['worse_3db'], total):>18}{r['z_T_std']:>9.3g}{n(r['floor_3db'], total):>16}")
    return "\n".join(lines)


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, style in (("plain", "k-o"), ("renoise", "b-s"), ("avg", "g-^"), ("anderson", "r-d"),
                          ("relax2", "c-x"), ("warm-anderson-relax2", "m-v")):
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


# the real SDXL-Turbo UNet (FACTS.md 1a: SDXL base with sample_size 64), for random weights
SDXL_TURBO_UNET = dict(block_out_channels=(320, 640, 1280), layers_per_block=2,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                       cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                       addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=64)
GEN_SEED = 7865                     # the reference code's seed


def _rel(a, b):
    """max |a - b| / max |b| (float64)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def _speed_models(args, device, dtype, folder, half=None):
    """Random weights saved with save_pretrained, loaded into diffusers' UNet and into ours (and
    into ours again in `half`, when given)."""
    from diffusers import UNet2DConditionModel

    from renoise.models import load_unet
    if args.size == "tiny":
        from tiny_models import make_tiny_unet
        built = make_tiny_unet("sdxl", seed=args.seed)
    else:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(args.seed)
            built = UNet2DConditionModel(**SDXL_TURBO_UNET)
    built.to(dtype).save_pretrained(folder / "unet")
    del built
    theirs = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).to(device).eval()
    theirs.requires_grad_(False)
    ours = load_unet(folder, dtype=dtype, device=device)
    return theirs, ours, (load_unet(folder, dtype=half, device=device) if half is not None else None)


def _speed_inputs(cfg, side, device, dtype, seed):
    """Random text conditioning (context, pooled text_embeds, time_ids) and an image latent z0."""
    g = torch.Generator().manual_seed(seed)
    px = 8 * side
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    cond = dict(context=torch.randn(1, 77, cfg["cross_attention_dim"], generator=g),
                text_embeds=torch.randn(1, pooled, generator=g),
                time_ids=torch.tensor([[px, px, 0.0, 0.0, px, px]]))
    z0 = torch.randn(1, 4, side, side, generator=g)
    return {k: v.to(device, dtype) for k, v in cond.items()}, z0.to(device, dtype)


def speed(args):
    """Part two (issue 6): seconds per image, renoise vs the official ReNoise loop on diffusers.

    One set of random UNet weights (tiny SDXL-like, or the SDXL-Turbo config) is saved with
    save_pretrained and loaded into diffusers' UNet2DConditionModel and into renoise's UNet. The same
    conditioning, latent and generator seed go to (a) the official loop on diffusers
    (tests/official_renoise.py, the reference's SDXL-Turbo defaults), (b) renoise.invert with the
    sdxl-turbo-reference preset on our UNet (through renoise.pipeline.GuidedDenoiser, as the Editor
    calls it), (c) the same on diffusers' UNet (solver speed alone), (d) with --compile MODE..., every
    inversion step as one compiled region (renoise.speed; compiled in the untimed first run) and
    (e) with --half DTYPE, our UNet's weights and activations in that dtype (latents and solver in
    --dtype). Timed: the inversion (4 Euler-ancestral steps)
    per image; the reconstruction (4 more calls) is only checked against (a). Random weights are no
    denoiser, so the reconstruction need not return to z0 (the JSON's recon_vs_z0 says how far): the
    check is that every method computes the same thing. Generators are CPU ones (noises drawn in
    float32, then moved), as in both implementations' documented draw order.
    """
    import statistics
    import sys
    import tempfile

    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # the official-loop oracle
    import official_renoise as official
    from unet import exact_rss, peak_since, reset_peak                    # benchmarks/unet.py, a sibling
    from renoise.pipeline import Conditioning, GuidedDenoiser

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.float16 if device == "cuda" else torch.float32, "float32": torch.float32,
             "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    threads = args.threads or (1 if device == "cpu" and args.size == "tiny" else 0)
    if threads:
        torch.set_num_threads(threads)
    side = args.latent or (32 if args.size == "tiny" else 64)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    half = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.half]
    with tempfile.TemporaryDirectory() as tmp:
        theirs, ours, ours_half = _speed_models(args, device, dtype, Path(tmp), half)
    cfg = dict(theirs.config)
    cond, z0 = _speed_inputs(cfg, side, device, dtype, args.seed)
    sched = official.Scheduler("euler_ancestral", 4, official.SDXL_TURBO_SCHEDULER)
    schedule = Schedule.from_config(sched.config)
    plan = Plan.preset("sdxl-turbo-reference")
    smod = renoise.samplers.get(plan.sampler)
    gen = lambda: torch.Generator().manual_seed(GEN_SEED)  # noqa: E731

    official_net = official.diffusers_net(theirs, cond["context"], cond["text_embeds"], cond["time_ids"])

    def diffusers_den(unet):
        def den(x, t):
            b = x.shape[0]
            c = {k: v.expand(b, *v.shape[1:]) for k, v in cond.items()}
            added = {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]}
            xin = smod.model_input(x, t, schedule)
            return unet(xin, t, encoder_hidden_states=c["context"], added_cond_kwargs=added).sample
        return den

    def our_den(unet):
        c = Conditioning(cond["context"], cond["text_embeds"], cond["time_ids"])
        return GuidedDenoiser(unet, schedule, plan.sampler, Conditioning(*(v.to(unet.dtype) for v in c._fields())))

    def run_official():
        traj, noises, calls = official.invert(official_net, sched, z0, gen(), **official.SDXL_TURBO)
        return traj[-1], noises, calls

    def run_renoise(den, compile=None):
        return lambda: renoise.invert(den, z0, schedule, plan.sampler, plan.num_steps, plan, generator=gen(),
                                      compile=compile)

    runs = {"renoise, our UNet": (our_den(ours), None), "renoise, diffusers UNet": (diffusers_den(theirs), None)}
    for mode in args.compile or ():
        runs[f"renoise, our UNet, compile={mode}"] = (our_den(ours), mode)
    if ours_half is not None:
        for mode in [None] + list(args.compile or ()):
            runs[f"renoise, our UNet {args.half}" + (f", compile={mode}" if mode else "")] = (our_den(ours_half), mode)
    dens = {k: d for k, (d, _) in runs.items()}
    methods = {"official loop, diffusers UNet": run_official} | {k: run_renoise(*v) for k, v in runs.items()}

    # warm-up, the parity check and the reconstructions (not timed); compiled modes compile here
    deadline = time.perf_counter() + args.budget if args.budget else None
    rows, skipped = {}, {}
    z_ref, noises_ref, calls_ref = run_official()
    recon_ref = official.denoise(official_net, sched, z_ref, noises_ref)
    rows["official loop, diffusers UNet"] = dict(calls=calls_ref, z_T_rel=0.0, recon_rel=0.0,
                                                 recon_vs_z0=_rel(recon_ref, z0))
    for name, den in dens.items():
        if deadline is not None and "compile=" in name and time.perf_counter() > deadline:
            skipped[name] = "time budget spent before its compilation"
            del methods[name]
            continue
        t0 = time.perf_counter()
        res = methods[name]()                         # the first run compiles, for compiled modes
        first = time.perf_counter() - t0
        recon = renoise.sample(den, res)
        rows[name] = dict(calls=res.model_calls, z_T_rel=_rel(res.z_T, z_ref), recon_rel=_rel(recon, recon_ref),
                          recon_vs_z0=_rel(recon, z0), first_run_seconds=first)

    times = {k: [] for k in methods}
    cpu = {k: [] for k in methods}
    for _ in range(args.repeats):          # interleaved, so that background load hits every method alike
        for name, f in methods.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            sync()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    if device == "cpu":
        exact_rss(True)
    for name, f in methods.items():        # one more run each for the activation peak above the weights
        base = reset_peak(device)
        f()
        rows[name]["peak_mib"] = peak_since(device, base) / 2**20
    if device == "cpu":
        exact_rss(False)

    official_times = times["official loop, diffusers UNet"]
    for name in methods:
        # the speed-up of each repeat against the official run of the same round: background load
        # that hits one round hits both, so the paired ratios spread less than the seconds do
        ratios = sorted(o / t for o, t in zip(official_times, times[name]))
        rows[name].update(seconds=statistics.median(times[name]), seconds_min=min(times[name]),
                          cpu_seconds=statistics.median(cpu[name]), times=times[name],
                          speedup=statistics.median(ratios), speedup_min=ratios[0], speedup_max=ratios[-1],
                          speedups=ratios)
    config = dict(size=args.size, latent=side, device=device, dtype=str(dtype).replace("torch.", ""),
                  repeats=args.repeats, threads=torch.get_num_threads(), seed=args.seed, generator_seed=GEN_SEED,
                  plan=plan.name, sampler=plan.sampler, num_steps=plan.num_steps, torch=torch.__version__,
                  gpu=torch.cuda.get_device_name() if device == "cuda" else None)
    result = dict(config=config, rows=[dict(method=k) | v for k, v in rows.items()], skipped=skipped)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"inversion_speed_{args.size}_{device}.json"
    path.write_text(json.dumps(result, indent=1))
    print(speed_table(result))
    print(f"\nwrote {path}")
    return result


def speed_table(result):
    c = result["config"]
    lines = [f"ReNoise inversion, {c['plan']} ({c['sampler']}, {c['num_steps']} steps), {c['size']} UNet with random "
             f"weights, latent {c['latent']}x{c['latent']}, {c['device']} {c['dtype']}, {c['threads']} threads, "
             f"median of {c['repeats']} interleaved rounds",
             f"{'method':<46}{'s/image':>9}{'min':>8}{'cpu s':>8}{'speed-up (min-max)':>20}{'calls':>7}"
             f"{'peak MiB':>10}{'z_T rel':>10}{'recon rel':>11}{'1st run s':>11}"]
    for r in result["rows"]:
        spread = f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})"
        lines.append(f"{r['method']:<46}{r['seconds']:>9.3f}{r['seconds_min']:>8.3f}{r['cpu_seconds']:>8.2f}"
                     f"{spread:>20}{r['calls']:>7}{r['peak_mib']:>10.1f}{r['z_T_rel']:>10.1e}"
                     f"{r['recon_rel']:>11.1e}{r.get('first_run_seconds', float('nan')):>11.1f}")
    lines += [f"{k}: skipped, {why}" for k, why in result.get("skipped", {}).items()]
    lines.append("speed-up: median over rounds of official s / method s in the same round (min-max over rounds)")
    lines.append("z_T rel / recon rel: max |x - official| / max |official| for z_T and for the reconstruction")
    return "\n".join(lines)


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
    ap.add_argument("--noise-correction", choices=("none", "override", "optimize"), default="none",
                    help="for stochastic samplers (default none: PSNR then measures the fixed-point solve)")
    ap.add_argument("--out", type=Path, default=OUT)
    sp = ap.add_argument_group("--part speed")
    sp.add_argument("--size", choices=("tiny", "sdxl-turbo"), default="tiny",
                    help="UNet config with random weights: tiny SDXL-like, or the real SDXL-Turbo one")
    sp.add_argument("--latent", type=int, default=0, help="latent side (default: 32 tiny, 64 sdxl-turbo)")
    sp.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    sp.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                    help="auto: float16 on CUDA, float32 on CPU")
    sp.add_argument("--repeats", type=int, default=10,
                    help="timed rounds after one warm-up; each round runs every method once, interleaved")
    sp.add_argument("--threads", type=int, default=0,
                    help="CPU threads (0: 1 for the tiny UNet on CPU, which gains nothing from more, else the default)")
    sp.add_argument("--compile", nargs="*", default=None, metavar="MODE",
                    help="also time renoise with every inversion step compiled (renoise.speed modes: compile, "
                         "max-autotune, cuda-graphs; no MODE: compile)")
    sp.add_argument("--budget", type=float, default=None,
                    help="seconds after which no compiled method starts compiling (skipped, and said so)")
    sp.add_argument("--half", choices=("bfloat16", "float16"), default=None,
                    help="also time our UNet with weights and activations in this dtype")
    args = ap.parse_args(argv)
    if args.compile == []:
        args.compile = ["compile"]
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
