"""What the attention hook costs: UNet time without the hook's code, with the hook off, observing, steering.

    python benchmarks/attention_hook.py                 # demo UNet (16×16 latents) + SD 1.5 at 32×32, CPU fp32
    python benchmarks/attention_hook.py --cases demo --rounds 5

Rows, interleaved call by call in every round so that background load hits all alike:
  no-hook-code  Attention.forward replaced (on the instances) by the same code without the hook's
                `if self.processor is None` test: the UNet as it was before the hook existed
  hook-off      the library as shipped, no processor installed
  observe       AttentionStore (keeps every cross-attention map, mean over heads)
  p2p           renoise.editing.AttentionControl: cross maps replaced from the source rows, stored
                for local blending (the pair batch [source; edit])
Median seconds per call over rounds; ratio to no-hook-code. Writes JSON (benchmarks/out/attention_hook.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from renoise.editing import AttentionControl
from renoise.models import UNet, UNetConfig, load_pipeline
from renoise.models.attention_hook import AttentionStore, attention_hook, attention_layers

SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, sample_size=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def _plain_forward(self, x, context=None):
    """Attention.forward as it was before the hook: SDPA with no processor test."""
    context = x if context is None else context
    B, N, C = x.shape
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    q, k, v = (u.view(B, -1, self.heads, C // self.heads).transpose(1, 2) for u in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.to_out[0](out.transpose(1, 2).reshape(B, N, C))


def _unet(case):
    if case == "demo":
        return load_pipeline("demo", dtype=torch.float32, device="cpu").unet, 16
    cfg = UNetConfig.from_dict(SD15)
    torch.manual_seed(0)
    return UNet(cfg).eval(), 32


def run_case(case, rounds, batch):
    unet, side = _unet(case)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, side, side, generator=g)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(500.0)
    mods = [m for _, m in attention_layers(unet)]
    half = batch // 2
    mapping = torch.arange(77).repeat(half, 1)

    def call(row):
        if row == "no-hook-code":
            for m in mods:
                m.forward = types.MethodType(_plain_forward, m)
            try:
                return unet(x, t, ctx)
            finally:
                for m in mods:
                    del m.forward
        if row == "hook-off":
            return unet(x, t, ctx)
        proc = AttentionStore() if row == "observe" else AttentionControl(
            half, (side, side), mapping=mapping, replace_steps=1, store=True)
        with attention_hook(unet, proc):
            return unet(x, t, ctx)

    rows = ["no-hook-code", "hook-off", "observe", "p2p"]
    times = {r: [] for r in rows}
    with torch.no_grad():
        for r in rows:
            call(r)                                        # warm-up
        for _ in range(rounds):
            for r in rows:
                t0 = time.perf_counter()
                call(r)
                times[r].append(time.perf_counter() - t0)
    base = statistics.median(times["no-hook-code"])
    return [{"case": case, "row": r, "batch": batch, "latent": side, "median_s": statistics.median(times[r]),
             "min_s": min(times[r]), "ratio": statistics.median(times[r]) / base} for r in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["demo", "sd15"], choices=("demo", "sd15"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(Path("benchmarks/out/attention_hook.json")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for case in args.cases:
        results += run_case(case, args.rounds if case == "demo" else max(3, args.rounds // 4), args.batch)
    print(f"{'case':6} {'row':14} {'median ms':>10} {'min ms':>8} {'ratio':>6}")
    for r in results:
        print(f"{r['case']:6} {r['row']:14} {1e3 * r['median_s']:10.2f} {1e3 * r['min_s']:8.2f} {r['ratio']:6.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": platform.platform(), "threads": args.threads,
                                           "torch": torch.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
