"""The Stable Diffusion UNet (SD 1.x, 2.x, SDXL/Turbo, LCM) with diffusers' parameter names.

    emb  = MLP(sinusoid(t) [+ cond_proj(timestep_cond)])  [+ MLP([text_embeds, sinusoid(time_ids)])]
    h    = conv_in(x); skips = [h]
    down: per level, L × (resnet(h, emb) → [transformer(h, context)]), then a strided conv; push each
    mid:  resnet → transformer → resnet
    up:   per level, (L+1) × (resnet(cat(h, skips.pop()), emb) → [transformer]), then upsample
    out  = conv_out(SiLU(GroupNorm(h)))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import norm_silu
from .blocks import Attention, Downsample, ResnetBlock, TimestepMLP, Upsample, timestep_embedding
from .configs import UNetConfig


class GEGLU(nn.Module):
    """(a, g) = split(W x); a · gelu(g)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):
        a, g = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(g)


class FeedForward(nn.Module):
    """GEGLU MLP, keys `net.0.proj`, `net.2` (`net.1` is diffusers' parameter-free dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text context, and a GEGLU MLP."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm → proj_in → transformer blocks on the H·W tokens → proj_out, plus residual.

    SD 1.x checkpoints hold 1×1 convolutions for proj_in/out, SD 2.x / SDXL linears; both are
    applied as one matmul on the token layout `[B, H·W, C]` (a 1×1 conv is that matmul, and on the
    tokens it needs one layout copy instead of three).
    """

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int, linear: bool):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, context_dim) for _ in range(depth)])
        self.proj_out = proj()

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        h = F.linear(h, self.proj_in.weight.reshape(C, C), self.proj_in.bias)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = F.linear(h, self.proj_out.weight.reshape(C, C), self.proj_out.bias)
        return x + h.reshape(B, H, W, C).permute(0, 3, 1, 2)


class UNetLevel(nn.Module):
    """One resolution level: resnets, optional transformers, optional down/upsampler."""

    def __init__(self, cfg: UNetConfig, cins: list[int], cout: int, heads: int, depth: int,
                 attention: bool, sampler: str | None):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock(c, cout, cfg.time_embed_dim, g, eps) for c in cins])
        self.attentions = nn.ModuleList(
            [SpatialTransformer(cout, heads, depth, cfg.cross_attention_dim, g, cfg.use_linear_projection)
             for _ in cins]) if attention else None
        if sampler == "down":
            self.downsamplers = nn.ModuleList([Downsample(cout, cfg.downsample_padding)])
        elif sampler == "up":
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def layers(self):
        attns = self.attentions if self.attentions is not None else [None] * len(self.resnets)
        return zip(self.resnets, attns)


class MidBlock(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        c, g, eps, s = cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList([ResnetBlock(c, c, cfg.time_embed_dim, g, eps, s) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer(
            c, cfg.num_heads[-1], cfg.transformer_layers_per_block[-1], cfg.cross_attention_dim, g,
            cfg.use_linear_projection)])

    def forward(self, h, emb, context):
        h = self.resnets[0](h, emb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, emb)


class UNet(nn.Module):
    """UNet2DConditionModel-compatible denoiser. `unet(x, t, context, ...)` → model output `[B,C,H,W]`."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch = cfg.block_out_channels
        c0, n = ch[0], len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepMLP(c0, cfg.time_embed_dim, cfg.time_cond_proj_dim)
        self.add_embedding = (TimestepMLP(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
                              if cfg.addition_embed_type == "text_time" else None)

        self.down_blocks = nn.ModuleList()
        cprev = c0
        for i, kind in enumerate(cfg.down_block_types):
            L = cfg.layers_per_block[i]
            self.down_blocks.append(UNetLevel(
                cfg, [cprev] + [ch[i]] * (L - 1), ch[i], cfg.num_heads[i], cfg.transformer_layers_per_block[i],
                kind == "CrossAttnDownBlock2D", "down" if i < n - 1 else None))
            cprev = ch[i]
        self.mid_block = MidBlock(cfg)

        # Up level i (deepest first) takes L+1 skips: L from down level n-1-i, then the
        # downsampler output (or conv_in) of the level above it.
        rch, rheads, rL = ch[::-1], cfg.num_heads[::-1], cfg.layers_per_block[::-1]
        self.up_blocks = nn.ModuleList()
        cprev = rch[0]
        for i, kind in enumerate(cfg.up_block_types):
            cout, cskip_last = rch[i], rch[min(i + 1, n - 1)]
            cins = [(cprev if j == 0 else cout) + (cskip_last if j == rL[i] else cout) for j in range(rL[i] + 1)]
            self.up_blocks.append(UNetLevel(
                cfg, cins, cout, rheads[i], cfg.up_transformer_layers[i], kind == "CrossAttnUpBlock2D",
                "up" if i < n - 1 else None))
            cprev = cout

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, c0, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(c0, cfg.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def embed(self, t, batch: int, dtype, device, text_embeds=None, time_ids=None, timestep_cond=None):
        """The conditioning vector `[B, time_embed_dim]` from timesteps and extra conditions."""
        cfg = self.config
        t = torch.as_tensor(t, device=device)
        if t.numel() not in (1, batch):
            raise ValueError(f"t has {t.numel()} timesteps for a batch of {batch}; give one or one per sample")
        t = t.reshape(-1).expand(batch)
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).to(dtype)
        emb = self.time_embedding(emb, timestep_cond)
        if self.add_embedding is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet (SDXL, addition_embed_type='text_time') needs text_embeds "
                                 "(pooled text embeddings [B, D]) and time_ids ([B, 6] micro-conditioning)")
            tid = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                     cfg.freq_shift).reshape(text_embeds.shape[0], -1)
            add = torch.cat([text_embeds.to(dtype), tid.to(dtype)], dim=-1)
            if add.shape[-1] != cfg.projection_class_embeddings_input_dim:
                raise ValueError(
                    f"text_embeds ({text_embeds.shape[-1]}) + time_ids embedding ({tid.shape[-1]}) give "
                    f"{add.shape[-1]} features; this UNet expects {cfg.projection_class_embeddings_input_dim}")
            emb = emb + self.add_embedding(add)
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds/time_ids are only used by SDXL-type UNets; this one has no "
                             "addition embedding — pass None")
        return emb

    def forward(self, x, t, context, text_embeds=None, time_ids=None, timestep_cond=None):
        """x `[B,C,H,W]`, t scalar or `[B]` (float allowed), context `[B, M, cross_attention_dim]`."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, H, W], got {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"context must be [B, tokens, {cfg.cross_attention_dim}], got {tuple(context.shape)}")
        emb = self.embed(t, x.shape[0], x.dtype, x.device, text_embeds, time_ids, timestep_cond)
        context = context.to(x.dtype)

        h = self.conv_in(x)
        skips = [h]
        for level in self.down_blocks:
            for resnet, attn in level.layers():
                h = resnet(h, emb)
                if attn is not None:
                    h = attn(h, context)
                skips.append(h)
            if hasattr(level, "downsamplers"):
                h = level.downsamplers[0](h)
                skips.append(h)

        h = self.mid_block(h, emb, context)

        for level in self.up_blocks:
            for resnet, attn in level.layers():
                h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
                if attn is not None:
                    h = attn(h, context)
            if hasattr(level, "upsamplers"):
                h = level.upsamplers[0](h, size=skips[-1].shape[-2:])

        return self.conv_out(norm_silu(self.conv_norm_out, h))
