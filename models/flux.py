"""The FLUX.1 transformer (dev and schnell) with diffusers' FluxTransformer2DModel parameter names.

    x    = x_embedder(packed latents [B, L, 64]);  c = context_embedder(T5 tokens [B, M, 4096])
    temb = MLP(sin256(1000σ)) [+ MLP(sin256(1000g)), dev] + MLP(pooled CLIP [B, 768])
    rope = 3-axis rotary table over ids = [txt_ids; img_ids]  ([M + L, 3]: (0, row, col) for images)
    19 × double-stream block (separate weights per stream, attention over [c; x])
    38 × single-stream block on h = [c; x] (attention and MLP in parallel, one output projection)
    out  = proj_out(LN(x)·(1 + scale) + shift)  → packed velocity [B, L, 64]

`pack_latents` / `unpack_latents` / `latent_image_ids` turn [B, 16, H, W] latents into the packed
2×2 tokens and back, as diffusers' FluxPipeline does.
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
class FluxConfig:
    """FluxTransformer2DModel architecture (defaults: diffusers' class defaults = FLUX.1-schnell)."""
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None          # None: in_channels
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        if self.patch_size != 1:
            raise UnsupportedConfigError(f"Flux config: patch_size={self.patch_size}; only 1 is implemented "
                                         "(latents are packed 2×2 outside the model)")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(a % 2 for a in self.axes_dims_rope):
            raise UnsupportedConfigError(f"Flux config: axes_dims_rope {self.axes_dims_rope} must be even and sum "
                                         f"to attention_head_dim {self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, d: dict) -> "FluxConfig":
        """Read a diffusers FluxTransformer2DModel `config.json` dict."""
        _check_class(d, "FluxTransformer2DModel", "Flux transformer")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None}
        kw["axes_dims_rope"] = tuple(int(a) for a in kw.get("axes_dims_rope", cls.axes_dims_rope))
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FLUX_CONFIGS = {"flux.1-dev": FluxConfig(guidance_embeds=True), "flux.1-schnell": FluxConfig()}


def flux_config(name: str) -> FluxConfig:
    """The config of a released FLUX.1 model: "flux.1-dev" or "flux.1-schnell"."""
    return _lookup(FLUX_CONFIGS, name, "Flux transformer")


def attend(q, k, v, rope):
    """RoPE on q and k, then softmax(q kᵀ/√d) v; `[B, heads, N, d]`. Every Flux attention goes through here."""
    return F.scaled_dot_product_attention(apply_rope(q, rope), apply_rope(k, rope), v)


def rope_table(ids: torch.Tensor, axes_dims, theta: float = 10000.0):
    """(cos, sin), each float32 `[N, sum(axes_dims)]`, for positions `ids` `[N, n_axes]`.

    Axis a with d_a dims: angle_j = pos_a · theta^(-2j/d_a), j < d_a/2, each repeated twice
    (adjacent pairs); computed in float64 where the device has it.
    """
    if ids.ndim != 2 or ids.shape[1] != len(axes_dims):
        raise ValueError(f"ids must be [tokens, {len(axes_dims)}], got {tuple(ids.shape)}")
    f64 = ids.device.type not in ("mps", "npu")
    dt = torch.float64 if f64 else torch.float32
    angles = []
    for a, d in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=dt, device=ids.device) / d)
        angles.append(torch.outer(ids[:, a].to(dt), freqs).repeat_interleave(2, dim=1))
    angle = torch.cat(angles, dim=1)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x, rope):
    """Rotate adjacent pairs of `x` `[B, H, N, d]`: (x0, x1) → (x0·cos − x1·sin, x1·cos + x0·sin), in fp32."""
    cos, sin = rope
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x1, x0], dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class FluxAttention(nn.Module):
    """q, k, v projections with per-head RMS norms; `joint`: a second set for the text stream
    (`add_*_proj`, `norm_added_*`, `to_add_out`); `pre_only` (single blocks): no output projection."""

    def __init__(self, dim: int, n_heads: int, head_dim: int, joint: bool, pre_only: bool):
        super().__init__()
        self.n_heads = n_heads
        inner = n_heads * head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        if not pre_only:
            self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
            self.to_add_out = nn.Linear(inner, dim)

    def forward(self, x, rope, context=None):
        n = self.n_heads
        q, k, v = self.norm_q(heads(self.to_q(x), n)), self.norm_k(heads(self.to_k(x), n)), heads(self.to_v(x), n)
        if context is None:
            return merge_heads(attend(q, k, v, rope))
        cq = self.norm_added_q(heads(self.add_q_proj(context), n))
        ck = self.norm_added_k(heads(self.add_k_proj(context), n))
        cv = heads(self.add_v_proj(context), n)
        m = context.shape[1]
        out = merge_heads(attend(torch.cat([cq, q], 2), torch.cat([ck, k], 2), torch.cat([cv, v], 2), rope))
        return self.to_out[0](out[:, m:]), self.to_add_out(out[:, :m])


def _clip_fp16(x):
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class FluxTransformerBlock(nn.Module):
    """Double-stream block: AdaLN-Zero on image and text, joint attention, separate MLPs."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        D = cfg.inner_dim
        self.norm1, self.norm1_context = AdaNorm(D, 6), AdaNorm(D, 6)
        self.attn = FluxAttention(D, cfg.num_attention_heads, cfg.attention_head_dim, joint=True, pre_only=False)
        self.ff, self.ff_context = FeedForward(D), FeedForward(D)

    def forward(self, x, c, temb, rope):
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
        x_attn, c_attn = self.attn(modulate(layer_norm(x), shift, scale), rope,
                                   modulate(layer_norm(c), c_shift, c_scale))
        x = x + gate[:, None] * x_attn
        x = x + gate_mlp[:, None] * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))
        c = c + c_gate[:, None] * c_attn
        c = c + c_gate_mlp[:, None] * self.ff_context(modulate(layer_norm(c), c_shift_mlp, c_scale_mlp))
        return x, _clip_fp16(c)


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block on h = [c; x]: h ← h + gate · proj_out([attn(h̃), GELU(proj_mlp(h̃))])."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        D = cfg.inner_dim
        self.norm = AdaNorm(D, 3)
        self.proj_mlp = nn.Linear(D, 4 * D)
        self.attn = FluxAttention(D, cfg.num_attention_heads, cfg.attention_head_dim, joint=False, pre_only=True)
        self.proj_out = nn.Linear(D + 4 * D, D)

    def forward(self, x, c, temb, rope):
        m = c.shape[1]
        h = torch.cat([c, x], dim=1)
        shift, scale, gate = self.norm(temb)
        nh = modulate(layer_norm(h), shift, scale)
        mlp = F.gelu(self.proj_mlp(nh), approximate="tanh")
        h = _clip_fp16(h + gate[:, None] * self.proj_out(torch.cat([self.attn(nh, rope), mlp], dim=2)))
        return h[:, m:], h[:, :m]


class FluxTransformer(nn.Module):
    """FluxTransformer2DModel-compatible velocity model.

    `model(x, t, context, pooled, img_ids, txt_ids, guidance=None)`: x packed latents `[B, L, in_channels]`,
    t = σ in [0, 1] (scalar or `[B]`; multiplied by 1000 inside, as diffusers does), context
    `[B, M, joint_attention_dim]`, pooled `[B, pooled_projection_dim]`, img_ids `[L, 3]`, txt_ids
    `[M, 3]`, guidance (dev only) the distilled guidance scale (scalar or `[B]`) → `[B, L, out_channels]`.
    """

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = cfg = config
        D = cfg.inner_dim
        self.time_text_embed = TimeTextEmbed(D, cfg.pooled_projection_dim, guidance=cfg.guidance_embeds)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, D)
        self.x_embedder = nn.Linear(cfg.in_channels, D)
        self.transformer_blocks = nn.ModuleList([FluxTransformerBlock(cfg) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleTransformerBlock(cfg) for _ in range(cfg.num_single_layers)])
        self.norm_out = AdaNorm(D, 2)
        self.proj_out = nn.Linear(D, cfg.patch_size * cfg.patch_size * cfg.out_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    def embed(self, t, pooled, guidance, batch: int, dtype):
        """temb `[B, D]`; t and guidance are rounded to the model's dtype before the ×1000 (as diffusers)."""
        t = batch_vector(t, batch, pooled.device, "t").to(dtype) * 1000
        if self.config.guidance_embeds:
            if guidance is None:
                raise ValueError("this Flux model (FLUX.1-dev type, guidance_embeds=True) needs guidance= "
                                 "(the distilled guidance scale, e.g. 3.5)")
            guidance = batch_vector(guidance, batch, pooled.device, "guidance").to(dtype) * 1000
        elif guidance is not None:
            raise ValueError("guidance= was given but this Flux model has no guidance embedding "
                             "(FLUX.1-schnell type); pass guidance=None")
        return self.time_text_embed(t, pooled.to(dtype), guidance)

    def forward(self, x, t, context, pooled, img_ids, txt_ids, guidance=None):
        cfg = self.config
        if x.ndim != 3 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"x must be packed latents [B, tokens, {cfg.in_channels}], got {tuple(x.shape)}; "
                             "use pack_latents")
        B, L, _ = x.shape
        if context.ndim != 3 or context.shape[0] != B or context.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(f"context must be [{B}, tokens, {cfg.joint_attention_dim}], got {tuple(context.shape)}")
        if pooled.shape != (B, cfg.pooled_projection_dim):
            raise ValueError(f"pooled must be [{B}, {cfg.pooled_projection_dim}], got {tuple(pooled.shape)}")
        if img_ids.shape[0] != L or txt_ids.shape[0] != context.shape[1]:
            raise ValueError(f"img_ids {tuple(img_ids.shape)} / txt_ids {tuple(txt_ids.shape)} must have one row per "
                             f"image token ({L}) / text token ({context.shape[1]})")
        dtype = x.dtype
        temb = self.embed(t, pooled, guidance, B, dtype)
        h = self.x_embedder(x)
        c = self.context_embedder(context.to(dtype))
        rope = rope_table(torch.cat([txt_ids, img_ids], dim=0).to(x.device), cfg.axes_dims_rope)
        for block in self.transformer_blocks:
            h, c = block(h, c, temb, rope)
        for block in self.single_transformer_blocks:
            h, c = block(h, c, temb, rope)
        scale, shift = self.norm_out(temb)
        return self.proj_out(modulate(layer_norm(h), shift, scale))


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """`[B, C, H, W]` (H, W even) → `[B, (H/2)(W/2), 4C]`; token row-major, feature c·4 + 2·dy + dx."""
    B, C, H, W = z.shape
    if H % 2 or W % 2:
        raise ValueError(f"Flux latents need even height and width, got {H}×{W}")
    return z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), 4 * C)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents`: `[B, (H/2)(W/2), 4C]` → `[B, C, H, W]` (latent height, width)."""
    B, L, F4 = tokens.shape
    if L != (height // 2) * (width // 2) or height % 2 or width % 2:
        raise ValueError(f"{L} tokens do not form a {height}×{width} latent (even sizes, (H/2)(W/2) tokens)")
    return tokens.view(B, height // 2, width // 2, F4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
        B, F4 // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """`[(H/2)(W/2), 3]` ids (0, row, col) of the packed tokens of an H×W latent."""
    h, w = height // 2, width // 2
    rows = torch.arange(h, device=device, dtype=dtype)[:, None].expand(h, w)
    cols = torch.arange(w, device=device, dtype=dtype)[None, :].expand(h, w)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """`[length, 3]` zeros: text tokens sit at position 0 on every axis."""
    return torch.zeros(length, 3, device=device, dtype=dtype)
