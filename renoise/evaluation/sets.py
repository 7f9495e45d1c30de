"""Evaluation sets off the demo model's home ground, built on the fly (`renoise eval --set NAME`).

    folder = build("other-renderer", "out/data", n=16, seed=0)   # PNGs + captions.jsonl
    items = data.from_folder(folder)

None of them is drawn by `renoise.demo.scenes` (the renderer that made the demo model's training
data); `degraded` starts from its held-out scenes and damages them.

- `other-renderer`: a second, independent renderer (signed distances, numpy): circles, squares,
  triangles and ellipses of any size and place, filled or outlined, hard or soft edges, on plain,
  gradient, striped or checkered backgrounds, with pixel noise; its own colour values and its own
  caption grammar ("a red circle on a white background", "an outlined blue square near the top").
- `unknown-words`: the same renderer's images with captions the model's tokenizer has never seen
  ("a vermilion lozenge on a cerulean backdrop"), nonsense words, and empty captions.
- `photos`: the photographs that scikit-image ships (`skimage.data`, no download), centre-cropped
  square and resized to 128 px, with generic captions.
- `degraded`: the demo's held-out scenes, JPEG-compressed (Pillow, quality 10-50) and/or with
  Gaussian pixel noise (σ 0.02-0.1).

Each set is deterministic in (n, seed): the same images and captions every time.

Edits (`entries`, written by `build` as `edit_prompt`, `mask` and `target_colour`): every set but the
photographs (no masks) has one per image, a colour swap of one shape to a colour the demo model knows
that is in neither the shapes nor the ground; the mask is the shape's visible coverage.
- `other-renderer`: the main shape (the most fully covered visible pixels), its colour word swapped
  in the renderer's own grammar ("a red circle ..." -> "a green circle ...");
- `unknown-words`: the same, in its captions: the first unknown colour word replaced by the known
  target ("a vermilion lozenge on a cerulean backdrop" -> "a green lozenge on a cerulean backdrop"),
  "a green " before nonsense words, "a green shape" for an empty caption;
- `degraded`: the demo's own edit of the scene (`data.demo_edit`: its first shape's colour, as `--demo`).
"""
from __future__ import annotations

import functools
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..demo.checks import COVERED

__all__ = ["SETS", "build", "images", "entries", "Edit"]

SIZE = 128
# colours of this renderer (its own values, not the demo's), named with words the model knows
PALETTE = {"red": (205, 30, 55), "green": (60, 150, 40), "blue": (30, 110, 200), "yellow": (250, 225, 70),
           "orange": (230, 120, 50), "purple": (120, 40, 160), "white": (235, 235, 225), "black": (15, 20, 30)}
KINDS = ("circle", "square", "triangle", "ellipse")
UNKNOWN = {"colours": ["vermilion", "cerulean", "magenta", "teal", "crimson", "ochre", "grey", "beige"],
           "shapes": ["lozenge", "disc", "blob", "hexagon", "polygon", "oval", "splodge"],
           "grounds": ["backdrop", "canvas", "wallpaper", "field"]}
PHOTOS = {"astronaut": "a photo of an astronaut", "camera": "a photo of a man with a camera",
          "coffee": "a photo of a cup of coffee", "chelsea": "a photo of a cat", "rocket": "a photo of a rocket",
          "coins": "a photo of coins", "moon": "a photo of the moon", "page": "a photo of a page of text",
          "text": "a photo of text", "brick": "a photo of a brick wall", "grass": "a photo of grass",
          "gravel": "a photo of gravel", "horse": "a picture of a horse", "clock": "a photo of a clock",
          "immunohistochemistry": "a microscope image", "hubble_deep_field": "a photo of galaxies",
          "retina": "a photo of a retina", "cell": "a microscope image of a cell",
          "logo": "a logo", "colorwheel": "a colour wheel"}


# ------------------------------------------------------------------ the second renderer

def _grid(size):
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    return np.meshgrid(c, c, indexing="xy")                      # x right, y down, in [0, 1]


def _distance(kind, x, y, cx, cy, r, angle, aspect):
    """Signed distance (fractions of the side; < 0 inside) to a shape centred at (cx, cy)."""
    ca, sa = math.cos(angle), math.sin(angle)
    u, v = ca * (x - cx) + sa * (y - cy), -sa * (x - cx) + ca * (y - cy)
    if kind == "circle":
        return np.hypot(u, v) - r
    if kind == "ellipse":                                        # scaled circle: close to a distance near the edge
        return (np.hypot(u / aspect, v) - r) * min(aspect, 1.0)
    if kind == "square":
        qx, qy = np.abs(u) - r, np.abs(v) - r
        return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
    if kind == "triangle":                                       # intersection of three half-planes
        d = None
        for k in range(3):
            t = math.pi / 2 + 2 * math.pi * k / 3
            h = u * math.cos(t) - v * math.sin(t) - r / 2
            d = h if d is None else np.maximum(d, h)
        return d
    raise ValueError(f"unknown kind {kind!r}")


def _coverage(dist, soft):
    """Edge profile: a linear ramp over `soft` (fractions of the side) across the boundary."""
    return np.clip(0.5 - dist / soft, 0.0, 1.0)


def _background(rng, x, y, colours):
    """(image [H, W, 3] in [0, 1], words for the caption)."""
    a = np.asarray(PALETTE[colours[0]], np.float64) / 255
    b = np.asarray(PALETTE[colours[1]], np.float64) / 255
    style = rng.choice(["plain", "plain", "gradient", "stripes", "checks"])
    if style == "plain":
        return np.broadcast_to(a, x.shape + (3,)).copy(), f"a {colours[0]} background"
    if style == "gradient":
        t = (x * math.cos(th := rng.uniform(0, 2 * math.pi)) + y * math.sin(th))
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        return a * (1 - t[..., None]) + b * t[..., None], f"a {colours[0]} to {colours[1]} gradient"
    period = rng.uniform(0.08, 0.25)
    if style == "stripes":
        m = (np.sin(2 * math.pi * (x if rng.random() < 0.5 else y) / period) > 0).astype(np.float64)
        return a * (1 - m[..., None]) + b * m[..., None], f"{colours[0]} and {colours[1]} stripes"
    m = ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float64)
    return a * (1 - m[..., None]) + b * m[..., None], f"a {colours[0]} and {colours[1]} checkerboard"


def _where(cx, cy):
    vert = "top" if cy < 0.38 else "bottom" if cy > 0.62 else ""
    hor = "left" if cx < 0.38 else "right" if cx > 0.62 else ""
    if not vert and not hor:
        return "in the middle"
    return "near the " + " ".join(w for w in (vert, hor) if w)


def other_scene(seed: int, size: int = SIZE) -> tuple[np.ndarray, str]:
    """(float32 RGB [3, size, size] in [0, 1], caption) of scene `seed` of the second renderer."""
    img, caption, _ = _other_scene(seed, size)
    return img, caption


def _other_scene(seed, size=SIZE):
    """(image, caption, facts): facts holds the caption's parts and ground, the colours drawn, and each
    shape's visible coverage [H, W] (its own coverage times what later shapes leave of it)."""
    rng = np.random.default_rng([seed, 7919])
    x, y = _grid(size)
    names = list(PALETTE)
    bg = list(rng.choice(names, 2, replace=False))
    img, ground = _background(rng, x, y, bg)
    parts, shapes = [], []
    for _ in range(int(rng.choice([1, 1, 2, 3]))):
        kind = str(rng.choice(KINDS))
        colour = str(rng.choice([c for c in names if c not in bg]))
        r = rng.uniform(0.05, 0.3)
        cx, cy = rng.uniform(r * 0.6, 1 - r * 0.6, 2)
        dist = _distance(kind, x, y, cx, cy, r, rng.uniform(0, 2 * math.pi), rng.uniform(0.4, 0.8))
        outlined = rng.random() < 0.3
        if outlined:
            dist = np.abs(dist) - rng.uniform(0.01, 0.03)
        soft = 1.0 / size if rng.random() < 0.6 else rng.uniform(3, 12) / size
        m = _coverage(dist, soft)[..., None]
        fill = np.asarray(PALETTE[colour], np.float64) / 255
        if rng.random() < 0.25:                                  # a textured fill: shaded by a sinusoid
            fill = fill * (0.75 + 0.25 * np.sin(2 * math.pi * (x + y) / rng.uniform(0.05, 0.15)))[..., None]
        img = img * (1 - m) + fill * m
        for s in shapes:                                         # this shape covers part of the earlier ones
            s["coverage"] = s["coverage"] * (1 - m[..., 0])
        word = ("an outlined " if outlined else "a ") + ("blurry " if soft > 2 / size else "")
        shapes.append({"colour": colour, "coverage": m[..., 0], "words": (word, f" {kind} {_where(cx, cy)}")})
        parts.append(f"{word}{colour} {kind} {_where(cx, cy)}")
    noise = rng.choice([0.0, 0.0, 0.02, 0.05])
    if noise:
        img = img + rng.normal(0, noise, img.shape)
    caption = ", ".join(parts) + f" on {ground}"
    facts = {"ground": ground, "background": bg, "shapes": shapes}
    return np.clip(img, 0, 1).transpose(2, 0, 1).astype(np.float32), caption, facts


def _main_shape(facts) -> int:
    """The shape an edit changes: the one with the most fully covered visible pixels (ties: the highest
    peak coverage, then the first)."""
    keys = [(int((s["coverage"] > COVERED).sum()), float(s["coverage"].max())) for s in facts["shapes"]]
    return max(range(len(keys)), key=lambda i: (keys[i], -i))


def _target(seed, facts) -> str:
    """The colour the main shape turns to: one the demo model knows, in neither the shapes nor the ground."""
    used = set(facts["background"]) | {s["colour"] for s in facts["shapes"]}
    return str(np.random.default_rng([seed, 7919, 1]).choice([c for c in PALETTE if c not in used]))


def _other_edit(seed, facts):
    """(edit caption in the renderer's grammar, target colour, mask [H, W]): the colour word of the main
    shape's part swapped; the mask is that shape's visible coverage, scaled so that its peak is 1 (a
    blurry outline never covers a pixel fully, and the judge reads the pixels above COVERED)."""
    k, target = _main_shape(facts), _target(seed, facts)
    parts = [f"{a}{target if i == k else s['colour']}{b}" for i, s in enumerate(facts["shapes"])
             for a, b in [s["words"]]]
    coverage = facts["shapes"][k]["coverage"]
    mask = coverage / max(float(coverage.max()), 1e-6) if coverage.max() < 1 else coverage
    return ", ".join(parts) + f" on {facts['ground']}", target, mask


def _unknown_caption(rng, k):
    """(caption, its edit with "{colour}" where the shape's colour word goes): grammar with unknown
    words (k % 3 == 0), nonsense (1) or empty (2)."""
    if k % 3 == 2:
        return "", "a {colour} shape"
    w = lambda key: str(rng.choice(UNKNOWN[key]))        # noqa: E731
    if k % 3 == 1:
        text = " ".join("".join(rng.choice(list("bcdfgklmnprstvzqx"), 1)[0] + rng.choice(list("aeiou"), 1)[0]
                              for _ in range(3)) for _ in range(3))
        return text, "a {colour} " + text
    colour, shape, ground_colour, ground = w("colours"), w("shapes"), w("colours"), w("grounds")
    return (f"a {colour} {shape} on a {ground_colour} {ground}",
            f"a {{colour}} {shape} on a {ground_colour} {ground}")


# ------------------------------------------------------------------ the sets

def _photo(name):
    from PIL import Image
    from skimage import data
    arr = np.asarray(getattr(data, name)())
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:                                     # bool / float images
        arr = arr.astype(np.float64)
        arr = (255 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-9)).astype(np.uint8)
    h, w = arr.shape[:2]
    s = min(h, w)
    arr = arr[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    img = Image.fromarray(arr).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    return np.asarray(img, np.float32).transpose(2, 0, 1) / 255


@functools.lru_cache(maxsize=None)
def _photos_available():
    """The names of PHOTOS that this scikit-image ships in its wheel (no download)."""
    try:
        from skimage import data
    except ImportError as e:
        raise ValueError("the 'photos' set needs scikit-image (pip install scikit-image, part of renoise[test])") from e
    out = []
    for name in PHOTOS:
        try:
            getattr(data, name)()
            out.append(name)
        except Exception:                                         # not bundled (would need a download)
            continue
    if not out:
        raise ValueError("scikit-image ships none of the photographs of the 'photos' set in this installation")
    return tuple(out)


def _jpeg(img, quality):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((img.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.float32).transpose(2, 0, 1) / 255


def images(name: str, n: int, seed: int = 0) -> list[tuple[str, np.ndarray, str]]:
    """The set's first n entries as (id, float32 RGB [3, 128, 128] in [0, 1], caption)."""
    return [(ident, img, caption) for ident, img, caption, _ in entries(name, n, seed)]


def entries(name: str, n: int, seed: int = 0) -> list[tuple[str, np.ndarray, str, Edit | None]]:
    """The set's first n entries as (id, image, caption, edit): images and captions as `images` gives
    them, with the edit of the main shape's colour (None for the photographs: no masks)."""
    if name not in SETS:
        raise ValueError(f"unknown evaluation set {name!r}; expected one of {', '.join(SETS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--set-size must be an int >= 1, got {n!r}")
    out = []
    if name == "other-renderer":
        for i in range(n):
            img, cap, facts = _other_scene(seed * 100_003 + i)
            edit, target, mask = _other_edit(seed * 100_003 + i, facts)
            out.append((f"other-{i:04d}", img, cap, Edit(edit, target, mask.astype(np.float32))))
    elif name == "unknown-words":
        rng = np.random.default_rng([seed, 31])
        for i in range(n):
            img, _, facts = _other_scene(seed * 100_003 + 50_000 + i)
            _, target, mask = _other_edit(seed * 100_003 + 50_000 + i, facts)
            caption, template = _unknown_caption(rng, i)
            out.append((f"unknown-{i:04d}", img, caption,
                        Edit(template.format(colour=target), target, mask.astype(np.float32))))
    elif name == "photos":
        names = _photos_available()
        if n > len(names):
            raise ValueError(f"the 'photos' set has {len(names)} photographs in this scikit-image; "
                             f"ask for --set-size {len(names)} or fewer")
        order = np.random.default_rng([seed, 17]).permutation(len(names)) if seed else np.arange(len(names))
        for i in order[:n]:
            out.append((f"photo-{names[i]}", _photo(names[i]), PHOTOS[names[i]], None))
    else:                                                         # degraded
        from ..demo import held_out, render, shape_masks
        from .data import demo_edit
        rng = np.random.default_rng([seed, 53])
        for i in range(n):
            scene = held_out(i, max_shapes=3)
            img = render(scene)
            kind = ("jpeg", "noise", "both")[i % 3]
            tags = []
            if kind in ("jpeg", "both"):
                q = int(rng.choice([10, 25, 50]))
                img, tags = _jpeg(img, q), tags + [f"q{q}"]
            if kind in ("noise", "both"):
                s = float(rng.choice([0.02, 0.05, 0.1]))
                img, tags = np.clip(img + rng.normal(0, s, img.shape), 0, 1), tags + [f"n{int(s * 100):02d}"]
            edit, target = demo_edit(i, max_shapes=3)
            out.append((f"degraded-{i:04d}-{'-'.join(tags)}", img.astype(np.float32), scene.caption,
                        Edit(edit, target, shape_masks(scene)[0])))
    return out


@dataclass(frozen=True)
class Edit:
    """A set entry's edit: the edit prompt, the colour the masked shape should turn (a name of
    renoise.demo.checks' palette) and the shape's visible coverage, float32 [H, W] in [0, 1]."""
    prompt: str
    target_colour: str
    mask: np.ndarray


SETS = {"other-renderer": "shapes by a second, independent renderer, other caption grammar",
        "unknown-words": "that renderer's images with unknown words, nonsense and empty captions",
        "photos": "scikit-image's bundled photographs at 128 px with generic captions",
        "degraded": "the demo's held-out scenes, JPEG-compressed and/or noised"}


def build(name: str, folder, n: int = 16, seed: int = 0) -> Path:
    """Write the set as PNGs and captions.jsonl into folder/NAME (each file written atomically, with the
    same bytes every time, so that concurrent processes may build it alike); returns that folder."""
    from PIL import Image

    from .store import write_atomic
    root = Path(folder) / name
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for ident, img, caption, edit in entries(name, n, seed):
        buf = io.BytesIO()
        Image.fromarray((img.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
        write_atomic(root / f"{ident}.png", buf.getvalue())
        record = {"image": f"{ident}.png", "id": ident, "prompt": caption}
        if edit is not None:
            buf = io.BytesIO()
            Image.fromarray((edit.mask * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
            write_atomic(root / f"{ident}_mask.png", buf.getvalue())
            record.update(edit_prompt=edit.prompt, mask=f"{ident}_mask.png", target_colour=edit.target_colour)
        lines.append(json.dumps(record))
    write_atomic(root / "captions.jsonl", ("\n".join(lines) + "\n").encode())
    return root
