"""The 16-channel VAE of SD3 / SD3.5 / FLUX.1 (shift_factor, no quant convs) against diffusers' AutoencoderKL."""
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE

from renoise.models import AutoencoderKL, VAEConfig, load_vae, vae_config
from renoise.models.loading import CheckpointError
from tiny_models import save_tiny_vae

FACTORS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _tiny(path, kind):
    scale, shift = FACTORS[kind]
    return save_tiny_vae(path, "sd", seed=11, latent_channels=16, scaling_factor=scale, shift_factor=shift,
                         use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)


@pytest.fixture(scope="module", params=sorted(FACTORS))
def saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, _tiny(path, request.param)


def images(batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


@torch.no_grad()
def test_encode_with_shift_factor(saved):
    kind, path, ref = saved
    ours = load_vae(path)
    assert ours.quant_conv is None and ours.post_quant_conv is None
    assert (ours.scaling_factor, ours.shift_factor) == FACTORS[kind]
    x = images(seed=1)
    dist = ref.encode(x).latent_dist
    mean, logvar = ours.encode(x)
    assert mean.shape == (2, 16, 8, 8)
    assert rel_err(mean, dist.mean) < 1e-5 and rel_err(logvar, dist.logvar) < 1e-5
    # what the SD3 / FLUX img2img pipelines do: (sample - shift_factor) * scaling_factor
    sf, sh = ref.config.scaling_factor, ref.config.shift_factor
    want = (dist.sample(generator=torch.Generator().manual_seed(5)) - sh) * sf
    assert rel_err(ours.encode_latents(x, generator=torch.Generator().manual_seed(5)), want) < 1e-5
    assert rel_err(ours.encode_latents(x, sample=False), (dist.mean - sh) * sf) < 1e-5


@torch.no_grad()
def test_decode_with_shift_factor(saved):
    kind, path, ref = saved
    ours = load_vae(path)
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    assert rel_err(ours.decode(z), ref.decode(z).sample) < 1e-5
    # what the pipelines do before decoding: latents / scaling_factor + shift_factor
    sf, sh = ref.config.scaling_factor, ref.config.shift_factor
    assert rel_err(ours.decode_latents(z), ref.decode(z / sf + sh).sample) < 1e-5
    assert rel_err(ours.decode_latents(ours.encode_latents(images(), sample=False)),
                   ref.decode(ref.encode(images()).latent_dist.mean).sample) < 1e-5


def test_quant_conv_mismatch_is_refused(tmp_path):
    _tiny(tmp_path, "sd3")
    with pytest.raises(CheckpointError, match="quant_conv"):
        load_vae(tmp_path, config=VAEConfig.from_dict({**_dict(tmp_path), "use_quant_conv": True}))


def _dict(path):
    import json
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("name,kind", [("sd3-medium", "sd3"), ("sd35-large", "sd3"), ("sd35-medium", "sd3"),
                                       ("flux-dev", "flux"), ("flux-schnell", "flux")])
def test_full_configs_keys_match_diffusers(name, kind):
    scale, shift = FACTORS[kind]
    cfg = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16,
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               norm_num_groups=32, sample_size=1024, scaling_factor=scale, shift_factor=shift, force_upcast=True,
               use_quant_conv=False, use_post_quant_conv=False)
    with torch.device("meta"):
        theirs = DiffusersVAE(**cfg)
        ours = AutoencoderKL(vae_config(name))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert VAEConfig.from_dict({"_class_name": "AutoencoderKL", **dict(theirs.config)}) == vae_config(name)
