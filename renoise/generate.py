"""Text-to-image generation with a loaded pipeline (what diffusers' pipelines' `__call__` does).

    images = generate(pipe, ["a red circle ..."], num_steps=25, guidance_scale=4.0, generator=gen)

z_T ~ N(0, I) (or `latents`), then the sampler's chain with classifier-free guidance
ε = ε_u + g·(ε_c − ε_u) (negative prompt "" or the model's zeros), decoded by the VAE to
[B, 3, H, W] in [-1, 1]. Stochastic samplers draw their step noises from the same generator.
"""
from __future__ import annotations

import torch

from .denoisers import initial_latents
from .pipeline import decode_latents, family_of

__all__ = ["generate", "initial_latents"]


@torch.no_grad()
def generate(pipe, prompts, *, num_steps: int = 25, guidance_scale: float = 4.0, sampler: str = "ddim",
             negative_prompts=None, size=None, latents: torch.Tensor | None = None,
             generator: torch.Generator | None = None, return_latents: bool = False):
    """Images [B, 3, H, W] in [-1, 1] for `prompts` (with return_latents: also z0). `size`
    (H, W) in pixels defaults to the UNet's (SD3: the transformer's) sample size × 8. The pipeline's
    family (renoise.pipeline.FAMILIES) runs the chain: UNets with `sampler`; SD3 / FLUX.1 with their
    flow Euler step (the sampler argument does not apply)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    x = family_of(pipe).generate(prompts, num_steps=num_steps, guidance_scale=guidance_scale, sampler=sampler,
                                 negative_prompts=negative_prompts, size=size, latents=latents, generator=generator)
    images = decode_latents(pipe, x)
    return (images, x) if return_latents else images
