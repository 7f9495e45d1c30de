"""Measure a pipeline on held-out demo scenes: generation, VAE, inversion and editing.

    follows_caption(pipe, 64)                 -> colour / shape accuracy of text-to-image samples
    vae_psnr(pipe, 16)                        -> [16] PSNR of VAE round trips
    reconstruction(pipe, plan, 8, ...)        -> PSNR of ReNoise invert + reconstruct, calls, seconds
    colour_edits(pipe, plan, 32, ...)         -> hue-edit success rate and background PSNR

The same held-out scenes (seeds from `renoise.demo.HELD_OUT`) for every method, so that numbers
compare. Image PSNR is in [0, 1] units (data range 1), as the paper's Table 2 reports it.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .. import metrics
from ..pipeline import Editor, decode_latents, encode_images
from . import held_out, render_tensor
from .checks import COVERED, dominant_colour, judge
from .scenes import shape_masks

__all__ = ["follows_caption", "vae_psnr", "reconstruction", "colour_edits", "edit_scenes"]


def _psnr01(a, b) -> torch.Tensor:
    return metrics.psnr((a + 1) / 2, (b + 1) / 2, data_range=1.0)


def _to01(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) / 2).float().cpu().numpy()


@torch.no_grad()
def follows_caption(pipe, n: int = 64, *, num_steps: int = 20, guidance_scale: float = 4.0, seed: int = 0,
                    first: int = 0) -> dict:
    """Generate held-out one-shape captions first..first+n; judge colour and shape with the checker."""
    from ..generate import generate
    scene_list = [held_out(first + i) for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    images = generate(pipe, [s.caption for s in scene_list], num_steps=num_steps, guidance_scale=guidance_scale,
                      generator=gen)
    verdicts = [judge(img, s) for img, s in zip(_to01(images), scene_list)]
    return {"colour": float(np.mean([v["colour_ok"] for v in verdicts])),
            "shape": float(np.mean([v["shape_ok"] for v in verdicts])), "verdicts": verdicts, "images": images}


@torch.no_grad()
def vae_psnr(pipe, n: int = 16, first: int = 0, max_shapes: int = 3) -> torch.Tensor:
    """PSNR [n] of decode(encode(x)) (posterior mean) on held-out scenes."""
    x = render_tensor([held_out(first + i, max_shapes=max_shapes) for i in range(n)])
    y = decode_latents(pipe, encode_images(pipe, x, sample=False))
    return _psnr01(y, x)


def reconstruction(pipe, plan, n: int = 8, *, first: int = 0, max_shapes: int = 3, seed: int = 0, **editor_kw):
    """Invert held-out scenes with `plan` (a preset name or Plan), reconstruct with the source caption.
    Returns {"psnr": [n], "latent_psnr": [n], "calls": inversion model calls (the batch's),
    "sample_calls": [n] the calls each image needed (tolerance stopping freezes an image once its
    residual is small; the batch runs until its slowest image is done), "seconds", "z_T_std"}."""
    scene_list = [held_out(first + i, max_shapes=max_shapes) for i in range(n)]
    x = render_tensor(scene_list)
    editor = Editor(pipe, plan, **editor_kw)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    inv = editor.invert(x, [s.caption for s in scene_list], generator=gen, sample_posterior=False)
    seconds = time.perf_counter() - t0
    z, _ = editor.reconstruct_latents(inv)
    y = decode_latents(pipe, z)
    z0 = inv.z0
    latent = metrics.psnr(z, z0, data_range=(z0.flatten(1).amax(1) - z0.flatten(1).amin(1)))
    res = inv.result.residuals                   # [calls, n] per step; a frozen image's residual reads 0
    solved = sum((r > 0).sum(0) for r in res)
    other = inv.result.model_calls - sum(r.shape[0] for r in res)     # noise correction: every image
    return {"psnr": _psnr01(y, x), "latent_psnr": latent, "calls": inv.result.model_calls,
            "sample_calls": solved + other, "seconds": seconds, "z_T_std": float(inv.result.z_T.std()), "images": y}


def edit_scenes(n: int, first: int = 0, source: str = "red", kind: str = "circle"):
    """Held-out one-shape scenes whose shape is made a `source` `kind`, on backgrounds of other colours."""
    out, i = [], first
    while len(out) < n:
        s = held_out(i).replace_shape(colour=source, kind=kind)
        if source not in s.background and all(c not in s.background for c in ("green", "red", "blue")):
            out.append(s)
        i += 1
    return out


def colour_edits(pipe, plan, n: int = 32, *, source: str = "red", target: str = "green", kind: str = "circle",
                 target_kind: str | None = None, edit_guidance_scale: float = 1.0, seed: int = 0, **editor_kw):
    """Invert "a ... {source} {kind} ..." scenes and edit them to "{target} {target_kind}".

    success: the dominant colour inside the shape's mask is `target` (and, for shape edits, the
    checker reads `target_kind` in the edited foreground). background_psnr: PSNR of the edit
    against the source outside the shape's mask dilated by 3 px."""
    scene_list = edit_scenes(n, source=source, kind=kind)
    x = render_tensor(scene_list)
    editor = Editor(pipe, plan, **editor_kw)
    gen = torch.Generator().manual_seed(seed)
    inv = editor.invert(x, [s.caption for s in scene_list], generator=gen, sample_posterior=False)
    targets = [s.replace_shape(colour=target, kind=target_kind or kind) for s in scene_list]
    z, _ = editor.edit_latents(inv, [t.caption for t in targets], edit_guidance_scale=edit_guidance_scale)
    edited = decode_latents(pipe, z)
    ok, bg = [], []
    for img, src, s, t in zip(_to01(edited), _to01(x), scene_list, targets):
        mask = shape_masks(s)[0]
        colour_ok = dominant_colour(img, mask > COVERED) == target
        ok.append(colour_ok and (target_kind is None or judge(img, t)["shape_ok"]))
        keep = ~_dilate(mask > 0.01, 3)
        bg.append(_masked_psnr(img, src, keep))
    return {"success": float(np.mean(ok)), "background_psnr": np.asarray(bg), "images": edited}


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def _masked_psnr(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
    mse = float(((a - b) ** 2)[:, keep].mean())
    return 10 * np.log10(1.0 / max(mse, 1e-12))

