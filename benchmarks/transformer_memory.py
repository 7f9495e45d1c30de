"""Peak host memory when loading a half-precision flow transformer: renoise against diffusers.

A FLUX.1-shaped transformer cut to ~2 B parameters (3 double-stream + 7 single-stream blocks of
FLUX.1's width 3072; random fp16 weights) is written once to a temporary folder as a diffusers
folder: config.json + sharded fp16 safetensors (one shard per block) and the shard index. Each loader
then runs in a fresh subprocess (file pages warm in the kernel's cache) and reports, after the load
and after `touch` (every weight read once), the peak RSS above the post-import baseline (VmHWM)
against the weights' size. The target is at most 1.2× the weights.

--layouts bfl writes the same shapes as one Black Forest Labs-layout bf16 file (fused qkv and
`linear1`, as flux1-dev.safetensors), streamed to disk one tensor at a time, and loads it through
the single-file path (ours: load_transformer(file); diffusers: from_single_file with the local config).

    python benchmarks/transformer_memory.py                   # writes benchmarks/out/transformer_memory.json
    python benchmarks/transformer_memory.py --targets float16:cpu --loaders renoise
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIG = dict(num_layers=3, num_single_layers=7, guidance_embeds=True)   # FLUX.1-dev's width, fewer blocks
INDEX = "diffusion_pytorch_model.safetensors.index.json"

CHILD = r"""
import json, sys, time, torch
def kib(f):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(f + ':'))
who, folder, dtype, device = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4]
import renoise.models.transformer_loading as tl
from diffusers import FluxTransformer2DModel
from diffusers.utils import logging
logging.set_verbosity_error()
torch.ones(1)
if device == 'cuda':
    torch.zeros(1, device='cuda')
base = kib('VmRSS') * 1024
sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
t0 = time.perf_counter()
import os
single = folder.endswith('.safetensors')
if who == 'renoise':
    m = tl.load_transformer(folder, dtype=dtype, device=device)
elif single:
    m = FluxTransformer2DModel.from_single_file(folder, config=os.path.dirname(folder), torch_dtype=dtype).to(device)
else:
    m = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=dtype).to(device)
sync()
out = {'load_s': time.perf_counter() - t0, 'load_peak_bytes': kib('VmHWM') * 1024 - base}
with torch.no_grad():
    total = sum(float(p.sum()) for p in m.parameters())     # a reduction: no temporary copy of a weight
sync()
out.update(touch_s=time.perf_counter() - t0, touch_peak_bytes=kib('VmHWM') * 1024 - base, check=float(total),
           weights_bytes=sum(p.numel() * p.element_size() for p in m.parameters()),
           params=sum(p.numel() for p in m.parameters()))
print(json.dumps(out))
"""


def write_checkpoint(folder: Path, seed: int = 0):
    """config.json + one fp16 shard per block (random N(0, 0.02²) weights) + the index, as diffusers lays
    out a sharded model; never more than one block in memory."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file
    with torch.device("meta"):
        model = FluxTransformer2DModel(**CONFIG)
    model.save_config(folder)
    groups: dict[str, list[str]] = {}
    for k in model.state_dict():
        parts = k.split(".")
        group = ".".join(parts[:2]) if parts[0] in ("transformer_blocks", "single_transformer_blocks") else "rest"
        groups.setdefault(group, []).append(k)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, (group, keys) in enumerate(groups.items()):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        sd = {k: (0.02 * torch.randn(shapes[k], generator=g)).half() for k in keys}
        total += sum(v.numel() * 2 for v in sd.values())
        save_file(sd, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        del sd
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def bfl_shapes(cfg: dict) -> dict:
    """{name: shape} of a BFL-layout FLUX.1 file with FLUX.1's width and `cfg`'s block counts."""
    D, hd = 3072, 128
    shapes = {"img_in.weight": (D, 64), "txt_in.weight": (D, 4096), "final_layer.linear.weight": (64, D),
              "final_layer.adaLN_modulation.1.weight": (2 * D, D)}
    for emb, din in (("time_in", 256), ("vector_in", 768)) + ((("guidance_in", 256),) if cfg["guidance_embeds"] else ()):
        shapes |= {f"{emb}.in_layer.weight": (D, din), f"{emb}.out_layer.weight": (D, D)}
    for i in range(cfg["num_layers"]):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}_"
            shapes |= {b + "mod.lin.weight": (6 * D, D), b + "attn.qkv.weight": (3 * D, D),
                       b + "attn.proj.weight": (D, D), b + "mlp.0.weight": (4 * D, D), b + "mlp.2.weight": (D, 4 * D),
                       b + "attn.norm.query_norm.scale": (hd,), b + "attn.norm.key_norm.scale": (hd,)}
    for i in range(cfg["num_single_layers"]):
        b = f"single_blocks.{i}."
        shapes |= {b + "modulation.lin.weight": (3 * D, D), b + "linear1.weight": (7 * D, D),
                   b + "linear2.weight": (D, 5 * D), b + "norm.query_norm.scale": (hd,), b + "norm.key_norm.scale": (hd,)}
    for k in [k for k in shapes if k.endswith(".weight") and len(shapes[k]) == 2]:
        shapes[k.replace(".weight", ".bias")] = (shapes[k][0],)
    return shapes


def write_bfl(path: Path, seed: int = 0) -> int:
    """One bf16 safetensors file in BFL's layout, written by hand one tensor at a time (header, then data)."""
    import math
    shapes = bfl_shapes(CONFIG)
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = 2 * math.prod(shape)
        header[k] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 16)            # data starts 16-byte aligned (8-byte length + header)
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k, shape in shapes.items():
            t = (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
            f.write(t.view(torch.int16).numpy().tobytes())
    return offset


def run_child(who, folder, dtype, device):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", CHILD, who, str(folder), dtype, device], capture_output=True,
                         text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", nargs="*", default=None,
                    help="dtype:device pairs (default: float16:cpu bfloat16:cpu, and float16:cuda with CUDA)")
    ap.add_argument("--loaders", nargs="*", choices=("renoise", "diffusers"), default=["renoise", "diffusers"])
    ap.add_argument("--layouts", nargs="*", choices=("diffusers", "bfl"), default=["diffusers", "bfl"],
                    help="sharded diffusers folder (fp16) and/or one BFL-layout file (bf16)")
    ap.add_argument("--folder", type=Path, default=None, help="reuse a checkpoint folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "transformer_memory.json")
    a = ap.parse_args(argv)
    targets = a.targets or ["float16:cpu", "bfloat16:cpu"] + (["float16:cuda"] if torch.cuda.is_available() else [])
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        folder = a.folder or Path(tmp)
        for layout in a.layouts:
            t0 = time.perf_counter()
            if layout == "diffusers" and not (folder / INDEX).is_file():
                size = write_checkpoint(folder)
                print(f"wrote {folder} ({size / 2**30:.2f} GiB fp16) in {time.perf_counter() - t0:.0f} s")
            source = folder
            if layout == "bfl":
                source = folder / "bfl" / "flux.safetensors"
                if not source.is_file():
                    source.parent.mkdir(exist_ok=True)
                    from diffusers import FluxTransformer2DModel
                    with torch.device("meta"):
                        FluxTransformer2DModel(**CONFIG).save_config(source.parent)
                    size = write_bfl(source)
                    print(f"wrote {source} ({size / 2**30:.2f} GiB bf16) in {time.perf_counter() - t0:.0f} s")
            for target in targets:
                dtype, device = target.split(":")
                for who in a.loaders:
                    try:
                        r = dict(layout=layout, loader=who, dtype=dtype, device=device,
                                 **run_child(who, str(source), dtype, device))
                    except RuntimeError as e:
                        print(f"{layout} {who} {dtype} {device}: failed: {str(e).strip().splitlines()[-1][:200]}")
                        rows.append(dict(layout=layout, loader=who, dtype=dtype, device=device, error=str(e)[-500:]))
                        continue
                    r["touch_peak_ratio"] = r["touch_peak_bytes"] / r["weights_bytes"]
                    rows.append(r)
                    print_row(r)
    result = dict(env=dict(torch=torch.__version__, cpu=platform.processor(), cpus=os.cpu_count(),
                           cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                           date=time.strftime("%Y-%m-%d"), config=CONFIG), rows=rows)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1))
    print(f"JSON: {a.json}")
    return result


def print_row(r):
    gib = 2 ** 30
    print(f"{r['layout']:9} {r['loader']:9} {r['dtype']:8} {r['device']:5}  {r['params'] / 1e9:.2f} B params, weights "
          f"{r['weights_bytes'] / gib:.2f} GiB | load {r['load_s']:6.1f} s, peak +{r['load_peak_bytes'] / gib:5.2f} GiB"
          f" | after touch {r['touch_s']:6.1f} s, peak +{r['touch_peak_bytes'] / gib:5.2f} GiB"
          f" = {r['touch_peak_ratio']:.2f}x weights")


if __name__ == "__main__":
    main()
