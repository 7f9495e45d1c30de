"""The Stable Diffusion 3 / 3.5 MMDiT with diffusers' SD3Transformer2DModel parameter names.

    x    = Conv2d_p×p(latent) as tokens [B, h·w, D] + centre crop of the pos-embed grid
    temb = MLP(sin256(t)) + MLP(pooled)                       t = 1000·σ, not divided
    c    = context_embedder(text tokens)                      [B, M, D]
    N × joint block (AdaLN-Zero on both streams, attention over [x; c]; the last block updates x only)
    out  = proj_out(LN(x)·(1 + scale) + shift) unpatchified to [B, C, H, W]

SD 3.5 large/turbo add per-head RMS norms on q and k (`qk_norm="rms_norm"`); SD 3.5 medium adds,
in the blocks listed in `dual_attention_layers`, a second self-attention on the image tokens
(`attn2`) with its own modulation (9 chunks instead of 6).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configs import UnsupportedConfigError, _check_class, _lookup
from .dit_blocks import (AdaNorm, FeedForward, RMSNorm, TimeTextEmbed, batch_vector, heads, layer_norm,
                         merge_heads, modulate)


@dataclass(frozen=True)
class SD3Config:
    """SD3Transformer2DModel architecture (defaults: diffusers' class defaults)."""
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        if self.qk_norm not in (None, "rms_norm"):
            raise UnsupportedConfigError(f"SD3 config: qk_norm={self.qk_norm!r}; implemented: None, 'rms_norm'")
        if self.caption_projection_dim != self.inner_dim:
            raise UnsupportedConfigError(
                f"SD3 config: caption_projection_dim {self.caption_projection_dim} must equal "
                f"num_attention_heads·attention_head_dim = {self.inner_dim}")
        if not self.pos_embed_max_size:
            raise UnsupportedConfigError("SD3 config: pos_embed_max_size must be set (every released SD3 has it)")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise UnsupportedConfigError(f"SD3 config: dual_attention_layers {bad} outside 0..{self.num_layers - 1}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict) -> "SD3Config":
        """Read a diffusers SD3Transformer2DModel `config.json` dict."""
        _check_class(d, "SD3Transformer2DModel", "SD3 transformer")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None}
        if "qk_norm" in d:
            kw["qk_norm"] = d["qk_norm"]
        kw["dual_attention_layers"] = tuple(int(i) for i in kw.get("dual_attention_layers", ()))
        if kw.get("out_channels") is None:
            kw["out_channels"] = kw.get("in_channels", cls.in_channels)
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SD3M = SD3Config(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)
_SD35L = SD3Config(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                   qk_norm="rms_norm")
SD3_CONFIGS = {
    "sd3-medium": _SD3M,
    "sd3.5-large": _SD35L,
    "sd3.5-large-turbo": _SD35L,
    "sd3.5-medium": dataclasses.replace(_SD3M, pos_embed_max_size=384, qk_norm="rms_norm",
                                        dual_attention_layers=tuple(range(13))),
}


def sd3_config(name: str) -> SD3Config:
    """The config of a released SD3 model: "sd3-medium", "sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium"."""
    return _lookup(SD3_CONFIGS, name, "SD3 transformer")


def attend(q, k, v):
    """softmax(q kᵀ/√d) v for `[B, heads, N, d]` tensors: every attention of the MMDiT goes through here."""
    return F.scaled_dot_product_attention(q, k, v)


def sincos_grid(dim: int, size: int, base_size: int) -> torch.Tensor:
    """The 2-D sin-cos position table `[1, size², dim]` (float32), rows of the grid first.

    Coordinates are arange(size)/(size/base_size); the first dim/2 channels encode the column,
    the rest the row, each as [sin(p·ω), cos(p·ω)] with ω_k = 10000^(-k/(dim/4)) (in float64).
    """
    pos = torch.arange(size, dtype=torch.float64) / (size / base_size)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_axis(p):
        a = p.reshape(-1)[:, None] * omega[None]
        return torch.cat([a.sin(), a.cos()], dim=1)

    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()[None]


class PatchEmbed(nn.Module):
    """Conv2d(C → D, kernel = stride = p) to tokens, plus the centred crop of the `pos_embed` table."""

    def __init__(self, cfg: SD3Config):
        super().__init__()
        D, M = cfg.inner_dim, cfg.pos_embed_max_size
        self.patch, self.max_size = cfg.patch_size, M
        self.proj = nn.Conv2d(cfg.in_channels, D, cfg.patch_size, stride=cfg.patch_size)
        device = self.proj.weight.device
        table = torch.empty(1, M * M, D, device=device) if device.type == "meta" else \
            sincos_grid(D, M, cfg.sample_size // cfg.patch_size)
        self.register_buffer("pos_embed", table)

    def forward(self, x):
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        M = self.max_size
        if h > M or w > M:
            raise ValueError(f"latent of {h}×{w} patches exceeds this model's position table "
                             f"({M}×{M} patches): use a smaller image")
        top, left = (M - h) // 2, (M - w) // 2
        pos = self.pos_embed.view(1, M, M, -1)[:, top:top + h, left:left + w].reshape(1, h * w, -1)
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        return (tokens + pos).to(tokens.dtype)


class JointAttention(nn.Module):
    """Attention over [image; context] tokens, each stream with its own projections.

    `attn.to_q/k/v`, `to_out.0` for the image, `add_q/k/v_proj`, `to_add_out` for the context
    (absent in the last, context-pre-only block). With `context=None` it is plain self-attention
    on the image (SD 3.5 medium's `attn2`).
    """

    def __init__(self, dim: int, n_heads: int, head_dim: int, qk_norm: bool, joint: bool, pre_only: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, n_heads * head_dim) for _ in range(3))
        self.norm_q = RMSNorm(head_dim) if qk_norm else None
        self.norm_k = RMSNorm(head_dim) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(n_heads * head_dim, dim)])
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, n_heads * head_dim) for _ in range(3))
            self.norm_added_q = RMSNorm(head_dim) if qk_norm else None
            self.norm_added_k = RMSNorm(head_dim) if qk_norm else None
            self.to_add_out = None if pre_only else nn.Linear(n_heads * head_dim, dim)

    def _qkv(self, x, q, k, v, nq, nk):
        q, k, v = (heads(f(x), self.n_heads) for f in (q, k, v))
        return (nq(q) if nq is not None else q), (nk(k) if nk is not None else k), v

    def forward(self, x, context=None):
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if context is None:
            return self.to_out[0](merge_heads(attend(q, k, v))), None
        cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                               self.norm_added_q, self.norm_added_k)
        n = x.shape[1]
        out = merge_heads(attend(torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)))
        x_out, c_out = out[:, :n], out[:, n:]
        return self.to_out[0](x_out), (None if self.to_add_out is None else self.to_add_out(c_out))


class JointTransformerBlock(nn.Module):
    """One MMDiT block: AdaLN-Zero modulated joint attention and MLPs on both streams.

    x ← x + g·attn;  [dual: x ← x + g2·attn2(x̃2)];  x ← x + g_mlp·FF(LN(x)(1+s)+b); the same for c,
    except in the last block (`context_pre_only`), whose context only feeds keys and values.
    """

    def __init__(self, cfg: SD3Config, index: int):
        super().__init__()
        D = cfg.inner_dim
        self.pre_only = index == cfg.num_layers - 1
        self.dual = index in cfg.dual_attention_layers
        qk = cfg.qk_norm is not None
        self.norm1 = AdaNorm(D, 9 if self.dual else 6)
        self.norm1_context = AdaNorm(D, 2 if self.pre_only else 6)
        self.attn = JointAttention(D, cfg.num_attention_heads, cfg.attention_head_dim, qk, True, self.pre_only)
        self.attn2 = JointAttention(D, cfg.num_attention_heads, cfg.attention_head_dim, qk, False) \
            if self.dual else None
        self.ff = FeedForward(D)
        self.ff_context = None if self.pre_only else FeedForward(D)

    def forward(self, x, c, temb):
        mods = self.norm1(temb)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        nx = layer_norm(x)
        if self.pre_only:
            c_scale, c_shift = self.norm1_context(temb)
            nc = modulate(layer_norm(c), c_shift, c_scale)
        else:
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
            nc = modulate(layer_norm(c), c_shift, c_scale)
        x_attn, c_attn = self.attn(modulate(nx, shift, scale), nc)
        x = x + gate[:, None] * x_attn
        if self.dual:
            shift2, scale2, gate2 = mods[6:]
            x = x + gate2[:, None] * self.attn2(modulate(nx, shift2, scale2))[0]
        x = x + gate_mlp[:, None] * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))
        if self.pre_only:
            return x, None
        c = c + c_gate[:, None] * c_attn
        c = c + c_gate_mlp[:, None] * self.ff_context(modulate(layer_norm(c), c_shift_mlp, c_scale_mlp))
        return x, c


class SD3Transformer(nn.Module):
    """SD3Transformer2DModel-compatible velocity model.

    `model(x, t, context, pooled)`: x `[B, C, H, W]` latents (H, W multiples of patch_size), t the
    timestep 1000·σ (scalar or `[B]`), context `[B, M, joint_attention_dim]`, pooled
    `[B, pooled_projection_dim]` → velocity `[B, out_channels, H, W]`. `skip_layers`: indices of
    blocks to skip (skip-layer guidance).
    """

    def __init__(self, config: SD3Config):
        super().__init__()
        self.config = cfg = config
        D = cfg.inner_dim
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = TimeTextEmbed(D, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([JointTransformerBlock(cfg, i) for i in range(cfg.num_layers)])
        self.norm_out = AdaNorm(D, 2)
        self.proj_out = nn.Linear(D, cfg.patch_size * cfg.patch_size * cfg.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    def forward(self, x, t, context, pooled, skip_layers=()):
        cfg = self.config
        p = cfg.patch_size
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"x must be [B, {cfg.in_channels}, H, W] with H, W multiples of {p}, "
                             f"got {tuple(x.shape)}")
        B, _, H, W = x.shape
        if context.ndim != 3 or context.shape[-1] != cfg.joint_attention_dim or context.shape[0] != B:
            raise ValueError(f"context must be [{B}, tokens, {cfg.joint_attention_dim}], got {tuple(context.shape)}")
        if pooled.shape != (B, cfg.pooled_projection_dim):
            raise ValueError(f"pooled must be [{B}, {cfg.pooled_projection_dim}], got {tuple(pooled.shape)}")
        bad = [i for i in skip_layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"skip_layers {bad} are not block indices (0..{cfg.num_layers - 1})")
        dtype = x.dtype
        h = self.pos_embed(x)
        temb = self.time_text_embed(batch_vector(t, B, x.device, "t"), pooled.to(dtype))
        c = self.context_embedder(context.to(dtype))
        for i, block in enumerate(self.transformer_blocks):
            if i not in skip_layers:
                h, c = block(h, c, temb)
        scale, shift = self.norm_out(temb)
        h = self.proj_out(modulate(layer_norm(h), shift, scale))
        return unpatchify(h, H // p, W // p, p)


def unpatchify(tokens, h: int, w: int, p: int):
    """`[B, h·w, p·p·C]` (channel fastest) → `[B, C, h·p, w·p]`."""
    B = tokens.shape[0]
    t = tokens.reshape(B, h, w, p, p, -1)
    return t.permute(0, 5, 1, 3, 2, 4).reshape(B, -1, h * p, w * p)
