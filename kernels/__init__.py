"""Fused GPU kernels (Triton), each with a plain-PyTorch reference and a test under TRITON_INTERPRET=1.

    renoise.kernels.available()     triton importable (an extra: pip install renoise[gpu])
    renoise.kernels.use(True)       route the resnet blocks' SiLU(GroupNorm(x)) (UNet and VAE)
                                    through the fused kernel (group_norm_silu) for CUDA tensors, and
                                    CPU ones when TRITON_INTERPRET=1; use(False) turns it off again

Off by default: a kernel is switched on by default only once a GPU measurement
(benchmarks/gpu.sh) shows that it beats both eager PyTorch and inductor. Inside torch.compile the
switch is ignored (inductor fuses these operations itself).
"""

if __name__ != "renoise.kernels":      # imported as a bare `kernels` from a clone's root
    from renoise._clone_guard import step_aside
    step_aside(__name__, __file__)

import os

import torch
import torch.nn.functional as F

_ENABLED = False


def available() -> bool:
    from .group_norm_silu import triton
    return triton is not None


def use(enabled: bool = True) -> None:
    """Switch the fused kernels on or off for the whole process."""
    global _ENABLED
    if enabled and not available():
        raise RuntimeError("renoise.kernels needs triton: pip install triton (or renoise[gpu])")
    _ENABLED = bool(enabled)


def norm_silu(norm, x):
    """silu(norm(x)) for an nn.GroupNorm: the fused kernel where switched on and x can run it."""
    if _ENABLED and not torch.compiler.is_compiling() and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        from .group_norm_silu import group_norm_silu
        return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(norm(x))
