"""Images in, images out: ReNoise inversion, reconstruction and text-driven editing of real images.

    pipe = renoise.models.load_pipeline("stabilityai/sdxl-turbo", dtype=torch.float16, device="cuda")
    editor = Editor(pipe, preset="sdxl-turbo")
    gen = torch.Generator("cuda").manual_seed(7865)
    inv = editor.invert(images, "a cat", generator=gen)     # images: [B, 3, H, W] in [-1, 1]
    recon = editor.reconstruct(inv)                         # same shape, [-1, 1]
    tiger = editor.edit(inv, "a tiger")                     # z_T + stored noises, new prompt

The flow: image --VAE--> z0 --renoise.invert(denoiser)--> z_T (+ noises) --renoise.sample--> z0'
--VAE--> image'. Everything model-specific lives in the denoiser closure built here:

    denoiser(x, t) = ε_u + g·(ε_c − ε_u)  with  ε = UNet(model_input(x, t), t, conditioning)

one UNet call per denoiser call (the batch doubled, [uncond; cond], when g > 1, as diffusers
does; g ≤ 1 is the conditional output alone). A UNet distilled with guidance built in (a full
LCM checkpoint, `time_cond_proj_dim` set) gets g as an embedding instead, with no CFG batch, as
diffusers' LCM pipeline does. The inversion may stack extra batch elements
(the regularizer's reference noise) onto a call: the conditioning is tiled to any whole multiple
of the image batch.

Prompts: SD 1.x/2.x condition on the text encoder's `last_hidden_state` (with `clip_skip`);
SDXL on the concatenated penultimate hidden states of both encoders, the pooled projection
(`text_embeds`) of encoder 2 and `time_ids = [orig_h, orig_w, crop_top, crop_left, target_h,
target_w]`. An SDXL negative prompt left as None is all zeros when the model asks for it
(`force_zeros_for_empty_prompt`), as in diffusers; SD's is the encoding of "". `clip_skip` applies
to negative prompts too (diffusers 0.42 ignores it for SDXL negatives).

Editing (the paper's protocol): denoise from the source image's z_T with its stored noises, the
edit prompt as the condition, the source prompt as the negative, guidance `edit_guidance_scale`
(default 1.0, i.e. the edit prompt alone).

Refused with a reason rather than silently wrong: denoising with a different number of steps
than the inversion used (z_T lives at the inverted chain's top timestep and the stored noises
belong to the steps of that chain; invert again with the other count).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import presets
from .compiling import check_mode
from .denoisers import (UNetFamily, Conditioning, GuidedDenoiser, as_prompts, encode_prompts, guidance_embedding,  # noqa: F401
                        guided_denoiser, make_time_ids, negative_conditioning)
from . import editing
from .editing import EditControl, run_pair
from .flow import FlowFamily
from .images import FACTOR
from .inversion import InversionResult, NonFiniteLatentError, invert, sample

__all__ = ["Editor", "Inversion", "Conditioning", "GuidedDenoiser", "guided_denoiser", "guidance_embedding",
           "encode_images", "decode_latents", "encode_prompts", "negative_conditioning", "make_time_ids", "as_prompts"]


# ---------------------------------------------------------------------------------------------
# the VAE

@torch.no_grad()
def encode_images(pipe, images: torch.Tensor, generator: torch.Generator | None = None,
                  sample: bool = True) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/8, W/8] (float32): the posterior's
    sample under `generator` (the reference's choice), or its mean with sample=False."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {list(images.shape)}")
    h, w = images.shape[-2:]
    if h % FACTOR or w % FACTOR:
        raise ValueError(f"image size {h}x{w} is not a multiple of {FACTOR}; fit it with renoise.images.fit")
    vae = pipe.vae
    param = next(vae.parameters())
    z = vae.encode_latents(images.to(device=param.device, dtype=param.dtype), generator=generator, sample=sample)
    return z.float()


@torch.no_grad()
def decode_latents(pipe, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images [B, 3, 8h, 8w] in [-1, 1] (float32)."""
    param = next(pipe.vae.parameters())
    images = pipe.vae.decode_latents(z.to(device=param.device, dtype=param.dtype)).float()
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(images).all()):
        where = "the latents were already" if not bool(torch.isfinite(z).all()) else "the VAE decoder made them"
        raise NonFiniteLatentError(f"decoding gave NaN or inf pixels ({where} non-finite); check the model's dtype "
                                   "(fp16 overflow; try --dtype float32) and the guidance scale")
    return images.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# inversion, reconstruction, editing

@dataclass
class Inversion:
    """An inverted batch: the solver's InversionResult plus what denoising it again needs."""
    result: object                       # renoise.inversion.InversionResult
    prompts: list
    size: tuple                          # (H, W) of the images, pixels
    guidance_scale: float = 1.0
    negative_prompts: list | None = None
    clip_skip: int | None = None
    extra: dict = field(default_factory=dict)      # free-form, saved along (the CLI keeps file names)

    META = ("prompts", "size", "guidance_scale", "negative_prompts", "clip_skip", "extra")

    @property
    def z0(self) -> torch.Tensor:
        """The encoded images the inversion started from."""
        return self.result.trajectory[0]

    @property
    def num_steps(self) -> int:
        return self.result.num_steps

    @property
    def batch(self) -> int:
        return self.result.z_T.shape[0]

    def check_num_steps(self, num_steps) -> None:
        """Denoising must run the inverted chain: refuse another step count with the fix."""
        if num_steps is not None and int(num_steps) != self.num_steps:
            raise ValueError(
                f"cannot denoise with {num_steps} steps an inversion made with {self.num_steps}: its z_T sits at "
                f"the top timestep of the {self.num_steps}-step chain and its stored noises belong to those steps; "
                f"invert again with {num_steps} steps")

    def save(self, path) -> None:
        """One safetensors file (InversionResult.save) with prompts, size and guidance in its metadata."""
        meta = {k: getattr(self, k) for k in self.META}
        meta["size"] = list(self.size)
        dataclasses.replace(self.result, extra={"pipeline": meta}).save(path)

    @classmethod
    def load(cls, path, device="cpu") -> "Inversion":
        path = Path(path)
        result = InversionResult.load(path, device=device)       # checked; its errors name the file
        meta = result.extra.get("pipeline")
        if not isinstance(meta, dict) or set(meta) != set(cls.META) or not _valid_meta(meta, result.z_T.shape[0]):
            raise ValueError(f"{path} holds an inversion but not the pipeline settings (prompts, image size, "
                             "guidance) that renoise.pipeline saves with it; invert the images again")
        meta["size"] = tuple(meta["size"])
        return cls(result=result, **meta)


def _valid_meta(meta, batch) -> bool:
    """The pipeline settings saved with an inversion have the types and lengths they need."""
    texts = lambda v: isinstance(v, list) and len(v) == batch and all(isinstance(p, str) for p in v)  # noqa: E731
    size = meta["size"]
    return (texts(meta["prompts"]) and (meta["negative_prompts"] is None or texts(meta["negative_prompts"]))
            and isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
            and isinstance(meta["guidance_scale"], (int, float)) and math.isfinite(meta["guidance_scale"])
            and isinstance(meta["extra"], dict))


FAMILIES = (FlowFamily, UNetFamily)          # the one place that knows the model families; first match wins


def family_of(pipe):
    """The model family of a loaded pipeline (renoise.denoisers.UNetFamily, renoise.flow.FlowFamily):
    its sampler, schedule, denoiser, image-size multiple and whether attention control applies."""
    for family in FAMILIES:
        if family.handles(pipe):
            return family(pipe)
    raise ValueError(f"{type(pipe).__name__} is no pipeline renoise knows: load it with renoise.models.load_pipeline")


class Editor:
    """Invert, reconstruct and edit real images with a loaded pipeline and a ReNoise plan.

    preset: a renoise.presets name or Plan; sampler, num_steps, guidance_scale (the inversion's
    CFG scale; ≤ 1: none) and any other plan field (`plan_overrides`) replace the preset's.
    strength < 1 inverts only the last part of the chain and denoises from there. compile: None
    (eager) or a renoise.speed mode ("compile", "max-autotune", "cuda-graphs"): every inversion
    step and every denoising step runs as one compiled region (compiled on first use, then reused).
    """

    def __init__(self, pipe, preset="sdxl-turbo", *, sampler=None, num_steps=None, guidance_scale=None,
                 strength=1.0, clip_skip=None, sampler_opts=None, plan_overrides=None, compile=None):
        overrides = dict(plan_overrides or {})
        for key, value in (("sampler", sampler), ("num_steps", num_steps), ("guidance_scale", guidance_scale)):
            if value is not None:
                overrides[key] = value
        self.family = family_of(pipe)
        fixed = self.family.sampler
        if fixed is not None:
            if overrides.get("sampler", fixed) != fixed:
                raise ValueError(f"{pipe.kind} is a {self.family.description}: it runs with the {fixed!r} sampler, "
                                 f"not {overrides['sampler']!r}")
            overrides["sampler"] = fixed
        self.pipe = pipe
        self.plan = presets.resolve(preset, **overrides)
        self.strength = float(strength)
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        self.clip_skip = clip_skip
        self.sampler_opts = dict(sampler_opts or {})
        self.schedule = self.family.default_schedule          # None where it depends on the image size
        if compile is not None:
            check_mode(compile, next(self.family.network.parameters()).device)
        self.compile = compile

    # -- pieces --------------------------------------------------------------------------------
    def encode(self, prompts, size, negative_prompts=None, guidance_scale=1.0, clip_skip=None):
        kwargs = dict(size=size, clip_skip=clip_skip)
        cond = encode_prompts(self.pipe, prompts, **kwargs)
        uncond = negative_conditioning(self.pipe, negative_prompts, cond, **kwargs) if guidance_scale > 1 else None
        return cond, uncond

    def denoiser(self, prompts, size, *, negative_prompts=None, guidance_scale=1.0, clip_skip=None,
                 schedule=None, sampler=None) -> GuidedDenoiser:
        cond = uncond = None
        if self.family.needs_encoding:
            cond, uncond = self.encode(prompts, size, negative_prompts, guidance_scale, clip_skip)
        return self.family.denoiser(cond, uncond, guidance_scale, schedule or self.schedule,
                                    sampler or self.plan.sampler, prompts=prompts, size=size,
                                    negative_prompts=negative_prompts)

    # -- the three jobs ------------------------------------------------------------------------
    def invert(self, images: torch.Tensor, prompts, *, negative_prompts=None, generator=None,
               sample_posterior=True, noises=None, callback=None) -> Inversion:
        """images [B, 3, H, W] in [-1, 1]; one prompt or one per image. The generator draws the
        VAE posterior sample first, then the inversion's noises."""
        batch, size = images.shape[0], tuple(images.shape[-2:])
        prompts = as_prompts(prompts, batch)
        if negative_prompts is not None:
            negative_prompts = as_prompts(negative_prompts, batch, "negative prompt")
        m = self.family.size_multiple
        if size[0] % m or size[1] % m:
            raise ValueError(f"image size {size[0]}x{size[1]}: {self.family.description}s need multiples of {m}; "
                             "fit it with renoise.images.fit")
        z0 = encode_images(self.pipe, images, generator, sample=sample_posterior)
        g = self.plan.guidance_scale
        den = self.denoiser(prompts, size, negative_prompts=negative_prompts, guidance_scale=g,
                            clip_skip=self.clip_skip)
        schedule = self.family.schedule(tuple(z0.shape[-2:]))
        result = invert(den, z0, schedule, self.plan.sampler, self.plan.num_steps, self.plan, noises=noises,
                        generator=generator, strength=self.strength, sampler_opts=self.sampler_opts,
                        callback=callback, compile=self.compile)
        return Inversion(result=result, prompts=prompts, size=size, guidance_scale=g,
                         negative_prompts=negative_prompts, clip_skip=self.clip_skip,
                         extra={"unet_evals": den.evals})

    def sample(self, inv: Inversion, prompts=None, *, negative_prompts=None, guidance_scale=None,
               num_steps=None, callback=None) -> tuple[torch.Tensor, GuidedDenoiser]:
        """Denoise inv's z_T along its own chain with its stored noises; the prompts default to
        the source prompts and the guidance to the inversion's. Returns z0' and the denoiser."""
        inv.check_num_steps(num_steps)
        prompts = inv.prompts if prompts is None else as_prompts(prompts, inv.batch)
        if negative_prompts is not None:
            negative_prompts = as_prompts(negative_prompts, inv.batch, "negative prompt")
        g = inv.guidance_scale if guidance_scale is None else float(guidance_scale)
        den = self.denoiser(prompts, inv.size, negative_prompts=negative_prompts, guidance_scale=g,
                            clip_skip=inv.clip_skip, schedule=inv.result.schedule, sampler=inv.result.sampler)
        return sample(den, inv.result, callback=callback, compile=self.compile), den

    def reconstruct(self, inv: Inversion, *, num_steps=None, callback=None) -> torch.Tensor:
        """Denoise with the source prompts and the inversion's own guidance: images [B, 3, H, W]."""
        z, _ = self.reconstruct_latents(inv, num_steps=num_steps, callback=callback)
        return decode_latents(self.pipe, z)

    def reconstruct_latents(self, inv: Inversion, *, num_steps=None, callback=None):
        """`reconstruct` before decoding: (z0', the denoiser used)."""
        return self.sample(inv, negative_prompts=inv.negative_prompts, num_steps=num_steps, callback=callback)

    def edit(self, inv: Inversion, edit_prompts, *, edit_guidance_scale=1.0, num_steps=None,
             callback=None, control=None, paste_back=None, feather=0) -> torch.Tensor:
        """The paper's edit: edit prompt as condition, source prompt as negative, guidance
        `edit_guidance_scale` (1.0: the edit prompt alone). `control` (renoise.editing.EditControl):
        the editing mode (swap, p2p), self-attention injection, re-weighting, local blending, a
        user mask; then the edit is denoised beside the source branch (`edit_pair`).
        paste_back: the input images [B, 3, H, W] in [-1, 1]; outside the edit's mask (the control's
        user mask, else its blend mask) the result is these pixels exactly, with `feather` px of soft
        edge (renoise.editing.paste_back). It needs a control with a mask or local blending."""
        if paste_back is not None and (control is None or (control.mask is None and control.local_blend is None)):
            raise ValueError("paste_back keeps the input outside the edit's mask, and this edit has none: give "
                             "control=EditControl(mask=...) or EditControl(local_blend=...)")
        z, out = self.edit_latents(inv, edit_prompts, edit_guidance_scale=edit_guidance_scale, num_steps=num_steps,
                                   callback=callback, control=control)
        images = decode_latents(self.pipe, z)
        if paste_back is None:
            return images
        return editing.paste_back(images, paste_back.to(images), editing.edit_mask(control, out), feather)

    def edit_latents(self, inv: Inversion, edit_prompts, *, edit_guidance_scale=1.0, num_steps=None,
                     callback=None, control=None):
        """`edit` before decoding: (z0', the denoiser used; with a control, the EditResult)."""
        if control is not None and not control.plain:
            if not self.family.attention_control:
                raise ValueError("editing modes (p2p, self-attention injection, re-weighting, local blend, masks) "
                                 "work on UNet cross-attention; flow models (SD3 / FLUX.1) take plain edits only")
            out = self.edit_pair(inv, edit_prompts, control, edit_guidance_scale=edit_guidance_scale,
                                 num_steps=num_steps, callback=callback)
            return out.edit, out
        return self.sample(inv, edit_prompts, negative_prompts=inv.prompts, guidance_scale=edit_guidance_scale,
                           num_steps=num_steps, callback=callback)

    def edit_pair(self, inv: Inversion, edit_prompts, control=None, *, edit_guidance_scale=1.0, num_steps=None,
                  callback=None):
        """Source and edit branches as one batch from inv's z_T and noises, the edit steered by
        `control` (renoise.editing.EditControl; default: mode swap). Returns an EditResult
        (source and edit latents, blend mask, averaged cross-attention maps, calls)."""
        inv.check_num_steps(num_steps)
        return run_pair(self, inv, edit_prompts, control or EditControl(), edit_guidance_scale=edit_guidance_scale,
                        callback=callback)
