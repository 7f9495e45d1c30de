"""One hook through which every attention layer of our models is observed and steered.

    from renoise.models.attention_hook import attention_hook, attention_probs

    def processor(layer, q, k, v):               # layer: AttentionLayer; q [B, h, N, d], k/v [B, h, M, d]
        p = attention_probs(q, k)                # softmax(q kᵀ / √d), [B, h, N, M]
        ...                                      # look at p, or change it
        return p @ v                             # the heads' output, [B, h, N, d]

    with attention_hook(unet, processor) as layers:   # layers: the AttentionLayer of each module
        unet(x, t, context)

Every `models.blocks.Attention` (the UNet's self-attention `attn1` and cross-attention `attn2`,
and any model built from the same block) holds a `processor` attribute, None by default. With
None the layer runs `F.scaled_dot_product_attention` and the hook costs one `is None` test. With a
processor, the layer calls `processor(layer_info, q, k, v)` with the projected, head-split
queries, keys and values and uses what it returns as the attention output (before `to_out`).

The processor is a plain Python callable and may keep state (a step counter, stored maps); the
caller advances its step between model calls. Under `torch.compile` the processor is traced into
the graph like any module code (a changed processor or changed Python state it branches on
re-specialises the graph, as any attribute would).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

__all__ = ["AttentionLayer", "attention_layers", "attention_hook", "set_processor", "attention_probs",
           "AttentionStore"]


@dataclass(frozen=True)
class AttentionLayer:
    """What a processor is told about the layer that calls it.

    name: the module's path in the model (e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2");
    is_cross: keys/values come from another sequence (the text); index: the layer's position in
    the model's forward order of registration; heads: number of heads.
    """
    name: str
    is_cross: bool
    index: int
    heads: int


def attention_layers(model) -> list:
    """[(AttentionLayer, module)] for every hookable attention module of `model`, in module order."""
    from .blocks import Attention
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]
    return [(AttentionLayer(name, m.is_cross, i, m.heads), m) for i, (name, m) in enumerate(found)]


class _Bound:
    """A processor bound to one layer: called by Attention.forward as bound(q, k, v)."""

    __slots__ = ("layer", "processor")

    def __init__(self, layer, processor):
        self.layer, self.processor = layer, processor

    def __call__(self, q, k, v):
        return self.processor(self.layer, q, k, v)


def set_processor(model, processor) -> list:
    """Install `processor` (or None: the plain SDPA path) on every attention layer of `model`.
    Returns the AttentionLayers. Raises when the model has no hookable attention layer."""
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention layer built from renoise.models.blocks.Attention "
                         "to hook")
    for layer, module in layers:
        module.processor = None if processor is None else _Bound(layer, processor)
    return [layer for layer, _ in layers]


@contextlib.contextmanager
def attention_hook(model, processor):
    """Within the block, every attention layer of `model` runs through `processor`; the previous
    processors come back afterwards (also on an error)."""
    layers = attention_layers(model)
    before = [m.processor for _, m in layers]
    try:
        yield set_processor(model, processor)
    finally:
        for (_, m), p in zip(layers, before):
            m.processor = p


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) over the keys, in fp32: [B, h, N, d] × [B, h, M, d] → [B, h, N, M]."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return scores.softmax(dim=-1)


class AttentionStore:
    """An observing processor: keeps each call's attention maps, mean over heads, per layer name.

    store.maps[name] -> list of [B, N, M] float32 tensors, one per call (cross layers only unless
    `self_attention`). The output is the plain SDPA result, so the model's output is unchanged.
    """

    def __init__(self, self_attention: bool = False):
        self.self_attention = self_attention
        self.maps = {}

    def __call__(self, layer, q, k, v):
        if layer.is_cross or self.self_attention:
            self.maps.setdefault(layer.name, []).append(attention_probs(q, k).mean(1))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
