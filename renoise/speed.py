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

import copy

import torch

from . import inversion
from .compiling import MODES, RECOMPILE_LIMIT, _options, check_mode, compiled, nested_region  # noqa: F401 (public here)
from .denoisers import GuidedDenoiser


def compiled_step(mode, device=None):
    """The compiled region of one inversion step (renoise.inversion._step)."""
    return compiled(inversion._step, mode, device)


def compiled_denoise_step(mode, device=None):
    """The compiled region of one denoising step (renoise.inversion._denoise_step)."""
    return compiled(inversion._denoise_step, mode, device)


def accelerate(target, mode="compile", *, freeze=False, channels_last=False):
    """A compiled `target`: an nn.Module (UNet, VAE, text encoder) comes back as torch.compile's
    module (fullgraph, static shapes: a new input shape compiles again); a GuidedDenoiser as a copy
    calling the compiled UNet. mode: see MODES. freeze: inductor's freezing (weights become
    constants of the compiled code: faster on CPU, but weights edited in place afterwards, e.g. a
    LoRA merge, are not seen; compile again). channels_last: convert the module's 4-d weights to
    channels-last memory format first (in place; helps convolutions on GPUs with tensor cores)."""
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
