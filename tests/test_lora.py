"""LoRA merging: each file format merged by us gives the UNet (and text encoder) output of
diffusers applying the same LoRA through peft."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import tiny_models  # noqa: E402
from renoise.models import load_unet  # noqa: E402
from renoise.models.lora import LoraError, merge_lora, parse_lora  # noqa: E402
from renoise.models.single_file import unet_to_ldm  # noqa: E402

# LCM-LoRA's target modules (FACTS.md §3)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
RANK, ALPHA = 4, 8.0


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def random_lora(model, seed=0, targets=TARGETS):
    """{module name: (down, up)} for every targeted Linear / Conv2d (down k×k, up 1×1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(targets):
            out[name] = (torch.randn(RANK, m.in_features, generator=g) * 0.2,
                         torch.randn(m.out_features, RANK, generator=g) * 0.2)
        elif isinstance(m, torch.nn.Conv2d) and name.endswith(targets):
            out[name] = (torch.randn(RANK, m.in_channels, *m.kernel_size, generator=g) * 0.2,
                         torch.randn(m.out_channels, RANK, 1, 1, generator=g) * 0.2)
    return out


def to_format(lora, fmt, config=None, prefix="lora_unet_"):
    sd = {}
    if fmt == "peft":   # no alpha keys: alpha = rank
        for n, (d, u) in lora.items():
            sd[f"unet.{n}.lora_A.weight"], sd[f"unet.{n}.lora_B.weight"] = d, u
        return sd
    names = {n: n for n in lora}
    if fmt == "kohya-sgm":
        names = {n: k[: -len(".weight")] for k, n in unet_to_ldm({n + ".weight": n for n in lora}, config).items()}
    for n, spelled in names.items():
        k = prefix + spelled.replace(".", "_")
        sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"] = lora[n]
        sd[k + ".alpha"] = torch.tensor(ALPHA)
    return sd


_FOLDERS = {}


def _folder(kind, tmp_path_factory):
    if kind not in _FOLDERS:
        _FOLDERS[kind] = tmp_path_factory.mktemp(kind)
        tiny_models.save_tiny_unet(_FOLDERS[kind], kind, seed=0)
    return _FOLDERS[kind]


@pytest.fixture
def sd1(tmp_path_factory):
    return "sd1", _folder("sd1", tmp_path_factory)


def _diffusers_with_lora(kind, sd, scale):
    ref = tiny_models.make_tiny_unet(kind, seed=0)
    cls = diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline
    converted, alphas = cls.lora_state_dict(dict(sd), unet_config=ref.config)  # it pops keys
    ref.load_lora_adapter(converted, network_alphas=alphas, prefix="unet", adapter_name="lora")
    ref.set_adapters(["lora"], weights=[scale])
    return ref


def _run(model, kind, ours):
    x, t, ctx, extra = tiny_models.unet_inputs(kind, seed=1)
    with torch.no_grad():
        if ours:
            return model(x, t, ctx, **extra)
        return model(x, t, ctx, **({"added_cond_kwargs": extra} if extra else {})).sample


@pytest.mark.parametrize("kind,fmt,scale", [("sd1", "peft", 1.0), ("sd1", "kohya", 0.7), ("sd1", "kohya-sgm", 1.0),
                                            ("sdxl", "kohya", 0.7), ("sdxl", "kohya-sgm", 1.3)])
def test_unet_lora_matches_diffusers(tmp_path_factory, kind, fmt, scale):
    folder = _folder(kind, tmp_path_factory)
    unet = load_unet(folder)
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    lora = random_lora(unet)
    assert len(lora) > 50
    sd = to_format(lora, fmt, unet.config)
    merged = merge_lora(unet, sd, scale=scale, inplace=False)
    assert all(torch.equal(v, original[k]) for k, v in unet.state_dict().items())   # target left alone
    # diffusers' SGM-name mapper sends output_blocks.{i}.1.conv to an attention even in levels without
    # one (SD 1.x's first up level), so there the oracle applies the same LoRA in diffusers names
    oracle_sd = to_format(lora, "kohya") if (fmt, kind) == ("kohya-sgm", "sd1") else sd
    expected = _run(_diffusers_with_lora(kind, oracle_sd, scale), kind, False)
    out = _run(merged, kind, True)
    # merged (W + ΔW) x against peft's unfused W x + up(down x): fp32 rounding only
    assert _rel(out, expected) < 3e-5
    assert _rel(out, _run(unet, kind, True)) > 1e-2                     # the LoRA changed something
    merge_lora(unet, sd, scale=scale)                                   # in place: the same weights
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in unet.state_dict().items())
    merge_lora(unet, sd, scale=scale, unmerge=True)
    assert all(torch.allclose(v, original[k], atol=1e-5) for k, v in unet.state_dict().items())


def test_half_precision_merge_is_done_in_fp32(sd1):
    kind, folder = sd1
    unet = load_unet(folder)
    lora = random_lora(unet)
    sd = to_format(lora, "kohya")
    half = load_unet(folder, dtype=torch.bfloat16)
    merge_lora(half, sd)
    merge_lora(unet, sd)
    name = next(iter(lora))
    w32 = unet.get_submodule(name).weight
    w16 = half.get_submodule(name).weight
    assert w16.dtype == torch.bfloat16
    assert _rel(w16.float(), w32) < 1e-2


def test_text_encoder_lora(tmp_path):
    """lora_te_ / lora_te1_ / lora_te2_ keys land in the text encoders of a pipeline-like dict."""
    from renoise.models import load_text_encoder
    cfg = transformers.CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, projection_dim=8, bos_token_id=0, eos_token_id=2,
                                      pad_token_id=1)  # legacy ids: argmax pooling, as ours
    torch.manual_seed(0)
    transformers.CLIPTextModel(cfg).save_pretrained(tmp_path / "te")
    transformers.CLIPTextModelWithProjection(cfg).save_pretrained(tmp_path / "te2")
    te = load_text_encoder(tmp_path / "te", subfolder=None)
    te2 = load_text_encoder(tmp_path / "te2", subfolder=None)
    targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    l1, l2 = random_lora(te, 1, targets), random_lora(te2, 2, targets)
    sd = {**to_format(l1, "kohya", prefix="lora_te1_"), **to_format(l2, "kohya", prefix="lora_te2_")}
    ids = torch.randint(0, 49, (2, 77), generator=torch.Generator().manual_seed(0))
    merged = merge_lora({"text_encoder": te, "text_encoder_2": te2}, sd, scale=0.5, inplace=False)
    # oracle: transformers models with the update written into their weights by name
    refs = {}
    for key, folder, lora, cls in (("text_encoder", "te", l1, transformers.CLIPTextModel),
                                   ("text_encoder_2", "te2", l2, transformers.CLIPTextModelWithProjection)):
        ref = cls.from_pretrained(tmp_path / folder).eval()
        root = ref if hasattr(ref, "text_model") else torch.nn.Module()
        if not hasattr(ref, "text_model"):
            root.text_model = ref       # transformers ≥ 5 flattens CLIPTextModel
        with torch.no_grad():
            for n, (d, u) in lora.items():
                root.get_submodule(n).weight += 0.5 * ALPHA / RANK * (u @ d)
        refs[key] = ref
    with torch.no_grad():
        assert _rel(merged["text_encoder"](ids).last_hidden_state, refs["text_encoder"](ids).last_hidden_state) < 1e-5
        assert _rel(merged["text_encoder_2"](ids).text_embeds, refs["text_encoder_2"](ids).text_embeds) < 1e-5
        assert _rel(merged["text_encoder"](ids).last_hidden_state, te(ids).last_hidden_state) > 1e-3
    with pytest.raises(LoraError, match="no text_encoder_2 in the target"):
        merge_lora({"text_encoder": te}, sd)


def test_errors_name_the_problem(sd1):
    kind, folder = sd1
    unet = load_unet(folder)
    lora = random_lora(unet)
    sd = to_format(lora, "kohya")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    bogus = {"lora_unet_not_a_module.lora_down.weight": torch.zeros(4, 8),
             "lora_unet_not_a_module.lora_up.weight": torch.zeros(8, 4)}
    with pytest.raises(LoraError, match="1 of 1 LoRA modules match no layer.*not_a_module"):
        merge_lora(unet, bogus)
    with pytest.raises(LoraError, match="1 of .* match no layer.*not_a_module"):
        merge_lora(unet, {**sd, **bogus})
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())  # nothing half-merged
    with pytest.raises(LoraError, match="no known format.*weird.key"):
        merge_lora(unet, {"weird.key": torch.zeros(1)})
    half = {k: v for k, v in sd.items() if not k.endswith("lora_up.weight")}
    with pytest.raises(LoraError, match="need both down and up"):
        merge_lora(unet, half)
    name = next(iter(lora))
    k = "lora_unet_" + name.replace(".", "_")
    wrong = {k + ".lora_down.weight": torch.zeros(4, 3), k + ".lora_up.weight": torch.zeros(5, 4)}
    with pytest.raises(LoraError, match="layer weight"):
        merge_lora(unet, wrong)
    with pytest.raises(LoraError, match="empty"):
        merge_lora(unet, {})


def test_parse_legacy_processor_keys():
    d, u = torch.zeros(2, 3), torch.zeros(3, 2)
    groups = parse_lora({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": d,
                         "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": u})
    assert list(groups) == [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0")]


def test_load_lora_from_file_folder_and_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from safetensors.torch import save_file
    from renoise.models import load_lora
    sd = {"lora_unet_conv_in.lora_down.weight": torch.randn(2, 4, 3, 3), "lora_unet_conv_in.lora_up.weight": torch.randn(8, 2, 1, 1)}
    (tmp_path / "repo").mkdir()
    save_file(sd, tmp_path / "repo" / "pytorch_lora_weights.safetensors")
    snap = tiny_models.make_cache(tmp_path / "cache", "org/lcm", tmp_path / "repo")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for source in (snap / "pytorch_lora_weights.safetensors", snap):
        assert all(torch.equal(v, sd[k]) for k, v in load_lora(source).items())
    got = load_lora("org/lcm", cache_dir=tmp_path / "cache")
    assert set(got) == set(sd)
    with pytest.raises(FileNotFoundError, match="org/other"):
        load_lora("org/other", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_lora(tmp_path / "missing.safetensors")
