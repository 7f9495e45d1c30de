"""Judging generated and edited demo images with the renderer's own colours and masks.

    colour = dominant_colour(img, mask)            # the palette name most pixels in mask are nearest to
    fg = foreground(img, scene.background)         # pixels far from every background colour
    kind, scores = classify_shape(fg)              # the SHAPES entry whose rendered mask fits best (IoU)

Images are float [3, H, W] in [0, 1] (numpy or torch); masks are [H, W] booleans or coverages.
"""
from __future__ import annotations

import math

import numpy as np

from .scenes import COLOURS, SHAPES, shape_mask

__all__ = ["nearest_colours", "dominant_colour", "foreground", "classify_shape", "judge", "COVERED"]

COVERED = 0.99     # mask coverage above which a pixel is the shape's own when an edit's colour is judged

_PALETTE = np.asarray(list(COLOURS.values()), np.float32) / 255.0      # [C, 3]
_NAMES = list(COLOURS)


def _np(img) -> np.ndarray:
    if hasattr(img, "detach"):
        img = img.detach().float().cpu().numpy()
    return np.asarray(img, np.float32)


def nearest_colours(img) -> np.ndarray:
    """Index into COLOURS of each pixel's nearest palette colour, [H, W]."""
    img = _np(img)
    d = ((img[None] - _PALETTE[:, :, None, None]) ** 2).sum(1)          # [C, H, W]
    return d.argmin(0)


def dominant_colour(img, mask) -> str | None:
    """The palette colour most pixels inside `mask` are nearest to (None for an empty mask)."""
    sel = nearest_colours(img)[_np(mask) > 0.5]
    if sel.size == 0:
        return None
    return _NAMES[int(np.bincount(sel, minlength=len(_NAMES)).argmax())]


def foreground(img, background, threshold: float = 0.25) -> np.ndarray:
    """Pixels whose RGB lies farther than `threshold` from each of the background colours, [H, W] bool."""
    img = _np(img)
    dist = [np.sqrt(((img - np.asarray(COLOURS[c], np.float32)[:, None, None] / 255.0) ** 2).sum(0))
            for c in background]
    return np.min(dist, axis=0) > threshold


_UNIT_AREA = {}


def _unit_area(kind: str, size: int) -> float:
    """Area in pixels of `kind` with radius 0.2 at this image size."""
    if (kind, size) not in _UNIT_AREA:
        _UNIT_AREA[kind, size] = float(shape_mask(kind, (0.5, 0.5), 0.2, size).sum())
    return _UNIT_AREA[kind, size]


def classify_shape(mask) -> tuple[str | None, dict[str, float]]:
    """Which SHAPES entry `mask` ([H, W], one shape) is: each candidate is rendered at the mask's
    centroid with the radius that gives the mask's area, and the best intersection-over-union wins.
    Returns (kind, {kind: IoU}); (None, {}) for an empty mask."""
    m = _np(mask) > 0.5
    size = m.shape[-1]
    area = float(m.sum())
    if area < 4:
        return None, {}
    ys, xs = np.nonzero(m)
    centre = ((xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size)
    scores = {}
    for kind in SHAPES:
        r = 0.2 * math.sqrt(area / _unit_area(kind, size))
        ref = shape_mask(kind, centre, r, size) > 0.5
        scores[kind] = float((ref & m).sum() / max((ref | m).sum(), 1))
    return max(scores, key=scores.get), scores


def judge(img, scene) -> dict:
    """For a one-shape scene's caption: the image's dominant foreground colour and shape class."""
    if len(scene.shapes) != 1:
        raise ValueError(f"judge() reads one-shape scenes; this one has {len(scene.shapes)} shapes")
    fg = foreground(img, scene.background)
    kind, scores = classify_shape(fg)
    want = scene.shapes[0]
    colour = dominant_colour(img, fg)
    return {"colour": colour, "shape": kind, "colour_ok": colour == want.colour, "shape_ok": kind == want.kind,
            "iou": scores.get(kind, 0.0)}
