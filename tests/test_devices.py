"""renoise.devices: "auto" device (CUDA, then MPS, then CPU) and dtype (fp16 / bf16 / fp32),
with the accelerators' availability mocked so that every branch runs on a CPU-only machine."""
import json

import pytest
import torch

from renoise import devices
from renoise.devices import model_dtype, resolve_device, resolve_dtype


@pytest.fixture
def machine(monkeypatch):
    """machine(cuda=..., mps=..., bf16=...) sets what this 'machine' has."""
    def set_(cuda=False, mps=False, bf16=True, count=1):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count if cuda else 0)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(devices, "_mps_available", lambda: mps)
    return set_


@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"),
                                               (False, False, "cpu")])
def test_auto_device_order(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device() == torch.device(expected)


def test_named_devices_and_errors(machine):
    machine(cuda=True, count=2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="2 CUDA device"):
        resolve_device("cuda:2")
    machine()
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="MPS is not available"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="device 'gpu'"):
        resolve_device("gpu")


def test_auto_dtype(machine):
    machine(cuda=True)
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cpu", torch.bfloat16) == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("auto", "cuda", torch.float32) == torch.float16
    assert resolve_dtype("auto", torch.device("cuda", 0), torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("auto", "mps") == torch.float16
    assert resolve_dtype("auto", "mps", torch.bfloat16) == torch.bfloat16
    machine(cuda=True, bf16=False)                       # e.g. a V100: no bf16, fp16 instead
    assert resolve_dtype("auto", "cuda", torch.bfloat16) == torch.float16
    assert resolve_dtype("float16", "cpu") == torch.float16 and resolve_dtype("bfloat16", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'int8'"):
        resolve_dtype("int8", "cpu")


def _pipeline_folder(root, **configs):
    for name, config in configs.items():
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config))
    return root


def test_model_dtype_from_component_configs(tmp_path, monkeypatch):
    bf16 = _pipeline_folder(tmp_path / "bf16", unet={"_class_name": "UNet2DConditionModel"},
                            text_encoder={"torch_dtype": "bfloat16"})
    v5 = _pipeline_folder(tmp_path / "v5", text_encoder_2={"dtype": "bfloat16"})        # transformers 5's key
    fp16 = _pipeline_folder(tmp_path / "fp16", text_encoder={"torch_dtype": "float16"}, vae={})
    assert model_dtype(bf16) == model_dtype(str(v5)) == torch.bfloat16
    assert model_dtype(fp16) is None and model_dtype(tmp_path / "missing") is None
    assert model_dtype(tmp_path / "fp16" / "vae" / "config.json") is None             # a file: no opinion
    # a hub id: only the component configs are fetched (here from an offline cache)
    from huggingface_hub import constants

    import tiny_models
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    tiny_models.make_cache(tmp_path / "cache", "org/bf16", bf16)
    assert model_dtype("org/bf16", cache_dir=tmp_path / "cache") == torch.bfloat16
    assert model_dtype("org/not-cached", cache_dir=tmp_path / "cache") is None


def test_cli_resolves_auto_with_the_models_dtype(machine, tmp_path):
    """The CLI's --device/--dtype auto on a (mocked) CUDA machine: fp16, or bf16 when the model asks."""
    from renoise.__main__ import _device_and_dtype, build_parser
    machine(cuda=True)
    plain = _pipeline_folder(tmp_path / "plain", text_encoder={"torch_dtype": "float32"})
    bf16 = _pipeline_folder(tmp_path / "bf16", unet={"torch_dtype": "bfloat16"})
    base = ["edit", "--image", "x.png", "--edit-prompt", "e", "--out", "o", "--model"]
    parse = build_parser().parse_args
    assert _device_and_dtype(parse(base + [str(plain)])) == (torch.device("cuda"), torch.float16)
    assert _device_and_dtype(parse(base + [str(bf16)])) == (torch.device("cuda"), torch.bfloat16)
    assert _device_and_dtype(parse(base + [str(bf16), "--dtype", "float32"]))[1] == torch.float32
    assert _device_and_dtype(parse(base + [str(bf16), "--device", "cpu"])) == (torch.device("cpu"), torch.float32)
