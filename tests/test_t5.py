"""The T5 v1.1 encoder against transformers' T5EncoderModel (test oracle) on tiny random configs."""
import json

import pytest
import torch

from renoise.models.t5 import T5Config, T5EncoderModel, load_t5_encoder, relative_position_bucket, t5_config

transformers = pytest.importorskip("transformers")


def _tiny(tmp_path, max_distance=128, shards=True, seed=0):
    """A tiny random T5EncoderModel saved by transformers (sharded safetensors); returns (model, folder)."""
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                                relative_attention_max_distance=max_distance, dropout_rate=0.0)
    ref = transformers.T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
        ref.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0, 2.0)
    folder = tmp_path / f"t5-{max_distance}"
    ref.save_pretrained(folder, max_shard_size="20KB" if shards else "5GB")
    return ref, folder


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_bucket_matches_transformers():
    rp = torch.arange(-300, 301)[None]
    from transformers.models.t5.modeling_t5 import T5Attention
    for nb, md in ((32, 128), (32, 20), (16, 40)):
        expected = T5Attention._relative_position_bucket(rp, bidirectional=True, num_buckets=nb, max_distance=md)
        assert torch.equal(relative_position_bucket(rp, nb, md), expected)


@pytest.mark.parametrize("max_distance", [128, 20])
def test_parity_fp32_with_padding(tmp_path, max_distance):
    ref, folder = _tiny(tmp_path, max_distance)
    assert len(list(folder.glob("model-*.safetensors"))) > 1          # really sharded
    ours = load_t5_encoder(folder)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (3, 150), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0
    mask[2, 7:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        for m in (None, mask):
            expected = ref(input_ids=ids, attention_mask=m).last_hidden_state
            got = ours(ids, m)
            assert got.shape == expected.shape == (3, 150, 32)
            assert rel(got, expected) < 1e-5, rel(got, expected)
        # short, unpadded input: the exact-distance buckets only
        assert rel(ours(ids[:, :5]), ref(input_ids=ids[:, :5]).last_hidden_state) < 1e-5


def test_fp16_keeps_wo_in_fp32(tmp_path):
    ref, folder = _tiny(tmp_path, shards=False)
    ours = load_t5_encoder(folder, dtype=torch.float16)
    for name, p in ours.named_parameters():
        assert p.dtype == (torch.float32 if ".wo." in name else torch.float16), name
    ref16 = transformers.T5EncoderModel.from_pretrained(folder, dtype=torch.float16).eval()
    assert ref16.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, expected = ours(ids), ref16(input_ids=ids).last_hidden_state
    assert got.dtype == expected.dtype == torch.float16
    assert rel(got, expected) < 2e-3
    with torch.no_grad():
        assert rel(got, ref(input_ids=ids).last_hidden_state) < 5e-3      # and near the fp32 answer


def test_strict_loading_and_config_errors(tmp_path):
    _, folder = _tiny(tmp_path, shards=False)
    from safetensors.torch import load_file, save_file
    sd = load_file(folder / "model.safetensors")
    # a checkpoint with both tied names loads; one with a missing or extra key is refused by name
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    both = dict(sd)
    both["encoder.embed_tokens.weight"] = both.get("shared.weight", both.get("encoder.embed_tokens.weight")).clone()
    both["shared.weight"] = both["encoder.embed_tokens.weight"]
    save_file({k: v.contiguous().clone() for k, v in both.items()}, bad / "model.safetensors")
    m = load_t5_encoder(bad)
    assert m.encoder.embed_tokens is m.shared
    missing = {k: v for k, v in both.items() if "block.1.layer.1.DenseReluDense.wi_0" not in k}
    save_file({k: v.contiguous().clone() for k, v in missing.items()}, bad / "model.safetensors")
    with pytest.raises(Exception, match="wi_0"):
        load_t5_encoder(bad)
    extra = dict(both, **{"decoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(32, 32)})
    save_file({k: v.contiguous().clone() for k, v in extra.items()}, bad / "model.safetensors")
    with pytest.raises(Exception, match="decoder"):
        load_t5_encoder(bad)
    cfg = json.loads((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="gated"):
        T5Config.from_dict({**cfg, "feed_forward_proj": "relu"})
    with pytest.raises(FileNotFoundError, match="text_encoder_3"):
        load_t5_encoder(tmp_path)


def test_pipeline_subfolder_and_xxl_layout(tmp_path):
    ref, folder = _tiny(tmp_path, shards=False)
    pipe = tmp_path / "pipe"
    ref.save_pretrained(pipe / "text_encoder_3")
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel(load_t5_encoder(pipe, subfolder="text_encoder_3")(ids), ref(input_ids=ids).last_hidden_state) < 1e-5
    # T5-XXL's key set and shapes, on the meta device, equal transformers'
    xxl = t5_config()
    with torch.device("meta"):
        ours = T5EncoderModel(xxl)
        theirs = transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            feed_forward_proj="gated-gelu"))
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert a == b
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_hub_ids_fetch_only_what_is_read(tmp_path, monkeypatch):
    from tiny_models import FakeHub
    ref, folder = _tiny(tmp_path, shards=False)
    pipe = tmp_path / "pipe"
    ref.save_pretrained(pipe / "text_encoder_2")
    half = transformers.T5EncoderModel.from_pretrained(folder, dtype=torch.float16)
    half.save_pretrained(pipe / "text_encoder_2", variant="fp16")
    (pipe / "text_encoder_2" / "pytorch_model.bin").write_bytes(b"not read")
    hub = FakeHub({"org/t5": folder, "org/flux": pipe}, tmp_path / "cache").install(monkeypatch)
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel(load_t5_encoder("org/t5")(ids), ref(input_ids=ids).last_hidden_state) < 1e-5
        enc = load_t5_encoder("org/flux", subfolder="text_encoder_2", dtype=torch.float16)
    assert sorted(hub.fetched) == ["config.json", "model.safetensors", "text_encoder_2/config.json",
                                   "text_encoder_2/model.fp16.safetensors"]
    assert enc.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
