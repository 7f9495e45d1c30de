"""renoise.kernels on a GPU: each fused kernel against PyTorch eager and inductor, same inputs.

group_norm_silu on the activations of SD 1.5's resnet blocks at 512 px, batch 2 (a CFG batch),
32 groups, fp16 and bf16: microseconds per call (median of CUDA-event timings after warm-up), the
error against the fp32 reference, and the verdict: a kernel "wins" only where it beats both eager
and the compiled reference. Prints a table and writes JSON (benchmarks/out/kernels.json or --json).

    python benchmarks/fused_kernels.py
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8), (2, 960, 64, 64)]


def cuda_time_us(f, reps=50):
    for _ in range(5):
        f()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "kernels.json")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/fused_kernels.py times GPU kernels: no CUDA device here "
                         "(the kernels' CPU check is tests/test_kernels.py under TRITON_INTERPRET=1)")
    from renoise.kernels.group_norm_silu import group_norm_silu, group_norm_silu_reference
    compiled = torch.compile(group_norm_silu_reference, dynamic=False)
    rows = []
    print(f"{'shape':>22} {'dtype':>9} {'eager us':>9} {'inductor us':>12} {'triton us':>10} {'max err':>9}  verdict")
    for shape in SHAPES:
        for dtype in (torch.float16, torch.bfloat16):
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(shape, device="cuda", generator=g).to(dtype)
            w = torch.randn(shape[1], device="cuda", generator=g).to(dtype)
            b = torch.randn(shape[1], device="cuda", generator=g).to(dtype)
            want = group_norm_silu_reference(x.float(), 32, w.float(), b.float(), 1e-5)
            err = (group_norm_silu(x, 32, w, b, 1e-5).float() - want).abs().max().item()
            t = {name: cuda_time_us(f, a.reps) for name, f in (
                ("eager", lambda: group_norm_silu_reference(x, 32, w, b, 1e-5)),
                ("inductor", lambda: compiled(x, 32, w, b, 1e-5)),
                ("triton", lambda: group_norm_silu(x, 32, w, b, 1e-5)))}
            verdict = "wins" if t["triton"] < min(t["eager"], t["inductor"]) else "loses"
            rows.append(dict(kernel="group_norm_silu", shape=shape, dtype=str(dtype)[6:], max_err=err,
                             verdict=verdict, **{f"{k}_us": v for k, v in t.items()}))
            print(f"{str(shape):>22} {str(dtype)[6:]:>9} {t['eager']:9.1f} {t['inductor']:12.1f} {t['triton']:10.1f} "
                  f"{err:9.1e}  {verdict}")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), indent=1))
    print(f"JSON: {a.json}")


if __name__ == "__main__":
    main()
