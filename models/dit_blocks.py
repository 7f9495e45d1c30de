"""Building blocks shared by the flow-matching transformers (SD3 MMDiT and FLUX.1).

Attribute names follow diffusers' SD3Transformer2DModel / FluxTransformer2DModel (`norm1.linear`,
`attn.to_q`, `attn.add_q_proj`, `ff.net.0.proj`, `time_text_embed.timestep_embedder.linear_1`, ...)
so that state dicts load by name. Every modulation is AdaLN:

    x̃ = LayerNorm(x) · (1 + scale) + shift,    (shift, scale, gate, ...) = Linear(SiLU(temb)).chunk(n)

LayerNorms here have no affine parameters and eps 1e-6.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import TimestepMLP, timestep_embedding

EPS = 1e-6


def modulate(x, shift, scale):
    """x `[B, N, D]` · (1 + scale `[B, D]`) + shift `[B, D]`."""
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(x):
    """LayerNorm over the last dim without affine parameters, eps 1e-6."""
    return F.layer_norm(x, x.shape[-1:], eps=EPS)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight over the last dim (per attention head), computed in fp32."""

    def __init__(self, dim: int, eps: float = EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h.to(self.weight.dtype) * self.weight).to(x.dtype)


class AdaNorm(nn.Module):
    """`linear` (D_emb → n·D) on SiLU(temb); chunks are returned in the file's order.

    diffusers' AdaLayerNormZero (n = 6), SD35AdaLayerNormZeroX (n = 9), AdaLayerNormZeroSingle
    (n = 3) and AdaLayerNormContinuous (n = 2, order scale, shift) all hold just this `linear`.
    """

    def __init__(self, dim: int, n: int, emb_dim: int | None = None):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(emb_dim or dim, n * dim)

    def forward(self, temb):
        return self.linear(F.silu(temb)).chunk(self.n, dim=1)


class GELUProj(nn.Module):
    """Linear then tanh-approximated GELU (diffusers' `GELU` module with `.proj`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear(D → 4D) → GELU(tanh) → Linear(4D → D); keys `net.0.proj`, `net.2`."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GELUProj(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class TimeTextEmbed(nn.Module):
    """temb = MLP(sin256(t)) [+ MLP(sin256(g))] + MLP(pooled text), `[B, D]`.

    Keys `timestep_embedder.linear_1/2`, `guidance_embedder.linear_1/2` (FLUX.1-dev),
    `text_embedder.linear_1/2`. The sinusoid is [cos, sin] with freqs exp(-ln(1e4)·k/128),
    computed in fp32 and cast to the pooled embedding's dtype.
    """

    def __init__(self, dim: int, pooled_dim: int, guidance: bool = False):
        super().__init__()
        self.timestep_embedder = TimestepMLP(256, dim)
        self.guidance_embedder = TimestepMLP(256, dim) if guidance else None
        self.text_embedder = TimestepMLP(pooled_dim, dim)

    def forward(self, t, pooled, guidance=None):
        dtype = pooled.dtype
        emb = self.timestep_embedder(timestep_embedding(t, 256).to(dtype))
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(timestep_embedding(guidance, 256).to(dtype))
        return emb + self.text_embedder(pooled)


def batch_vector(t, batch: int, device, name: str) -> torch.Tensor:
    """A scalar or `[B]` tensor/number as a `[B]` tensor on `device` (keeps its float dtype)."""
    t = torch.as_tensor(t, device=device)
    if t.numel() not in (1, batch):
        raise ValueError(f"{name} has {t.numel()} values for a batch of {batch}; give one or one per sample")
    return t.reshape(-1).expand(batch)


def heads(x, n: int):
    """`[B, N, n·d]` → `[B, n, N, d]`."""
    B, N, _ = x.shape
    return x.view(B, N, n, -1).transpose(1, 2)


def merge_heads(x):
    """`[B, n, N, d]` → `[B, N, n·d]`."""
    B, n, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, n * d)
