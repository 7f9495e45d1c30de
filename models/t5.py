"""The T5 v1.1 encoder (T5-XXL: SD3's `text_encoder_3`, FLUX.1's `text_encoder_2`), pure PyTorch.

Parameter names are those of transformers' `T5EncoderModel`, so its `save_pretrained` folders
(single file or shards, safetensors) load by name:

    x_0 = shared[ids]                                               [B, L, d_model], no position embedding
    x' = x + o(softmax(q·kᵀ + bias + mask)·v)   on RMSNorm(x)       (no 1/√d scaling)
    x_{i+1} = x' + wo(gelu_tanh(wi_0(h)) · wi_1(h)),  h = RMSNorm(x')
    last_hidden_state = RMSNorm_final(x_n)

RMSNorm(x) = w · x / √(mean(x²) + ε), computed in fp32 (no mean, no bias); no Linear has a bias.
The relative position bias [1, H, L, L] is a learned table over 32 buckets of key - query
position (`relative_position_bucket`), held by block 0 only and added in every layer. The mask
(attention_mask [B, L], 1 = token, 0 = padding) hides padded keys; SD3 and FLUX pass none.

Half precision: as transformers (`_keep_in_fp32_modules = ["wo"]`), `load_t5_encoder(dtype=fp16)`
keeps every `wo` in fp32 — T5-XXL's feed-forward outputs overflow fp16 — so the residual stream
becomes fp32 after the first feed-forward; while it is still fp16, values are clamped to the
finite range after each sublayer, as transformers does.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["T5Config", "T5EncoderModel", "t5_config", "load_t5_encoder", "t5_encoder_from_state_dict",
           "relative_position_bucket"]

_ACTS = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
         "gelu": F.gelu, "relu": F.relu}
KEEP_FP32 = ("wo",)      # module names kept in fp32 when loading in half precision (transformers' rule)


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        act, gated = self.activation()
        if not gated:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r}: renoise implements the T5 v1.1 gated "
                             "feed-forward (wi_0/wi_1/wo), e.g. 'gated-gelu'")
        if act not in _ACTS:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r}: unsupported activation {act!r}; "
                             f"expected one of {sorted(_ACTS)}")

    def activation(self) -> tuple[str, bool]:
        """(activation name, gated) as transformers reads `feed_forward_proj` ("gated-gelu" -> gelu_new)."""
        parts = self.feed_forward_proj.split("-")
        gated = len(parts) == 2 and parts[0] == "gated"
        return ("gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]), gated

    @classmethod
    def from_dict(cls, cfg: dict) -> "T5Config":
        """From a transformers T5 `config.json` dict."""
        if cfg.get("model_type", "t5") != "t5":
            raise ValueError(f"not a T5 config (model_type {cfg.get('model_type')!r})")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in known})


_KNOWN = {"t5-v1_1-xxl": T5Config()}


def t5_config(name: str = "t5-v1_1-xxl", **overrides) -> T5Config:
    """Config of a known encoder ("t5-v1_1-xxl": SD3 and FLUX.1)."""
    if name not in _KNOWN:
        raise ValueError(f"unknown T5 encoder {name!r}; known: {sorted(_KNOWN)}")
    return replace(_KNOWN[name], **overrides)


def relative_position_bucket(rel: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 bucket of rel = key position - query position (int tensor): half the
    buckets for rel > 0; within a half, |rel| < n/4 exactly, then logarithmic up to max_distance."""
    half = num_buckets // 2
    exact = half // 2
    base = (rel > 0).long() * half
    n = rel.abs()
    log_part = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                        * (half - exact)).long()
    return base + torch.where(n < exact, n, log_part.clamp(max=half - 1))


class T5LayerNorm(nn.Module):
    """RMS norm: w · x / √(mean(x²) + ε), the statistic in fp32; cast to w's dtype when it is half."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x):
        var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, c: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        inner = c.num_heads * c.d_kv
        self.heads, self.d_kv = c.num_heads, c.d_kv
        self.q, self.k, self.v = (nn.Linear(c.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, c.d_model, bias=False)
        self.buckets, self.max_distance = c.relative_attention_num_buckets, c.relative_attention_max_distance
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.buckets, c.num_heads)

    def compute_bias(self, length: int, device) -> torch.Tensor:
        """[1, H, L, L] learned bias of each (query, key) pair."""
        pos = torch.arange(length, device=device)
        bucket = relative_position_bucket(pos[None, :] - pos[:, None], self.buckets, self.max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1)[None]

    def forward(self, x, bias):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, self.d_kv).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(y.transpose(1, 2).reshape(b, n, self.heads * self.d_kv))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, c: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(c, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)
        self.act = _ACTS[c.activation()[0]]

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x)
        return self.wo(h.to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(c)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


def _clamp_fp16(x):
    """fp16 only: clamp to ±max (±(max - 1000) when something already overflowed), no host sync."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    c = torch.where(torch.isinf(x).any(), big - 1000, big).to(x.dtype)
    return torch.clamp(x, min=-c, max=c)


class T5Block(nn.Module):
    def __init__(self, c: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(c, has_relative_attention_bias), T5LayerFF(c)])

    def forward(self, x, bias):
        x = _clamp_fp16(self.layer[0](x, bias))
        return _clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, c: T5Config, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList([T5Block(c, i == 0) for i in range(c.num_layers)])
        self.final_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)


class T5EncoderModel(nn.Module):
    """T5 encoder. forward(input_ids [B, L], attention_mask [B, L] or None) -> last_hidden_state [B, L, d_model]."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared)      # embed_tokens is shared (tied), as in transformers

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor [B, L], got {input_ids.dtype} {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        x = self.shared(input_ids)
        bias = self.encoder.block[0].layer[0].SelfAttention.compute_bias(input_ids.shape[1], input_ids.device)
        if attention_mask is not None:
            masked = (attention_mask == 0)[:, None, None, :]
            bias = bias.masked_fill(masked, torch.finfo(bias.dtype).min)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


# ---------------------------------------------------------------------------------------------
# loading

_TIED = "encoder.embed_tokens.weight"


def _keep_fp32(name: str) -> bool:
    return name.rsplit(".", 2)[-2] in KEEP_FP32


def _normalize(state_dict: dict) -> dict:
    """transformers may save the tied embedding under `shared.weight`, `encoder.embed_tokens.weight`
    or both; the model takes it under both names (one module). A decoder's keys are refused."""
    sd = dict(state_dict)
    if "shared.weight" not in sd and _TIED in sd:
        sd["shared.weight"] = sd[_TIED]
    if "shared.weight" in sd:
        sd[_TIED] = sd["shared.weight"]
    return sd


def _expected(config: T5Config) -> dict:
    with torch.device("meta"):
        model = T5EncoderModel(config)
    return model, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def t5_encoder_from_state_dict(config: T5Config, state_dict: dict, *, dtype=torch.float32,
                               device="cpu") -> T5EncoderModel:
    """Build on the meta device and assign `state_dict` (transformers names) strictly, in `dtype`
    (`wo` in fp32 when dtype is half) on `device`."""
    from .loading import check_keys

    sd = _normalize(state_dict)
    model, expected = _expected(config)
    check_keys(expected, {k: tuple(v.shape) for k, v in sd.items()}, "the T5 encoder weights", "T5 encoder")
    half = dtype in (torch.float16, torch.bfloat16)
    sd = {k: v.to(device=device, dtype=torch.float32 if half and _keep_fp32(k) else dtype) for k, v in sd.items()}
    sd[_TIED] = sd["shared.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    model.encoder.embed_tokens = model.shared
    return model.eval().requires_grad_(False)


def _read(weights: Path, *, dtype, device) -> dict:
    """Read a safetensors file or shard index, `wo` weights in fp32 when dtype is half, the rest in
    dtype; each tensor goes straight to its final dtype (no full-precision copy of the model)."""
    from . import loading

    if weights.name.endswith(".json"):
        by_shard = {}
        for k, shard in loading._index_map(weights).items():
            by_shard.setdefault(shard, []).append(k)
    else:
        by_shard = {weights: list(loading.safetensors_header(weights))}
    half = dtype in (torch.float16, torch.bfloat16)
    out = {}
    for shard, keys in by_shard.items():
        if shard.suffix != ".safetensors":
            raise loading.CheckpointError(f"{shard.name}: the T5 loader reads safetensors only")
        fp32 = [k for k in keys if half and _keep_fp32(k)]
        rest = [k for k in keys if k not in fp32]
        out.update(loading.read_safetensors(shard, dtype=dtype, device=device, keys=rest))
        if fp32:
            out.update(loading.read_safetensors(shard, dtype=torch.float32, device=device, keys=fp32))
    return out


def load_t5_encoder(source, *, dtype=torch.float32, device="cpu", subfolder: str | None = None,
                    variant: str | None = None, **hub) -> T5EncoderModel:
    """Load a T5 encoder from a transformers `save_pretrained` folder (`config.json` and
    `model[.variant].safetensors` or its shards), or from a diffusers pipeline folder / hub id with
    `subfolder` ("text_encoder_3" for SD3, "text_encoder_2" for FLUX.1). Names and shapes are checked
    from the file headers before any data is read. In fp16/bf16 every `wo` stays fp32.
    `hub`: cache_dir, revision, local_files_only."""
    from . import loading

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}")
    hub_id = loading.is_hub_id(source)
    if hub_id and subfolder is None:     # a transformers repo: config.json and the weights at its root
        folder = loading._download(source, None, variants=loading.weight_variants(variant, dtype), allow_pickle=False,
                                   base="model", cache_dir=hub.get("cache_dir"), revision=hub.get("revision"),
                                   local_files_only=hub.get("local_files_only"))
    elif subfolder is None:
        folder = Path(source)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no T5 config.json in {folder}; for a diffusers pipeline folder pass "
                                    "subfolder='text_encoder_3' (SD3) or 'text_encoder_2' (FLUX.1)")
    else:
        folder = loading.resolve_folder(source, subfolder, class_name="T5EncoderModel", what="T5 encoder",
                                        variant=variant, base="model", dtype=dtype, **hub)
    config = T5Config.from_dict(json.loads((folder / "config.json").read_text()))
    weights = loading.find_weights(folder, variant=variant, base="model", dtype=dtype)
    shapes = loading.checkpoint_shapes(weights)
    _, expected = _expected(config)
    loading.check_keys(expected, {k: tuple(v) for k, v in _normalize(shapes).items()}, weights, "T5 encoder")
    return t5_encoder_from_state_dict(config, _read(weights, dtype=dtype, device=device), dtype=dtype, device=device)
