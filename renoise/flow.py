"""The denoiser and text-to-image loop of flow-matching pipelines (SD3 / SD 3.5, FLUX.1).

    den = FlowDenoiser(pipe, schedule, cond, uncond, guidance_scale)     # v = den(x, t), x [B, C, h, w]
    z0 = generate_flow(pipe, prompts, num_steps=28, guidance_scale=7.0, latents=z)

The model predicts the velocity v = ε − x0 at σ = t / 1000; the sampler is "flow_euler"
(x ← x + (σ' − σ)·v). Guidance:
  SD3:          true CFG v = v_u + g·(v_c − v_u), batch [negative; positive] (g > 1)
  FLUX.1-dev:   the guidance scale is an input of the model (guidance embedding); one pass
  FLUX.1-schnell: no guidance
FLUX latents are packed 2×2 for the model and unpacked after, so the sampling loop and ReNoise see
[B, C, h, w] for every family.
"""
from __future__ import annotations

import torch

from . import samplers as _samplers
from .denoisers import Conditioning, as_prompts

__all__ = ["FlowDenoiser", "encode_flow", "generate_flow", "is_flow_pipeline"]


def is_flow_pipeline(pipe) -> bool:
    return getattr(pipe, "kind", None) in ("sd3", "flux")


def encode_flow(pipe, prompts, *, max_sequence_length=None) -> Conditioning:
    """Conditioning(context, text_embeds=pooled) of a flow pipeline."""
    from .models.flow_pipeline import encode_flow_prompts
    context, pooled = encode_flow_prompts(pipe, prompts, max_sequence_length=max_sequence_length)
    return Conditioning(context, pooled)


class FlowDenoiser:
    """denoiser(x, t) -> velocity for renoise.invert / renoise.sample with the flow_euler sampler.
    x [k·B, C, h, w] (k-fold stacked batches), t a timestep of `schedule` (σ·1000). Counts its calls."""

    def __init__(self, pipe, schedule, cond: Conditioning, uncond: Conditioning | None = None,
                 guidance_scale: float = 1.0):
        self.pipe, self.transformer, self.schedule = pipe, pipe.transformer, schedule
        self.sampler = _samplers.get("flow_euler")
        self.cond, self.uncond, self.guidance_scale = cond, uncond, float(guidance_scale)
        self.distilled = pipe.guidance_embeds
        self.cfg = pipe.kind == "sd3" and self.guidance_scale > 1.0
        if self.cfg and uncond is None:
            raise ValueError(f"guidance scale {guidance_scale} > 1 needs a negative conditioning (SD3's true CFG)")
        if self.cfg and uncond.batch != cond.batch:
            raise ValueError(f"negative conditioning batch {uncond.batch} != conditioning batch {cond.batch}")
        if pipe.kind == "flux" and uncond is not None:
            raise ValueError("FLUX.1 pipelines take no negative prompt (dev: the guidance scale is a model input; "
                             "schnell: no guidance)")
        self.calls = self.evals = 0
        self.dtype = pipe.transformer.dtype

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        k, rest = divmod(x.shape[0], self.cond.batch)
        if rest or k == 0:
            raise ValueError(f"denoiser got a batch of {x.shape[0]}, not a whole multiple of the "
                             f"{self.cond.batch} conditioned images")
        xin = x.to(self.dtype)
        cond = self.cond.tile(k)
        if self.cfg:
            cond = Conditioning.cat([self.uncond.tile(k), cond])
            xin = torch.cat([xin, xin])
        tt = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if self.pipe.kind == "flux":
            from .models.flux import latent_image_ids, pack_latents, text_ids, unpack_latents
            h, w = x.shape[-2:]
            guidance = self.guidance_scale if self.distilled else None
            out = self.transformer(pack_latents(xin), tt / 1000, cond.context, cond.text_embeds,
                                   latent_image_ids(h, w, device=x.device, dtype=self.dtype),
                                   text_ids(cond.context.shape[1], device=x.device, dtype=self.dtype), guidance=guidance)
            out = unpack_latents(out, h, w)
        else:
            out = self.transformer(xin, tt, cond.context, cond.text_embeds)
        out = out.to(x.dtype)
        if not torch.compiler.is_compiling():    # inside a compiled region its caller counts (count_calls)
            self.calls += 1
            self.evals += k * (2 if self.cfg else 1)
        if self.cfg:
            uncond_out, cond_out = out.chunk(2)
            out = uncond_out + self.guidance_scale * (cond_out - uncond_out)
        return out

    def count_calls(self, n: int) -> None:
        """Add n calls made inside a compiled region (renoise.speed), where __call__ does not count."""
        self.calls += n
        self.evals += n * (2 if self.cfg else 1)


def flow_denoiser(pipe, prompts, latent_hw, *, guidance_scale=1.0, negative_prompts=None, max_sequence_length=None):
    """(FlowDenoiser, FlowSchedule) for `prompts` at a latent size (h, w)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    cond = encode_flow(pipe, prompts, max_sequence_length=max_sequence_length)
    uncond = None
    if pipe.kind == "sd3" and guidance_scale > 1:
        neg = as_prompts("" if negative_prompts is None else negative_prompts, len(prompts), "negative prompt")
        uncond = encode_flow(pipe, neg, max_sequence_length=max_sequence_length)
    elif pipe.kind == "flux" and negative_prompts is not None:
        raise ValueError("FLUX.1 pipelines take no negative prompt (dev: the guidance scale is a model input; "
                         "schnell: no guidance)")
    schedule = pipe.schedule(latent_hw)
    return FlowDenoiser(pipe, schedule, cond, uncond, guidance_scale), schedule


@torch.no_grad()
def generate_flow(pipe, prompts, *, num_steps: int = 28, guidance_scale: float = 7.0, negative_prompts=None,
                  size=None, latents: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  max_sequence_length: int | None = None) -> torch.Tensor:
    """z0 [B, C, H/8, W/8] (float32) from z_1 = `latents` (or N(0, I) drawn from `generator`) by the
    flow Euler chain; `size` (H, W) in pixels, multiples of 16."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if latents is None:
        if size is None:
            raise ValueError("pass size=(height, width) in pixels or latents=")
        if size[0] % 16 or size[1] % 16:
            raise ValueError(f"image size {size} must be multiples of 16 for flow transformers")
        device = generator.device if generator is not None else "cpu"
        latents = torch.randn((len(prompts), pipe.latent_channels, size[0] // 8, size[1] // 8),
                              generator=generator, device=device)
    x = latents.to(device=pipe.transformer.device, dtype=torch.float32)
    den, schedule = flow_denoiser(pipe, prompts, x.shape[-2:], guidance_scale=guidance_scale,
                                  negative_prompts=negative_prompts, max_sequence_length=max_sequence_length)
    smp = den.sampler
    for t, t_next in schedule.chain(num_steps, smp.NAME):
        x = smp.step(x, den(x, t), t, t_next, schedule)
    return x


class FlowFamily:
    """SD3 / SD 3.5 / FLUX.1: velocity models with the deterministic flow Euler step; the schedule
    depends on the image's size (dynamic shifting); sides multiples of 16 (2×2 patches of 8× latents);
    plain edits only (attention control works on UNet cross-attention). Noise correction and the
    regularizer need no check here: a Plan with the flow_euler sampler refuses them when it is made."""

    name = "flow"
    description = "flow-matching model"
    sampler = "flow_euler"
    size_multiple = 16
    attention_control = False
    needs_encoding = False              # flow_denoiser encodes with the pipeline's own encoders

    @staticmethod
    def handles(pipe) -> bool:
        return is_flow_pipeline(pipe)

    def __init__(self, pipe):
        self.pipe = pipe
        self.default_schedule = None    # per image size: schedule(latent_hw)

    @property
    def network(self):
        return self.pipe.transformer

    def schedule(self, latent_hw):
        return self.pipe.schedule(latent_hw)

    def generate(self, prompts, *, num_steps, guidance_scale, sampler=None, negative_prompts=None, size=None,
                 latents=None, generator=None):
        """z0 from noise (renoise.generate) by generate_flow; `sampler` does not apply (the flow Euler step).
        size defaults to SD3's sample_size × 8 (FLUX.1 has none: pass size or latents)."""
        sample = getattr(self.pipe.transformer.config, "sample_size", None)
        if size is None and latents is None and sample:
            size = (sample * 8, sample * 8)
        return generate_flow(self.pipe, prompts, num_steps=num_steps, guidance_scale=guidance_scale,
                             negative_prompts=negative_prompts, size=size, latents=latents, generator=generator)

    def denoiser(self, cond, uncond, guidance_scale, schedule, sampler, *, prompts, size, negative_prompts):
        if self.pipe.kind == "flux":
            negative_prompts = None      # FLUX.1 has no negative branch (dev: guidance is a model input)
        return flow_denoiser(self.pipe, prompts, (size[0] // 8, size[1] // 8), guidance_scale=guidance_scale,
                             negative_prompts=negative_prompts)[0]
