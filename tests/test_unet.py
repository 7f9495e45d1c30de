"""Our UNet against diffusers' UNet2DConditionModel on the same random weights.

Tiny SD-1-, SD-2-, SDXL- and LCM-like configs are saved by diffusers' save_pretrained and read by
our load_unet; the full SD 1.5 / 2.1 / SDXL configs are compared on the meta device (keys, shapes).
"""
import pytest
import torch
from diffusers import UNet2DConditionModel

from renoise.models import UNet, UNetConfig, load_unet, unet_config
from renoise.models.blocks import Attention
from renoise.models.configs import UnsupportedConfigError
from tiny_models import save_tiny_unet, tiny_unet_config, unet_inputs


KINDS = ["sd1", "sd2", "sdxl", "lcm"]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def diffusers_call(ref, x, t, context, extra):
    kw = {}
    if "text_embeds" in extra:
        kw["added_cond_kwargs"] = {"text_embeds": extra["text_embeds"], "time_ids": extra["time_ids"]}
    if "timestep_cond" in extra:
        kw["timestep_cond"] = extra["timestep_cond"]
    return ref(x, t, context, **kw).sample


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """kind → (kind, folder, diffusers model): a tiny model saved in fp32, fp16 and bf16 variants."""
    cache = {}

    def get(kind):
        if kind not in cache:
            path = tmp_path_factory.mktemp(kind)
            ref = save_tiny_unet(path, kind, seed=KINDS.index(kind))
            save_tiny_unet(path, kind, seed=KINDS.index(kind), variant="fp16", dtype=torch.float16)
            save_tiny_unet(path, kind, seed=KINDS.index(kind), variant="bf16", dtype=torch.bfloat16)
            cache[kind] = kind, path, ref
        return cache[kind]
    return get


@pytest.fixture(params=KINDS)
def saved(request, store):
    return store(request.param)


@torch.no_grad()
def test_fp32_parity_cfg_batch_per_sample_timesteps(saved):
    kind, path, ref = saved
    ours = load_unet(path)
    x, t, context, extra = unet_inputs(kind, batch=2, seed=1)
    assert t[0] != t[1]
    out = ours(x, t, context, **extra)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert rel_err(out, diffusers_call(ref, x, t, context, extra)) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_scalar_timesteps(store, kind):
    kind, path, ref = store(kind)
    ours = load_unet(path)
    x, _, context, extra = unet_inputs(kind, batch=2, seed=2)
    for t in [999, 0, 417.5, torch.tensor(250), torch.tensor([31.25])]:
        assert rel_err(ours(x, t, context, **extra), diffusers_call(ref, x, t, context, extra)) < 1e-5, t


@torch.no_grad()
@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_odd_latent_size(store, kind):
    """Sizes not divisible by 2^levels: upsampling follows the skip connection's size."""
    kind, path, ref = store(kind)
    ours = load_unet(path)
    x, t, context, extra = unet_inputs(kind, batch=2, size=10, seed=3)
    x = x[..., :9, :10]
    assert rel_err(ours(x, t, context, **extra), diffusers_call(ref, x, t, context, extra)) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("variant,dtype,tol", [("fp16", torch.float16, 5e-3), ("bf16", torch.bfloat16, 3e-2)])
def test_half_variant_files(saved, variant, dtype, tol):
    kind, path, _ = saved
    ours = load_unet(path, variant=variant, dtype=dtype)
    ref = UNet2DConditionModel.from_pretrained(path, variant=variant, torch_dtype=dtype).eval()
    assert all(p.dtype == dtype for p in ours.parameters())
    theirs = ref.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    x, t, context, extra = unet_inputs(kind, batch=2, seed=4, dtype=dtype)
    out = ours(x, t, context, **extra)
    assert out.dtype == dtype
    assert rel_err(out, diffusers_call(ref, x, t, context, extra)) < tol


@torch.no_grad()
def test_fp16_file_loaded_as_fp32(saved):
    kind, path, _ = saved
    ours = load_unet(path, variant="fp16", dtype=torch.float32)
    ref = UNet2DConditionModel.from_pretrained(path, variant="fp16", torch_dtype=torch.float32).eval()
    x, t, context, extra = unet_inputs(kind, batch=2, seed=5)
    assert ours.dtype == torch.float32
    assert rel_err(ours(x, t, context, **extra), diffusers_call(ref, x, t, context, extra)) < 1e-5


def test_config_read_from_folder(saved):
    kind, path, ref = saved
    cfg = load_unet(path).config
    expect = tiny_unet_config(kind)
    assert cfg.block_out_channels == tuple(expect["block_out_channels"])
    assert cfg.cross_attention_dim == expect["cross_attention_dim"]
    assert cfg.time_cond_proj_dim == expect.get("time_cond_proj_dim")
    assert cfg.use_linear_projection == expect.get("use_linear_projection", False)
    with pytest.raises(Exception):          # frozen
        cfg.cross_attention_dim = 1


@torch.no_grad()
def test_input_errors(tmp_path):
    save_tiny_unet(tmp_path / "xl", "sdxl")
    save_tiny_unet(tmp_path / "sd1", "sd1")
    xl, sd1 = load_unet(tmp_path / "xl"), load_unet(tmp_path / "sd1")
    x, t, context, extra = unet_inputs("sdxl")
    with pytest.raises(ValueError, match="text_embeds"):
        xl(x, t, context)
    with pytest.raises(ValueError, match="context"):
        xl(x, t, context[..., :5], **extra)
    with pytest.raises(ValueError, match="timesteps for a batch"):
        xl(x, torch.tensor([1.0, 2.0, 3.0]), context, **extra)
    x, t, context, _ = unet_inputs("sd1")
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        sd1(x, t, context, timestep_cond=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="only used by SDXL"):
        sd1(x, t, context, text_embeds=torch.zeros(2, 32), time_ids=torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"x must be \[B, 4"):
        sd1(x[:, :3], t, context)


def test_attention_fp16_large_logits_stay_finite():
    """upcast_attention: half inputs whose q·k overflow fp16 still give a finite softmax."""
    attn = Attention(64, heads=2).half()
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k):
            lin.weight.copy_(torch.eye(64) * 40)
        attn.to_v.weight.copy_(torch.eye(64))
    x = torch.full((1, 4, 64), 8.0, dtype=torch.float16)     # q·k = 64 · 320² ≫ 65504
    assert torch.isfinite(attn(x)).all()


# ---------------------------------------------------------------- full-size configs on meta

SD15 = dict(block_out_channels=[320, 640, 1280, 1280],
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, layers_per_block=2,
            attention_head_dim=8, cross_attention_dim=768, sample_size=64)
SD21 = dict(SD15, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
            upcast_attention=True, sample_size=96)
SDXL = dict(block_out_channels=[320, 640, 1280], down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
            up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"], layers_per_block=2,
            attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, sample_size=128)


@pytest.mark.parametrize("name,cfg", [("sd15", SD15), ("sd21", SD21), ("sdxl-base", SDXL)])
def test_full_config_keys_and_shapes_match_diffusers(name, cfg):
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**cfg)
        ours = UNet(unet_config(name))
    t = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    o = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(o) == sorted(t)
    assert o == t
    assert all(p.is_meta for p in ours.parameters())
    assert UNetConfig.from_dict(dict(theirs.config)) == unet_config(name)


def test_known_configs_and_unknown_name():
    for name in ["sd14", "sd15", "sd21", "sd21-base", "sd-turbo", "sdxl-base", "sdxl-turbo"]:
        assert isinstance(unet_config(name), UNetConfig)
    assert unet_config("sdxl-turbo").sample_size == 64
    assert unet_config("sd21").num_heads == (5, 10, 20, 20)       # heads, not head size
    with pytest.raises(UnsupportedConfigError, match="known"):
        unet_config("sd3")
    with pytest.raises(UnsupportedConfigError, match="SimpleCrossAttnDownBlock2D"):
        UNetConfig.from_dict(dict(SD15, down_block_types=["SimpleCrossAttnDownBlock2D"] * 4))
    with pytest.raises(UnsupportedConfigError, match="class_embed_type"):
        UNetConfig.from_dict(dict(SD15, class_embed_type="timestep"))
    with pytest.raises(UnsupportedConfigError, match="UNet3DConditionModel"):
        UNetConfig.from_dict(dict(SD15, _class_name="UNet3DConditionModel"))
