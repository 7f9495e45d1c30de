"""The device and dtype a run uses, from a name or "auto".

    device = resolve_device("auto")                 # cuda, else mps, else cpu
    dtype = resolve_dtype("auto", device, wanted)   # cpu: float32; cuda/mps: float16, or bfloat16
                                                    # when the model asks for it (wanted = model_dtype(...))
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["DTYPES", "resolve_device", "resolve_dtype", "model_dtype"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# components whose config may name the dtype the weights were published in
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """"auto": CUDA, then MPS, then CPU; otherwise the named device, which must be available here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r}: {e}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not _mps_available():
        raise ValueError(f"device {name!r}: MPS is not available on this machine; use auto or cpu")
    return device


def resolve_dtype(name: str = "auto", device="cpu", wanted: torch.dtype | None = None) -> torch.dtype:
    """"auto": float32 on CPU; on CUDA/MPS float16, or bfloat16 when `wanted` (the model's own dtype,
    see `model_dtype`) is bfloat16 and the device supports it. Otherwise the named dtype."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype {name!r}: expected auto or one of {', '.join(DTYPES)}")
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cpu":
        return torch.float32
    if wanted == torch.bfloat16 and (device.type != "cuda" or torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _config_dtype(config: dict) -> torch.dtype | None:
    value = config.get("torch_dtype") or config.get("dtype")      # transformers < 5 / >= 5
    return DTYPES.get(value) if isinstance(value, str) else None


def model_dtype(source, **hub) -> torch.dtype | None:
    """bfloat16 when a component config of the pipeline `source` (folder or hub id; for a hub id
    only the configs are fetched) names it, else None. Single files and unknown layouts: None."""
    from .models.loading import hub_snapshot, is_hub_id

    if is_hub_id(source):
        try:
            root = hub_snapshot(source, [f"{c}/config.json" for c in _COMPONENTS], **hub)
        except FileNotFoundError:
            return None                   # the loader says why, with the files it needs
    else:
        root = Path(source)
        if not root.is_dir():
            return None
    for component in _COMPONENTS:
        path = root / component / "config.json"
        try:
            config = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            continue                      # the loader reports a broken config
        if _config_dtype(config) == torch.bfloat16:
            return torch.bfloat16
    return None
