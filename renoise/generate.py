"""Text-to-image generation with a loaded pipeline (what diffusers' pipelines' `__call__` does).

    images = generate(pipe, ["a red circle ..."], num_steps=25, guidance_scale=4.0, generator=gen)

z_T ~ N(0, I) (or `latents`), then the sampler's chain with classifier-free guidance
ε = ε_u + g·(ε_c − ε_u) (negative prompt "" or the model's zeros), decoded by the VAE to
[B, 3, H, W] in [-1, 1]. Stochastic samplers draw their step noises from the same generator.
"""
from __future__ import annotations

import torch

from . import samplers as _samplers
from .pipeline import GuidedDenoiser, as_prompts, decode_latents, encode_prompts, negative_conditioning
from .schedules import Schedule

__all__ = ["generate", "initial_latents"]


def initial_latents(pipe, batch: int, size, generator: torch.Generator | None = None) -> torch.Tensor:
    """z_T ~ N(0, I), [batch, C, H/8, W/8], drawn on the generator's device, float32."""
    c = pipe.unet.config.in_channels
    device = generator.device if generator is not None else "cpu"
    return torch.randn((batch, c, size[0] // 8, size[1] // 8), generator=generator, device=device)


@torch.no_grad()
def generate(pipe, prompts, *, num_steps: int = 25, guidance_scale: float = 4.0, sampler: str = "ddim",
             negative_prompts=None, size=None, latents: torch.Tensor | None = None,
             generator: torch.Generator | None = None, return_latents: bool = False):
    """Images [B, 3, H, W] in [-1, 1] for `prompts` (with return_latents: also z0). `size`
    (H, W) in pixels defaults to the UNet's (SD3: the transformer's) sample size × 8."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    from .flow import generate_flow, is_flow_pipeline
    if is_flow_pipeline(pipe):             # SD3 / FLUX.1: the flow Euler chain (the sampler argument does not apply)
        sample = getattr(pipe.transformer.config, "sample_size", None)
        if size is None and latents is None and sample:          # SD3: diffusers' default, sample_size × 8
            size = (sample * 8, sample * 8)
        x = generate_flow(pipe, prompts, num_steps=num_steps, guidance_scale=guidance_scale,
                          negative_prompts=negative_prompts, size=size, latents=latents, generator=generator)
        images = decode_latents(pipe, x)
        return (images, x) if return_latents else images
    if size is None:
        s = pipe.unet.config.sample_size * 8
        size = (s, s)
    schedule = Schedule.from_config(pipe.scheduler_config)
    smp = _samplers.get(sampler)
    cond = encode_prompts(pipe, prompts, size=size)
    uncond = None
    if guidance_scale > 1:
        neg = None if negative_prompts is None else as_prompts(negative_prompts, len(prompts), "negative prompt")
        uncond = negative_conditioning(pipe, neg, cond, size=size)
    den = GuidedDenoiser(pipe.unet, schedule, smp, cond, uncond, guidance_scale)
    device = pipe.unet.device
    x = initial_latents(pipe, len(prompts), size, generator) if latents is None else latents
    x = x.to(device=device, dtype=torch.float32)
    chain = schedule.chain(num_steps, smp.NAME)
    if smp.NAME == "euler_ancestral":
        x = x * float(schedule.sigma(chain[0][0]))          # σ-space: x = x0 + σ·ε
    for t, t_next in chain:
        noise = None
        if smp.is_stochastic(t_next):
            noise = torch.randn(x.shape, generator=generator, device=x.device if generator is None
                                else generator.device).to(x.device)
        x = smp.step(x, den(x, t), t, t_next, schedule, noise=noise)
    images = decode_latents(pipe, x)
    return (images, x) if return_latents else images
