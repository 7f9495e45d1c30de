"""Our CLIP text encoders against transformers on the same random weights (saved, then loaded)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from renoise.models import clip as ours  # noqa: E402

VOCAB = 64  # real-style ids: BOS = VOCAB-2, EOS = VOCAB-1 (the largest id, like 49406/49407)


def _hf_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=77, projection_dim=24,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)  # the legacy ids of SD configs
    base.update(kw)
    return transformers.CLIPTextConfig(**base)


def _ids(gen, batch=3, length=77):
    """BOS, random words, EOS at different positions, then padding (EOS or "!"-like id 0)."""
    ids = torch.randint(3, VOCAB - 2, (batch, length), generator=gen)
    ids[:, 0] = VOCAB - 2
    for b, end in enumerate([5, 40, 76][:batch]):
        ids[b, end] = VOCAB - 1
        ids[b, end + 1:] = VOCAB - 1 if b % 2 == 0 else 0
    return ids


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("act,cls", [("quick_gelu", "CLIPTextModel"), ("gelu", "CLIPTextModel"),
                                     ("gelu", "CLIPTextModelWithProjection")])
def test_parity_with_transformers(tmp_path, act, cls):
    torch.manual_seed(0)
    ref = getattr(transformers, cls)(_hf_config(hidden_act=act)).eval()
    ref.save_pretrained(tmp_path / "text_encoder")
    model = ours.load_text_encoder(tmp_path, subfolder="text_encoder")
    assert model.config.with_projection == (cls == "CLIPTextModelWithProjection")
    ids = _ids(torch.Generator().manual_seed(1))
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        o = model(ids)
    assert len(o.hidden_states) == len(r.hidden_states) == 4
    assert _rel(o.last_hidden_state, r.last_hidden_state) < 1e-5
    assert _rel(o.hidden_states[-2], r.hidden_states[-2]) < 1e-5
    for mine, theirs in zip(o.hidden_states, r.hidden_states):
        assert _rel(mine, theirs) < 1e-5
    if cls == "CLIPTextModel":
        assert _rel(o.pooled, r.pooler_output) < 1e-5
        assert o.text_embeds is None
    else:
        assert _rel(o.text_embeds, r.text_embeds) < 1e-5
        pooled = r.last_hidden_state[torch.arange(3), ids.argmax(-1)]
        assert _rel(o.pooled, pooled) < 1e-5


def test_clip_skip_matches_diffusers_convention(tmp_path):
    """clip_skip=k: final LN of hidden_states[-(k+1)] of the full model (diffusers' SD pipelines)."""
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(_hf_config()).eval()
    ref.save_pretrained(tmp_path)
    model = ours.load_text_encoder(tmp_path, subfolder=None)
    ids = _ids(torch.Generator().manual_seed(2))
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        o = model(ids, clip_skip=1)
        expected = ref.final_layer_norm(r.hidden_states[-2])
    assert len(o.hidden_states) == 3
    assert _rel(o.last_hidden_state, expected) < 1e-5
    with pytest.raises(ValueError, match="clip_skip"):
        model(ids, clip_skip=3)


def test_legacy_prefixed_keys_and_dtype(tmp_path):
    """v4-style files (`text_model.*` + position_ids buffer) load too, into the requested dtype."""
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(_hf_config()).eval()
    sd = {"text_model." + k: v for k, v in ref.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    model = ours.text_encoder_from_state_dict(ours.CLIPTextConfig.from_dict(ref.config.to_dict()), sd,
                                              dtype=torch.float64)
    assert model.dtype == torch.float64
    ids = _ids(torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _rel(model(ids).last_hidden_state.float(), ref(ids).last_hidden_state) < 1e-5


def test_errors_name_the_problem(tmp_path):
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(_hf_config())
    config = ours.CLIPTextConfig.from_dict(ref.config.to_dict())
    sd = dict(ref.state_dict())
    sd.pop("encoder.layers.0.mlp.fc1.weight")
    with pytest.raises(ValueError, match="missing keys: .*layers.0.mlp.fc1.weight"):
        ours.text_encoder_from_state_dict(config, sd)
    bad = ours.CLIPTextConfig.from_dict({**ref.config.to_dict(), "intermediate_size": 40})
    with pytest.raises(ValueError, match="shape mismatches: .*fc1.weight"):
        ours.text_encoder_from_state_dict(bad, ref.state_dict())
    with pytest.raises(ValueError, match="hidden_act"):
        ours.CLIPTextConfig.from_dict({"hidden_act": "relu6"})
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(FileNotFoundError):
        ours.load_text_encoder(tmp_path)
    ref.save_pretrained(tmp_path / "edited")
    config = tmp_path / "edited" / "config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 3', '"num_hidden_layers": 4'))
    with pytest.raises(ValueError, match="(?s)model.safetensors.*16 missing keys: .*layers.3"):
        ours.load_text_encoder(tmp_path / "edited", subfolder=None)


def test_known_configs():
    assert ours.clip_config("openclip-h").num_hidden_layers == 23
    big = ours.clip_config("openclip-bigg")
    assert big.with_projection and big.projection_dim == 1280 and big.hidden_act == "gelu"
    with pytest.raises(ValueError, match="unknown text encoder"):
        ours.clip_config("t5")
