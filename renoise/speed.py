"""Speed switches: torch.compile (inductor) of the models and of whole ReNoise steps, CUDA graphs.

    unet = renoise.accelerate(pipe.unet, "compile")        # a compiled module, static shapes
    res = renoise.invert(den, z0, ..., compile="compile")  # each timestep's whole solve: one compiled region
    x0 = renoise.sample(den, res, compile="compile")       # each denoising step: one compiled region
    editor = Editor(pipe, compile="cuda-graphs")           # both, for inversion, reconstruction and edits
    python -m renoise edit ... --compile | --cuda-graphs

Modes:
    "compile"       torch.compile with inductor, default mode (on CPU: its C++/OpenMP backend)
    "max-autotune"  inductor with autotuned GEMM/conv kernels (long first compile), no CUDA graphs
    "cuda-graphs"   inductor + CUDA graphs: torch.compile's "reduce-overhead" (cudagraph trees record
                    each compiled region once per shape and replay it, with static input and output
                    buffers kept in one memory pool). CUDA only.
    "trace"         dynamo with the eager backend: checks that a region traces as one graph, with no
                    code generation (tests, debugging); no speed-up

Why reduce-overhead rather than an explicit torch.cuda.CUDAGraph: the region has to be compiled
anyway for the fused math, cudagraph trees then handle the static buffers, the one graph per
distinct step structure (first step, main steps) and the shared memory pool; an explicit capture
would restate all of that. Each call starts a new cudagraph generation and its outputs are cloned
(a latent each), so results of earlier steps stay valid.

A compiled region is traced once per structure (plan iterations, window, sampler, batch, image
size, dtype) and reused: timesteps enter as 0-d tensors, so every step of that structure and every
later call (new images, new prompts) replays it. Shapes are static: another image size compiles
again. Compilation costs seconds to minutes; it pays for repeated use (several images, or a server).

The regularizer's random shifts are drawn before each step, in the order the eager loop draws
them, so compiled and eager runs give the same numbers from the same generator.
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


def compiled_step(mode, device=None):
    """The compiled region of one inversion step (renoise.inversion._step)."""
    from .inversion import _step
    return compiled(_step, mode, device)


def compiled_denoise_step(mode, device=None):
    """The compiled region of one denoising step (renoise.inversion._denoise_step)."""
    from .inversion import _denoise_step
    return compiled(_denoise_step, mode, device)


def accelerate(target, mode="compile", *, freeze=False, channels_last=False):
    """A compiled `target`: an nn.Module (UNet, VAE, text encoder) comes back as torch.compile's
    module (fullgraph, static shapes: a new input shape compiles again); a GuidedDenoiser as a copy
    calling the compiled UNet. mode: see MODES. freeze: inductor's freezing (weights become
    constants of the compiled code: faster on CPU, but weights edited in place afterwards, e.g. a
    LoRA merge, are not seen; compile again). channels_last: convert the module's 4-d weights to
    channels-last memory format first (in place; helps convolutions on GPUs with tensor cores)."""
    import copy

    from .pipeline import GuidedDenoiser
    if isinstance(target, GuidedDenoiser):
        out = copy.copy(target)
        out.unet = accelerate(target.unet, mode, freeze=freeze, channels_last=channels_last)
        return out
    if not isinstance(target, torch.nn.Module):
        raise ValueError(f"accelerate takes an nn.Module (UNet, VAE, text encoder) or a GuidedDenoiser, "
                         f"got {type(target).__name__}")
    param = next(target.parameters(), None)
    check_mode(mode, param.device if param is not None else None)
    if channels_last:
        target.to(memory_format=torch.channels_last)
    return torch.compile(target, fullgraph=True, dynamic=False, **_options(mode, freeze))
