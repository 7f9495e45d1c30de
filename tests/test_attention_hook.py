"""The attention hook (renoise.models.attention_hook) on the demo model's UNet: every layer is seen,
its maps are softmax(QKᵀ/√d) computed by hand, the hook off is the plain path, and it runs under
torch.compile."""
import math

import pytest
import torch

from renoise.models.attention_hook import (AttentionStore, attention_hook, attention_layers, attention_probs,
                                           set_processor)


@pytest.fixture(scope="module")
def unet():
    from renoise.models import load_pipeline
    return load_pipeline("demo", dtype=torch.float32, device="cpu").unet


def inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(batch, c.in_channels, 16, 16, generator=g)
    context = torch.randn(batch, 77, c.cross_attention_dim, generator=g)
    return x, torch.tensor([500.0, 20.0][:batch]), context


def test_layers_are_every_attention_module_named_and_typed(unet):
    layers = [layer for layer, _ in attention_layers(unet)]
    names = [layer.name for layer in layers]
    assert len(layers) == 2 * sum(1 for n, _ in unet.named_modules() if n.endswith("transformer_blocks.0"))
    assert all(n.endswith(("attn1", "attn2")) for n in names)
    assert [layer.is_cross for layer in layers] == [n.endswith("attn2") for n in names]
    assert [layer.index for layer in layers] == list(range(len(layers)))


@torch.no_grad()
def test_maps_equal_explicit_softmax_of_scaled_scores(unet):
    """Each stored cross-attention map is exp(s)/Σexp(s) with s = (x Wq)(c Wk)ᵀ/√d, per head, by hand."""
    x, t, context = inputs(unet)
    seen = {}
    handles = []
    for layer, module in attention_layers(unet):
        if layer.is_cross:
            handles.append(module.register_forward_pre_hook(
                lambda m, a, name=layer.name: seen.__setitem__(name, (a[0].clone(), a[1].clone()))))
    store = AttentionStore()
    try:
        with attention_hook(unet, store):
            unet(x, t, context)
    finally:
        for h in handles:
            h.remove()
    assert set(store.maps) == set(seen) and seen
    for (layer, module) in attention_layers(unet):
        if not layer.is_cross:
            continue
        hidden, ctx = seen[layer.name]
        B, N, C = hidden.shape
        h, d = module.heads, C // module.heads
        q = (hidden @ module.to_q.weight.T).reshape(B, N, h, d).double()
        k = (ctx @ module.to_k.weight.T).reshape(B, -1, h, d).double()
        s = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d)
        e = torch.exp(s - s.amax(-1, keepdim=True))
        explicit = (e / e.sum(-1, keepdim=True)).mean(1)
        got = store.maps[layer.name][0].double()
        assert got.shape == (B, N, 77)
        assert (got - explicit).abs().max() < 1e-6


@torch.no_grad()
def test_hook_off_is_the_plain_path_and_observing_changes_nothing(unet):
    x, t, context = inputs(unet, seed=1)
    plain = unet(x, t, context)
    with attention_hook(unet, AttentionStore(self_attention=True)) as layers:
        observed = unet(x, t, context)
    assert all(m.processor is None for _, m in attention_layers(unet))          # restored
    assert len(layers) == len(attention_layers(unet))
    assert torch.equal(unet(x, t, context), plain)
    assert (observed - plain).abs().max() < 1e-5


@torch.no_grad()
def test_steering_changes_the_output_and_errors_restore(unet):
    x, t, context = inputs(unet, seed=2)
    plain = unet(x, t, context)

    def uniform_cross(layer, q, k, v):              # cross-attention replaced by the mean of the values
        if layer.is_cross:
            return v.mean(2, keepdim=True).expand_as(q).contiguous()
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    with attention_hook(unet, uniform_cross):
        steered = unet(x, t, context)
    assert (steered - plain).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="boom"):
        with attention_hook(unet, lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))):
            unet(x, t, context)
    assert all(m.processor is None for _, m in attention_layers(unet))


@torch.no_grad()
def test_probs_helper_is_the_softmax():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g)
    p = attention_probs(q, k)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(8), -1)
    assert (p.double() - ref).abs().max() < 1e-6


def test_set_processor_refuses_a_model_without_attention():
    with pytest.raises(ValueError, match="no attention layer"):
        set_processor(torch.nn.Linear(2, 2), AttentionStore())


@torch.no_grad()
def test_under_torch_compile_observing_and_steering_match_eager(unet):
    torch._dynamo.reset()
    x, t, context = inputs(unet, seed=4)
    eager_store, compiled_store = AttentionStore(), AttentionStore()
    with attention_hook(unet, eager_store):
        eager = unet(x, t, context)
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
    with attention_hook(unet, compiled_store):
        out = compiled(x, t, context)
    assert (out - eager).abs().max() < 1e-5
    assert set(compiled_store.maps) == set(eager_store.maps)
    for name, maps in eager_store.maps.items():
        assert (compiled_store.maps[name][0] - maps[0]).abs().max() < 1e-6

    def double_first_token(layer, q, k, v):
        p = attention_probs(q, k)
        if layer.is_cross:
            p = p * torch.cat([torch.full_like(p[..., :1], 2.0), torch.ones_like(p[..., 1:])], -1)
        return p @ v

    with attention_hook(unet, double_first_token):
        steered_eager = unet(x, t, context)
        steered = compiled(x, t, context)
    assert (steered - steered_eager).abs().max() < 1e-5
    assert (steered - eager).abs().max() > 1e-4
    plain = compiled(x, t, context)                 # hook off again: the plain graph
    assert (plain - unet(x, t, context)).abs().max() < 1e-5
    torch._dynamo.reset()
