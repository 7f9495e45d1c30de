"""Building blocks shared by the UNet and the VAE.

Attribute names follow the diffusers checkpoints (`norm1`, `conv1`, `time_emb_proj`, `to_q`,
`to_out.0`, ...) so that state dicts load by name. No buffers: every module is fully described
by its parameters, which is what lets the loaders build it on the meta device and assign weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import norm_silu


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, float32 `[N, dim]`.

    freqs_i = exp(-ln(max_period) · i / (dim/2 - freq_shift)),  i = 0..dim/2-1
    emb     = [cos(t·freqs), sin(t·freqs)]   (or [sin, cos] when flip_sin_to_cos is False)
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.reshape(-1, 1).float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else
                    [torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepMLP(nn.Module):
    """Linear → SiLU → Linear on a sinusoidal embedding (`time_embedding`, `add_embedding`).

    With `cond_dim` (LCM), a guidance embedding is projected and added to the input first.
    """

    def __init__(self, in_dim: int, dim: int, cond_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim else None

    def forward(self, x, cond=None):
        if cond is not None:
            if self.cond_proj is None:
                raise ValueError("timestep_cond was given but this UNet has no time_cond_proj_dim "
                                 "(it is not an LCM-distilled UNet); pass timestep_cond=None")
            x = x + self.cond_proj(cond.to(x.dtype))
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv3×3 (+ time embedding) → GroupNorm → SiLU → conv3×3, plus skip.

    out = (shortcut(x) + h) / output_scale
    """

    def __init__(self, cin: int, cout: int, temb_dim: int | None, groups: int, eps: float,
                 output_scale: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout) if temb_dim else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.output_scale = output_scale

    def forward(self, x, temb=None):
        h = self.conv1(norm_silu(self.norm1, x))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(norm_silu(self.norm2, h))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        return out if self.output_scale == 1.0 else out / self.output_scale


class Downsample(nn.Module):
    """Strided 3×3 conv. padding=0 (the VAE) pads one pixel right and bottom first."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)
        self.pad_right = padding == 0

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad_right else x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 (or to `size`, the skip connection's size) then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head attention, `[B, N, dim]` queries against `[B, M, context_dim]` keys/values.

    softmax(q kᵀ / √d_head) v per head, through `F.scaled_dot_product_attention`, which
    accumulates scores and softmax in fp32 for half inputs on every backend (the fused CUDA
    kernels, and the math/CPU paths since torch 2.5) — so `upcast_attention` needs no extra cast.

    `processor` (None by default) is the attention hook (models.attention_hook): when set, it is
    called with the head-split q, k, v `[B, heads, N, d_head]` instead of SDPA and returns the
    heads' output of the same shape as q.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        self.is_cross = context_dim is not None        # keys/values from another sequence (the text)
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.processor = None                          # the attention hook: models.attention_hook

    def forward(self, x, context=None):
        context = x if context is None else context
        B, N, C = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (u.view(B, -1, self.heads, C // self.heads).transpose(1, 2) for u in (q, k, v))
        if self.processor is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = self.processor(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(B, N, C))
