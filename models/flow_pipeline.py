"""Flow-matching pipelines (SD3 / SD 3.5 and FLUX.1): components, text encoding, schedule.

    pipe = load_pipeline("stabilityai/stable-diffusion-3-medium-diffusers", dtype=torch.float16)
    pipe.kind ("sd3" | "flux"), pipe.transformer, pipe.vae, pipe.text_encoder(_2, _3), pipe.tokenizer(_2, _3)
    context, pooled = encode_flow_prompts(pipe, ["a photo of a cat"])
    schedule = pipe.schedule(latent_size)          # a renoise.schedules.FlowSchedule, μ set for the image

Text conditioning (diffusers' StableDiffusion3Pipeline / FluxPipeline.encode_prompt):
  SD3:  CLIP-L and CLIP-G penultimate hidden states [B, 77, 768 + 1280] concatenated on channels,
        zero-padded to the T5 width; joined with T5's last hidden state [B, max_sequence_length, 4096]
        (zeros when text_encoder_3 is None) along the sequence → context [B, 77 + 256, 4096];
        pooled = [CLIP-L text_embeds; CLIP-G text_embeds] [B, 2048].
  FLUX: pooled = CLIP-L pooler output [B, 768]; context = T5 last hidden state [B, max_sequence_length,
        4096]; text ids are zeros.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["FlowPipeline", "FLOW_PIPELINES", "load_flow_pipeline", "encode_flow_prompts"]

# model_index.json _class_name -> family
FLOW_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}


@dataclass
class FlowPipeline:
    transformer: nn.Module                      # SD3Transformer | FluxTransformer
    vae: nn.Module                              # 16-channel AutoencoderKL (shift_factor)
    text_encoder: nn.Module                     # CLIP-L (SD3: with projection)
    tokenizer: object
    text_encoder_2: nn.Module | None = None     # SD3: CLIP-G (with projection); FLUX: T5
    tokenizer_2: object | None = None
    text_encoder_3: nn.Module | None = None     # SD3: T5 (optional)
    tokenizer_3: object | None = None
    scheduler_config: dict | None = None        # FlowMatchEulerDiscreteScheduler config
    kind: str = "sd3"                           # "sd3" | "flux"
    max_sequence_length: int | None = None      # T5 tokens; None: 256 (SD3, FLUX.1-schnell) / 512 (FLUX.1-dev)

    prediction_type = "flow"

    @property
    def t5(self):
        """(T5 encoder, its tokenizer) or (None, None)."""
        if self.kind == "flux":
            return self.text_encoder_2, self.tokenizer_2
        return self.text_encoder_3, self.tokenizer_3

    @property
    def sequence_length(self) -> int:
        """T5 tokens: max_sequence_length, else 256 for SD3 and FLUX.1-schnell (no guidance embedding; BFL's
        and diffusers' documented limit for schnell), 512 for FLUX.1-dev (FluxPipeline's default)."""
        if self.max_sequence_length:
            return int(self.max_sequence_length)
        if self.kind == "flux" and not self.guidance_embeds:
            return 256
        return DEFAULT_MAX_SEQUENCE_LENGTH[self.kind]

    @property
    def guidance_embeds(self) -> bool:
        """FLUX.1-dev type: the guidance scale is an input of the model (no true CFG)."""
        return self.kind == "flux" and bool(self.transformer.config.guidance_embeds)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def image_seq_len(self, latent_hw) -> int:
        """The transformer's image tokens for a latent of (h, w): (h/p)(w/p), p = 2 (FLUX packing / SD3 patches)."""
        p = 2 if self.kind == "flux" else self.transformer.config.patch_size
        return (latent_hw[0] // p) * (latent_hw[1] // p)

    def schedule(self, latent_hw):
        """The FlowSchedule of this pipeline for a latent of (h, w) (μ from its token count; FLUX's
        linspace(1, 1/n, n) sigmas)."""
        from renoise.schedules import FlowSchedule
        s = FlowSchedule.from_config(self.scheduler_config or {}, spacing="flux" if self.kind == "flux" else "default")
        return s.for_image(self.image_seq_len(latent_hw))

    def modules(self) -> dict[str, nn.Module]:
        names = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def load_t5_tokenizer(where, subfolder, **hub):
    """The T5 tokenizer, imported only when a pipeline has T5 (it needs the `renoise[t5]` extra)."""
    from .t5_tokenizer import load_t5_tokenizer as load
    return load(where, subfolder, **hub)


def load_flow_pipeline(where, index: dict, scheduler_config: dict, family: str, *, dtype, device, variant,
                       allow_pickle, **hub) -> FlowPipeline:
    """The components of an SD3 / FLUX diffusers folder or hub id (`where`), `index` its model_index.json."""
    from .clip import load_text_encoder
    from .loading import component_present, load_vae
    from .t5 import load_t5_encoder
    from .tokenizer import load_tokenizer
    from .transformer_loading import load_transformer

    if allow_pickle:
        raise ValueError("flow pipelines load safetensors only; allow_pickle does not apply")
    common = dict(dtype=dtype, device=device, variant=variant)
    transformer = load_transformer(where, family=family, **common, **hub)
    vae = load_vae(where, **common, **hub)
    te = load_text_encoder(where, **common, **hub)
    tok = load_tokenizer(where, "tokenizer", **hub)
    if family == "flux":
        for name in ("text_encoder_2", "tokenizer_2"):
            if not component_present(index, name):
                raise ValueError(f"{where}: a FLUX pipeline needs {name} (the T5 encoder and its tokenizer)")
        t5 = load_t5_encoder(where, subfolder="text_encoder_2", **common, **hub)
        return FlowPipeline(transformer, vae, te, tok, t5, load_t5_tokenizer(where, "tokenizer_2", **hub),
                            scheduler_config=scheduler_config, kind="flux")
    te2 = load_text_encoder(where, subfolder="text_encoder_2", **common, **hub)
    tok2 = load_tokenizer(where, "tokenizer_2", **hub)
    t5 = tok3 = None
    if component_present(index, "text_encoder_3"):
        t5 = load_t5_encoder(where, subfolder="text_encoder_3", **common, **hub)
        tok3 = load_t5_tokenizer(where, "tokenizer_3", **hub)
    return FlowPipeline(transformer, vae, te, tok, te2, tok2, t5, tok3, scheduler_config=scheduler_config, kind="sd3")


def _clip_ids(tokenizer, prompts, device):
    from .tokenizer import warn_if_truncated
    for p in prompts:
        warn_if_truncated(tokenizer, p)
    return torch.as_tensor(tokenizer(list(prompts)), dtype=torch.long).to(device)


@torch.no_grad()
def encode_flow_prompts(pipe: FlowPipeline, prompts, *, max_sequence_length: int | None = None, clip_skip=None):
    """(context [B, M, joint_attention_dim], pooled [B, pooled_projection_dim]) in the transformer's dtype."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = int(max_sequence_length or pipe.sequence_length)
    if pipe.kind == "flux" and n > 512:
        raise ValueError(f"max_sequence_length {n} > 512: FLUX.1's T5 conditioning takes at most 512 tokens")
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    joint = pipe.transformer.config.joint_attention_dim
    t5, t5_tok = pipe.t5
    if t5 is not None:
        ids = torch.as_tensor(t5_tok(prompts, max_length=n), dtype=torch.long).to(t5.device)
        t5_states = t5(ids).to(device=device, dtype=dtype)
    else:
        t5_states = torch.zeros(len(prompts), n, joint, device=device, dtype=dtype)
    if pipe.kind == "flux":
        pooled = pipe.text_encoder(_clip_ids(pipe.tokenizer, prompts, pipe.text_encoder.device)).pooled
        return t5_states, pooled.to(device=device, dtype=dtype)
    index = -(2 + (clip_skip or 0))
    hidden, pooled = [], []
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        out = enc(_clip_ids(tok, prompts, enc.device))
        if out.text_embeds is None:
            raise ValueError("SD3's CLIP encoders must have a text projection (CLIPTextModelWithProjection)")
        hidden.append(out.hidden_states[index].to(device=device, dtype=dtype))
        pooled.append(out.text_embeds.to(device=device, dtype=dtype))
    clip = torch.cat(hidden, dim=-1)
    clip = nn.functional.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))   # zero channels up to T5's width
    return torch.cat([clip, t5_states], dim=-2), torch.cat(pooled, dim=-1)


def flow_family(index: dict, root: Path | None = None) -> str | None:
    """The family ("sd3" | "flux") of a flow pipeline's model_index.json; None for a UNet pipeline."""
    name = index.get("_class_name", "")
    if name in FLOW_PIPELINES:
        return FLOW_PIPELINES[name]
    entry = index.get("transformer")
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        cls = entry[1]
        if cls == "SD3Transformer2DModel":
            return "sd3"
        if cls == "FluxTransformer2DModel":
            return "flux"
        raise ValueError(f"model_index.json names a transformer of class {cls!r}; supported: SD3Transformer2DModel, "
                         "FluxTransformer2DModel")
    return None
