"""SD3 / SD 3.5 single files and BFL FLUX.1 files as whole pipelines through `load_pipeline(file, config=folder)`.

A tiny SD3 pipeline is saved by diffusers (tiny_flow_pipeline.py); its components are written here into one
file in Stability's original layout (model.diffusion_model.* MMDiT, first_stage_model.* LDM VAE,
text_encoders.{clip_l,clip_g,t5xxl}.transformer.*), with the published key mapping inverted in this file.
Loaded through load_pipeline with the tiny folder as the reference (tokenizers, configs), generation from
the same latents equals diffusers' StableDiffusion3Pipeline on the folder, and its own from_single_file.
"""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")
pytest.importorskip("tokenizers")

from renoise.flow import generate_flow  # noqa: E402
from renoise.models import load_pipeline  # noqa: E402
from renoise.models.flow_pipeline import FlowPipeline  # noqa: E402
from renoise.models.flux import pack_latents, unpack_latents  # noqa: E402
from renoise.models.loading import CheckpointError  # noqa: E402
from test_transformer_loading import flux_original, sd3_original  # noqa: E402

PROMPTS = ["a photo of a cat", "a dog"]


# ------------------------------------------------------------------ writing original-layout files

def vae_ldm(sd: dict, n_levels: int) -> dict:
    """diffusers AutoencoderKL → LDM `first_stage_model` names (the published mapping, inverted here)."""
    out = {}
    for key, v in sd.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                   lambda m: f"decoder.up.{n_levels - 1 - int(m[1])}.block.{m[2]}", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                   lambda m: f"decoder.up.{n_levels - 1 - int(m[1])}.upsample", k)
        k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                k = k.replace(f"attn_1.{a}.", f"attn_1.{b}.")
            if k.endswith("weight") and v.ndim == 2:
                v = v[:, :, None, None]                                   # LDM: 1×1 convs
        out[k] = v
    return out


def write_single_file(path, pipe, *, t5=True, clips=True, vae=True, clip_l_projection=None, t5_embed_copy=False):
    """An SD3 all-in-one (or transformer-only) file in Stability's layout from a diffusers pipeline.
    T5's tied embedding is written once, as `shared.weight` (also as `encoder.embed_tokens.weight` with
    t5_embed_copy)."""
    tr = pipe.transformer
    sd = {"model.diffusion_model." + k: v for k, v in sd3_original(tr.state_dict(), tr.config.num_layers).items()}
    if vae:
        levels = len(pipe.vae.config.block_out_channels)
        sd |= {"first_stage_model." + k: v for k, v in vae_ldm(pipe.vae.state_dict(), levels).items()}
    if clips:
        clip_l = dict(pipe.text_encoder.state_dict())
        if clip_l_projection is not None:
            clip_l["text_projection.weight"] = clip_l_projection
        sd |= {"text_encoders.clip_l.transformer." + k: v for k, v in clip_l.items()}
        sd |= {"text_encoders.clip_g.transformer." + k: v for k, v in pipe.text_encoder_2.state_dict().items()}
    if t5:
        sd |= {"text_encoders.t5xxl.transformer." + k: v.clone() for k, v in pipe.text_encoder_3.state_dict().items()
               if t5_embed_copy or k != "encoder.embed_tokens.weight"}   # tied to shared.weight
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def save_sd3_for_single_files(folder, seed=0):
    """tiny_flow_pipeline.save_sd3 with CLIP-G wider than CLIP-L (diffusers' from_single_file tells the two
    apart by width) and CLIP-L's projection the identity (SD3 pools CLIP-L unprojected)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from tiny_dit import tiny_sd3_config
    from tiny_flow_pipeline import JOINT, _randomise, _t5, _t5_tokenizer, _vae
    from tiny_pipeline import _text_encoder, _tokenizer
    width_l, width_g = 16, 24
    cfg = dict(tiny_sd3_config("sd3"), joint_attention_dim=JOINT, pooled_projection_dim=width_l + width_g)
    clip_l = _text_encoder(width_l, width_l, seed=seed + 2)
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(width_l))
    tok3 = _t5_tokenizer(folder.parent / (folder.name + "-spm"))
    pipe = StableDiffusion3Pipeline(
        transformer=_randomise(SD3Transformer2DModel(**cfg), seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed + 1, 0.0609, 1.5305), text_encoder=clip_l, tokenizer=_tokenizer(),
        text_encoder_2=_text_encoder(width_g, width_g, seed=seed + 3), tokenizer_2=_tokenizer(pad_token="!"),
        text_encoder_3=_t5(len(tok3), seed + 5), tokenizer_3=tok3)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny SD3 folder, its diffusers pipeline, and single files written from it."""
    root = tmp_path_factory.mktemp("sd3file")
    folder = root / "sd3"
    pipe = save_sd3_for_single_files(folder)
    files = {"full": write_single_file(root / "sd3_full.safetensors", pipe),
             "incl_clips": write_single_file(root / "sd3_incl_clips.safetensors", pipe, t5=False),
             "transformer": write_single_file(root / "sd3_transformer.safetensors", pipe, t5=False, clips=False,
                                              vae=False)}
    return {"folder": folder, "pipe": pipe, "root": root, **files}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def generate_both(ours, ref, hw=(4, 6), seed=0):
    z = torch.randn(2, 4, *hw, generator=torch.Generator().manual_seed(seed))
    mine = generate_flow(ours, PROMPTS, num_steps=3, guidance_scale=4.5, negative_prompts=["red", ""], latents=z)
    with torch.no_grad():
        want = ref(prompt=PROMPTS, negative_prompt=["red", ""], num_inference_steps=3, guidance_scale=4.5,
                   latents=z.clone(), height=hw[0] * 8, width=hw[1] * 8, output_type="latent").images
    assert rel(want, z) > 1e-2                               # the chain moved the latents
    return mine, want


# ------------------------------------------------------------------ parity

@pytest.mark.parametrize("name", ["full", "incl_clips"])
def test_all_in_one_file_equals_diffusers_folder(made, name):
    pipe = load_pipeline(made[name], config=made["folder"])
    assert isinstance(pipe, FlowPipeline) and pipe.kind == "sd3"
    assert (pipe.text_encoder_3 is None) == (name == "incl_clips") == (pipe.tokenizer_3 is None)
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == pytest.approx((0.0609, 1.5305))
    extra = dict(text_encoder_3=None, tokenizer_3=None) if name == "incl_clips" else {}
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(made["folder"], **extra)
    mine, want = generate_both(pipe, ref)
    print(f"\n{name}: rel err vs the folder {rel(mine, want):.2e}")
    assert rel(mine, want) < 1e-5, rel(mine, want)


@pytest.mark.parametrize("name", ["full", "incl_clips"])
def test_equals_diffusers_from_single_file(made, name, tmp_path):
    """diffusers' own single-file loader, offline with the local folder as its config, agrees.

    diffusers 0.42 with transformers 5 leaves T5's `encoder.embed_tokens` on the meta device when the
    file holds `shared.weight` alone, so the file given to both here also holds the copy."""
    extra = dict(text_encoder_3=None, tokenizer_3=None) if name == "incl_clips" else {}
    f = write_single_file(tmp_path / "f.safetensors", made["pipe"], t5=name == "full", t5_embed_copy=True)
    ref = diffusers.StableDiffusion3Pipeline.from_single_file(str(f), config=str(made["folder"]),
                                                              local_files_only=True, **extra)
    pipe = load_pipeline(f, config=made["folder"])
    mine, want = generate_both(pipe, ref, hw=(4, 4), seed=1)
    assert rel(mine, want) < 1e-5, rel(mine, want)


def test_clip_l_projection_is_identity(made, tmp_path):
    """SD3 pools CLIP-L unprojected: a projection in the file is replaced by eye(width), as diffusers does."""
    w = made["pipe"].text_encoder.config.hidden_size
    f = write_single_file(tmp_path / "proj.safetensors", made["pipe"], t5=False, clip_l_projection=torch.randn(w, w))
    pipe = load_pipeline(f, config=made["folder"])
    assert torch.equal(pipe.text_encoder.text_projection.weight, torch.eye(w))


@pytest.mark.parametrize("vae", [False, True])
def test_file_without_text_encoders_takes_them_from_the_folder(made, tmp_path, vae):
    """Transformer-only files, and MMDiT + VAE files such as sd3_medium.safetensors."""
    f = made["transformer"] if not vae else write_single_file(tmp_path / "tv.safetensors", made["pipe"], t5=False,
                                                               clips=False)
    pipe = load_pipeline(f, config=made["folder"])
    assert pipe.text_encoder_3 is not None                   # the folder lists T5: it is loaded from there
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(made["folder"])
    mine, want = generate_both(pipe, ref, hw=(6, 4), seed=2)
    assert rel(mine, want) < 1e-5, rel(mine, want)


def test_flux_bfl_file_with_folder(tmp_path):
    from tiny_flow_pipeline import save_flux
    folder = save_flux(tmp_path / "dev", kind="dev")
    ref = diffusers.FluxPipeline.from_pretrained(folder)
    tr = ref.transformer
    f = tmp_path / "flux1-dev.safetensors"
    save_file({k: v.contiguous() for k, v in
               flux_original(tr.state_dict(), tr.config.num_layers, tr.config.num_single_layers).items()}, str(f))
    pipe = load_pipeline(f, config=folder)
    assert pipe.kind == "flux" and pipe.guidance_embeds
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    mine = generate_flow(pipe, PROMPTS, num_steps=3, guidance_scale=3.5, latents=z)
    with torch.no_grad():
        want = ref(prompt=PROMPTS, num_inference_steps=3, guidance_scale=3.5, latents=pack_latents(z),
                   max_sequence_length=pipe.sequence_length, height=32, width=32, output_type="latent").images
    want = unpack_latents(want, 4, 4)
    assert rel(mine, want) < 1e-5, rel(mine, want)


# ------------------------------------------------------------------ configs read off the shapes

def test_configs_inferred_from_full_size_shapes():
    """With no reference configs, the full-size SD3 VAE, CLIP-L/G and T5-XXL key sets give their released configs."""
    from renoise.models.clip import CLIPTextModel, clip_config
    from renoise.models.configs import vae_config
    from renoise.models.flow_single_file import _clip_config, infer_t5_config, infer_vae_config
    from renoise.models.single_file import vae_to_ldm
    from renoise.models.t5 import T5Config, T5EncoderModel
    from renoise.models.vae import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(vae_config("sd3"))
        t5 = T5EncoderModel(T5Config())
        bigg = CLIPTextModel(clip_config("openclip-bigg"))
        clip_l = CLIPTextModel(clip_config("clip-l"))
    ldm = {k: tuple(v.shape) for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}
    assert infer_vae_config(ldm, vae_config("sd3")) == vae_config("sd3")
    assert infer_t5_config({k: tuple(v.shape) for k, v in t5.state_dict().items()}) == T5Config()
    assert _clip_config("clip_g", {k: tuple(v.shape) for k, v in bigg.state_dict().items()}, None, "sd3")[0] == \
        clip_config("openclip-bigg")
    assert _clip_config("clip_l", {k: tuple(v.shape) for k, v in clip_l.state_dict().items()}, None, "sd3")[0] == \
        clip_config("clip-l", with_projection=True)


# ------------------------------------------------------------------ errors

def test_offline_without_reference_names_what_to_pass(made, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config=.*stabilityai/stable-diffusion-3-medium-diffusers") as e:
        load_pipeline(made["full"], cache_dir=tmp_path / "empty-cache", local_files_only=True)
    assert "tokenizers" in str(e.value)
    with pytest.raises(FileNotFoundError, match="holds no tokenizers, vae, clip_l, clip_g, t5"):
        load_pipeline(made["transformer"], cache_dir=tmp_path / "empty-cache", local_files_only=True)


def test_reference_without_tokenizers_or_components(made, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(made["folder"], bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(FileNotFoundError, match="carries no tokenizers; tokenizer/ .*config="):
        load_pipeline(made["incl_clips"], config=bare)
    pipe = load_pipeline(made["incl_clips"], config=bare, tokenizer=made["folder"])   # tokenizers apart: fine
    assert pipe.tokenizer is not None
    novae = tmp_path / "novae"
    shutil.copytree(made["folder"], novae, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(FileNotFoundError, match="holds no VAE"):
        load_pipeline(made["transformer"], config=novae)


def _corrupt(src, dst, edit):
    from safetensors.torch import load_file
    sd = load_file(str(src))
    edit(sd)
    save_file(sd, str(dst))
    return dst


def test_bad_files_give_clear_errors(made, tmp_path):
    folder = made["folder"]
    extra = _corrupt(made["incl_clips"], tmp_path / "extra.safetensors",
                     lambda sd: sd.update({"cond_stage_model.transformer.x.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match="no known prefix.*cond_stage_model"):
        load_pipeline(extra, config=folder)
    clip = _corrupt(made["incl_clips"], tmp_path / "clip.safetensors",
                    lambda sd: sd.pop("text_encoders.clip_g.transformer.text_model.final_layer_norm.weight"))
    with pytest.raises(CheckpointError, match=r"(?s)clip_g.*final_layer_norm"):
        load_pipeline(clip, config=folder)
    vae = _corrupt(made["incl_clips"], tmp_path / "vae.safetensors",
                   lambda sd: sd.update({"first_stage_model.decoder.conv_in.weight":
                                         sd["first_stage_model.decoder.conv_in.weight"][:, :2].clone()}))
    with pytest.raises(CheckpointError, match=r"(?s)first_stage_model.*decoder.conv_in"):
        load_pipeline(vae, config=folder)
    t5 = _corrupt(made["full"], tmp_path / "t5.safetensors",
                  lambda sd: sd.pop("text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight"))
    with pytest.raises(CheckpointError, match=r"(?s)t5xxl.*final_layer_norm"):
        load_pipeline(t5, config=folder)
    tr = _corrupt(made["incl_clips"], tmp_path / "tr.safetensors",
                  lambda sd: sd.update({"model.diffusion_model.joint_blocks.0.x_block.bogus.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match="bogus"):
        load_pipeline(tr, config=folder)
    diff = tmp_path / "diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in made["pipe"].transformer.state_dict().items()}, str(diff))
    with pytest.raises(CheckpointError, match="diffusers-layout"):
        load_pipeline(diff, config=folder)
    from renoise.models.single_file import UnknownCheckpointError, load_single_file
    with pytest.raises(UnknownCheckpointError, match="load_pipeline"):      # the SD/SDXL loader points the way
        load_single_file(made["incl_clips"])


# ------------------------------------------------------------------ the CLI

def test_cli_model_takes_an_sd3_single_file(made, tmp_path, capsys):
    from PIL import Image

    from renoise.__main__ import main
    with pytest.raises(SystemExit):
        main(["reconstruct", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "SD3/3.5 single file" in text and "FLUX.1" in text and "--config" in text
    img = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "out"
    assert main(["reconstruct", "--model", str(made["incl_clips"]), "--config", str(made["folder"]),
                 "--image", str(img), "--prompt", "a cat", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "sd3" and report["preset"] == "sd3-medium"


# ------------------------------------------------------------------ hub ids, half precision

def test_hub_reference_fetches_only_what_the_file_lacks(made, tmp_path, monkeypatch):
    from tiny_models import FakeHub
    repo = "stabilityai/stable-diffusion-3-medium-diffusers"
    hub = FakeHub({repo: made["folder"]}, tmp_path / "cache").install(monkeypatch)
    pipe = load_pipeline(made["full"])                        # no config=: the released model's repo, online
    assert pipe.text_encoder_3 is not None and pipe.tokenizer_3 is not None
    assert hub.fetched and not any(n.endswith(".safetensors") for n in hub.fetched), hub.fetched
    assert {n.split("/")[0] for n in hub.fetched} >= {"tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"}
    hub.fetched.clear()
    load_pipeline(made["transformer"], config=repo)           # transformer-only: VAE and encoders from the hub
    weights = sorted(n for n in hub.fetched if n.endswith(".safetensors"))
    assert weights == ["text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                       "text_encoder_3/model.safetensors", "vae/diffusion_pytorch_model.safetensors"], weights


def test_half_precision_load(made):
    pipe = load_pipeline(made["full"], config=made["folder"], dtype=torch.bfloat16)
    for name, module in pipe.modules().items():
        dtypes = {p.dtype for n, p in module.named_parameters() if not n.endswith("DenseReluDense.wo.weight")}
        assert dtypes == {torch.bfloat16}, (name, dtypes)
    wo = pipe.text_encoder_3.state_dict()["encoder.block.0.layer.1.DenseReluDense.wo.weight"]
    assert wo.dtype == torch.float32                          # T5's wo stays fp32 (transformers' rule)
    ref = made["pipe"].text_encoder_3.state_dict()
    assert torch.equal(wo, ref["encoder.block.0.layer.1.DenseReluDense.wo.weight"])
