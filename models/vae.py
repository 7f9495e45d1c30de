"""The Stable Diffusion autoencoder (AutoencoderKL) with diffusers' parameter names.

    encode:  image [-1,1] → encoder → quant_conv → (mean, logvar)      latents at 1/2^(levels-1) size
    sample:  z = mean + exp(logvar/2) · ε,  ε ~ N(0, I) from an explicit generator
    scaled:  (z - shift_factor) · scaling_factor        (what the UNet sees)
    decode:  z → post_quant_conv → decoder → image (not clamped)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Downsample, ResnetBlock, Upsample
from .configs import VAEConfig

EPS = 1e-6


class VAEAttention(nn.Module):
    """Single-head self-attention over the H·W pixels, with its own GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).reshape(B, C, H * W).transpose(1, 2)
        q, k, v = (f(h)[:, None] for f in (self.to_q, self.to_k, self.to_v))
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]
        return self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W) + x


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, None, groups, EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(c, groups)] if attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Level(nn.Module):
    """Resnets at one resolution, then an optional down- or upsampler."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, sampler: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, None, groups, EPS) for i in range(n)])
        if sampler == "down":
            self.downsamplers = nn.ModuleList([Downsample(cout, padding=0)])
        elif sampler == "up":
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, "down" if i < n - 1 else None)
            for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, "up" if i < n - 1 else None)
            for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """The KL autoencoder. Images are `[B, 3, H, W]` in [-1, 1]; latents `[B, 4, H/8, W/8]` for SD.

    With `config.force_upcast` (SDXL's VAE, which overflows in fp16) and fp16 weights, every call
    runs in fp32 on fp32 copies of the weights and casts the result back to the input's dtype.
    Half-precision results are checked for inf/NaN and raise instead of passing them on.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = cfg = config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv2d(c, c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = (nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
                                if cfg.use_post_quant_conv else None)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor

    def _run(self, modules, x):
        """Apply `modules` in order in the compute dtype; return in x's dtype."""
        upcast = self.config.force_upcast and self.dtype == torch.float16
        h = x.to(torch.float32 if upcast else self.dtype)
        for m in modules:
            if m is None:
                continue
            if upcast:
                params = {k: p.float() for k, p in m.named_parameters()}
                h = torch.func.functional_call(m, params, (h,))
            else:
                h = m(h)
        if h.dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(h).all():
            raise ValueError(f"the VAE produced inf/NaN computing in {h.dtype}: these weights overflow in "
                             "half precision; load the VAE in float32 (or set force_upcast in its config)")
        return h.to(x.dtype)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw posterior moments (mean, logvar), logvar clamped to [-30, 20]."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be [B, {self.config.in_channels}, H, W], got {tuple(images.shape)}")
        mean, logvar = self._run([self.encoder, self.quant_conv], images).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw (unscaled) latents → images in about [-1, 1] (not clamped)."""
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"latents must be [B, {self.config.latent_channels}, h, w], got {tuple(latents.shape)}")
        return self._run([self.post_quant_conv, self.decoder], latents)

    def encode_latents(self, images, generator: torch.Generator | None = None, sample: bool = True):
        """Scaled latents: a posterior sample (ε drawn as `randn(mean.shape, generator)` on the
        generator's device, in the moments' dtype) or, with sample=False, the posterior mean."""
        mean, logvar = self.encode(images)
        if sample:
            if generator is None:
                raise ValueError("encode_latents(sample=True) needs an explicit torch.Generator; "
                                 "pass generator=... or sample=False for the posterior mean")
            eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps.to(mean.device)
        else:
            z = mean
        return (z - self.shift_factor) * self.scaling_factor

    def decode_latents(self, scaled: torch.Tensor) -> torch.Tensor:
        """Scaled latents (what the UNet sees) → images."""
        return self.decode(scaled / self.scaling_factor + self.shift_factor)
