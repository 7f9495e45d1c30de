"""SD3 / SD 3.5 MMDiT: parity with diffusers' SD3Transformer2DModel on tiny random configs, and the
released configs' key sets on the meta device."""
import pytest
import torch

from renoise.models.mmdit import SD3Config, SD3Transformer, sd3_config, sincos_grid
from tiny_dit import FULL_SD3, make_tiny_sd3, rel_err, sd3_inputs, tiny_sd3_config


def ours_from(theirs) -> SD3Transformer:
    model = SD3Transformer(SD3Config.from_dict(dict(theirs.config))).eval()
    model.load_state_dict(theirs.state_dict(), strict=True)
    return model


@pytest.mark.parametrize("kind", ["sd3", "sd35-large", "sd35-medium"])
@pytest.mark.parametrize("size", [(8, 6), (4, 8)])
def test_matches_diffusers(kind, size):
    theirs = make_tiny_sd3(kind)
    ours = ours_from(theirs)
    inp = sd3_inputs(kind, height=size[0], width=size[1], seed=sum(size))
    with torch.no_grad():
        want = theirs(**inp).sample
        got = ours(inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"], inp["pooled_projections"])
    assert got.shape == want.shape == inp["hidden_states"].shape
    assert rel_err(got, want) < 1e-5


def test_skip_layers_match_diffusers():
    theirs = make_tiny_sd3("sd35-medium", seed=3)
    ours = ours_from(theirs)
    inp = sd3_inputs("sd35-medium", seed=5)
    with torch.no_grad():
        want = theirs(**inp, skip_layers=[1]).sample
        got = ours(inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"], inp["pooled_projections"],
                   skip_layers=[1])
        full = ours(inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"], inp["pooled_projections"])
    assert rel_err(got, want) < 1e-5
    assert rel_err(full, got) > 1e-3


def test_scalar_timestep_and_pos_embed_table():
    theirs = make_tiny_sd3("sd3")
    ours = SD3Transformer(SD3Config.from_dict(dict(theirs.config)))
    # the buffer built at init equals diffusers' (it is a persistent buffer in the checkpoints too)
    assert torch.equal(ours.pos_embed.pos_embed, theirs.pos_embed.pos_embed)
    big = sincos_grid(64, 24, 12)
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    ref = get_2d_sincos_pos_embed(64, 24, base_size=12, interpolation_scale=1.0, output_type="pt")
    assert torch.allclose(big[0], ref.float(), atol=1e-6)
    ours.load_state_dict(theirs.state_dict())
    inp = sd3_inputs("sd3", batch=1)
    with torch.no_grad():
        want = theirs(**{**inp, "timestep": torch.tensor([250.0])}).sample
        got = ours.eval()(inp["hidden_states"], 250.0, inp["encoder_hidden_states"], inp["pooled_projections"])
    assert rel_err(got, want) < 1e-5


def test_bad_inputs_are_named():
    ours = SD3Transformer(SD3Config(**tiny_sd3_config("sd3")))
    inp = sd3_inputs("sd3")
    x, t, c, p = inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"], inp["pooled_projections"]
    with pytest.raises(ValueError, match="multiples of 2"):
        ours(x[..., :5], t, c, p)
    with pytest.raises(ValueError, match="position table"):
        ours(torch.randn(2, 4, 18, 6), t, c, p)
    with pytest.raises(ValueError, match="context"):
        ours(x, t, c[..., :5], p)
    with pytest.raises(ValueError, match="pooled"):
        ours(x, t, c, p[:1])
    with pytest.raises(ValueError, match="skip_layers"):
        ours(x, t, c, p, skip_layers=[7])


def test_config_refuses_unknown():
    from renoise.models.configs import UnsupportedConfigError
    with pytest.raises(UnsupportedConfigError, match="qk_norm"):
        SD3Config.from_dict({**tiny_sd3_config(), "qk_norm": "layer_norm"})
    with pytest.raises(UnsupportedConfigError, match="FluxTransformer2DModel"):
        SD3Config.from_dict({"_class_name": "FluxTransformer2DModel"})


@pytest.mark.parametrize("name", sorted(FULL_SD3))
def test_full_config_keys_equal_diffusers(name):
    from diffusers import SD3Transformer2DModel
    with torch.device("meta"):
        theirs = SD3Transformer2DModel(**FULL_SD3[name])
        ours = SD3Transformer(sd3_config(name))
    assert SD3Config.from_dict(dict(theirs.config)) == sd3_config(name)
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
    assert all(v.is_meta for v in ours.state_dict().values())
