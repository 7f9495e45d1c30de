"""Loading: sharded and variant files, hub ids from a local cache, pickle opt-in, strict checks,
clear errors, and weights created on the meta device (no random init, no second copy)."""
import json
import shutil

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file, save_file
from torch import nn

from renoise.models import load_state_dict, load_unet, load_vae
from renoise.models.configs import UnsupportedConfigError
from renoise.models.loading import CheckpointError, find_weights, read_safetensors, safetensors_header
from tiny_models import FakeHub, make_cache, save_tiny_unet, save_tiny_vae, unet_inputs


WEIGHTS = "diffusion_pytorch_model.safetensors"


def assert_same_weights(ours, ref, dtype=torch.float32):
    theirs = ref.state_dict()
    mine = ours.state_dict()
    assert sorted(mine) == sorted(theirs)
    for k, v in mine.items():
        assert v.dtype == dtype and torch.equal(v, theirs[k].to(dtype)), k


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1")
    return path, save_tiny_unet(path, "sd1")


def test_sharded_checkpoint_with_index(tmp_path):
    ref = save_tiny_unet(tmp_path, "sdxl", max_shard_size="300KB")
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file() and not (tmp_path / WEIGHTS).exists()
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 2
    assert find_weights(tmp_path) == index
    assert_same_weights(load_unet(tmp_path), ref)


def test_sharded_fp16_variant(tmp_path):
    ref = save_tiny_unet(tmp_path, "sd1", max_shard_size="300KB", variant="fp16", dtype=torch.float16)
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert_same_weights(load_unet(tmp_path, variant="fp16", dtype=torch.float16), ref, torch.float16)


def test_pipeline_folder_and_subfolders(tmp_path):
    unet_ref = save_tiny_unet(tmp_path / "unet", "sd1")
    vae_ref = save_tiny_vae(tmp_path / "vae", "sd")
    assert_same_weights(load_unet(tmp_path), unet_ref)
    assert_same_weights(load_vae(tmp_path), vae_ref)
    assert_same_weights(load_unet(tmp_path / "unet"), unet_ref)      # the model folder itself


def test_bare_file_with_config(sd1):
    path, ref = sd1
    from renoise.models.configs import read_config
    assert_same_weights(load_unet(path / WEIGHTS, config=read_config(path / "config.json")), ref)
    with pytest.raises(ValueError, match="config="):
        load_unet(path / WEIGHTS)


# ---------------------------------------------------------------- hub ids, no network

def test_hub_id_from_offline_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ref = save_tiny_unet(tmp_path / "pipe" / "unet", "sdxl")
    save_tiny_unet(tmp_path / "pipe" / "unet", "sdxl", variant="fp16", dtype=torch.float16)
    vref = save_tiny_vae(tmp_path / "pipe" / "vae", "sdxl")
    make_cache(tmp_path / "cache", "tiny/sdxl", tmp_path / "pipe")

    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda **kw: calls.append(kw["allow_patterns"]) or real(**kw))
    ours = load_unet("tiny/sdxl", cache_dir=tmp_path / "cache")
    assert_same_weights(ours, ref)
    assert calls == [[], ["unet/config.json", f"unet/{WEIGHTS}"]]         # the cache's listing, then only what is needed
    for kw in ({"variant": "fp16"}, {}):                                   # half precision: fp16 files by default
        calls.clear()
        load_unet("tiny/sdxl", cache_dir=tmp_path / "cache", dtype=torch.float16, **kw)
        assert calls[1] == ["unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"]
    assert_same_weights(load_vae("tiny/sdxl", cache_dir=tmp_path / "cache"), vref)
    x, t, c, extra = unet_inputs("sdxl")
    with torch.no_grad():
        assert torch.isfinite(ours(x, t, c, **extra)).all()


def test_half_precision_reads_the_fp16_variant(tmp_path, monkeypatch):
    """variant=None: fp16/bf16 read the fp16 files (here other weights, to tell them apart), float32
    the default ones; online, only the file read is fetched, whatever else the repo holds."""
    ref = save_tiny_unet(tmp_path / "repo" / "unet", "sd1", seed=0)
    half = save_tiny_unet(tmp_path / "repo" / "unet", "sd1", seed=1, variant="fp16", dtype=torch.float16).half()
    ref.save_pretrained(tmp_path / "repo" / "unet", safe_serialization=False)         # a .bin copy too
    for dtype in (torch.float16, torch.bfloat16):
        assert_same_weights(load_unet(tmp_path / "repo", dtype=dtype), half, dtype)
    assert_same_weights(load_unet(tmp_path / "repo"), ref)
    assert_same_weights(load_unet(tmp_path / "repo", dtype=torch.float16, variant="fp16"), half, torch.float16)
    hub = FakeHub({"org/tiny": tmp_path / "repo"}, tmp_path / "cache").install(monkeypatch)
    load_unet("org/tiny", dtype=torch.float16, allow_pickle=True)
    assert hub.fetched == ["unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"]
    with pytest.raises(FileNotFoundError, match="could not access hub repo 'org/missing'"):
        load_unet("org/missing")


def test_load_progress_counts_the_bytes_read(tmp_path):
    """load_progress: each weights file adds its data bytes to the bar's total, each tensor its bytes."""
    from renoise.models.loading import load_progress

    class Bar:
        total, n, updates = None, 0, 0

        def update(self, k):
            self.n += k
            self.updates += 1

    save_tiny_unet(tmp_path, "sd1", max_shard_size="300KB")
    expected = sum(p.numel() * 4 for p in load_unet(tmp_path).state_dict().values())
    with load_progress(Bar()) as bar:
        load_unet(tmp_path, dtype=torch.float16)
    assert bar.total == bar.n == expected and bar.updates > 10
    load_unet(tmp_path)                                    # outside the block: nothing reported
    assert bar.n == expected


def test_hub_id_sharded_fetches_the_listed_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ref = save_tiny_unet(tmp_path / "pipe" / "unet", "sd1", max_shard_size="300KB")
    make_cache(tmp_path / "cache", "tiny/sharded", tmp_path / "pipe")
    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda **kw: calls.append(kw["allow_patterns"]) or real(**kw))
    assert_same_weights(load_unet("tiny/sharded", cache_dir=tmp_path / "cache"), ref)
    shards = sorted(p.name for p in (tmp_path / "pipe" / "unet").glob("*-of-*.safetensors"))
    assert len(calls) == 3 and sorted(calls[2]) == [f"unet/{s}" for s in shards]


def test_hub_id_of_a_single_model_repo(tmp_path, monkeypatch):
    """A repo holding one model at its root (e.g. a stand-alone VAE) loads with the default subfolder."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ref = save_tiny_vae(tmp_path / "vae-repo", "sdxl")
    make_cache(tmp_path / "cache", "tiny/vae", tmp_path / "vae-repo")
    assert_same_weights(load_vae("tiny/vae", cache_dir=tmp_path / "cache"), ref)


def test_hub_id_not_cached_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        load_unet("nobody/not-cached", cache_dir=tmp_path)


# ---------------------------------------------------------------- pickle

class NotATensor:
    pass


def test_pickle_refused_without_opt_in(tmp_path, sd1):
    _, ref = sd1
    ref.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_unet(tmp_path)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_state_dict(tmp_path / "diffusion_pytorch_model.bin")
    assert_same_weights(load_unet(tmp_path, allow_pickle=True), ref)


def test_pickle_read_with_weights_only(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}, "evil": NotATensor()}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_state_dict(tmp_path / "x.ckpt", allow_pickle=True)
    torch.save({"state_dict": {"w": torch.ones(2)}, "step": 3}, tmp_path / "y.ckpt")
    assert torch.equal(load_state_dict(tmp_path / "y.ckpt", allow_pickle=True)["w"], torch.ones(2))


# ---------------------------------------------------------------- strict checks, named errors

@pytest.fixture
def sd1_copy(tmp_path, sd1):
    path, _ = sd1
    shutil.copytree(path, tmp_path / "m")
    return tmp_path / "m"


def edit_weights(folder, fn):
    sd = load_file(folder / WEIGHTS)
    fn(sd)
    save_file(sd, folder / WEIGHTS)


def test_missing_key_named(sd1_copy):
    edit_weights(sd1_copy, lambda sd: sd.pop("mid_block.attentions.0.proj_in.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing keys: mid_block\.attentions\.0\.proj_in\.weight"):
        load_unet(sd1_copy)


def test_unexpected_key_named(sd1_copy):
    edit_weights(sd1_copy, lambda sd: sd.update({"down_blocks.0.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: down_blocks\.0\.extra\.weight"):
        load_unet(sd1_copy)


def test_misshaped_key_named(sd1_copy):
    edit_weights(sd1_copy, lambda sd: sd.update({"conv_in.weight": torch.zeros(32, 4, 1, 1)}))
    with pytest.raises(CheckpointError, match=r"conv_in\.weight: checkpoint \(32, 4, 1, 1\) vs model \(32, 4, 3, 3\)"):
        load_unet(sd1_copy)


def test_conv_weights_for_linear_projections_refused(tmp_path):
    """SD1-style [C, C, 1, 1] proj_in under an SD2-style (linear) config is a mismatch, not squeezed."""
    save_tiny_unet(tmp_path, "sd1")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, use_linear_projection=True)))
    with pytest.raises(CheckpointError, match=r"proj_in\.weight: checkpoint \(32, 32, 1, 1\) vs model \(32, 32\)"):
        load_unet(tmp_path)
    with pytest.raises(ValueError, match="floating torch.dtype"):
        load_unet(tmp_path, dtype="float16")


def test_config_that_does_not_match_weights(sd1_copy):
    cfg = json.loads((sd1_copy / "config.json").read_text())
    (sd1_copy / "config.json").write_text(json.dumps(dict(cfg, cross_attention_dim=16)))
    with pytest.raises(CheckpointError, match=r"attn2\.to_k\.weight"):
        load_unet(sd1_copy)


def test_truncated_safetensors(sd1_copy):
    data = (sd1_copy / WEIGHTS).read_bytes()
    (sd1_copy / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_unet(sd1_copy)
    (sd1_copy / WEIGHTS).write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_unet(sd1_copy)


def test_folder_without_unet(tmp_path):
    save_tiny_vae(tmp_path / "vae", "sd")
    with pytest.raises(FileNotFoundError, match="no UNet in"):
        load_unet(tmp_path)
    with pytest.raises(FileNotFoundError, match="no UNet in"):
        load_unet(tmp_path / "vae")            # a VAE folder is not a UNet
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model weights"):
        load_unet(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a hub id"):
        load_unet(str(tmp_path / "does" / "not" / "exist"))


def test_unknown_architecture(sd1_copy):
    cfg = json.loads((sd1_copy / "config.json").read_text())
    (sd1_copy / "config.json").write_text(json.dumps(dict(cfg, mid_block_type="UNetMidBlock2DSimpleCrossAttn")))
    with pytest.raises(UnsupportedConfigError, match="mid_block_type"):
        load_unet(sd1_copy)
    with pytest.raises(UnsupportedConfigError, match="unknown UNet architecture"):
        load_unet(sd1_copy / WEIGHTS, config="sd9")


def test_missing_variant_hint(sd1_copy):
    with pytest.raises(CheckpointError, match="variant='fp16'"):
        load_unet(sd1_copy, variant="fp16")
    (sd1_copy / WEIGHTS).rename(sd1_copy / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(CheckpointError, match="pass variant='fp16'"):
        load_unet(sd1_copy)


# ---------------------------------------------------------------- no init, no second copy

def test_load_builds_on_meta_and_skips_init(sd1, monkeypatch):
    path, ref = sd1
    seen = []
    for cls in (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm):
        real = cls.reset_parameters
        monkeypatch.setattr(cls, "reset_parameters",
                            lambda self, real=real: seen.append(self.weight.device.type) or real(self))
    ours = load_unet(path, dtype=torch.float16)
    assert seen and set(seen) == {"meta"}         # every init ran on meta: no memory, no random numbers
    assert not any(p.is_meta for p in ours.parameters())
    assert all(p.dtype == torch.float16 and not p.requires_grad for p in ours.parameters())
    assert not ours.training


def test_tensors_read_straight_into_final_dtype(sd1):
    path, ref = sd1
    header = safetensors_header(path / WEIGHTS)
    sd = read_safetensors(path / WEIGHTS, dtype=torch.bfloat16, keys=["conv_in.weight"])
    assert list(sd) == ["conv_in.weight"] and sd["conv_in.weight"].dtype == torch.bfloat16
    assert list(sd["conv_in.weight"].shape) == header["conv_in.weight"]["shape"]
    assert torch.equal(sd["conv_in.weight"], ref.conv_in.weight.detach().bfloat16())
    full = read_safetensors(path / WEIGHTS)
    assert all(torch.equal(full[k], v) for k, v in load_file(path / WEIGHTS).items())
