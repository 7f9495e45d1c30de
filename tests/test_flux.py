"""FLUX.1 transformer: parity with diffusers' FluxTransformer2DModel on tiny random configs (dev and
schnell), the packing helpers against FluxPipeline's, and the released configs' key sets on meta."""
import pytest
import torch

from renoise.models.flux import (FluxConfig, FluxTransformer, apply_rope, flux_config, latent_image_ids,
                                 pack_latents, rope_table, text_ids, unpack_latents)
from tiny_dit import FULL_FLUX, flux_inputs, make_tiny_flux, rel_err, tiny_flux_config


def ours_from(theirs) -> FluxTransformer:
    model = FluxTransformer(FluxConfig.from_dict(dict(theirs.config))).eval()
    model.load_state_dict(theirs.state_dict(), strict=True)
    return model


def call_ours(model, inp):
    return model(inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"], inp["pooled_projections"],
                 inp["img_ids"], inp["txt_ids"], guidance=inp["guidance"])


@pytest.mark.parametrize("kind", ["dev", "schnell"])
@pytest.mark.parametrize("size", [(8, 6), (4, 10)])
def test_matches_diffusers(kind, size):
    theirs = make_tiny_flux(kind)
    ours = ours_from(theirs)
    inp = flux_inputs(kind, height=size[0], width=size[1], seed=sum(size))
    with torch.no_grad():
        want = theirs(**inp).sample
        got = call_ours(ours, inp)
    assert got.shape == want.shape == inp["hidden_states"].shape
    assert rel_err(got, want) < 1e-5


def test_guidance_changes_dev_output_and_is_required():
    theirs = make_tiny_flux("dev", seed=1)
    ours = ours_from(theirs)
    inp = flux_inputs("dev")
    with torch.no_grad():
        a = call_ours(ours, inp)
        b = call_ours(ours, {**inp, "guidance": inp["guidance"] + 1})
    assert rel_err(a, b) > 1e-4
    with pytest.raises(ValueError, match="guidance"):
        call_ours(ours, {**inp, "guidance": None})
    schnell = FluxTransformer(FluxConfig(**tiny_flux_config("schnell")))
    with pytest.raises(ValueError, match="no guidance embedding"):
        call_ours(schnell, inp)


def test_rope_matches_diffusers():
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed
    ids = torch.cat([text_ids(3), latent_image_ids(6, 8)])
    cos, sin = rope_table(ids, (4, 6, 6))
    rc, rs = FluxPosEmbed(10000, [4, 6, 6])(ids)
    assert torch.equal(cos, rc) and torch.equal(sin, rs)
    x = torch.randn(2, 3, ids.shape[0], 16)          # [B, H, N, d]
    want = apply_rotary_emb(x.transpose(1, 2), (rc, rs), sequence_dim=1).transpose(1, 2)
    assert torch.allclose(apply_rope(x, (cos, sin)), want, atol=1e-6)


def test_pack_unpack_and_ids_match_pipeline():
    from diffusers import FluxPipeline
    z = torch.randn(2, 16, 6, 10)
    packed = pack_latents(z)
    assert torch.equal(packed, FluxPipeline._pack_latents(z, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), z)
    # the pipeline's unpack takes pixel sizes (vae_scale_factor 8)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 48, 80, 8), z)
    assert torch.equal(latent_image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 16, 5, 4))
    with pytest.raises(ValueError, match="tokens"):
        unpack_latents(packed, 8, 10)


def test_bad_inputs_are_named():
    ours = FluxTransformer(FluxConfig(**tiny_flux_config("schnell")))
    inp = flux_inputs("schnell")
    with pytest.raises(ValueError, match="packed latents"):
        call_ours(ours, {**inp, "hidden_states": torch.randn(2, 4, 6, 8)})
    with pytest.raises(ValueError, match="img_ids"):
        call_ours(ours, {**inp, "img_ids": inp["img_ids"][:-1]})
    with pytest.raises(ValueError, match="pooled"):
        call_ours(ours, {**inp, "pooled_projections": inp["pooled_projections"][:, :3]})


@pytest.mark.parametrize("name", sorted(FULL_FLUX))
def test_full_config_keys_equal_diffusers(name):
    from diffusers import FluxTransformer2DModel
    with torch.device("meta"):
        theirs = FluxTransformer2DModel(**FULL_FLUX[name])
        ours = FluxTransformer(flux_config(name))
    assert FluxConfig.from_dict(dict(theirs.config)) == flux_config(name)
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
