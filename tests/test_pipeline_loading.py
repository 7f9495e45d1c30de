"""load_pipeline on tiny diffusers pipeline folders: every component equals the oracle's."""
import json

import pytest
import torch

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import tiny_models  # noqa: E402
import tiny_pipeline  # noqa: E402
from renoise.models import load_pipeline  # noqa: E402


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _check_components(pipe, folder, sdxl):
    import diffusers
    g = torch.Generator().manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10.0, 700.0])
    kw, extra = {}, {}
    if sdxl:
        pooled = torch.randn(2, tiny_pipeline.PROJECTION_2, generator=g)
        ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
        kw = dict(text_embeds=pooled, time_ids=ids)
        extra = dict(added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
    with torch.no_grad():
        assert _rel(pipe.unet(x, t, ctx, **kw), unet(x, t, ctx, **extra).sample) < 1e-5
        img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
        mean, _ = pipe.vae.encode(img)
        assert _rel(mean, vae.encode(img).latent_dist.mean) < 1e-5
    ref_tok = transformers.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    prompts = ["a photo of a cat", "tiger, dog!! 12"]
    ids = ref_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(pipe.tokenizer(prompts), ids)
    ref_te = transformers.CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    with torch.no_grad():
        assert _rel(pipe.text_encoder(ids).hidden_states[-2],
                    ref_te(ids, output_hidden_states=True).hidden_states[-2]) < 1e-5
    if sdxl:
        ref_tok2 = transformers.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
        ids2 = ref_tok2(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(pipe.tokenizer_2(prompts), ids2)
        assert pipe.tokenizer_2.pad_token_id == 0 != pipe.tokenizer.pad_token_id
        ref_te2 = transformers.CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2").eval()
        with torch.no_grad():
            assert _rel(pipe.text_encoder_2(ids2).text_embeds, ref_te2(ids2).text_embeds) < 1e-5


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_pipeline.save_sd(tmp_path_factory.mktemp("pipes") / "sd")


def test_sd_folder(sd_folder):
    folder = sd_folder
    pipe = load_pipeline(folder)
    assert pipe.kind == "sd" and pipe.text_encoder_2 is None and pipe.tokenizer_2 is None
    assert pipe.force_zeros_for_empty_prompt is False
    assert pipe.scheduler_config == json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert pipe.prediction_type == "epsilon"
    _check_components(pipe, folder, sdxl=False)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return tiny_pipeline.save_sdxl(tmp_path_factory.mktemp("pipes") / "sdxl")


def test_sdxl_folder(sdxl_folder):
    """As StableDiffusionXLPipeline.save_pretrained writes it (transformers 5: no vocab.json/merges.txt)."""
    folder = sdxl_folder
    for sub in ("tokenizer", "tokenizer_2"):
        assert sorted(p.name for p in (folder / sub).iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    pipe = load_pipeline(folder, dtype=torch.float32)
    assert pipe.kind == "sdxl" and pipe.force_zeros_for_empty_prompt is True
    assert pipe.scheduler_config["_class_name"] == "EulerAncestralDiscreteScheduler"
    _check_components(pipe, folder, sdxl=True)
    half = load_pipeline(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for m in half.modules().values() for p in m.parameters())


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_pipeline(tmp_path / "nothing" / "here")
    with pytest.raises(ValueError, match="single-file"):
        load_pipeline(tmp_path, config=tmp_path)


def test_hub_id_from_offline_cache(tmp_path, monkeypatch, sdxl_folder):
    """A hub id resolves through the local Hugging Face cache, fetching only the needed files."""
    import huggingface_hub
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = sdxl_folder
    snap = tiny_models.make_cache(tmp_path / "cache", "tiny/sdxl", folder)
    (snap / "unet" / "unused.bin").write_bytes(b"not needed")
    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda **kw: calls.append(kw["allow_patterns"]) or real(**kw))
    pipe = load_pipeline("tiny/sdxl", cache_dir=tmp_path / "cache")
    local = load_pipeline(folder)
    assert pipe.kind == "sdxl" and pipe.scheduler_config == local.scheduler_config
    for name, module in local.modules().items():
        theirs = pipe.modules()[name].state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in module.state_dict().items()), name
    assert torch.equal(pipe.tokenizer_2(["a cat"]), local.tokenizer_2(["a cat"]))
    patterns = [p for c in calls for p in c]
    assert "tokenizer_2/tokenizer.json" in patterns and not any(p.endswith(".bin") for p in patterns)
    with pytest.raises(FileNotFoundError, match="not-cached"):
        load_pipeline("nobody/not-cached", cache_dir=tmp_path / "cache")


def test_hub_fetches_only_what_runs(tmp_path, monkeypatch, sdxl_folder):
    """An online repo with fp16 and fp32 safetensors, .bin copies, an unused component and a
    single-file checkpoint: a half-precision load fetches the fp16 files (default ones where a
    component has none), a float32 load the default ones; never a .bin, never anything unused."""
    import shutil

    from safetensors.torch import load_file, save_file
    remote = tmp_path / "remote"
    shutil.copytree(sdxl_folder, remote)
    components = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                  "text_encoder_2": "model"}
    for sub, base in components.items():
        sd = load_file(remote / sub / f"{base}.safetensors")
        torch.save(sd, remote / sub / f"{base}.bin")
        if sub != "text_encoder":                     # this one has no fp16 variant: its default files are read
            save_file({k: v.half() for k, v in sd.items()}, remote / sub / f"{base}.fp16.safetensors")
    (remote / "safety_checker").mkdir()
    (remote / "safety_checker" / "config.json").write_text("{}")
    (remote / "safety_checker" / "model.fp16.safetensors").write_bytes(b"unused")
    (remote / "tiny_sdxl_fp16.safetensors").write_bytes(b"unused")
    small = {"model_index.json", "scheduler/scheduler_config.json", *(f"{s}/config.json" for s in components),
             *(f"{t}/{f}" for t in ("tokenizer", "tokenizer_2") for f in ("tokenizer.json", "tokenizer_config.json"))}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        hub = tiny_models.FakeHub({"org/tiny-sdxl": remote}, tmp_path / f"cache-{dtype}").install(monkeypatch)
        pipe = load_pipeline("org/tiny-sdxl", dtype=dtype, allow_pickle=True)
        v = ".fp16" if dtype != torch.float32 else ""
        weights = {f"{s}/{b}{'' if s == 'text_encoder' else v}.safetensors" for s, b in components.items()}
        assert sorted(hub.fetched) == sorted(small | weights), dtype
        local = load_pipeline(remote, dtype=dtype)    # a local folder follows the same rule
        for name, module in local.modules().items():
            theirs = pipe.modules()[name].state_dict()
            assert all(torch.equal(t, theirs[k]) for k, t in module.state_dict().items()), (dtype, name)
    with pytest.raises(FileNotFoundError, match="could not access hub repo"):
        load_pipeline("org/missing", dtype=torch.float16)


def test_merge_lora_into_a_pipeline(sd_folder):
    """One kohya file with UNet and text-encoder keys; inplace=False gives a new Pipeline."""
    from renoise.models import merge_lora
    pipe = load_pipeline(sd_folder)
    g = torch.Generator().manual_seed(0)
    names = [n for n, _ in pipe.unet.named_modules()]
    to_k = next(n for n in names if n.endswith("attn2.to_k"))
    conv = next(n for n in names if n.startswith("up_blocks.") and n.endswith("resnets.0.conv1"))
    lora = {}
    for prefix, module, name in (("lora_unet_", pipe.unet, to_k), ("lora_unet_", pipe.unet, conv),
                                 ("lora_te_", pipe.text_encoder, "text_model.encoder.layers.1.mlp.fc1")):
        w = module.get_submodule(name).weight
        down = torch.randn(2, *w.shape[1:], generator=g)
        up = torch.randn(w.shape[0], 2, *([1, 1] if w.ndim == 4 else []), generator=g)
        key = prefix + name.replace(".", "_")
        lora.update({key + ".lora_down.weight": down, key + ".lora_up.weight": up, key + ".alpha": torch.tensor(1.0)})
    merged = merge_lora(pipe, lora, scale=0.5, inplace=False)
    assert merged is not pipe and merged.tokenizer is pipe.tokenizer and merged.vae is pipe.vae
    for prefix, name, comp in (("lora_unet_", conv, "unet"), ("lora_unet_", to_k, "unet"),
                               ("lora_te_", "text_model.encoder.layers.1.mlp.fc1", "text_encoder")):
        key = prefix + name.replace(".", "_")
        old = getattr(pipe, comp).get_submodule(name).weight
        new = getattr(merged, comp).get_submodule(name).weight
        up, down = lora[key + ".lora_up.weight"], lora[key + ".lora_down.weight"]
        expected = old + 0.5 * (1.0 / 2) * (up.flatten(1) @ down.flatten(1)).view(old.shape)
        assert torch.allclose(new, expected, atol=1e-6)
