"""Flow-transformer forward speed: renoise's SD3Transformer / FluxTransformer against diffusers'
SD3Transformer2DModel / FluxTransformer2DModel, on the same weight tensors and inputs.

diffusers' model is built with random weights (on the target device; full-size cases on the meta
device first, then filled there), ours is built on the meta device and assigned the very same
tensors (no second copy). Calls are interleaved so that background load hits both alike; the table
gives median and min wall time per forward, the relative error of each variant against diffusers
eager, and (with --compile / --graphs) each model under torch.compile (ours through
renoise.accelerate, fullgraph; diffusers' plainly) and replayed from an explicit CUDA graph capture.

    python benchmarks/transformer.py                                  # CPU: small SD3 and Flux configs, fp32
    python benchmarks/transformer.py --cases sd3-small flux-small --reps 5
    on CUDA (benchmarks/gpu.sh): full-size SD3.5-medium / SD3.5-large @1024 and FLUX.1-dev @1024, bf16
    python benchmarks/transformer.py --cases sd35m-cuda-1024 flux-dev-cuda-1024 --dtypes bfloat16 \
        --compile --graphs --budget 200

Prints a table and writes JSON (benchmarks/out/transformer.json or --json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from renoise.models.flux import FluxConfig, FluxTransformer, latent_image_ids, pack_latents, text_ids
from renoise.models.mmdit import SD3Config, SD3Transformer

SD3_SMALL = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64,
                 num_attention_heads=4, joint_attention_dim=256, caption_projection_dim=256,
                 pooled_projection_dim=128, out_channels=16, pos_embed_max_size=32, qk_norm="rms_norm",
                 dual_attention_layers=(0, 1))
FLUX_SMALL = dict(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=2,
                  joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=True)
SD35M = dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
             qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
SD35L = dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
             qk_norm="rms_norm")
FLUX_DEV = dict(guidance_embeds=True)

# name: (family, diffusers config, latent size (16-ch VAE latent pixels), text tokens, device, default reps)
CASES = {
    "sd3-small": ("sd3", SD3_SMALL, 32, 77, "cpu", 10),
    "flux-small": ("flux", FLUX_SMALL, 32, 64, "cpu", 10),
    "sd35m-cuda-1024": ("sd3", SD35M, 128, 333, "cuda", 20),
    "sd35l-cuda-1024": ("sd3", SD35L, 128, 333, "cuda", 20),
    "flux-dev-cuda-1024": ("flux", FLUX_DEV, 128, 512, "cuda", 20),
}


def build_pair(family, cfg: dict, dtype, device, seed=0):
    """diffusers' model with random N(0, 0.02²) weights on `device`, and ours sharing its tensors."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    cls, ours_cls, cfg_cls = ((SD3Transformer2DModel, SD3Transformer, SD3Config) if family == "sd3" else
                              (FluxTransformer2DModel, FluxTransformer, FluxConfig))
    with torch.device("meta"):
        ref = cls(**cfg)
    ref = ref.to(dtype).to_empty(device=device).eval().requires_grad_(False)     # no fp32 copy on the device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.02, generator=g)
        if family == "sd3":     # the position table is a buffer: the real one (to_empty left it undefined)
            from renoise.models.mmdit import sincos_grid
            D, M = ref.config.num_attention_heads * ref.config.attention_head_dim, ref.config.pos_embed_max_size
            ref.pos_embed.pos_embed.copy_(sincos_grid(D, M, ref.config.sample_size // ref.config.patch_size))
    with torch.device("meta"):
        ours = ours_cls(cfg_cls.from_dict(dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


def inputs(family, cfg, size, tokens, dtype, device, batch, seed=0):
    """(ours: positional args + kwargs, diffusers: kwargs) for one forward."""
    g = torch.Generator().manual_seed(seed)
    joint = cfg.get("joint_attention_dim", 4096)
    pooled = torch.randn(batch, cfg.get("pooled_projection_dim", 2048 if family == "sd3" else 768), generator=g)
    ctx = torch.randn(batch, tokens, joint, generator=g)
    pooled, ctx = pooled.to(device, dtype), ctx.to(device, dtype)
    if family == "sd3":
        x = torch.randn(batch, 16, size, size, generator=g).to(device, dtype)
        t = torch.full((batch,), 801.0, device=device)
        return ((x, t, ctx, pooled), {}), dict(hidden_states=x, timestep=t, encoder_hidden_states=ctx,
                                              pooled_projections=pooled)
    x = pack_latents(torch.randn(batch, cfg["in_channels"] // 4, size, size, generator=g)).to(device, dtype)
    t = torch.full((batch,), 0.801, device=device)
    img, txt = latent_image_ids(size, size, device=device), text_ids(tokens, device=device)
    guidance = torch.full((batch,), 3.5, device=device) if cfg.get("guidance_embeds") else None
    return ((x, t, ctx, pooled, img, txt), {"guidance": guidance}), dict(
        hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled, img_ids=img, txt_ids=txt,
        guidance=guidance)


def variants(ref, ours, args, compile=False, graphs=False, deadline=None):
    """{name: zero-argument callable}; compiling is done here (untimed). Failing modes are reported."""
    import renoise
    (oargs, okw), dkw = args
    ours_call = lambda m: (lambda: m(*oargs, **okw))  # noqa: E731
    ref_call = lambda m: (lambda: m(**dkw, return_dict=False)[0])  # noqa: E731
    runs, skipped, todo = {"renoise": ours_call(ours), "diffusers": ref_call(ref)}, {}, []
    if compile:
        todo += [("renoise compiled", lambda: ours_call(renoise.accelerate(ours, "compile"))),
                 ("diffusers compiled", lambda: ref_call(torch.compile(ref, dynamic=False)))]
    for name, make in todo:
        if deadline is not None and time.perf_counter() > deadline:
            skipped[name] = "time budget spent"
            continue
        try:
            f = make()
            with torch.inference_mode():
                t0 = time.perf_counter()
                f()
                f.compile_seconds = time.perf_counter() - t0
            runs[name] = f
        except Exception as e:  # noqa: BLE001 -- one failing mode must not lose the table
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if graphs and next(ours.parameters()).is_cuda:
        for name in [n for n in list(runs) if n.endswith("compiled")]:
            try:
                runs[name + "+graphed"] = cuda_graphed(runs[name])
            except Exception as e:  # noqa: BLE001
                skipped[name + "+graphed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return runs, skipped


def cuda_graphed(f):
    """f captured once in a torch.cuda.CUDAGraph (its inputs are the tensors it closes over) and replayed."""
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


def time_variants(runs, cuda: bool, reps: int):
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.inference_mode():
        outs = {k: f().float() for k, f in runs.items()}
        ref = outs["diffusers"]
        errs = {k: ((o - ref).norm() / ref.norm()).item() for k, o in outs.items()}
        del outs, ref
        res = {k: {"times": []} for k in runs}
        for _ in range(reps):
            for k, f in runs.items():
                sync()
                t0 = time.perf_counter()
                f()
                sync()
                res[k]["times"].append(time.perf_counter() - t0)
    for k, r in res.items():
        r.update(median_s=statistics.median(r["times"]), min_s=min(r["times"]), rel_err=errs[k],
                 compile_s=getattr(runs[k], "compile_seconds", None))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", help=f"subset of {list(CASES)} (default: those that fit the device)")
    ap.add_argument("--dtypes", nargs="*", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, help="timed calls per variant (default per case)")
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd variants")
    ap.add_argument("--graphs", action="store_true", help="CUDA: add CUDA-graph replays of the compiled variants")
    ap.add_argument("--budget", type=float, default=None, help="seconds after which no new compile starts")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "transformer.json")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    names = a.cases or [n for n, c in CASES.items() if c[4] == "cpu" or cuda]
    deadline = time.perf_counter() + a.budget if a.budget else None
    cases = {}
    for name in names:
        family, cfg, size, tokens, device, reps = CASES[name]
        if device == "cuda" and not cuda:
            print(f"{name}: skipped (no CUDA)")
            continue
        for dt in a.dtypes or (["bfloat16"] if device == "cuda" else ["float32"]):
            dtype = getattr(torch, dt)
            ref, ours = build_pair(family, cfg, dtype, device)
            args = inputs(family, cfg, size, tokens, dtype, device, a.batch)
            runs, skipped = variants(ref, ours, args, a.compile, a.graphs, deadline)
            res = time_variants(runs, device == "cuda", a.reps or reps)
            key = f"{name} {dt} B={a.batch}"
            cases[key] = dict(results=res, skipped=skipped,
                              params=sum(p.numel() for p in ours.parameters()))
            print_case(key, cases[key])
            del ref, ours, runs
            if device == "cuda":
                torch.cuda.empty_cache()
    result = dict(env=dict(torch=torch.__version__, cpu=platform.processor(), cpus=os.cpu_count(),
                           threads=torch.get_num_threads(),
                           cuda=torch.cuda.get_device_name() if cuda else None, date=time.strftime("%Y-%m-%d")),
                  cases=cases)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1))
    print(f"JSON: {a.json}")
    return result


def print_case(key, c):
    print(f"\n{key}  ({c['params'] / 1e6:.1f} M parameters)")
    print(f"  {'variant':28} {'median ms':>10} {'min ms':>9} {'vs diffusers':>13} {'rel err':>9} {'compile s':>10}")
    base = c["results"]["diffusers"]["median_s"]
    for k, r in c["results"].items():
        comp = f"{r['compile_s']:.0f}" if r["compile_s"] else ""
        print(f"  {k:28} {1e3 * r['median_s']:10.2f} {1e3 * r['min_s']:9.2f} {base / r['median_s']:12.2f}x "
              f"{r['rel_err']:9.1e} {comp:>10}")
    for k, why in c["skipped"].items():
        print(f"  {k:28} skipped: {why}")


if __name__ == "__main__":
    main()
