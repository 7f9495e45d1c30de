"""The images of an evaluation: a folder with captions, one prompt for all, or demo scenes.

    items = from_folder("data/", prompt=None)     # captions.jsonl or captions.csv beside the images
    items = from_demo(64)                         # held-out demo scenes with a colour-swap edit each
    x, mask = load(item, size=None, fit="none")   # [1, 3, H, W] in [-1, 1]; edit mask [H, W] or None

Captions: one JSON object a line, or a CSV with a header, with the fields `image` (a path relative
to the folder), `prompt`, and optionally `edit_prompt`, `mask` (an image file: white marks the
region the edit may change) and `id`. Without a captions file every image in the folder is used
with `--prompt`. A problem with one image (missing caption or file, unreadable, odd size) is not
an error: the item carries it in `problem`, and the evaluation reports and skips it.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Item", "from_folder", "from_demo", "load", "demo_scene", "as_numpy01", "IMAGE_SUFFIXES", "CAPTION_FILES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_FILES = ("captions.jsonl", "captions.csv")


@dataclass(frozen=True)
class Item:
    """One image to evaluate. Folder items have `path`; demo items have `demo` (the held-out index)."""
    id: str
    prompt: str | None
    edit_prompt: str | None = None
    path: str | None = None
    mask: str | None = None
    demo: int | None = None
    demo_shapes: int = 1
    target_colour: str | None = None       # demo edits: the colour the shape should turn
    problem: str | None = None             # why this item cannot run (reported, skipped)


def from_folder(folder, *, captions=None, prompt=None, edit_prompt=None) -> list[Item]:
    """Items from a folder: its captions file (or `captions`), else every image with `prompt`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if captions is None:
        captions = next((folder / n for n in CAPTION_FILES if (folder / n).is_file()), None)
    if captions is None:
        if prompt is None:
            raise ValueError(f"{folder} has no {' or '.join(CAPTION_FILES)}; add one, or give one --prompt for all")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        records = [{"image": p.name} for p in files]
    else:
        records = _read_captions(Path(captions))
    items = [_item(folder, r, i, prompt, edit_prompt) for i, r in enumerate(records)]
    _check_unique(items)
    return items


def _read_captions(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and "image" not in rows[0]:
            raise ValueError(f"{path}: the CSV header needs an 'image' column (and 'prompt', optionally "
                             "'edit_prompt', 'mask', 'id')")
        return [{k: v for k, v in r.items() if v not in (None, "")} for r in rows]
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not valid JSON ({e})") from None
        if not isinstance(r, dict) or not isinstance(r.get("image"), str):
            raise ValueError(f"{path}, line {n}: expected an object with an 'image' path, got {line.strip()[:80]}")
        records.append(r)
    if not records:
        raise ValueError(f"{path} lists no images")
    return records


def _item(folder, r, index, prompt, edit_prompt) -> Item:
    image = folder / r["image"]
    item_id = str(r.get("id") or Path(r["image"]).with_suffix("").as_posix().replace("/", "__"))
    text = r.get("prompt", prompt)
    problem = None
    if not isinstance(text, str):
        problem, text = "no caption (no 'prompt' in the captions file and no --prompt)", None
    elif not image.is_file():
        problem = f"image file not found: {image}"
    mask = r.get("mask")
    if problem is None and mask is not None and not (folder / mask).is_file():
        problem = f"mask file not found: {folder / mask}"
    return Item(item_id, text, r.get("edit_prompt", edit_prompt), str(image),
                None if mask is None else str(folder / mask), problem=problem)


def _check_unique(items):
    seen = {}
    for it in items:
        if it.id in seen:
            raise ValueError(f"two images have the id {it.id!r} ({seen[it.id]} and {it.path}); give them distinct "
                             "'id' fields in the captions file")
        seen[it.id] = it.path


def from_demo(n: int, *, first: int = 0, max_shapes: int = 1) -> list[Item]:
    """Held-out demo scenes first..first+n-1, each with a colour swap of its first shape as the edit
    (to a colour chosen per scene among those not already in it)."""
    from ..demo import COLOURS, HELD_OUT, held_out
    if n < 1:
        raise ValueError(f"--demo needs a number of scenes >= 1, got {n}")
    items = []
    for i in range(first, first + n):
        scene = held_out(i, max_shapes=max_shapes)
        used = {s.colour for s in scene.shapes} | set(scene.background)
        target = random.Random(HELD_OUT + i).choice([c for c in COLOURS if c not in used])
        edit = scene.replace_shape(0, colour=target).caption
        items.append(Item(f"demo-{i:05d}", scene.caption, edit, demo=i, demo_shapes=max_shapes, target_colour=target))
    return items


def load(item: Item, *, size=None, fit="none") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The item's image [1, 3, H, W] in [-1, 1] and its edit mask [H, W] (float, 1 = may change) or None.
    Raises ValueError / FileNotFoundError for an image that cannot be used."""
    if item.problem:
        raise ValueError(item.problem)
    if item.demo is not None:
        from ..demo import held_out, render_tensor, shape_masks
        scene = held_out(item.demo, max_shapes=item.demo_shapes)
        return render_tensor(scene), torch.from_numpy(shape_masks(scene)[0])
    from .. import images as imgs
    x = imgs.to_tensor(imgs.load_image(item.path, size=size, mode=fit))
    if item.mask is None:
        return x, None
    m = imgs.to_tensor(imgs.load_image(item.mask, size=size, mode=fit))
    if m.shape != x.shape:
        raise ValueError(f"mask {item.mask} is {m.shape[2]}x{m.shape[3]} but its image is {x.shape[2]}x{x.shape[3]}")
    return x, ((m[0].mean(0) + 1) / 2).clamp(0, 1)


def demo_scene(item: Item):
    """The demo scene of a demo item (for the checker)."""
    from ..demo import held_out
    return held_out(item.demo, max_shapes=item.demo_shapes)


def as_numpy01(image: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] or [3, H, W] in [-1, 1] -> float32 [3, H, W] in [0, 1]."""
    image = image[0] if image.ndim == 4 else image
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
