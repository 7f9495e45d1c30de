"""CLIP text encoders of Stable Diffusion: ViT-L/14, OpenCLIP ViT-H (23 layers), OpenCLIP bigG.

Parameter names are exactly those of transformers' `CLIPTextModel` (`text_model.*`) and
`CLIPTextModelWithProjection` (`text_model.*` + `text_projection.weight`), so the published
`text_encoder/model.safetensors` files load by name.

    x_0 = tok_emb[ids] + pos_emb[0:L]                      [B, L, D]
    x_{i+1} = x_i' + MLP(LN2(x_i')),  x_i' = x_i + Attn(LN1(x_i))   (causal self-attention)
    last_hidden_state = LN_final(x_n);  pooled = last_hidden_state[b, argmax(ids[b])]
    text_embeds = pooled @ W_projᵀ                         (bigG only)
"""
from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLIPTextConfig", "CLIPTextModel", "CLIPTextOutput", "clip_config", "load_text_encoder",
           "text_encoder_from_state_dict"]


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"          # "quick_gelu" (OpenAI CLIP) | "gelu" (OpenCLIP)
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    with_projection: bool = False           # CLIPTextModelWithProjection (SDXL's text_encoder_2)

    @classmethod
    def from_dict(cls, cfg: dict) -> "CLIPTextConfig":
        """From a transformers `config.json` dict; the class comes from `architectures`."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in known}
        if "with_projection" not in cfg:
            kwargs["with_projection"] = any("WithProjection" in a for a in cfg.get("architectures") or [])
        config = cls(**kwargs)
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported CLIP hidden_act {config.hidden_act!r}; expected one of {sorted(_ACTIVATIONS)}")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not divisible by "
                             f"num_attention_heads {config.num_attention_heads}")
        return config


_KNOWN = {
    # SD 1.x and SDXL's first encoder: OpenAI CLIP ViT-L/14
    "clip-l": CLIPTextConfig(),
    # SD 2.x: OpenCLIP ViT-H/14 with its last layer dropped
    "openclip-h": CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                 num_attention_heads=16, hidden_act="gelu", projection_dim=512),
    # SDXL's second encoder: OpenCLIP ViT-bigG/14 with text_projection
    "openclip-bigg": CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                    num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                    with_projection=True),
}


def clip_config(name: str, **overrides) -> CLIPTextConfig:
    """Config of a known text encoder: "clip-l", "openclip-h", "openclip-bigg"."""
    if name not in _KNOWN:
        raise ValueError(f"unknown text encoder {name!r}; known: {sorted(_KNOWN)}")
    return replace(_KNOWN[name], **overrides)


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": F.gelu}


@dataclass
class CLIPTextOutput:
    last_hidden_state: torch.Tensor          # [B, L, D], final layer norm applied
    hidden_states: tuple                     # (embeddings, layer 1, ..., layer n), no final norm
    pooled: torch.Tensor                     # [B, D], last_hidden_state at the first EOS
    text_embeds: torch.Tensor | None = None  # [B, projection_dim], with-projection model only


class _Attention(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        d = c.hidden_size
        self.heads = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))


class _MLP(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = _ACTIVATIONS[c.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.self_attn = _Attention(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = _MLP(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class _Encoder(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class _TextTransformer(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.embeddings = _Embeddings(c)
        self.encoder = _Encoder(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIP text transformer; `text_projection` exists iff `config.with_projection`."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = _TextTransformer(config)
        if config.with_projection:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    @property
    def dtype(self):
        return self.text_model.final_layer_norm.weight.dtype

    @property
    def device(self):
        return self.text_model.final_layer_norm.weight.device

    def forward(self, input_ids: torch.Tensor, clip_skip: int | None = None) -> CLIPTextOutput:
        """input_ids [B, L] (L ≤ max_position_embeddings).

        clip_skip=k runs only the first n-k layers (as diffusers' `clip_skip`): then
        `last_hidden_state` is the final layer norm of the output of layer n-k, and `hidden_states`
        ends there. Pooling takes the position of the largest id, i.e. the first EOS
        (<|endoftext|> is the largest id of the CLIP vocabulary).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids length {input_ids.shape[1]} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}; truncate with the tokenizer")
        layers = self.text_model.encoder.layers
        n = len(layers)
        skip = clip_skip or 0
        if not 0 <= skip < n:
            raise ValueError(f"clip_skip must be in [0, {n - 1}] for a {n}-layer encoder, got {clip_skip}")
        x = self.text_model.embeddings(input_ids)
        hidden = [x]
        for layer in layers[: n - skip]:
            x = layer(x)
            hidden.append(x)
        last = self.text_model.final_layer_norm(x)
        eos = input_ids.argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]
        embeds = self.text_projection(pooled) if self.config.with_projection else None
        return CLIPTextOutput(last, tuple(hidden), pooled, embeds)


# ---------------------------------------------------------------------------------------------
# loading

_IGNORED = ("text_model.embeddings.position_ids",)


def normalize_text_encoder_keys(state_dict: dict) -> dict:
    """Accept both transformers layouts: v4 `text_model.*` and v5's prefix-less `CLIPTextModel`
    (`embeddings.*`, `encoder.*`, `final_layer_norm.*`); drop the `position_ids` buffer."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            key = "text_model." + key
        if key not in _IGNORED:
            out[key] = value
    return out


def check_text_encoder_keys(config: CLIPTextConfig, shapes: dict, where="the text encoder weights") -> None:
    """Raise ValueError naming missing / unexpected / mis-shaped keys ({our name: shape})."""
    from .loading import check_keys

    with torch.device("meta"):
        model = CLIPTextModel(config)
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes, where, "text encoder")


def text_encoder_from_state_dict(config: CLIPTextConfig, state_dict: dict, *, dtype=torch.float32,
                                 device="cpu") -> CLIPTextModel:
    """Build on the meta device and load `state_dict` (our/transformers names) with strict checks."""
    from .loading import model_from_state_dict

    return model_from_state_dict(CLIPTextModel, config, normalize_text_encoder_keys(state_dict), dtype=dtype,
                                 device=device, where="the text encoder weights", what="text encoder")


def load_text_encoder(source, *, subfolder: str | None = "text_encoder", dtype=torch.float32, device="cpu",
                      variant: str | None = None, allow_pickle: bool = False, **hub) -> CLIPTextModel:
    """Load a text encoder from a diffusers pipeline folder or hub id (its `subfolder`), or from a
    transformers model folder (`subfolder=None`): `config.json` + `model[.variant].safetensors`
    (or shards; `.bin` only with allow_pickle). `hub`: cache_dir, revision, local_files_only."""
    from . import loading

    root = Path(source) if not loading.is_hub_id(source) else None
    if root is not None and subfolder is None:
        if not (root / "config.json").is_file():
            raise FileNotFoundError(f"no text encoder config.json in {root}")
        folder = root
    else:
        folder = loading.resolve_folder(source, subfolder, class_name="CLIPTextModel", what="text encoder",
                                        variant=variant, allow_pickle=allow_pickle, base="model", dtype=dtype,
                                        **hub)
    config = CLIPTextConfig.from_dict(json.loads((folder / "config.json").read_text()))
    weights = loading.find_weights(folder, variant=variant, allow_pickle=allow_pickle, base="model", dtype=dtype)
    shapes = loading.checkpoint_shapes(weights)
    if shapes is not None:  # names and shapes from the header, before reading any data
        check_text_encoder_keys(config, normalize_text_encoder_keys(shapes), weights)
    state_dict = loading.load_state_dict(weights, allow_pickle=allow_pickle, dtype=dtype, device=device)
    return text_encoder_from_state_dict(config, state_dict, dtype=dtype, device=device)
