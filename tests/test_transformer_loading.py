"""Loading SD3 / Flux transformers: diffusers folders (sharded, fp16/bf16 variants), hub ids (only the
transformer's files fetched), SD3/3.5 single files and Black Forest Labs' FLUX.1 files (written here
from a diffusers state dict with the published key mapping), half precision."""
import json

import pytest
import torch
from safetensors.torch import save_file

from renoise.models.flux import FluxConfig, FluxTransformer
from renoise.models.loading import CheckpointError
from renoise.models.mmdit import SD3Config, SD3Transformer
from renoise.models.transformer_loading import (load_flux_transformer, load_sd3_transformer, load_transformer)
from tiny_dit import (flux_inputs, make_tiny_flux, make_tiny_sd3, rel_err, save_tiny_flux, save_tiny_sd3,
                      sd3_inputs, tiny_flux_config)
from tiny_models import FakeHub, make_cache


def run_sd3(model, inp):
    with torch.no_grad():
        if isinstance(model, SD3Transformer):
            return model(inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"],
                         inp["pooled_projections"]).float()
        return model(**inp).sample.float()


def run_flux(model, inp):
    with torch.no_grad():
        if isinstance(model, FluxTransformer):
            return model(inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"],
                         inp["pooled_projections"], inp["img_ids"], inp["txt_ids"], guidance=inp["guidance"]).float()
        return model(**inp).sample.float()


# ------------------------------------------------------------------ diffusers folders

def test_pipeline_folder_sd35_medium(tmp_path):
    theirs = save_tiny_sd3(tmp_path / "transformer", "sd35-medium")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    ours = load_transformer(tmp_path)
    assert isinstance(ours, SD3Transformer) and ours.config.dual_attention_layers == (0, 1)
    inp = sd3_inputs("sd35-medium")
    assert rel_err(run_sd3(ours, inp), run_sd3(theirs, inp)) < 1e-5
    assert not any(p.requires_grad for p in ours.parameters())


def test_model_folder_flux_and_family_check(tmp_path):
    theirs = save_tiny_flux(tmp_path, "schnell")
    ours = load_flux_transformer(tmp_path)
    inp = flux_inputs("schnell")
    assert rel_err(run_flux(ours, inp), run_flux(theirs, inp)) < 1e-5
    with pytest.raises(CheckpointError, match="not a sd3"):
        load_sd3_transformer(tmp_path)


@pytest.mark.parametrize("dtype,variant", [(torch.float16, "fp16"), (torch.bfloat16, "bf16")])
def test_sharded_half_variant(tmp_path, dtype, variant):
    theirs = save_tiny_flux(tmp_path, "dev", variant=variant, dtype=dtype, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and any(p.name.endswith(f"index.{variant}.json") for p in tmp_path.iterdir())
    ours = load_flux_transformer(tmp_path, dtype=dtype, variant=variant)
    sd = ours.state_dict()
    assert all(v.dtype == dtype for v in sd.values())
    for k, v in theirs.state_dict().items():     # each weight rounded once from the fp32 original
        assert torch.equal(sd[k], v.to(dtype)), k
    with pytest.raises(CheckpointError, match="variant"):
        load_flux_transformer(tmp_path)          # fp32 default files absent: the error names the variant files


def test_half_dtype_from_fp32_folder(tmp_path):
    theirs = save_tiny_sd3(tmp_path, "sd35-large")
    ours = load_sd3_transformer(tmp_path, dtype=torch.bfloat16)
    assert {v.dtype for v in ours.state_dict().values()} == {torch.bfloat16}
    inp = sd3_inputs("sd35-large")
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v for k, v in inp.items()}
    assert rel_err(run_sd3(ours, half), run_sd3(theirs, inp)) < 0.05


def test_pickle_only_folder_is_refused(tmp_path):
    make_tiny_sd3("sd3").save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(CheckpointError, match="pickle"):
        load_transformer(tmp_path)


def test_unknown_class_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="UNet2DConditionModel"):
        load_transformer(tmp_path)


# ------------------------------------------------------------------ hub ids

def _pipeline_repo(root):
    theirs = save_tiny_sd3(root / "transformer", "sd3")
    save_tiny_sd3(root / "transformer", "sd3", variant="fp16", dtype=torch.float16)
    (root / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    for other in ("text_encoder", "vae"):
        (root / other).mkdir()
        (root / other / "config.json").write_text("{}")
        (root / other / "model.safetensors").write_bytes(b"x")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return theirs


def test_hub_id_fetches_only_the_transformer(tmp_path, monkeypatch):
    theirs = _pipeline_repo(tmp_path / "repo")
    hub = FakeHub({"org/sd3": tmp_path / "repo"}, tmp_path / "cache").install(monkeypatch)
    ours = load_transformer("org/sd3", dtype=torch.float16)
    assert sorted(hub.fetched) == ["transformer/config.json", "transformer/diffusion_pytorch_model.fp16.safetensors"]
    assert ours.dtype == torch.float16
    hub.fetched.clear()
    ours32 = load_sd3_transformer("org/sd3")
    assert hub.fetched == ["transformer/diffusion_pytorch_model.safetensors"]     # the config was cached
    inp = sd3_inputs("sd3")
    assert rel_err(run_sd3(ours32, inp), run_sd3(theirs, inp)) < 1e-5


def test_hub_id_offline_cache(tmp_path, monkeypatch):
    theirs = save_tiny_flux(tmp_path / "src" / "transformer", "dev")
    make_cache(tmp_path / "cache", "org/flux", tmp_path / "src")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = load_transformer("org/flux", cache_dir=tmp_path / "cache", local_files_only=True)
    inp = flux_inputs("dev")
    assert rel_err(run_flux(ours, inp), run_flux(theirs, inp)) < 1e-5
    with pytest.raises(FileNotFoundError):
        load_transformer("org/absent", cache_dir=tmp_path / "cache", local_files_only=True)


# ------------------------------------------------------------------ single files (original layouts)

def sd3_original(sd: dict, n_layers: int) -> dict:
    """diffusers → Stability's MMDiT names (the published mapping, inverted here independently)."""
    out = {}
    top = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
           "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
           "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
           "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
           "context_embedder": "context_embedder", "proj_out": "final_layer.linear"}
    for k, v in top.items():
        for s in ("weight", "bias"):
            if f"{k}.{s}" in sd:
                out[f"{v}.{s}"] = sd[f"{k}.{s}"]
    out["pos_embed"] = sd["pos_embed.pos_embed"]

    def shift_scale(w):          # diffusers holds (scale, shift); the original (shift, scale)
        scale, shift = w.chunk(2)
        return torch.cat([shift, scale])

    for s in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{s}"] = shift_scale(sd[f"norm_out.linear.{s}"])
    for i in range(n_layers):
        t, j = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for s in ("weight", "bias"):
            out[j + f"x_block.attn.qkv.{s}"] = torch.cat([sd[t + f"attn.to_{x}.{s}"] for x in "qkv"])
            out[j + f"context_block.attn.qkv.{s}"] = torch.cat([sd[t + f"attn.add_{x}_proj.{s}"] for x in "qkv"])
            out[j + f"x_block.attn.proj.{s}"] = sd[t + f"attn.to_out.0.{s}"]
            out[j + f"x_block.adaLN_modulation.1.{s}"] = sd[t + f"norm1.linear.{s}"]
            out[j + f"x_block.mlp.fc1.{s}"] = sd[t + f"ff.net.0.proj.{s}"]
            out[j + f"x_block.mlp.fc2.{s}"] = sd[t + f"ff.net.2.{s}"]
            ctx = sd[t + f"norm1_context.linear.{s}"]
            if i == n_layers - 1:
                out[j + f"context_block.adaLN_modulation.1.{s}"] = shift_scale(ctx)
            else:
                out[j + f"context_block.adaLN_modulation.1.{s}"] = ctx
                out[j + f"context_block.attn.proj.{s}"] = sd[t + f"attn.to_add_out.{s}"]
                out[j + f"context_block.mlp.fc1.{s}"] = sd[t + f"ff_context.net.0.proj.{s}"]
                out[j + f"context_block.mlp.fc2.{s}"] = sd[t + f"ff_context.net.2.{s}"]
            if t + f"attn2.to_q.{s}" in sd:
                out[j + f"x_block.attn2.qkv.{s}"] = torch.cat([sd[t + f"attn2.to_{x}.{s}"] for x in "qkv"])
                out[j + f"x_block.attn2.proj.{s}"] = sd[t + f"attn2.to_out.0.{s}"]
        for ours, theirs in (("norm_q", "x_block.attn.ln_q"), ("norm_k", "x_block.attn.ln_k"),
                             ("norm_added_q", "context_block.attn.ln_q"), ("norm_added_k", "context_block.attn.ln_k")):
            if t + f"attn.{ours}.weight" in sd:
                out[j + theirs + ".weight"] = sd[t + f"attn.{ours}.weight"]
        for q in "qk":
            if t + f"attn2.norm_{q}.weight" in sd:
                out[j + f"x_block.attn2.ln_{q}.weight"] = sd[t + f"attn2.norm_{q}.weight"]
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in sd.values())
    return out


def flux_original(sd: dict, n_double: int, n_single: int) -> dict:
    """diffusers → Black Forest Labs' FLUX.1 names (the published mapping, inverted here)."""
    out = {}
    top = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
           "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
    for s in ("weight", "bias"):
        for k, v in top.items():
            if f"{k}.{s}" in sd:
                out[f"{v}.{s}"] = sd[f"{k}.{s}"]
        scale, shift = sd[f"norm_out.linear.{s}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale])
        for i in range(n_double):
            t, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            out[d + f"img_mod.lin.{s}"] = sd[t + f"norm1.linear.{s}"]
            out[d + f"txt_mod.lin.{s}"] = sd[t + f"norm1_context.linear.{s}"]
            out[d + f"img_attn.qkv.{s}"] = torch.cat([sd[t + f"attn.to_{x}.{s}"] for x in "qkv"])
            out[d + f"txt_attn.qkv.{s}"] = torch.cat([sd[t + f"attn.add_{x}_proj.{s}"] for x in "qkv"])
            out[d + f"img_attn.proj.{s}"] = sd[t + f"attn.to_out.0.{s}"]
            out[d + f"txt_attn.proj.{s}"] = sd[t + f"attn.to_add_out.{s}"]
            for a, b in (("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                         ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2")):
                out[d + f"{a}.{s}"] = sd[t + f"{b}.{s}"]
        for i in range(n_single):
            t, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            out[b + f"modulation.lin.{s}"] = sd[t + f"norm.linear.{s}"]
            out[b + f"linear1.{s}"] = torch.cat([sd[t + f"attn.to_{x}.{s}"] for x in "qkv"] + [sd[t + f"proj_mlp.{s}"]])
            out[b + f"linear2.{s}"] = sd[t + f"proj_out.{s}"]
    for i in range(n_double):
        t, d = f"transformer_blocks.{i}.attn.", f"double_blocks.{i}."
        for a, b in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                     ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[d + b + ".scale"] = sd[t + a + ".weight"]
    for i in range(n_single):
        out[f"single_blocks.{i}.norm.query_norm.scale"] = sd[f"single_transformer_blocks.{i}.attn.norm_q.weight"]
        out[f"single_blocks.{i}.norm.key_norm.scale"] = sd[f"single_transformer_blocks.{i}.attn.norm_k.weight"]
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in sd.values())
    return out


def _write(path, sd, prefix="", extra=None):
    save_file({prefix + k: v.contiguous() for k, v in sd.items()} | (extra or {}), str(path))
    return path


@pytest.mark.parametrize("kind", ["sd3", "sd35-large", "sd35-medium"])
def test_sd3_single_file(tmp_path, kind):
    theirs = make_tiny_sd3(kind, seed=2)
    extra = {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(4),
             "first_stage_model.decoder.conv_in.weight": torch.ones(2, 2)}
    f = _write(tmp_path / "sd3.safetensors", sd3_original(theirs.state_dict(), 3), "model.diffusion_model.", extra)
    cfg = SD3Config.from_dict(dict(theirs.config))
    # the head size is read off the q/k norms when present; without them (SD3 medium: 64) give config=
    ours = load_sd3_transformer(f, config=None if cfg.qk_norm else cfg)
    if cfg.qk_norm:
        assert ours.config == SD3Config(**{**cfg.to_dict(), "sample_size": 128})
    inp = sd3_inputs(kind, seed=4)
    assert rel_err(run_sd3(ours, inp), run_sd3(theirs, inp)) < 1e-5


def test_sd3_single_file_config_inferred_head_64(tmp_path):
    theirs = make_tiny_sd3("sd3", attention_head_dim=64, caption_projection_dim=128, num_layers=2)
    f = _write(tmp_path / "m.safetensors", sd3_original(theirs.state_dict(), 2))   # no prefix
    ours = load_transformer(f)
    assert ours.config.num_attention_heads == 2 and ours.config.pos_embed_max_size == 8
    inp = sd3_inputs("sd3")
    assert rel_err(run_sd3(ours, inp), run_sd3(theirs, inp)) < 1e-5


@pytest.mark.parametrize("kind", ["dev", "schnell"])
def test_flux_bfl_file(tmp_path, kind):
    theirs = make_tiny_flux(kind, seed=3)
    f = _write(tmp_path / f"flux1-{kind}.safetensors", flux_original(theirs.state_dict(), 2, 2))
    ours = load_transformer(f, config=FluxConfig(**tiny_flux_config(kind)))
    inp = flux_inputs(kind, seed=6)
    assert rel_err(run_flux(ours, inp), run_flux(theirs, inp)) < 1e-5
    with pytest.raises(CheckpointError, match="axes"):          # head 16: the RoPE axes are not knowable
        load_transformer(f)


def test_flux_bfl_file_inferred_config_and_bf16(tmp_path):
    theirs = make_tiny_flux("dev", attention_head_dim=128, num_attention_heads=1, axes_dims_rope=(16, 56, 56),
                            num_layers=1, num_single_layers=1)
    f = _write(tmp_path / "flux.safetensors", flux_original(theirs.state_dict(), 1, 1), "model.diffusion_model.")
    ours = load_flux_transformer(f)
    assert ours.config == FluxConfig.from_dict(dict(theirs.config))
    inp = flux_inputs("dev")
    assert rel_err(run_flux(ours, inp), run_flux(theirs, inp)) < 1e-5
    half = load_flux_transformer(f, dtype=torch.bfloat16)
    sd = half.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    for k, v in theirs.state_dict().items():
        assert torch.equal(sd[k], v.to(torch.bfloat16)), k


def test_bad_single_files(tmp_path):
    theirs = make_tiny_flux("schnell")
    bad = flux_original(theirs.state_dict(), 2, 2)
    bad["double_blocks.0.img_attn.extra.weight"] = torch.ones(2)
    f = _write(tmp_path / "bad.safetensors", bad)
    with pytest.raises(CheckpointError, match="extra"):
        load_transformer(f, config=FluxConfig(**tiny_flux_config("schnell")))
    with pytest.raises(CheckpointError, match="not sd3"):
        load_sd3_transformer(f)
    g = _write(tmp_path / "other.safetensors", {"conv.weight": torch.ones(2)})
    with pytest.raises(CheckpointError, match="neither"):
        load_transformer(g)
    # a diffusers-layout file needs its config; with it, it loads
    d = _write(tmp_path / "diffusers.safetensors", theirs.state_dict())
    with pytest.raises(ValueError, match="config="):
        load_transformer(d)
    ours = load_transformer(d, config=dict(theirs.config))
    inp = flux_inputs("schnell")
    assert rel_err(run_flux(ours, inp), run_flux(theirs, inp)) < 1e-5
    # a wrong architecture is a key/shape error, not a silent partial load
    with pytest.raises(CheckpointError, match="missing"):
        load_transformer(d,
                         config=FluxConfig(**{**tiny_flux_config("schnell"), "num_layers": 3}))


def test_readme_flux_flow(tmp_path):
    """The README's FLUX.1 snippet on a tiny BFL file: bf16 load, a LoRA merged, offload, a forward."""
    from renoise.models import enable_offload, merge_lora
    from renoise.models.flux import latent_image_ids, pack_latents, text_ids
    theirs = make_tiny_flux("dev", attention_head_dim=128, num_attention_heads=1, axes_dims_rope=(16, 56, 56),
                            num_layers=1, num_single_layers=1, in_channels=64)
    f = _write(tmp_path / "flux1-dev.safetensors", flux_original(theirs.state_dict(), 1, 1))
    flux = load_transformer(f, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    lora = {"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.randn(2, 128, generator=g),
            "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": torch.randn(512, 2, generator=g)}
    save_file(lora, str(tmp_path / "pytorch_lora_weights.safetensors"))
    before = flux.single_transformer_blocks[0].proj_mlp.weight.clone()
    merge_lora(flux, tmp_path / "pytorch_lora_weights.safetensors")
    assert not torch.equal(flux.single_transformer_blocks[0].proj_mlp.weight, before)
    handle = enable_offload(flux, "cpu")
    latents = torch.randn(1, 16, 4, 6, generator=g).bfloat16()
    t5_tokens, clip_pooled = torch.randn(1, 5, 12).bfloat16(), torch.randn(1, 10).bfloat16()
    v = flux(pack_latents(latents), 0.7, t5_tokens, clip_pooled, latent_image_ids(4, 6), text_ids(5), guidance=3.5)
    assert v.shape == (1, 6, 64) and v.dtype == torch.bfloat16 and torch.isfinite(v).all()
    assert handle.transfers == 2
