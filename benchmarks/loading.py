"""Load time and peak memory of a UNet checkpoint: renoise's loader against diffusers', same files.

A full-size SD 1.5-shaped UNet (860 M parameters, constant weights: the values do not matter for
loading) is written once to a temporary folder as diffusers writes it (config.json +
diffusion_pytorch_model.safetensors, fp32, 3.3 GB). Each loader then runs in a fresh subprocess:

    cold    the file's pages dropped from the kernel's cache first (posix_fadvise DONTNEED)
    warm    the file read once before, so its pages are cached

and reports, after `load` (load_unet / UNet2DConditionModel.from_pretrained returned) and after
`touch` (every weight then read once: a CPU fp32 load leaves the weights memory-mapped in both
libraries, so this is where their bytes are read), the wall and CPU seconds and the peak RSS above
the post-import baseline (VmHWM), against the weights' size. Targets: fp32 on the CPU (mapped
as is), fp16 on the CPU (converted from the fp32 file) and, where present, fp16 on CUDA.

    python benchmarks/loading.py                 # writes benchmarks/out/loading.json
    python benchmarks/loading.py --targets float32:cpu --modes warm
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

SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
            cross_attention_dim=768, sample_size=64)
WEIGHTS = "diffusion_pytorch_model.safetensors"

CHILD = r"""
import json, sys, time, torch
def kib(f):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(f + ':'))
who, folder, dtype, device = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4]
import renoise.models.loading
from diffusers import UNet2DConditionModel
from diffusers.utils import logging
logging.set_verbosity_error()
torch.ones(1)
if device == 'cuda':
    torch.zeros(1, device='cuda')
base = kib('VmRSS') * 1024
sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
t0, c0 = time.perf_counter(), time.process_time()
if who == 'renoise':
    m = renoise.models.loading.load_unet(folder, dtype=dtype, device=device)
else:
    m = UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype).to(device)
sync()
out = {'load_s': time.perf_counter() - t0, 'load_cpu_s': time.process_time() - c0,
       'load_peak_bytes': kib('VmHWM') * 1024 - base}
with torch.no_grad():
    total = sum(p.float().sum() for p in m.parameters())
sync()
out.update(touch_s=time.perf_counter() - t0, touch_cpu_s=time.process_time() - c0,
           touch_peak_bytes=kib('VmHWM') * 1024 - base, check=float(total),
           weights_bytes=sum(p.numel() * p.element_size() for p in m.parameters()))
print(json.dumps(out))
"""


def write_checkpoint(folder: Path):
    """config.json and a constant-valued fp32 safetensors file of the SD 1.5 UNet's shapes."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    with torch.device("meta"):
        model = UNet2DConditionModel(**SD15)
    model.save_config(folder)
    sd = {k: torch.full(v.shape, 0.01) for k, v in model.state_dict().items()}
    save_file(sd, str(folder / WEIGHTS))
    with open(folder / WEIGHTS, "rb") as f:
        os.fsync(f.fileno())


def drop_cache(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_cache(path: Path):
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass


def run_child(who, folder, dtype, device):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", CHILD, who, str(folder), dtype, device], capture_output=True,
                         text=True, env=env, cwd=root)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", nargs="*", default=None,
                    help="dtype:device pairs (default: float32:cpu float16:cpu, and float16:cuda with CUDA)")
    ap.add_argument("--modes", nargs="*", choices=("cold", "warm"), default=["cold", "warm"])
    ap.add_argument("--folder", type=Path, default=None, help="reuse a checkpoint folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "loading.json")
    a = ap.parse_args(argv)
    targets = a.targets or ["float32:cpu", "float16:cpu"] + (["float16:cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.folder or Path(tmp)
        if not (folder / WEIGHTS).is_file():
            t0 = time.perf_counter()
            write_checkpoint(folder)
            print(f"wrote {folder / WEIGHTS} ({(folder / WEIGHTS).stat().st_size / 2**30:.2f} GiB) in "
                  f"{time.perf_counter() - t0:.0f} s")
        rows = []
        for target in targets:
            dtype, device = target.split(":")
            for mode in a.modes:
                for who in ("renoise", "diffusers"):
                    (drop_cache if mode == "cold" else warm_cache)(folder / WEIGHTS)
                    rows.append(dict(loader=who, dtype=dtype, device=device, cache=mode,
                                     **run_child(who, folder, dtype, device)))
                    print_row(rows[-1])
    result = dict(env=dict(torch=torch.__version__, cpu=platform.processor(), cpus=os.cpu_count(),
                           cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                           date=time.strftime("%Y-%m-%d")), rows=rows)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1))
    print(f"JSON: {a.json}")
    return result


def print_row(r):
    gib = 2 ** 30
    print(f"{r['loader']:9} {r['dtype']:8} {r['device']:5} {r['cache']:4}  "
          f"load {r['load_s']:6.2f} s (cpu {r['load_cpu_s']:5.2f}), peak +{r['load_peak_bytes'] / gib:5.2f} GiB | "
          f"+touch {r['touch_s']:6.2f} s (cpu {r['touch_cpu_s']:5.2f}), peak +{r['touch_peak_bytes'] / gib:5.2f} GiB"
          f" | weights {r['weights_bytes'] / gib:.2f} GiB")


if __name__ == "__main__":
    main()
