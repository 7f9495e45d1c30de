"""Tiny random-weight diffusers SD3 / Flux transformers for tests.

    tiny_sd3_config(kind)     kwargs for SD3Transformer2DModel; kind in {"sd3", "sd35-large", "sd35-medium"}
    tiny_flux_config(kind)    kwargs for FluxTransformer2DModel; kind in {"dev", "schnell"}
    make_tiny_sd3 / make_tiny_flux(kind, seed)      the diffusers model, every parameter randomised
    save_tiny_sd3 / save_tiny_flux(path, kind, ...) make + save_pretrained → the fp32 diffusers model
    sd3_inputs / flux_inputs(kind, ...)             random model inputs (diffusers' argument names)
    FULL_SD3 / FULL_FLUX                            the released models' config kwargs

diffusers is imported lazily: it is a test-only oracle.
"""
from __future__ import annotations

import torch

from tiny_models import _build, _save


def tiny_sd3_config(kind: str = "sd3") -> dict:
    cfg = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
               num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10,
               out_channels=4, pos_embed_max_size=8)
    if kind == "sd35-large":
        cfg["qk_norm"] = "rms_norm"
    elif kind == "sd35-medium":
        cfg.update(qk_norm="rms_norm", dual_attention_layers=(0, 1))
    elif kind != "sd3":
        raise ValueError(f"unknown tiny SD3 kind {kind!r}")
    return cfg


def tiny_flux_config(kind: str = "dev") -> dict:
    if kind not in ("dev", "schnell"):
        raise ValueError(f"unknown tiny Flux kind {kind!r}")
    return dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
                guidance_embeds=kind == "dev", axes_dims_rope=(4, 6, 6))


FULL_SD3 = {
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
    "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
}
FULL_FLUX = {"flux.1-dev": dict(guidance_embeds=True), "flux.1-schnell": dict(guidance_embeds=False)}


def make_tiny_sd3(kind: str = "sd3", seed: int = 0, **overrides):
    from diffusers import SD3Transformer2DModel
    return _build(SD3Transformer2DModel, {**tiny_sd3_config(kind), **overrides}, seed)


def make_tiny_flux(kind: str = "dev", seed: int = 0, **overrides):
    from diffusers import FluxTransformer2DModel
    return _build(FluxTransformer2DModel, {**tiny_flux_config(kind), **overrides}, seed)


def save_tiny_sd3(path, kind: str = "sd3", *, seed: int = 0, variant=None, dtype=None, max_shard_size=None,
                  **overrides):
    model = make_tiny_sd3(kind, seed, **overrides)
    _save(model, path, variant, dtype, max_shard_size)
    return model


def save_tiny_flux(path, kind: str = "dev", *, seed: int = 0, variant=None, dtype=None, max_shard_size=None,
                   **overrides):
    model = make_tiny_flux(kind, seed, **overrides)
    _save(model, path, variant, dtype, max_shard_size)
    return model


def sd3_inputs(kind: str = "sd3", batch: int = 2, height: int = 8, width: int = 6, tokens: int = 5, seed: int = 0,
               dtype=torch.float32) -> dict:
    """diffusers' keyword arguments: hidden_states, timestep (1000σ per sample), encoder_hidden_states,
    pooled_projections."""
    cfg = tiny_sd3_config(kind)
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, cfg["in_channels"], height, width, generator=g).to(dtype),
                timestep=torch.rand(batch, generator=g) * 1000,
                encoder_hidden_states=torch.randn(batch, tokens, cfg["joint_attention_dim"], generator=g).to(dtype),
                pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=g).to(dtype))


def flux_inputs(kind: str = "dev", batch: int = 2, height: int = 8, width: int = 6, tokens: int = 5, seed: int = 0,
                dtype=torch.float32) -> dict:
    """diffusers' keyword arguments for a packed latent of height×width (latent pixels): hidden_states,
    timestep (σ), encoder_hidden_states, pooled_projections, img_ids, txt_ids, guidance."""
    from renoise.models.flux import latent_image_ids, pack_latents, text_ids
    cfg = tiny_flux_config(kind)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, cfg["in_channels"] // 4, height, width, generator=g)
    return dict(hidden_states=pack_latents(z).to(dtype), timestep=torch.rand(batch, generator=g),
                encoder_hidden_states=torch.randn(batch, tokens, cfg["joint_attention_dim"], generator=g).to(dtype),
                pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=g).to(dtype),
                img_ids=latent_image_ids(height, width), txt_ids=text_ids(tokens),
                guidance=torch.tensor([3.5, 1.0][:batch] + [2.0] * max(0, batch - 2)) if kind == "dev" else None)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
