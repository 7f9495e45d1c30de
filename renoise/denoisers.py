"""Denoisers over the UNet pipelines: conditioning, prompt encoding, and the guided denoiser.

    cond = encode_prompts(pipe, ["a cat"], size=(512, 512))          # Conditioning, batch first
    den = GuidedDenoiser(pipe.unet, schedule, "ddim", cond, uncond, guidance_scale=7.5)
    out = den(x, t)                                                  # what renoise.invert / sample call

    denoiser(x, t) = ε_u + g·(ε_c − ε_u)  with  ε = UNet(model_input(x, t), t, conditioning)

The layer between the models and the pipeline (docs/layers.md): it sees a loaded pipeline's parts
and the samplers, never the inversion loop or the Editor. `renoise.pipeline` re-exports these
names (their documented home; warn_if_truncated lives in models.tokenizer); `renoise.editing`,
`renoise.flow` and `renoise.speed` import them from here. The details of prompts, guidance and LCM's guidance embedding: renoise.pipeline's docstring.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import samplers as _samplers
from .compiling import nested_region
from .models.tokenizer import warn_if_truncated
from .schedules import Schedule

__all__ = ["Conditioning", "GuidedDenoiser", "guided_denoiser", "guidance_embedding", "encode_prompts",
           "negative_conditioning", "make_time_ids", "as_prompts", "warn_if_truncated"]


# ---------------------------------------------------------------------------------------------
# conditioning

@dataclass
class Conditioning:
    """What the UNet is conditioned on, batch first: context [B, L, D]; SDXL also text_embeds
    [B, P] and time_ids [B, 6]."""
    context: torch.Tensor
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.context.shape[0]

    def tile(self, k: int) -> "Conditioning":
        """The batch repeated k times, [c; c; ...], matching a k-fold stacked sample batch."""
        if k == 1:
            return self
        return Conditioning(*(None if v is None else v.repeat(k, *([1] * (v.ndim - 1))) for v in self._fields()))

    @staticmethod
    def cat(parts) -> "Conditioning":
        parts = list(parts)
        columns = zip(*(p._fields() for p in parts))
        return Conditioning(*(None if col[0] is None else torch.cat(col) for col in columns))

    def _fields(self):
        return (self.context, self.text_embeds, self.time_ids)


def as_prompts(prompts, batch: int, what: str = "prompt") -> list[str]:
    """One prompt for every image: a string or a 1-list is broadcast, otherwise one per image."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what}s must be strings, got {[type(p).__name__ for p in prompts]}")
    if len(prompts) == 1:
        return prompts * batch
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} {what}s for {batch} images; give one {what} for all images "
                         f"or exactly one per image")
    return prompts


def make_time_ids(size, batch: int, *, original_size=None, crop_top_left=(0, 0), target_size=None,
                  device="cpu", dtype=torch.float32) -> torch.Tensor:
    """SDXL micro-conditioning [B, 6] = [orig_h, orig_w, crop_top, crop_left, target_h, target_w];
    original and target sizes default to the image size (H, W) in pixels."""
    original_size = tuple(original_size or size)
    target_size = tuple(target_size or size)
    ids = torch.tensor([*original_size, *crop_top_left, *target_size], dtype=dtype, device=device)
    if ids.numel() != 6:
        raise ValueError("time ids need (h, w) sizes and a (top, left) crop")
    return ids.expand(batch, 6).clone()


def _ids(tokenizer, prompts, device):
    for p in prompts:
        warn_if_truncated(tokenizer, p)
    ids = tokenizer(list(prompts))
    return torch.as_tensor(ids, dtype=torch.long).to(device)


@torch.no_grad()
def encode_prompts(pipe, prompts, *, size=None, clip_skip=None, original_size=None, crop_top_left=(0, 0),
                   target_size=None) -> Conditioning:
    """Encode a list of prompts for `pipe` (a renoise.models Pipeline). SDXL needs the image
    `size` (H, W) in pixels for its time ids."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    te = pipe.text_encoder
    device = te.device
    if pipe.kind == "sd":
        context = te(_ids(pipe.tokenizer, prompts, device), clip_skip=clip_skip).last_hidden_state
        return Conditioning(context)
    if pipe.kind != "sdxl":
        raise ValueError(f"unknown pipeline kind {pipe.kind!r}; expected 'sd' or 'sdxl'")
    if size is None:
        raise ValueError("SDXL conditions on the image size: pass size=(height, width) in pixels")
    index = -(2 + (clip_skip or 0))                  # the penultimate layer, `clip_skip` more back
    hidden, out2 = [], None
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        out = enc(_ids(tok, prompts, enc.device))
        hidden.append(out.hidden_states[index].to(device))
        out2 = out
    if out2.text_embeds is None:
        raise ValueError("SDXL's text_encoder_2 must have a text projection (CLIPTextModelWithProjection)")
    context = torch.cat(hidden, dim=-1)
    time_ids = make_time_ids(size, len(prompts), original_size=original_size, crop_top_left=crop_top_left,
                             target_size=target_size, device=device, dtype=context.dtype)
    return Conditioning(context, out2.text_embeds.to(device), time_ids)


def negative_conditioning(pipe, negative_prompts, like: Conditioning, **encode_kwargs) -> Conditioning:
    """The unconditional branch for CFG. None: zeros for SDXL with force_zeros_for_empty_prompt
    (time ids kept), otherwise the encoding of "" per image."""
    if negative_prompts is None:
        if pipe.kind == "sdxl" and pipe.force_zeros_for_empty_prompt:
            return Conditioning(torch.zeros_like(like.context), torch.zeros_like(like.text_embeds), like.time_ids)
        negative_prompts = [""] * like.batch
    return encode_prompts(pipe, as_prompts(negative_prompts, like.batch, "negative prompt"), **encode_kwargs)


# ---------------------------------------------------------------------------------------------
# the guided denoiser

def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's guidance condition [B, dim]: the sinusoid [sin, cos] of 1000·w at frequencies
    10000^(-k/(dim/2 - 1)), zero-padded to an odd dim (w = guidance scale - 1)."""
    # Same sinusoid as models.blocks.timestep_embedding(1000·w, freq_shift=1), but in diffusers' own
    # float32 operation order: angles reach ~1e4, where a different rounding of freqs shows at 1e-5.
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device)
                      * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = (1000.0 * w.float())[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


@nested_region
def _unet_call(unet, x, t, context, text_embeds, time_ids, timestep_cond):
    """One UNet call: a nested compile region (renoise.compiling.nested_region) inside compiled steps."""
    return unet(x, t, context, text_embeds=text_embeds, time_ids=time_ids, timestep_cond=timestep_cond)


class GuidedDenoiser:
    """denoiser(x, t) for renoise.invert / renoise.sample: sampler input scaling, conditioning
    tiled to the batch, classifier-free guidance in one UNet call. Counts its calls."""

    def __init__(self, unet, schedule, sampler, cond: Conditioning, uncond: Conditioning | None = None,
                 guidance_scale: float = 1.0):
        self.unet, self.schedule = unet, schedule
        self.sampler = _samplers.get(sampler) if isinstance(sampler, str) else sampler
        self.scales = None             # per-sample guidance (a 1-D tensor given): ε = ε_c where g ≤ 1
        if isinstance(guidance_scale, torch.Tensor) and guidance_scale.numel() > 1:
            if guidance_scale.shape != (cond.batch,):
                raise ValueError(f"per-sample guidance must be [{cond.batch}], got {tuple(guidance_scale.shape)}")
            self.scales = guidance_scale.float().to(cond.context.device)
            guidance_scale = self.scales.max()
        self.cond, self.uncond, self.guidance_scale = cond, uncond, float(guidance_scale)
        embed_dim = getattr(getattr(unet, "config", None), "time_cond_proj_dim", None)
        self.cfg = self.guidance_scale > 1.0 and embed_dim is None
        self.w_embedding = None
        if embed_dim is not None:
            w = torch.full((cond.batch,), self.guidance_scale - 1.0, device=cond.context.device)
            if self.scales is not None:
                w = self.scales - 1.0
            self.w_embedding = guidance_embedding(w, embed_dim)
        if self.cfg and uncond is None:
            raise ValueError(f"guidance scale {guidance_scale} > 1 needs an unconditional (negative) conditioning")
        if self.cfg and uncond.batch != cond.batch:
            raise ValueError(f"negative conditioning batch {uncond.batch} != conditioning batch {cond.batch}")
        self.calls = 0
        self.evals = 0            # UNet evaluations at the image batch: a CFG call 2, a k-fold batch k
        self.dtype = next(unet.parameters()).dtype

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        k, rest = divmod(x.shape[0], self.cond.batch)
        if rest or k == 0:
            raise ValueError(f"denoiser got a batch of {x.shape[0]}, not a whole multiple of the "
                             f"{self.cond.batch} conditioned images")
        xin = self.sampler.model_input(x, t, self.schedule).to(self.dtype)
        cond = self.cond.tile(k)
        if self.cfg:
            cond = Conditioning.cat([self.uncond.tile(k), cond])
            xin = torch.cat([xin, xin])
        w_emb = None if self.w_embedding is None else self.w_embedding.repeat(k, 1).to(self.dtype)
        out = _unet_call(self.unet, xin, t, cond.context, cond.text_embeds, cond.time_ids, w_emb).to(x.dtype)
        if not torch.compiler.is_compiling():    # read in a compiled region, the count would be a guard that
            self.calls += 1                      # fails at every call: the region's caller counts (count_calls)
            self.evals += k * (2 if self.cfg else 1)
        if self.cfg:
            uncond_out, cond_out = out.chunk(2)
            if self.scales is None:
                out = uncond_out + self.guidance_scale * (cond_out - uncond_out)
            else:
                g = self.scales.repeat(k).view(-1, 1, 1, 1).to(out.dtype)
                out = torch.where(g > 1, uncond_out + g * (cond_out - uncond_out), cond_out)
        return out

    def count_calls(self, n: int) -> None:
        """Add n calls made inside a compiled region (renoise.speed), where __call__ does not count."""
        self.calls += n
        self.evals += n * (2 if self.cfg else 1)      # (a region's doubled batches are not seen here)


def guided_denoiser(unet, schedule, sampler, cond, uncond=None, guidance_scale=1.0) -> GuidedDenoiser:
    return GuidedDenoiser(unet, schedule, sampler, cond, uncond, guidance_scale)


# ---------------------------------------------------------------------------------------------
# model families: what the Editor asks of a pipeline (renoise.pipeline.FAMILIES picks one)

def initial_latents(pipe, batch: int, size, generator: torch.Generator | None = None) -> torch.Tensor:
    """z_T ~ N(0, I), [batch, C, H/8, W/8], drawn on the generator's device, float32."""
    c = pipe.unet.config.in_channels
    device = generator.device if generator is not None else "cpu"
    return torch.randn((batch, c, size[0] // 8, size[1] // 8), generator=generator, device=device)


def generate_unet(pipe, prompts, *, num_steps, guidance_scale, sampler, negative_prompts=None, size=None,
                  latents=None, generator=None) -> torch.Tensor:
    """z0 [B, C, H/8, W/8] from z_T = `latents` (or N(0, I) from `generator`) by `sampler`'s chain with
    classifier-free guidance ε = ε_u + g·(ε_c − ε_u) (negative prompt "" or the model's zeros); stochastic
    samplers draw their step noises from the same generator. `size` (H, W) in pixels."""
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
    x = initial_latents(pipe, len(prompts), size, generator) if latents is None else latents
    x = x.to(device=pipe.unet.device, dtype=torch.float32)
    chain = schedule.chain(num_steps, smp.NAME)
    if smp.NAME == "euler_ancestral":
        x = x * float(schedule.sigma(chain[0][0]))          # σ-space: x = x0 + σ·ε
    for t, t_next in chain:
        noise = None
        if smp.is_stochastic(t_next):
            noise = torch.randn(x.shape, generator=generator, device=x.device if generator is None
                                else generator.device).to(x.device)
        x = smp.step(x, den(x, t), t, t_next, schedule, noise=noise)
    return x


class UNetFamily:
    """SD 1.x / 2.x, SDXL, LCM: ε-, v- or x0-prediction UNets. Any sampler; the schedule comes
    from the scheduler config (one for every image size); attention control works."""

    name = "unet"
    description = "UNet model"
    sampler = None                      # the plan's
    size_multiple = 8
    attention_control = True

    @staticmethod
    def handles(pipe) -> bool:
        return getattr(pipe, "unet", None) is not None

    def __init__(self, pipe):
        self.pipe = pipe
        self.default_schedule = Schedule.from_config(pipe.scheduler_config)

    @property
    def network(self):
        return self.pipe.unet

    def schedule(self, latent_hw):
        return self.default_schedule

    def denoiser(self, cond, uncond, guidance_scale, schedule, sampler, *, prompts, size, negative_prompts):
        return GuidedDenoiser(self.pipe.unet, schedule, sampler, cond, uncond, guidance_scale)

    def generate(self, prompts, **kw):
        """z0 from noise (renoise.generate): generate_unet."""
        return generate_unet(self.pipe, prompts, **kw)

    needs_encoding = True               # the Editor encodes the prompts (Editor.encode) for denoiser()
