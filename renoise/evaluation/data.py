"""The images of an evaluation: a folder with captions, one prompt for all, or demo scenes.

    items = from_folder("data/", prompt=None)     # captions.jsonl or captions.csv beside the images
    items = from_demo(64)                         # held-out demo scenes with a colour-swap edit each
    x, mask = load(item, size=None, fit="none")   # [1, 3, H, W] in [-1, 1]; edit mask [H, W] or None

Captions: one JSON object a line, or a CSV with a header, with the fields `image` (a path relative
to the folder), `prompt`, and optionally `edit_prompt`, `mask` (an image file: white marks the
region the edit may change), `target_colour` (the colour the masked region should turn, a name of
renoise.demo.checks' palette: red, green, blue, yellow, orange, purple, white, black; the edit is
judged like a demo edit: `edit_success` when the dominant palette colour of the edit where the mask
is > 0.99 is this one) and `id`. Without a captions file every image in the folder is used
with `--prompt`. A problem with one image (missing caption or file, unreadable, odd size, a field
of the wrong type, an id that is not a plain relative name, a `target_colour` the checker does not
know or without a mask and an edit prompt) is not an error: the item carries it
in `problem`, and the evaluation reports and skips it. A file that is not a captions file at all
(not UTF-8, invalid JSON, a line that is not an object, a CSV without an `image` column or rows)
is an error that names the file and the line. `fingerprint(item)` hashes what a pair's numbers
depend on (image and mask bytes, prompts) so that a rerun redoes a pair whose inputs changed.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Item", "from_folder", "from_demo", "load", "demo_scene", "as_numpy01", "IMAGE_SUFFIXES", "CAPTION_FILES",
           "fingerprint", "read_utf8", "id_problem", "demo_edit"]

FIELDS = ("image", "prompt", "edit_prompt", "mask", "id", "target_colour")      # each a string when given

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
    target_colour: str | None = None       # the colour the masked shape should turn (judged: edit_success)
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
        records = [(i + 1, {"image": p.name}) for i, p in enumerate(files)]
    else:
        records = _read_captions(Path(captions))
    items = [_item(folder, r, n, prompt, edit_prompt) for n, r in records]
    _check_unique(items)
    return items


def read_utf8(path, what="file") -> str:
    """A text file's contents (a UTF-8 byte-order mark dropped); not UTF-8: an error naming the line."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{what} {path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as "
                         "UTF-8") from None


def _read_captions(path: Path) -> list[tuple[int, dict]]:
    """[(line number, record)]; a record's fields are checked later, per item."""
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    text = read_utf8(path, "captions file")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            rows = [(reader.line_num, r) for r in reader]
        except csv.Error as e:
            raise ValueError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from None
        header = [h.strip() for h in reader.fieldnames or []]
        if "image" not in header:
            raise ValueError(f"{path}: the CSV header needs an 'image' column (and 'prompt', optionally "
                             f"'edit_prompt', 'mask', 'id', 'target_colour'); its header is {header}")
        if not rows:
            raise ValueError(f"{path} lists no images: it has a header but no rows")
        return [(n, {k.strip(): v for k, v in r.items() if k is not None and v not in (None, "")}) for n, r in rows]
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not valid JSON ({e})") from None
        if not isinstance(r, dict):
            raise ValueError(f"{path}, line {n}: expected an object with an 'image' path, got {line.strip()[:80]}")
        records.append((n, r))
    if not records:
        raise ValueError(f"{path} lists no images")
    return records


def id_problem(item_id: str) -> str | None:
    """Why an id cannot name output files (None if it can): ids are plain relative names."""
    parts = item_id.split("/")
    if (not item_id or item_id.startswith("/") or "\\" in item_id or "\0" in item_id
            or any(p in ("", ".", "..") for p in parts)):
        return (f"id {item_id!r} is not a plain relative name (it names the output files): no '..', no absolute "
                "path, no backslash; give the image another 'id'")
    return None


def _item(folder, r, line, prompt, edit_prompt) -> Item:
    """One record as an Item; a record with a wrong field carries the reason in `problem`."""
    wrong = [k for k in FIELDS if r.get(k) is not None and not isinstance(r[k], str)]
    image_name = r.get("image") if isinstance(r.get("image"), str) else None
    if isinstance(r.get("id"), str) and r["id"]:
        item_id = r["id"]
    elif image_name and "id" not in wrong:
        item_id = Path(image_name).with_suffix("").as_posix().replace("/", "__")
    else:
        item_id = f"line-{line}"
    text = r.get("prompt", prompt) if "prompt" not in wrong else None
    edit = r.get("edit_prompt", edit_prompt) if "edit_prompt" not in wrong else None
    mask = r.get("mask") if "mask" not in wrong else None
    target = r.get("target_colour") if "target_colour" not in wrong else None
    image = None if image_name is None else folder / image_name
    problem = None
    if wrong:
        problem = "; ".join(f"field {k!r} must be a string, got {type(r[k]).__name__} {json.dumps(r[k])[:40]}"
                            for k in wrong) + f" (captions line {line})"
    elif image_name is None:
        problem = f"no 'image' field (captions line {line})"
    elif id_problem(item_id):
        problem = id_problem(item_id)
    elif not isinstance(text, str):
        problem, text = "no caption (no 'prompt' in the captions file and no --prompt)", None
    elif not _text_ok(text) or (edit is not None and not _text_ok(edit)):
        problem = f"a prompt of captions line {line} is not valid UTF-8 text"
    elif not image.is_file():
        problem = f"image file not found: {image}"
    if problem is None and mask is not None and not (folder / mask).is_file():
        problem = f"mask file not found: {folder / mask}"
    if problem is None and target is not None:
        problem = _target_problem(target, mask, edit, line)
    return Item(item_id, text, edit, None if image is None else str(image),
                None if mask is None else str(folder / mask), target_colour=target, problem=problem)


def _target_problem(target, mask, edit, line) -> str | None:
    """Why a `target_colour` cannot be judged (None if it can)."""
    from ..demo.checks import COLOURS
    if target not in COLOURS:
        return (f"target_colour {target!r} (captions line {line}) is not a colour the checker knows "
                f"(renoise.demo.checks); use one of {', '.join(COLOURS)}")
    if mask is None:
        return f"target_colour {target!r} (captions line {line}) needs a 'mask': the region whose colour is judged"
    if not edit:
        return (f"target_colour {target!r} (captions line {line}) needs an edit prompt ('edit_prompt' or "
                "--edit-prompt): there is no edit to judge")
    return None


def _text_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


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
    from ..demo import held_out
    if n < 1:
        raise ValueError(f"--demo needs a number of scenes >= 1, got {n}")
    items = []
    for i in range(first, first + n):
        edit, target = demo_edit(i, max_shapes=max_shapes)
        items.append(Item(f"demo-{i:05d}", held_out(i, max_shapes=max_shapes).caption, edit, demo=i,
                          demo_shapes=max_shapes, target_colour=target))
    return items


def demo_edit(i: int, *, max_shapes: int = 1) -> tuple[str, str]:
    """(edit caption, target colour) of held-out scene i: its first shape turned to a colour chosen
    per scene among those not already in it."""
    from ..demo import COLOURS, HELD_OUT, held_out
    scene = held_out(i, max_shapes=max_shapes)
    used = {s.colour for s in scene.shapes} | set(scene.background)
    target = random.Random(HELD_OUT + i).choice([c for c in COLOURS if c not in used])
    return scene.replace_shape(0, colour=target).caption, target


def load(item: Item, *, size=None, fit="none", multiple=8) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The item's image [1, 3, H, W] in [-1, 1] and its edit mask [H, W] (float, 1 = may change) or None;
    sides multiples of `multiple` (8; flow transformers: 16) as --fit says.
    Raises ValueError / FileNotFoundError for an image that cannot be used."""
    if item.problem:
        raise ValueError(item.problem)
    if item.demo is not None:
        from ..demo import held_out, render_tensor, shape_masks
        scene = held_out(item.demo, max_shapes=item.demo_shapes)
        return render_tensor(scene), torch.from_numpy(shape_masks(scene)[0])
    from .. import images as imgs
    x = imgs.to_tensor(imgs.load_image(item.path, size=size, mode=fit, multiple=multiple))
    if item.mask is None:
        return x, None
    m = imgs.to_tensor(imgs.load_image(item.mask, size=size, mode=fit, multiple=multiple))
    if m.shape != x.shape:
        raise ValueError(f"mask {item.mask} is {m.shape[2]}x{m.shape[3]} but its image is {x.shape[2]}x{x.shape[3]}")
    return x, ((m[0].mean(0) + 1) / 2).clamp(0, 1)


def fingerprint(item: Item) -> str:
    """sha256 (hex) of what an item's numbers depend on: image and mask bytes (or the demo scene),
    prompt, edit prompt (each field length-prefixed, so no two inputs share a digest)."""
    h = hashlib.sha256()

    def field(name, value):
        data = value if isinstance(value, bytes) else json.dumps(value, ensure_ascii=False).encode("utf-8", "replace")
        h.update(f"{name}:{len(data)}:".encode())
        h.update(data)

    field("prompt", item.prompt)
    field("edit_prompt", item.edit_prompt)
    field("problem", item.problem)
    if item.demo is not None:
        field("demo", [item.demo, item.demo_shapes, item.target_colour])
    elif item.target_colour is not None:                # only then: older folder rows keep their digests
        field("target_colour", item.target_colour)
    for name, path in (("image", item.path), ("mask", item.mask)):
        if path is None:
            field(name, None)
            continue
        try:
            field(name, Path(path).read_bytes())
        except OSError as e:
            field(name, f"unreadable: {type(e).__name__}")
    return h.hexdigest()


def demo_scene(item: Item):
    """The demo scene of a demo item (for the checker)."""
    from ..demo import held_out
    return held_out(item.demo, max_shapes=item.demo_shapes)


def as_numpy01(image: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] or [3, H, W] in [-1, 1] -> float32 [3, H, W] in [0, 1]."""
    image = image[0] if image.ndim == 4 else image
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
