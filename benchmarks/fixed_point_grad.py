"""Gradients through renoise.fixed_point.iterate: memory, time and accuracy against forward calls K.

Problem: a convolutional equilibrium layer z = g(z) = tanh(conv(z) + x), z [B, C, H, W], with the
3×3 convolution scaled so that Σ_taps ‖W_tap‖₂ = 0.8 (a contraction: tanh is 1-Lipschitz), and
L = Σ c·z*. The gradient is taken with respect to the convolution's weight and bias and the
input x. Modes:

    unrolled       backpropagation through all K calls
    phantom-k      through the last k calls only (phantom_steps=k)
    implicit       no forward graph; one call at z* recorded; adjoint by K plain vjp iterations
    implicit-aa    the same with Anderson (m = 3) in the forward and in the adjoint solve

Columns: saved = bytes of the tensors autograd saved for backward (counted once per storage);
peak = the rise of memory above the start over forward + backward (CUDA: max_memory_allocated;
CPU: the process's peak RSS, VmHWM, reset through /proc/self/clear_refs, above the RSS at the
start); ms = forward + backward, median of `--repeats`; err = ‖∂L/∂W - ref‖ / ‖ref‖ with ref from
implicit differentiation of a forward and adjoint converged to 1e-10. The memory claim is that
implicit's columns do not grow with K; unrolled's grow linearly.

    python benchmarks/fixed_point_grad.py                 # CPU, ~1 min
    python benchmarks/fixed_point_grad.py --no-peak       # clean timings (no RSS tracking)
    python benchmarks/fixed_point_grad.py --device cuda --size 64

The CPU peak needs a fixed glibc mmap threshold (every tensor its own mapping), which adds
page-fault time to every allocation: take timings from a --no-peak run.
Writes a table to stdout and JSON to benchmarks/out/fixed_point_grad.json.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch

from renoise.fixed_point import iterate

OUT = Path(__file__).resolve().parent / "out"
MODES = {"unrolled": {}, "phantom-4": dict(grad="phantom", phantom_steps=4), "implicit": dict(grad="implicit"),
         "implicit-aa": dict(grad="implicit", anderson=3)}


def problem(batch, channels, size, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
    with torch.no_grad():
        w = torch.randn(conv.weight.shape, generator=gen)
        taps = torch.linalg.matrix_norm(w.permute(2, 3, 0, 1), 2).sum()
        conv.weight.copy_(0.8 * w / taps)
        conv.bias.copy_(0.1 * torch.randn(channels, generator=gen))
    conv = conv.to(device)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device).requires_grad_()
    c = torch.randn(batch, channels, size, size, generator=gen).to(device)
    return conv, x, c


class Saved:
    """Bytes autograd saves for backward inside the block, once per storage."""

    def __enter__(self):
        self.storages = {}

        def pack(t):
            s = t.untyped_storage()
            self.storages[s.data_ptr()] = s.nbytes()
            return t

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def bytes(self):
        return sum(self.storages.values())


def _status(field):
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def peak_tracker(device):
    """(start(), peak_rise()) for the device's memory."""
    if device.type == "cuda":
        def start():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return start, lambda base: torch.cuda.max_memory_allocated() - base
    try:
        Path("/proc/self/clear_refs").write_text("5")          # resets VmHWM (Linux >= 4.0)
    except OSError:
        return None, None

    def start():
        Path("/proc/self/clear_refs").write_text("5")
        return _status("VmRSS")
    return start, lambda base: _status("VmHWM") - base


def run(conv, x, c, K, opts):
    def g(z):
        return torch.tanh(conv(z) + x)
    res = iterate(g, torch.zeros_like(c), K, **opts)
    loss = (c * res.z).sum()
    return loss, res


def measure(conv, x, c, K, opts, ref, repeats, device, track_peak):
    start, rise = peak_tracker(device) if track_peak else (None, None)
    times, peak, saved = [], None, None
    for r in range(repeats):
        conv.zero_grad()
        x.grad = None
        base = start() if start else None
        t0 = time.perf_counter()
        with Saved() as s:
            loss, res = run(conv, x, c, K, opts)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if r == 0:
            saved = s.bytes
            peak = rise(base) if start else None
        adjoint = res.backward[0].evals if res.backward else 0
        del loss, res
    err = float((conv.weight.grad - ref).norm() / ref.norm())
    return dict(saved_mib=saved / 2**20, peak_mib=None if peak is None else peak / 2**20,
                ms=1e3 * statistics.median(times), err=err, adjoint_calls=adjoint)


def reference(conv, x, c):
    conv.zero_grad()
    loss, _ = run(conv, x, c, 2000, dict(grad="implicit", anderson=3, tol=1e-10, backward_tol=1e-10,
                                         backward_iters=2000))
    loss.backward()
    ref = conv.weight.grad.clone()
    conv.zero_grad()
    return ref


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--ks", default="4,8,16,32,64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-peak", action="store_true", help="skip the peak-memory column (for clean CPU timings)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cpu" and not a.no_peak:
        try:   # before any tensor exists: a fixed mmap threshold makes every block >= 64 KiB its own mapping,
            # returned to the system when freed, so RSS follows the live tensors (glibc would otherwise
            # raise the threshold and serve later tensors from freed heap memory that RSS still counts)
            import ctypes
            ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)   # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass
    conv, x, c = problem(a.batch, a.channels, a.size, device)
    ref = reference(conv, x, c)
    rows = []
    print(f"z [{a.batch}, {a.channels}, {a.size}, {a.size}] ({x.numel() * 4 / 2**20:.2f} MiB per iterate), "
          f"{device}, {a.threads} thread(s)")
    print(f"{'mode':<12} {'K':>4} {'saved MiB':>10} {'peak MiB':>9} {'ms':>8} {'grad err':>9} {'adjoint':>8}")
    for mode, opts in MODES.items():
        for K in map(int, a.ks.split(",")):
            row = dict(mode=mode, K=K, **measure(conv, x, c, K, opts, ref, a.repeats, device, not a.no_peak))
            rows.append(row)
            peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
            print(f"{mode:<12} {K:>4} {row['saved_mib']:>10.2f} {peak:>9} {row['ms']:>8.1f} {row['err']:>9.1e} "
                  f"{row['adjoint_calls']:>8}")
    OUT.mkdir(parents=True, exist_ok=True)
    meta = dict(vars(a), torch=torch.__version__, iterate_bytes=x.numel() * x.element_size())
    (OUT / "fixed_point_grad.json").write_text(json.dumps(dict(settings=meta, rows=rows), indent=1))
    print(f"wrote {OUT / 'fixed_point_grad.json'}")


if __name__ == "__main__":
    main()
