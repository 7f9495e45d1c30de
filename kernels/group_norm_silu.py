"""SiLU(GroupNorm(x)) in two Triton launches, for the eager UNet (every resnet block starts with it).

PyTorch runs GroupNorm and then SiLU: the activation is read twice and written twice. Here

  1. stats: the G·(C/G)·H·W values of each (sample, group) are contiguous in NCHW; each program
     takes one BLOCK-long chunk of one group and writes the chunk's mean and sum of squared
     deviations (fp32). The chunks combine exactly (Chan et al.'s pairwise formula, a few hundred
     numbers, in PyTorch), so the statistics are as stable as a two-pass computation.
  2. apply: one program per BLOCK of values writes silu((x - mean)·rstd·weight + bias) in x's dtype.

x is read twice and written once, and both launches have enough programs to fill a GPU even at
batch 1 (a kernel with one program per group has only B·G = 32 at batch 1).
`group_norm_silu_reference` is the PyTorch definition the kernel is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels are an extra: renoise works without triton
    triton = None

BLOCK = 4096


def group_norm_silu_reference(x, groups, weight=None, bias=None, eps=1e-5):
    """silu(group_norm(x)) in PyTorch (statistics in fp32 for half inputs, as PyTorch's CUDA kernel)."""
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


if triton is not None:
    @triton.jit
    def _stats(x_ptr, mean_ptr, m2_ptr, group_size, chunks, BLOCK: tl.constexpr):
        row = tl.program_id(0)                     # (sample, group)
        chunk = tl.program_id(1)
        start = chunk * BLOCK
        offs = start + tl.arange(0, BLOCK)
        mask = offs < group_size
        v = tl.load(x_ptr + row.to(tl.int64) * group_size + offs, mask=mask, other=0.0).to(tl.float32)
        n = tl.minimum(group_size - start, BLOCK).to(tl.float32)
        mean = tl.sum(v, axis=0) / n
        d = tl.where(mask, v - mean, 0.0)
        tl.store(mean_ptr + row * chunks + chunk, mean)
        tl.store(m2_ptr + row * chunks + chunk, tl.sum(d * d, axis=0))

    @triton.jit
    def _apply(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, total, hw, channels, cpg,
               HAS_AFFINE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = (offs // hw) % channels
        row = (offs // hw) // cpg                  # sample · groups + group
        y = (v - tl.load(mean_ptr + row, mask=mask, other=0.0)) * tl.load(rstd_ptr + row, mask=mask, other=1.0)
        if HAS_AFFINE:
            y = y * tl.load(w_ptr + c, mask=mask, other=1.0).to(tl.float32) \
                + tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
        y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def group_norm_silu(x, groups, weight=None, bias=None, eps=1e-5):
    """silu(group_norm(x, groups, weight, bias, eps)) for x [B, C, ...] (made contiguous NCHW)."""
    if triton is None:
        raise RuntimeError("renoise.kernels needs triton: pip install triton (or renoise[gpu])")
    if x.dim() < 2 or x.shape[1] % groups:
        raise ValueError(f"x must be [B, C, ...] with C divisible by groups={groups}, got {tuple(x.shape)}")
    x = x.contiguous()
    b, c = x.shape[:2]
    hw = x[0, 0].numel()
    group_size = (c // groups) * hw
    rows, chunks = b * groups, triton.cdiv(group_size, BLOCK)
    means = torch.empty(rows, chunks, device=x.device, dtype=torch.float32)
    m2s = torch.empty_like(means)
    _stats[(rows, chunks)](x, means, m2s, group_size, chunks, BLOCK=BLOCK)
    # Chan's combination of the chunks: mean = Σ n_i m_i / N, M2 = Σ M2_i + Σ n_i (m_i - mean)²
    n = torch.full((chunks,), float(BLOCK), device=x.device)
    n[-1] = group_size - BLOCK * (chunks - 1)
    mean = (means * n).sum(1) / group_size
    m2 = m2s.sum(1) + ((means - mean[:, None]) ** 2 * n).sum(1)
    rstd = torch.rsqrt(m2 / group_size + eps)
    y = torch.empty_like(x)
    affine = weight is not None
    _apply[(triton.cdiv(x.numel(), BLOCK),)](x, y, mean, rstd, weight if affine else x, bias if affine else x,
                                            x.numel(), hw, c, c // groups, HAS_AFFINE=affine, BLOCK=BLOCK)
    return y
