"""Reconstruction metrics, batched: one number per batch element.

    psnr(x, y, data_range)   10·log10(L² / mean((x-y)²)); +inf when x == y
    ssim(x, y, data_range)   Wang et al. 2004: 11×11 Gaussian window (σ = 1.5), K1 = 0.01,
                             K2 = 0.03, 'valid' filtering, per channel, averaged over channels
                             and positions. The window shrinks (odd, ≤ the smaller side) on
                             inputs smaller than 11 px, e.g. latents of tiny images.
    lpips(x, y)              LPIPS (AlexNet, v0.1) from weight files already on disk; never
                             downloads (LPIPSWeightsMissing says where it looked).

Images are [B, 3, H, W] in [-1, 1] (data_range 2, the default); latents are [B, C, h, w] with
no fixed range: `latent_metrics` uses each reference latent's own peak-to-peak range.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, [B]. data_range: a number or a [B] tensor."""
    x, y = _pair(x, y)
    mse = (x - y).pow(2).flatten(1).mean(1)
    peak = torch.as_tensor(data_range, dtype=mse.dtype, device=mse.device)
    return 10 * torch.log10(peak.pow(2) / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, *, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity, [B] (1 for identical inputs). Computed in float64."""
    x, y = _pair(x, y)
    if x.ndim != 4:
        raise ValueError(f"ssim expects [B, C, H, W] tensors, got shape {list(x.shape)}")
    x, y = x.double(), y.double()
    c = x.shape[1]
    size = min(window, *x.shape[-2:])
    size -= 1 - size % 2                                   # odd
    g = torch.exp(-((torch.arange(size, dtype=torch.float64, device=x.device) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, size, size)

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    peak = torch.as_tensor(data_range, dtype=torch.float64, device=x.device).reshape(-1, 1, 1, 1)
    c1, c2 = (k1 * peak) ** 2, (k2 * peak) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def latent_metrics(z: torch.Tensor, reference: torch.Tensor) -> dict:
    """RMSE, PSNR and SSIM of latents against a reference, with the reference's per-sample range."""
    z, reference = _pair(z, reference)
    flat = reference.flatten(1)
    span = (flat.max(1).values - flat.min(1).values).clamp_min(torch.finfo(flat.dtype).tiny)
    return {
        "rmse": (z - reference).pow(2).flatten(1).mean(1).sqrt(),
        "psnr": psnr(z, reference, span),
        "ssim": ssim(z, reference, span),
    }


def _pair(x, y):
    if x.shape != y.shape:
        raise ValueError(f"metric inputs differ in shape: {list(x.shape)} vs {list(y.shape)}")
    if x.ndim < 2:
        raise ValueError(f"metric inputs need a batch dimension, got shape {list(x.shape)}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    return x.to(dtype), y.to(dtype)


# ---------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018), AlexNet variant, weights read from local files only.

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"       # torchvision's ImageNet AlexNet
LPIPS_FILE = "alex.pth"                          # the lpips package's v0.1 linear heads
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_CONVS = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1),
          (8, 384, 256, 3, 1, 1), (10, 256, 256, 3, 1, 1))   # (features index, in, out, k, stride, pad)


class LPIPSWeightsMissing(FileNotFoundError):
    """LPIPS needs weight files that are not on this machine (they are never downloaded)."""


class LPIPS(torch.nn.Module):
    """d(x, y) = Σ_layers mean_hw ‖w_l ⊙ (f̂_l(x) - f̂_l(y))‖², f̂ = AlexNet ReLU features
    (after relu1..relu5) normalised to unit length over channels."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(i, o, k, s, p) for _, i, o, k, s, p in _CONVS)
        self.lins = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(1, o, 1, 1)) for _, _, o, *_ in _CONVS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))

    @classmethod
    def from_files(cls, alexnet=None, linear=None) -> "LPIPS":
        alexnet, linear = _find_lpips_files(alexnet, linear)
        backbone = torch.load(alexnet, map_location="cpu", weights_only=True)
        heads = torch.load(linear, map_location="cpu", weights_only=True)
        model = cls()
        state = {}
        for n, (idx, *_) in enumerate(_CONVS):
            state[f"convs.{n}.weight"] = backbone[f"features.{idx}.weight"]
            state[f"convs.{n}.bias"] = backbone[f"features.{idx}.bias"]
            state[f"lins.{n}"] = heads[f"lin{n}.model.1.weight"]
        model.load_state_dict(state, strict=False)
        return model.eval().requires_grad_(False)

    def features(self, x):
        h = (x - self.shift) / self.scale
        feats = []
        for n, conv in enumerate(self.convs):
            if n in (1, 2):
                h = F.max_pool2d(h, 3, 2)
            h = F.relu(conv(h))
            feats.append(h)
        return feats

    def forward(self, x, y):
        x, y = _pair(x, y)
        x, y = x.to(self.shift.dtype), y.to(self.shift.dtype)
        total = 0
        for lin, fx, fy in zip(self.lins, self.features(x), self.features(y)):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((fx - fy).pow(2) * lin).sum(1).mean((1, 2))
        return total


def lpips(x: torch.Tensor, y: torch.Tensor, *, alexnet=None, linear=None) -> torch.Tensor:
    """LPIPS distance, [B], for images in [-1, 1] (0 for identical images)."""
    return LPIPS.from_files(alexnet, linear).to(x.device)(x, y)


def _find_lpips_files(alexnet=None, linear=None):
    """Explicit paths, else $RENOISE_LPIPS_DIR, torch's hub cache and an installed lpips package."""
    dirs = []
    if os.environ.get("RENOISE_LPIPS_DIR"):
        dirs.append(Path(os.environ["RENOISE_LPIPS_DIR"]))
    torch_home = Path(os.environ.get("TORCH_HOME", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch"))
    dirs.append(torch_home / "hub" / "checkpoints")
    spec = importlib.util.find_spec("lpips")
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) / "weights" / "v0.1" for p in spec.submodule_search_locations]
    found = []
    for given, name in ((alexnet, ALEXNET_FILE), (linear, LPIPS_FILE)):
        candidates = [Path(given)] if given is not None else [d / name for d in dirs]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            looked = ", ".join(str(p) for p in candidates)
            raise LPIPSWeightsMissing(
                f"LPIPS needs {name}, not found (looked at: {looked}); renoise never downloads it: "
                f"put the file in $RENOISE_LPIPS_DIR or pass its path")
        found.append(hit)
    return found

