"""Procedurally rendered, captioned scenes: the demo model's world and its held-out test data.

    scene = random_scene(seed)               # deterministic per seed
    scene.caption                            # "a small red circle on the left on a blue background"
    img = render(scene)                      # float32 [3, S, S] in [0, 1], anti-aliased
    masks = shape_masks(scene)               # float32 [n_shapes, S, S] coverage in [0, 1]

A scene is one to three shapes (circle, square, triangle, star, ring) in named colours and sizes at
named positions (left, center, right), on a plain or two-tone (top/bottom) background. Rendering
is exact coverage by 4×4 supersampling: the same scene always gives the same pixels.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import numpy as np

__all__ = ["COLOURS", "SHAPES", "SIZES", "POSITIONS", "Shape", "Scene", "random_scene", "render", "shape_masks",
           "shape_mask", "caption", "SIZE"]

SIZE = 128                                   # the demo model's image size in pixels
COLOURS = {                                  # name -> RGB in [0, 255]
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "orange": (245, 135, 25), "purple": (140, 60, 190), "white": (245, 245, 245), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "ring")
SIZES = {"small": 0.11, "large": 0.19}       # radius as a fraction of the image side
POSITIONS = {"left": 0.27, "center": 0.5, "right": 0.73}   # centre x as a fraction of the side
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    kind: str                                # one of SHAPES
    colour: str                              # one of COLOURS
    size: str                                # one of SIZES
    position: str                            # one of POSITIONS
    dx: float = 0.0                          # jitter of the centre, fractions of the side
    dy: float = 0.0
    scale: float = 1.0                       # jitter of the radius

    @property
    def centre(self) -> tuple[float, float]:
        return POSITIONS[self.position] + self.dx, 0.5 + self.dy

    @property
    def radius(self) -> float:
        return SIZES[self.size] * self.scale


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[str, ...]              # one colour, or (top, bottom)

    @property
    def caption(self) -> str:
        return caption(self)

    def replace_shape(self, i: int = 0, **changes) -> "Scene":
        """The same scene with shape i changed (e.g. colour="green", kind="square")."""
        shapes = list(self.shapes)
        shapes[i] = dataclasses.replace(shapes[i], **changes)
        return Scene(tuple(shapes), self.background)


def caption(scene: Scene) -> str:
    parts = []
    for s in scene.shapes:
        where = "in the center" if s.position == "center" else f"on the {s.position}"
        parts.append(f"a {s.size} {s.colour} {s.kind} {where}")
    return " and ".join(parts) + f" on a {' and '.join(scene.background)} background"


def random_scene(seed: int, *, max_shapes: int = 3, two_tone: float = 0.25, jitter: bool = True) -> Scene:
    """A scene drawn from `random.Random(seed)`: 1 shape with probability 0.6, 2 with 0.3, 3 with
    0.1 (capped at `max_shapes`); background colours differ from every shape's colour."""
    rng = random.Random(seed)
    n = min(max_shapes, rng.choices((1, 2, 3), weights=(6, 3, 1))[0])
    positions = {1: [[p] for p in POSITIONS], 2: [["left", "right"], ["left", "center"], ["center", "right"]],
                 3: [["left", "center", "right"]]}[n]
    where = rng.choice(positions)
    colours = list(COLOURS)
    shapes = []
    for pos in where:
        # Neighbours one slot apart would overlap if large: only a left/right pair may be large.
        size = rng.choice(list(SIZES)) if n == 1 or where == ["left", "right"] else "small"
        j = (lambda: rng.uniform(-0.03, 0.03)) if jitter else (lambda: 0.0)
        shapes.append(Shape(rng.choice(SHAPES), rng.choice(colours), size, pos, dx=j(), dy=j(),
                            scale=rng.uniform(0.9, 1.1) if jitter else 1.0))
    free = [c for c in colours if c not in {s.colour for s in shapes}]
    bg = tuple(rng.sample(free, 2)) if rng.random() < two_tone else (rng.choice(free),)
    return Scene(tuple(shapes), bg)


def _axis(size: int) -> np.ndarray:
    """Supersample coordinates along one side, in fractions of the side."""
    n = size * _SUPERSAMPLE
    return (np.arange(n, dtype=np.float64) + 0.5) / n


def _polygon_inside(rho, theta, angles, radii):
    """Inside a star-shaped polygon around the origin with vertices at (angles, radii), listed
    counter-clockwise by angle: ρ ≤ the boundary's distance along the ray at θ."""
    k = len(angles)
    inside = np.zeros_like(rho, dtype=bool)
    for i in range(k):
        a, b = angles[i], angles[(i + 1) % k]
        ra, rb = radii[i], radii[(i + 1) % k]
        span = (b - a) % (2 * math.pi)
        rel = (theta - a) % (2 * math.pi)
        in_sector = rel < span
        edge = ra * rb * math.sin(span) / (ra * np.sin(rel) + rb * np.sin(span - rel))
        inside |= in_sector & (rho <= edge)
    return inside


def _regular(n, r, start, inner=None):
    """Vertex angles and radii of a regular n-gon (or n-point star with inner radius)."""
    if inner is None:
        return [start + 2 * math.pi * i / n for i in range(n)], [r] * n
    angles = [start + math.pi * i / n for i in range(2 * n)]
    return angles, [r if i % 2 == 0 else inner for i in range(2 * n)]


def _inside(kind: str, x, y, r):
    """Boolean mask of a shape of radius r centred at the origin (image y points down)."""
    rho, theta = np.hypot(x, y), np.arctan2(-y, x) % (2 * math.pi)   # angle counter-clockwise, y up
    if kind == "circle":
        return rho <= r
    if kind == "ring":
        return (rho <= r) & (rho >= 0.55 * r)
    if kind == "square":
        return (np.abs(x) <= 0.85 * r) & (np.abs(y) <= 0.85 * r)
    if kind == "triangle":
        return _polygon_inside(rho, theta, *_regular(3, 1.15 * r, math.pi / 2))
    if kind == "star":
        return _polygon_inside(rho, theta, *_regular(5, 1.2 * r, math.pi / 2, inner=0.5 * r))
    raise ValueError(f"unknown shape {kind!r}; known: {SHAPES}")


def _coverage(inside: np.ndarray) -> np.ndarray:
    s = _SUPERSAMPLE
    h, w = inside.shape[0] // s, inside.shape[1] // s
    return inside.reshape(h, s, w, s).mean(axis=(1, 3)).astype(np.float32)


def _window(centre, radius, size):
    """Pixel rows/columns [lo, hi) that can hold a shape of `radius` at `centre` (x, y)."""
    out = []
    for c in (centre[1], centre[0]):
        lo = max(0, int(math.floor((c - 1.3 * radius) * size)))
        hi = min(size, int(math.ceil((c + 1.3 * radius) * size)))
        out.append((lo, max(lo, hi)))
    return out


def _inside_window(kind, centre, radius, size):
    """(row slice, column slice, supersampled boolean mask inside that window)."""
    (r0, r1), (c0, c1) = _window(centre, radius, size)
    ax, s = _axis(size), _SUPERSAMPLE
    gx, gy = np.meshgrid(ax[c0 * s:c1 * s], ax[r0 * s:r1 * s], indexing="xy")
    return slice(r0, r1), slice(c0, c1), _inside(kind, gx - centre[0], gy - centre[1], radius)


def shape_mask(kind: str, centre, radius: float, size: int = SIZE) -> np.ndarray:
    """Coverage [size, size] in [0, 1] of one shape at `centre` (x, y) with `radius`, in fractions
    of the side."""
    out = np.zeros((size, size), np.float32)
    rows, cols, inside = _inside_window(kind, centre, radius, size)
    out[rows, cols] = _coverage(inside)
    return out


def shape_masks(scene: Scene, size: int = SIZE) -> np.ndarray:
    """Coverage of each shape, [n, size, size]; later shapes are drawn over earlier ones."""
    s = _SUPERSAMPLE
    drawn, masks = np.zeros((size * s, size * s), bool), []
    for shape in reversed(scene.shapes):
        rows, cols, inside = _inside_window(shape.kind, shape.centre, shape.radius, size)
        big = (slice(rows.start * s, rows.stop * s), slice(cols.start * s, cols.stop * s))
        inside &= ~drawn[big]
        drawn[big] |= inside
        m = np.zeros((size, size), np.float32)
        m[rows, cols] = _coverage(inside)
        masks.append(m)
    return np.stack(masks[::-1])


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as float32 RGB [3, size, size] in [0, 1]."""
    rgb = lambda name: np.asarray(COLOURS[name], np.float32)[:, None, None] / 255.0
    top = rgb(scene.background[0])
    if len(scene.background) == 1:
        img = np.broadcast_to(top, (3, size, size)).copy()
    else:
        split = (np.arange(size) < size // 2).astype(np.float32)[:, None]
        img = top * split + rgb(scene.background[1]) * (1 - split)
    for s, m in zip(scene.shapes, shape_masks(scene, size)):
        img = img * (1 - m) + rgb(s.colour) * m
    return img.astype(np.float32)
