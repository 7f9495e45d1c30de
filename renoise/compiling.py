"""torch.compile machinery that knows nothing of renoise: the modes, nested compile regions, one
compiled function per (function, mode) per process. The lowest layer of the speed switches: the
inversion core and the denoisers use it; `renoise.speed` (its public face, see there for the modes)
re-exports it and adds the compiled inversion and denoising steps and `accelerate`.
"""
from __future__ import annotations

import os
import shutil

import torch

MODES = ("compile", "max-autotune", "cuda-graphs", "trace")

_COMPILED: dict = {}


def nested_region(fn):
    """torch.compiler.nested_compile_region(fn) where torch has it (2.8+), else fn. Eagerly a plain
    call; inside a compiled region, fn is traced and compiled once per input signature and reused by
    every call (the UNet's K+1 calls, the regularizer's gradient steps), so compile time does not
    grow with the iterations."""
    mark = getattr(torch.compiler, "nested_compile_region", None)
    if mark is None:
        return fn
    marked = mark(fn)
    for attr in ("__name__", "__qualname__", "__doc__", "__module__"):    # not __wrapped__: dynamo must see the mark
        setattr(marked, attr, getattr(fn, attr))
    return marked


def check_mode(mode, device=None) -> str:
    """`mode` if it can run on `device` (a torch.device, name or None), else ValueError saying why."""
    if mode not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}; expected one of {', '.join(map(repr, MODES))} "
                         "(or None for eager)")
    dev = torch.device(device) if device is not None else None
    if mode == "cuda-graphs" and (dev is None or dev.type != "cuda"):
        where = dev.type if dev is not None else "an unknown device"
        raise ValueError(f"CUDA graphs need a CUDA device, but the tensors are on {where}; "
                         "use compile='compile' there")
    if mode != "trace" and (dev is None or dev.type == "cpu") and not _cxx():
        raise ValueError("inductor's CPU backend needs a C++ compiler: install g++ (or set CXX), or use "
                         "compile=None")
    return mode


def _cxx():
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")


def _options(mode, freeze=False) -> dict:
    """torch.compile keywords for a mode (freeze: inductor's freezing, weights folded as constants)."""
    if mode == "trace":
        return dict(backend="eager")
    if mode == "max-autotune":
        return dict(mode="max-autotune-no-cudagraphs") if not freeze else \
            dict(options={"max_autotune": True, "freezing": True})
    if mode == "cuda-graphs":
        return dict(mode="reduce-overhead") if not freeze else \
            dict(options={"triton.cudagraphs": True, "freezing": True})
    return dict(options={"freezing": True}) if freeze else {}


def compiled(fn, mode, device=None):
    """torch.compile(fn) for `mode` (fullgraph, static shapes), one per (fn, mode) per process, so
    that what it traced serves every later call. With "cuda-graphs" each call starts a new
    cudagraph generation and returns clones of the outputs."""
    check_mode(mode, device)
    key = (fn, mode)
    if key not in _COMPILED:
        run = _roomy(torch.compile(fn, fullgraph=True, dynamic=False, **_options(mode)))
        if mode == "cuda-graphs":
            run = _graphed(run)
        _COMPILED[key] = run
    return _COMPILED[key]


RECOMPILE_LIMIT = 64


def _roomy(run):
    """run with dynamo's per-function recompile limit raised to RECOMPILE_LIMIT (default 8): a
    region specialises on each model, plan, step kind (first or main iterations, stochastic or
    not, warm-started or not) and dtype of a process, and fullgraph turns the limit into an error."""
    def call(*args):
        limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        with torch._dynamo.config.patch(recompile_limit=limit):
            return run(*args)
    return call


def _graphed(run):
    def call(*args):
        torch.compiler.cudagraph_mark_step_begin()
        out = run(*args)
        if isinstance(out, torch.Tensor):
            return out.clone()
        return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in out)
    return call
