"""Single-file LDM/SGM checkpoints: written from tiny diffusers/transformers weights in the original
key layout, loaded by us, compared with the folder they came from and with diffusers' own
single-file loader (the oracle for the key layout)."""
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

import tiny_models  # noqa: E402
import tiny_pipeline  # noqa: E402
from renoise.models import configs, load_pipeline, single_file as sf  # noqa: E402
from renoise.models.single_file import load_single_file  # noqa: E402


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _randomised(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _text_encoder(hidden, act, layers=2, projection=None, seed=0):
    vocab = len(tiny_pipeline.vocabulary()[0])
    cfg = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77,
                                      hidden_act=act, projection_dim=projection or hidden,
                                      bos_token_id=0, eos_token_id=2, pad_token_id=1)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    torch.manual_seed(seed)
    return _randomised(cls(cfg), seed)


def _te_state(model):
    """transformers-v4 names (`text_model.*`), as in the published files."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v.contiguous()
            for k, v in model.state_dict().items()}


SCHED = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
         "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False,
         "clip_sample": False, "prediction_type": "epsilon"}


_MADE = {}


@pytest.fixture
def checkpoint(tmp_path_factory):
    """make_checkpoint, once per kind for the whole module."""
    def get(kind):
        if kind not in _MADE:
            _MADE[kind] = make_checkpoint(tmp_path_factory.mktemp(kind), kind)
        return _MADE[kind]
    return get


def make_checkpoint(tmp_path, kind):
    """A diffusers folder (tiny random weights) and the same weights as one LDM/SGM .safetensors."""
    folder = tmp_path / kind
    unet_kind = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}[kind]
    unet = tiny_models.save_tiny_unet(folder / "unet", unet_kind, seed=1)
    vae = tiny_models.save_tiny_vae(folder / "vae", "sdxl" if kind == "sdxl" else "sd", seed=2)
    cross = unet.config.cross_attention_dim
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}
    ucfg = configs.UNetConfig.from_dict(json.loads((folder / "unet" / "config.json").read_text()))
    vcfg = configs.VAEConfig.from_dict(json.loads((folder / "vae" / "config.json").read_text()))
    ckpt = {"model.diffusion_model." + k: v for k, v in sf.unet_to_ldm(unet.state_dict(), ucfg).items()}
    ckpt.update({"first_stage_model." + k: v for k, v in sf.vae_to_ldm(vae.state_dict(), vcfg).items()})
    tiny_pipeline.save_tokenizer(folder / "tokenizer")
    if kind == "sd1":
        te = _text_encoder(cross, "quick_gelu", seed=3)
        te.save_pretrained(folder / "text_encoder")
        ckpt.update({"cond_stage_model.transformer." + k: v for k, v in _te_state(te).items()})
    elif kind == "sd2":
        # the file holds one more layer than the model uses (OpenCLIP-H: 24, SD 2 uses 23) and a projection
        te = _text_encoder(cross, "gelu", layers=2, seed=3)
        te.save_pretrained(folder / "text_encoder")
        full = _text_encoder(cross, "gelu", layers=3, projection=16, seed=4)
        sd = _te_state(full)
        sd.update(_te_state(te))
        ckpt.update({"cond_stage_model.model." + k: v for k, v in sf.open_clip_from_transformers(sd).items()})
        ckpt["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    else:
        h1 = 24  # the widths must differ: diffusers tells the two encoders apart by width
        te = _text_encoder(h1, "quick_gelu", seed=3)
        te2 = _text_encoder(cross - h1, "gelu", projection=tiny_models.TINY_POOLED_DIM, seed=4)
        te.save_pretrained(folder / "text_encoder")
        te2.save_pretrained(folder / "text_encoder_2")
        tiny_pipeline.save_tokenizer(folder / "tokenizer_2", pad_token="!")
        ckpt.update({"conditioner.embedders.0.transformer." + k: v for k, v in _te_state(te).items()})
        ckpt.update({"conditioner.embedders.1.model." + k: v
                     for k, v in sf.open_clip_from_transformers(_te_state(te2)).items()})
        index.update(_class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHED))
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt.items()}, path)
    for weights in folder.glob("*/*.safetensors"):  # keep only configs: weights must come from the file
        weights.unlink()
    return folder, path, dict(unet=unet, vae=vae, te=te, te2=te2 if kind == "sdxl" else None)


def _inputs(kind, source, gen):
    x, t, ctx, extra = tiny_models.unet_inputs(kind, seed=5)
    vocab = len(tiny_pipeline.vocabulary()[0])
    ids = torch.randint(0, vocab - 2, (2, 77), generator=gen)
    ids[:, 0] = vocab - 2
    ids[0, 9:] = ids[1, 40:] = vocab - 1  # EOS (the largest id), then EOS padding
    return x, t, ctx, extra, ids


def _unet_out(model, x, t, ctx, extra, ours):
    if ours:
        return model(x, t, ctx, **extra)
    added = {"added_cond_kwargs": extra} if extra else {}
    return model(x, t, ctx, **added).sample


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_single_file_matches_source_and_diffusers(checkpoint, kind):
    folder, path, src = checkpoint(kind)
    assert sf.sniff(load_file(path)) == kind
    pipe = load_single_file(path, config=folder)
    assert pipe.kind == ("sdxl" if kind == "sdxl" else "sd")
    assert (pipe.text_encoder_2 is not None) == (pipe.tokenizer_2 is not None) == (kind == "sdxl")
    assert pipe.scheduler_config == SCHED
    cls = diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline
    extra_kw = {} if kind == "sdxl" else {"safety_checker": None}
    ref = cls.from_single_file(str(path), config=str(folder), local_files_only=True, **extra_kw)
    x, t, ctx, extra, ids = _inputs(kind, src, torch.Generator().manual_seed(0))
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours = _unet_out(pipe.unet, x, t, ctx, extra, True)
        assert _rel(ours, _unet_out(src["unet"], x, t, ctx, extra, False)) < 1e-5
        assert _rel(ours, _unet_out(ref.unet, x, t, ctx, extra, False)) < 1e-5
        mean, logvar = pipe.vae.encode(img)
        for other in (src["vae"], ref.vae):
            dist = other.encode(img).latent_dist
            assert _rel(mean, dist.mean) < 1e-5 and _rel(logvar, dist.logvar) < 1e-5
            assert _rel(pipe.vae.decode(mean), other.decode(mean).sample) < 1e-5
        encoders = [(pipe.text_encoder, src["te"], ref.text_encoder)]
        if kind == "sdxl":
            encoders.append((pipe.text_encoder_2, src["te2"], ref.text_encoder_2))
        for mine, source, theirs in encoders:
            o = mine(ids)
            for other in (source, theirs):
                r = other(ids, output_hidden_states=True)
                assert len(o.hidden_states) == len(r.hidden_states)
                assert _rel(o.last_hidden_state, r.last_hidden_state) < 1e-5
                assert _rel(o.hidden_states[-2], r.hidden_states[-2]) < 1e-5
                if mine.config.with_projection:
                    assert _rel(o.text_embeds, r.text_embeds) < 1e-5


def _meta_keys(name):
    from renoise.models.unet import UNet
    with torch.device("meta"):
        return UNet(configs.unet_config(name)).state_dict()


@pytest.mark.parametrize("name,expected", [
    ("sd15", ["output_blocks.11.0.skip_connection.weight", "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
              "input_blocks.3.0.op.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
              "middle_block.1.proj_in.weight", "time_embed.2.bias", "out.2.weight", "input_blocks.0.0.weight"]),
    ("sdxl-base", ["label_emb.0.0.weight", "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
                   "input_blocks.8.1.transformer_blocks.1.ff.net.2.weight", "output_blocks.2.2.conv.weight",
                   "output_blocks.5.2.conv.weight", "middle_block.1.transformer_blocks.9.norm3.weight",
                   "output_blocks.8.0.in_layers.2.weight"]),
])
def test_unet_key_map_on_released_layouts(name, expected):
    """Pinned LDM/SGM key names of the released checkpoints (FACTS.md §2) appear, and convert back."""
    ours = _meta_keys(name)
    ldm = sf.unet_to_ldm(ours, configs.unet_config(name))
    assert len(ldm) == len(ours)
    for key in expected:
        assert key in ldm, key
    assert set(sf.convert_unet(ldm, configs.unet_config(name))) == set(ours)


def test_vae_conversion_squeezes_attention():
    cfg = configs.VAEConfig(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1)
    from renoise.models.vae import AutoencoderKL
    ours = AutoencoderKL(cfg).state_dict()
    ldm = sf.vae_to_ldm(ours, cfg)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert "decoder.up.1.upsample.conv.weight" in ldm and "decoder.up.0.block.0.nin_shortcut.weight" in ldm
    back = sf.convert_vae(ldm, cfg)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


def test_open_clip_split_and_layer_drop():
    te = _text_encoder(16, "gelu", layers=3, projection=8, seed=0)
    sd = _te_state(te)
    oc = sf.open_clip_from_transformers(sd)
    assert oc["transformer.resblocks.0.attn.in_proj_weight"].shape == (48, 16)
    assert oc["text_projection"].shape == (16, 8)
    back = sf.convert_open_clip(oc, with_projection=True)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    dropped = sf.convert_open_clip(oc, num_layers=2)
    assert "text_projection.weight" not in dropped
    assert not any(".layers.2." in k for k in dropped) and any(".layers.1." in k for k in dropped)
    cfg = sf.infer_clip_config(back, hidden_act="gelu", with_projection=True, head_dim=8)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.projection_dim) == (3, 16, 32, 8)
    assert cfg.num_attention_heads == 2


def test_sniff_and_errors(tmp_path):
    unet = "model.diffusion_model.input_blocks.0.0.weight"
    assert sf.sniff([unet, "cond_stage_model.transformer.text_model.final_layer_norm.weight"]) == "sd1"
    assert sf.sniff([unet, "cond_stage_model.model.ln_final.weight"]) == "sd2"
    assert sf.sniff([unet, "conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    with pytest.raises(sf.UnknownCheckpointError, match="unknown checkpoint layout.*unet.conv_in.weight"):
        sf.sniff(["unet.conv_in.weight", "vae.encoder.conv_in.weight"])
    with pytest.raises(sf.UnknownCheckpointError, match="refiner"):
        sf.sniff([unet, "conditioner.embedders.0.model.ln_final.weight"])
    with pytest.raises(sf.UnknownCheckpointError, match="without text encoders"):
        sf.sniff([unet])
    cfg = configs.unet_config("sd15")
    with pytest.raises(ValueError, match="fit no module.*output_blocks.12.0"):
        sf.convert_unet({"output_blocks.12.0.in_layers.0.weight": torch.zeros(1)}, cfg)
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(sf.UnknownCheckpointError, match="foo.weight"):
        load_single_file(tmp_path / "x.safetensors")
    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="allow_pickle"):
        load_single_file(tmp_path / "x.ckpt")


def test_wrong_config_is_named(tmp_path, checkpoint):
    folder, path, _ = checkpoint("sd1")
    other = tmp_path / "other"
    tiny_models.save_tiny_unet(other / "unet", "sd1", seed=0, cross_attention_dim=48)
    (other / "vae").mkdir()
    (other / "vae" / "config.json").write_bytes((folder / "vae" / "config.json").read_bytes())
    with pytest.raises(ValueError, match="shape mismatches.*attn2.to_k.weight"):
        load_single_file(path, config=other)
    configs_ = {name: json.loads((folder / name / "config.json").read_text()) for name in ("unet", "vae")}
    with pytest.raises(ValueError, match="head count"):   # 32 wide: not CLIP's 64-wide heads, cannot infer
        load_single_file(path, config=configs_)
    configs_["text_encoder"] = json.loads((folder / "text_encoder" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_single_file(path, config=configs_, tokenizer=tmp_path / "nowhere")


def test_load_pipeline_dispatches_single_files(checkpoint):
    folder, path, src = checkpoint("sd1")
    pipe = load_pipeline(path, config=folder)
    x, t, ctx, extra, ids = _inputs("sd1", src, torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _rel(pipe.unet(x, t, ctx), src["unet"](x, t, ctx).sample) < 1e-5
    assert pipe.kind == "sd" and pipe.tokenizer.pad_token_id == pipe.tokenizer.eos_token_id
