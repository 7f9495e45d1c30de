"""Honest costs: a backward pass through the network in call-equivalents, measured on the machine.

Null-text inversion (and GNRI with autograd=True) differentiate through the denoiser; a backward pass costs about as much
as one to two forward calls, depending on the network, batch, device and dtype. `backward_ratio`
times a forward call and a forward + backward at the same inputs, and returns

    r = (t_forward+backward - t_forward) / t_forward

(medians over `repeats` timings after one warm-up each), so that a method's cost in call-
equivalents is evaluations + r · backward passes. `renoise eval` measures r once per run and model.
"""
from __future__ import annotations

import statistics
import time

import torch


def _sync(x):
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def backward_ratio(fn, x, repeats=3) -> float:
    """r for out = fn(x) (x [B, ...]); the backward is with respect to x, as GNRI's (null-text's is
    with respect to the text embedding, which goes through the same layers)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")

    def forward():
        with torch.no_grad():
            fn(x)

    def both():
        xi = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = fn(xi)
            torch.autograd.grad(out.float().sum(), xi)

    times = {}
    for name, run in (("f", forward), ("fb", both)):
        run()
        _sync(x)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            _sync(x)
            ts.append(time.perf_counter() - t0)
        times[name] = statistics.median(ts)
    return max(times["fb"] - times["f"], 0.0) / max(times["f"], 1e-12)


def call_equivalents(evals: int, backward: int, ratio: float | None) -> float:
    """evals + ratio · backward (ratio None with backward passes: refused, the cost would be wrong)."""
    if backward and ratio is None:
        raise ValueError("backward passes were made but no forward/backward ratio was measured")
    return float(evals) + (ratio or 0.0) * backward
