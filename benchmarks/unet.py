"""UNet forward speed and memory: renoise's UNet against diffusers' UNet2DConditionModel.

Both run in one process on the *same* weight tensors (ours is built on the meta device and its
parameters are assigned diffusers' tensors), same inputs, calls interleaved so that background
load hits both alike. Peak memory of a forward is the activation peak above the weights: CUDA's
allocator peak on GPU, the process high-water mark (/proc VmHWM, reset through clear_refs) on CPU,
with glibc told to mmap every allocation >= 64 KiB during that measurement (so freed memory leaves
RSS at once and the order of the two runs does not matter). On a shared machine compare the min
times as well as the medians, and (with --threads 1) the median process CPU time per call, which
other processes do not inflate.
Load memory: a fresh subprocess loads a saved checkpoint; its peak RSS above the post-import
baseline is reported against the weights' size (our loader, then diffusers' from_pretrained).

    python benchmarks/unet.py                        # CPU: tiny config + SD 1.5 at 32×32 latents, fp32
    python benchmarks/unet.py --cases small --reps 5 # quick
    python benchmarks/unet.py --cases small --compile --freeze   # + torch.compile of both models (CPU: inductor C++)
    on CUDA: SD 1.5 at 512 px and SDXL at 1024 px in fp16 (plus the CPU cases with --cases)
    python benchmarks/unet.py --cases sd15-cuda-512 sdxlturbo-cuda-512 --batch 1 2 --dtypes float16 bfloat16 \
        --compile --graphs --no-load --budget 240   # benchmarks/gpu.sh: eager / compiled / graphed, TFLOP/s

--compile adds each model under torch.compile (inductor, static shapes: ours through
renoise.accelerate, fullgraph; diffusers' plainly); --freeze adds ours with inductor's freezing;
--graphs (CUDA) adds each compiled model replayed from an explicit torch.cuda.CUDAGraph capture
(the compiled code captured as is: no second compilation). --budget stops starting new compiles
after that many seconds, so that a fixed time slot always ends with a table.

Prints a table and writes JSON (benchmarks/out/unet.json or --json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from renoise.models import UNet, UNetConfig  # noqa: E402

SMALL = dict(block_out_channels=(64, 128), layers_per_block=2, norm_num_groups=32, cross_attention_dim=128,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
             attention_head_dim=8, sample_size=32)
SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
            cross_attention_dim=768, sample_size=64)
SDXL = dict(block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), layers_per_block=2,
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, sample_size=128)

# name: (diffusers config, latent size, dtype, device, default reps)
CASES = {
    "small-cpu-32": (SMALL, 32, torch.float32, "cpu", 10),
    "sd15-cpu-32": (SD15, 32, torch.float32, "cpu", 3),
    "sd15-cuda-512": (SD15, 64, torch.float16, "cuda", 20),
    "sdxlturbo-cuda-512": (SDXL, 64, torch.float16, "cuda", 20),
    "sdxl-cuda-1024": (SDXL, 128, torch.float16, "cuda", 10),
}
# FLOPs of one UNet pass per sample (issue 13's figures), for TFLOP/s
FLOPS = {"sd15-cuda-512": 0.80e12, "sdxlturbo-cuda-512": 1.59e12}


def rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _libc():
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


M_MMAP_THRESHOLD = -3


def exact_rss(on: bool):
    """On glibc, serve every allocation >= 64 KiB by mmap so that freed memory leaves RSS at once:
    the high-water mark then measures live memory, whichever model runs first."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024 if on else 32 * 2 ** 20)
        libc.malloc_trim(0)


def reset_peak(device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_kib("VmRSS") * 1024


def peak_since(device, base) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return rss_kib("VmHWM") * 1024 - base


def build_pair(cfg: dict, dtype, device, seed=0):
    """diffusers' UNet with random weights, and ours sharing the very same tensors."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    with torch.device(device):
        ref = UNet2DConditionModel(**cfg)
    ref = ref.to(dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        ours = UNet(UNetConfig.from_dict(dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


def inputs(cfg, size, dtype, device, batch=2, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g).to(device, dtype)
    t = torch.full((batch,), 801.0).to(device)
    ctx = torch.randn(batch, 77, cfg["cross_attention_dim"], generator=g).to(device, dtype)
    extra = {}
    if cfg.get("addition_embed_type") == "text_time":
        extra = dict(text_embeds=torch.randn(batch, 1280, generator=g).to(device, dtype),
                     time_ids=torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch).to(device, dtype))
    return x, t, ctx, extra


def variants(ref, ours, args, device, compile=False, freeze=False, graphs=False, deadline=None):
    """{name: zero-argument callable} for each model and mode asked for (compiling is done here,
    untimed; a mode that fails or misses the deadline is reported as skipped)."""
    import renoise
    x, t, ctx, extra = args
    dkw = {"added_cond_kwargs": extra} if extra else {}
    ours_call = lambda m: (lambda: m(x, t, ctx, **extra))  # noqa: E731
    ref_call = lambda m: (lambda: m(x, t, ctx, **dkw).sample)  # noqa: E731
    runs = {"renoise": ours_call(ours), "diffusers": ref_call(ref)}
    skipped = {}
    todo = []
    if compile:
        todo += [("renoise compiled", lambda: ours_call(renoise.accelerate(ours, "compile"))),
                 ("diffusers compiled", lambda: ref_call(torch.compile(ref, dynamic=False)))]
    if freeze:
        todo += [("renoise compiled+frozen", lambda: ours_call(renoise.accelerate(ours, "compile", freeze=True)))]
    for name, make in todo:
        if deadline is not None and time.perf_counter() > deadline:
            skipped[name] = "time budget spent"
            continue
        try:
            f = make()
            with torch.inference_mode():
                t0 = time.perf_counter()
                f()                               # compiles
                f.compile_seconds = time.perf_counter() - t0
            runs[name] = f
        except Exception as e:  # noqa: BLE001 -- report and go on: one failing mode must not lose the table
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if graphs and device == "cuda":
        for name in [n for n in list(runs) if n.endswith("compiled")]:
            try:
                runs[name + "+graphed"] = cuda_graphed(runs[name])
            except Exception as e:  # noqa: BLE001
                skipped[name + "+graphed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return runs, skipped


def cuda_graphed(f):
    """f captured once in a torch.cuda.CUDAGraph (static inputs: the ones f closes over) and replayed."""
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                f()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = f()
    def replay():
        graph.replay()
        return out
    return replay


def time_variants(runs, device, reps, peak=True):
    """Interleaved timing of every variant; (results, rel error of each against diffusers eager)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        outs = {k: f().float() for k, f in runs.items()}             # warm-up (and the parity check)
        ref = outs["diffusers"]
        errs = {k: ((o - ref).norm() / ref.norm()).item() for k, o in outs.items()}
        del outs, ref
        res = {k: {"times": [], "cpu_times": []} for k in runs}
        for _ in range(reps):
            for k, f in runs.items():
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                f()
                sync()
                res[k]["times"].append(time.perf_counter() - t0)
                res[k]["cpu_times"].append(time.process_time() - c0)
        if peak:
            if device == "cpu":
                exact_rss(True)
            for _ in range(2):               # the min of two rounds drops one-time costs of the first call
                for k, f in runs.items():
                    base = reset_peak(device)
                    f()
                    res[k]["peak_bytes"] = min(res[k].get("peak_bytes", 2 ** 62), peak_since(device, base))
            if device == "cpu":
                exact_rss(False)
    for k, r in res.items():
        r["median_s"] = statistics.median(r["times"])
        r["compile_s"] = getattr(runs[k], "compile_seconds", None)
    return res, errs


LOAD_SCRIPT = r"""
import json, sys, time, torch
def kib(f):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(f + ':'))
import renoise.models.loading, renoise.models.unet
from diffusers import UNet2DConditionModel
torch.ones(1)
base = kib('VmRSS') * 1024
t0 = time.perf_counter()
if sys.argv[1] == 'renoise':
    m = renoise.models.loading.load_unet(sys.argv[2])
else:
    m = UNet2DConditionModel.from_pretrained(sys.argv[2])
dt = time.perf_counter() - t0
w = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({'peak_bytes': kib('VmHWM') * 1024 - base, 'weights_bytes': w, 'seconds': dt}))
"""


def load_memory(ref, who: str, folder: Path):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, who, str(folder)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", help=f"subset of {list(CASES)} (default: all that fit the device)")
    ap.add_argument("--reps", type=int, help="timed calls per model (default per case)")
    ap.add_argument("--batch", type=int, nargs="*", default=[2], help="batch sizes (default: 2, a CFG batch)")
    ap.add_argument("--dtypes", nargs="*", choices=("float32", "float16", "bfloat16"),
                    help="dtypes (default: the case's)")
    ap.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    ap.add_argument("--freeze", action="store_true", help="also time ours compiled with inductor's freezing")
    ap.add_argument("--graphs", action="store_true", help="CUDA: also replay each compiled model as a CUDA graph")
    ap.add_argument("--budget", type=float, default=None, help="seconds after which no new compile starts")
    ap.add_argument("--no-load", action="store_true", help="skip the load-memory measurement")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "unet.json"))
    a = ap.parse_args()
    deadline = time.perf_counter() + a.budget if a.budget else None
    cuda = torch.cuda.is_available()
    if a.threads:
        torch.set_num_threads(a.threads)
    names = a.cases or [n for n, c in CASES.items() if c[3] == "cpu" or cuda]
    if not names:
        raise SystemExit("no case selected")
    results = {"env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
                       "cuda": torch.cuda.get_device_name() if cuda else None}, "cases": {}}
    try:
        import diffusers
        results["env"]["diffusers"] = diffusers.__version__
    except ImportError:
        raise SystemExit("this benchmark compares against diffusers; install it") from None

    for name in names:
        cfg, size, dtype, device, reps = CASES[name]
        if device == "cuda" and not cuda:
            print(f"skip {name}: no CUDA")
            continue
        for dt in [getattr(torch, d) for d in a.dtypes] if a.dtypes else [dtype]:
            ref, ours = build_pair(cfg, dt, device)
            nparams = sum(p.numel() for p in ours.parameters())
            for batch in a.batch:
                key = name if (dt, batch) == (dtype, 2) else f"{name}-{str(dt)[6:]}-b{batch}"
                runs, skipped = variants(ref, ours, inputs(cfg, size, dt, device, batch), device, a.compile,
                                         a.freeze, a.graphs, deadline)
                res, errs = time_variants(runs, device, a.reps or reps, peak=not (a.compile or a.graphs))
                case = {"params": nparams, "latent": size, "dtype": str(dt), "device": device, "batch": batch,
                        "rel_err_vs_diffusers": errs["renoise"], "rel_err": errs, "skipped": skipped,
                        "flops_per_sample": FLOPS.get(name), **res}
                results["cases"][key] = case
                print_case(key, case)
            if not a.no_load and device == "cpu":
                with tempfile.TemporaryDirectory() as tmp:
                    ref.save_pretrained(tmp)
                    del ref, ours
                    case["load"] = {who: load_memory(None, who, Path(tmp)) for who in ("renoise", "diffusers")}
                print_load(case)
            else:
                del ref, ours
            if device == "cuda":
                torch.cuda.empty_cache()
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=1))
    print(f"\nJSON: {a.json}")


def print_case(name, c):
    mib = 2 ** 20
    flops = c.get("flops_per_sample")
    print(f"\n{name}: {c['params'] / 1e6:.1f}M params, batch {c['batch']}, {c['latent']}x{c['latent']} latents, "
          f"{c['dtype']} on {c['device']}")
    print(f"  {'':26} {'median ms':>10} {'min ms':>8} {'CPU-time ms':>12} {'fwd peak MiB':>13} {'rel err':>8} "
          f"{'compile s':>10}" + (f" {'TFLOP/s':>8}" if flops else ""))
    runs = [k for k in c if isinstance(c[k], dict) and "median_s" in c[k]]
    for k in runs:
        v = c[k]
        peak = f"{v['peak_bytes'] / mib:13.1f}" if "peak_bytes" in v else f"{'-':>13}"
        comp = f"{v['compile_s']:10.1f}" if v.get("compile_s") else f"{'-':>10}"
        tf = f" {flops * c['batch'] / min(v['times']) / 1e12:8.1f}" if flops else ""
        print(f"  {k:26} {1e3 * v['median_s']:10.2f} {1e3 * min(v['times']):8.2f} "
              f"{1e3 * statistics.median(v['cpu_times']):12.1f} {peak} {c['rel_err'][k]:8.1e} {comp}{tf}")
    for k, why in c.get("skipped", {}).items():
        print(f"  {k:26} skipped: {why}")
    d = c["diffusers"]
    for k in runs:
        if k != "diffusers":
            print(f"  speed-up of {k} over diffusers eager: median {d['median_s'] / c[k]['median_s']:.3f}x, "
                  f"min {min(d['times']) / min(c[k]['times']):.3f}x")


def print_load(c):
    mib = 2 ** 20
    for k, v in c["load"].items():
        print(f"  load {k:10}: peak RSS +{v['peak_bytes'] / mib:.0f} MiB for {v['weights_bytes'] / mib:.0f} MiB "
              f"of weights ({v['peak_bytes'] / v['weights_bytes']:.2f}x) in {v['seconds']:.2f}s")


if __name__ == "__main__":
    main()
