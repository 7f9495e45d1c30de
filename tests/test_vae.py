"""Our AutoencoderKL against diffusers' on the same random weights (saved by diffusers, read by us)."""
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE

from renoise.models import AutoencoderKL, VAEConfig, load_vae, vae_config
from tiny_models import save_tiny_vae, tiny_vae_config


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, save_tiny_vae(path, request.param, seed=7)


def images(batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


@torch.no_grad()
def test_encode_moments_parity(saved):
    kind, path, ref = saved
    ours = load_vae(path)
    x = images(seed=1)
    dist = ref.encode(x).latent_dist
    mean, logvar = ours.encode(x)
    assert mean.shape == (2, 4, 8, 8)
    assert rel_err(mean, dist.mean) < 1e-5 and rel_err(logvar, dist.logvar) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 123])
def test_generator_sample_matches_diffusers(saved, seed):
    kind, path, ref = saved
    ours = load_vae(path)
    x = images(seed=2)
    want = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(seed)) * ref.config.scaling_factor
    got = ours.encode_latents(x, generator=torch.Generator().manual_seed(seed))
    assert rel_err(got, want) < 1e-5
    mean = ours.encode_latents(x, sample=False)
    assert rel_err(mean, ref.encode(x).latent_dist.mean * ref.config.scaling_factor) < 1e-5
    assert not torch.allclose(got, mean)


@torch.no_grad()
def test_decode_parity(saved):
    kind, path, ref = saved
    ours = load_vae(path)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert rel_err(ours.decode(z), ref.decode(z).sample) < 1e-5
    assert ours.scaling_factor == ref.config.scaling_factor and ours.shift_factor == 0.0
    assert rel_err(ours.decode_latents(z * ours.scaling_factor), ref.decode(z).sample) < 1e-5


@torch.no_grad()
def test_old_attention_names(tmp_path):
    ref = save_tiny_vae(tmp_path, "old", seed=9)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert any(k.endswith("attentions.0.query.weight") for k in keys)
        assert f.get_tensor("encoder.mid_block.attentions.0.query.weight").ndim == 4
    ours = load_vae(tmp_path)
    x = images(seed=4)
    assert rel_err(ours.encode(x)[0], ref.encode(x).latent_dist.mean) < 1e-5


@torch.no_grad()
def test_fp16_variant_loads(tmp_path):
    ref = save_tiny_vae(tmp_path, "sd", seed=5)
    save_tiny_vae(tmp_path, "sd", seed=5, variant="fp16", dtype=torch.float16)
    ours = load_vae(tmp_path, variant="fp16", dtype=torch.float16)
    assert ours.dtype == torch.float16
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = ours.decode(z.half())
    assert out.dtype == torch.float16
    assert rel_err(out, ref.decode(z).sample) < 2e-2


def _overflowing_vae(path, force_upcast):
    """A VAE whose conv_in activations exceed fp16's range (≈4e5) though its weights fit in fp16."""
    ref = save_tiny_vae(path, "sdxl", seed=6, force_upcast=force_upcast)
    with torch.no_grad():
        w = ref.encoder.conv_in.weight
        w.copy_(2e4 * (1 + 0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))))
    ref.save_pretrained(path)
    return ref


@torch.no_grad()
def test_force_upcast_runs_fp16_weights_in_fp32(tmp_path):
    ref = _overflowing_vae(tmp_path, force_upcast=True)
    ours = load_vae(tmp_path, dtype=torch.float16)
    assert ours.config.force_upcast and ours.dtype == torch.float16
    x = images(seed=8).abs()
    mean, logvar = ours.encode(x.half())
    assert mean.dtype == torch.float16 and torch.isfinite(mean).all()
    want = ref.to(torch.float16).float().encode(x).latent_dist.mean     # fp16-rounded weights, fp32 math
    assert rel_err(mean, want) < 2e-3


@torch.no_grad()
def test_fp16_overflow_without_upcast_raises(tmp_path):
    _overflowing_vae(tmp_path, force_upcast=False)
    ours = load_vae(tmp_path, dtype=torch.float16)
    with pytest.raises(ValueError, match="overflow"):
        ours.encode(images(seed=8).abs().half())


def test_errors_and_configs(tmp_path):
    save_tiny_vae(tmp_path, "sd")
    vae = load_vae(tmp_path)
    with pytest.raises(ValueError, match="generator"):
        vae.encode_latents(images())
    with pytest.raises(ValueError, match=r"images must be \[B, 3"):
        vae.encode(torch.zeros(1, 4, 16, 16))
    assert vae_config("sdxl-turbo").force_upcast and vae_config("sdxl-base").scaling_factor == 0.13025
    assert vae_config("sd15").scaling_factor == 0.18215 and not vae_config("sd15").force_upcast
    assert VAEConfig.from_dict(tiny_vae_config("sdxl")).force_upcast


def test_full_vae_keys_and_shapes_match_diffusers():
    with torch.device("meta"):
        theirs = DiffusersVAE(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                              latent_channels=4, norm_num_groups=32, sample_size=512)
        ours = AutoencoderKL(vae_config("sd15"))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
