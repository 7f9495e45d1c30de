"""Block offloading on the CPU: each block's weights are swapped for fresh copies while it runs and
back afterwards, and the outputs are bit-identical to the plain model's."""
import pytest
import torch

from renoise.models.flux import FluxConfig, FluxTransformer
from renoise.models.mmdit import SD3Config, SD3Transformer
from renoise.models.offload import enable_offload
from tiny_dit import flux_inputs, sd3_inputs, tiny_flux_config, tiny_sd3_config


def _flux():
    torch.manual_seed(0)
    model = FluxTransformer(FluxConfig(**tiny_flux_config("dev"))).eval()
    inp = flux_inputs("dev")
    return model, lambda: model(inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"],
                                inp["pooled_projections"], inp["img_ids"], inp["txt_ids"], guidance=inp["guidance"])


def _sd3():
    torch.manual_seed(0)
    model = SD3Transformer(SD3Config(**tiny_sd3_config("sd35-medium"))).eval()
    inp = sd3_inputs("sd35-medium")
    return model, lambda: model(inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"],
                                inp["pooled_projections"])


@pytest.mark.parametrize("build", [_flux, _sd3])
def test_offload_same_numbers_and_swaps(build):
    model, call = build()
    with torch.no_grad():
        want = call()
    blocks = [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]
    host = {id(p): p.data_ptr() for b in blocks for p in b.parameters()}
    seen = []

    def inside(block, args):          # runs after the offload pre-hook (registered later)
        seen.append(all(p.data_ptr() != host[id(p)] for p in block.parameters()))

    handle = enable_offload(model, "cpu")
    probes = [b.register_forward_pre_hook(inside) for b in blocks]
    with torch.no_grad():
        got = call()
    assert torch.equal(got, want)
    assert handle.transfers == len(blocks) and seen == [True] * len(blocks)      # each ran on its own copy
    assert all(p.data_ptr() == host[id(p)] for b in blocks for p in b.parameters())   # and went back
    for p in probes:
        p.remove()
    handle.remove()
    with torch.no_grad():
        assert torch.equal(call(), want)
    assert handle.transfers == len(blocks)      # hooks gone


def test_offload_sees_weight_changes_and_refuses_meta():
    model, call = _flux()
    handle = enable_offload(model, "cpu")
    with torch.no_grad():
        before = call()
        model.single_transformer_blocks[0].proj_out.weight.mul_(2)      # e.g. merging a LoRA
        assert not torch.equal(call(), before)
    handle.remove()
    with torch.device("meta"):
        empty = FluxTransformer(FluxConfig(**tiny_flux_config("dev")))
    with pytest.raises(ValueError, match="meta"):
        enable_offload(empty, "cpu")
    with pytest.raises(ValueError, match="blocks="):
        enable_offload(torch.nn.Linear(2, 2), "cpu")
