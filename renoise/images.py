"""Images in and out: files, PIL images and [-1, 1] NCHW tensors.

The VAE maps an H×W image to an (H/8)×(W/8) latent, so H and W must be multiples of 8
(`FACTOR`). `fit` makes any image acceptable, keeping its aspect ratio:

    "crop"    centre-crop to the largest multiple of 8 in each side (loses ≤ 7 px per side)
    "resize"  resample to the nearest multiple of 8 in each side (≥ 8)
    "none"    keep the image as it is; an image whose sides are not multiples of 8 is refused

`size=(H, W)` first scales the image to cover H×W and centre-crops it (the usual "resize to
512×512"), then the mode above applies (a no-op when H, W are multiples of 8).

Tensors: float, [B, 3, H, W], values in [-1, 1] (pixel / 127.5 - 1), as the VAE expects.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

FACTOR = 8
MODES = ("crop", "resize", "none")


class ImageError(ValueError):
    """An image that cannot be read or cannot be used as given."""


def load_image(path, *, size=None, mode="crop", multiple=FACTOR) -> Image.Image:
    """Read an image file as RGB (upright per its EXIF orientation) and `fit` it.
    Raises FileNotFoundError or ImageError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            image = _to_rgb(ImageOps.exif_transpose(im))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot read image {path}: not an image file PIL can decode ({e})") from None
    try:
        return fit(image, size=size, mode=mode, multiple=multiple)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None


def load_images(paths, *, size=None, mode="crop", multiple=FACTOR) -> torch.Tensor:
    """Read several files into one [B, 3, H, W] tensor; all must fit to the same size."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ImageError("no image files given")
    return to_tensor([load_image(p, size=size, mode=mode, multiple=multiple) for p in paths])


def fit(image: Image.Image, *, size=None, mode="crop", multiple=FACTOR) -> Image.Image:
    """Make the image's sides multiples of `multiple` (see the module docstring)."""
    if mode not in MODES:
        raise ImageError(f"unknown image fit mode {mode!r}; use one of {', '.join(MODES)}")
    image = _to_rgb(image)
    if size is not None:
        image = cover(image, _size(size))
    w, h = image.size
    if mode == "none":
        if h % multiple or w % multiple:
            raise ImageError(
                f"image size {h}x{w} (HxW) is not a multiple of {multiple}; crop or resize it "
                f"(e.g. --fit crop / --fit resize), or pass a size that is")
        return image
    if mode == "crop":
        th, tw = h // multiple * multiple, w // multiple * multiple
        if th == 0 or tw == 0:
            raise ImageError(f"image size {h}x{w} (HxW) is smaller than {multiple} px; use a larger image")
        return center_crop(image, (th, tw))
    th, tw = (max(multiple, round(s / multiple) * multiple) for s in (h, w))
    return image if (th, tw) == (h, w) else image.resize((tw, th), Image.Resampling.LANCZOS)


def cover(image: Image.Image, size) -> Image.Image:
    """Scale (keeping the aspect ratio) so the image covers size=(H, W), then centre-crop to it."""
    th, tw = _size(size)
    w, h = image.size
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    return center_crop(image, (th, tw))


def center_crop(image: Image.Image, size) -> Image.Image:
    """Crop the centre (H, W) region; the extra pixel of an odd margin goes to the bottom/right."""
    th, tw = _size(size)
    w, h = image.size
    if th > h or tw > w:
        raise ImageError(f"cannot crop {h}x{w} (HxW) to the larger {th}x{tw}")
    top, left = (h - th) // 2, (w - tw) // 2
    return image.crop((left, top, left + tw, top + th))


def to_tensor(images) -> torch.Tensor:
    """PIL image(s) -> float32 [B, 3, H, W] in [-1, 1]. All images must share one size."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    if not images:
        raise ImageError("no images given")
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        listed = ", ".join(f"{h}x{w}" for w, h in sorted(sizes))
        raise ImageError(f"images in one batch must share a size, got {listed} (HxW); pass a common size")
    arr = np.stack([np.asarray(_to_rgb(im), dtype=np.uint8) for im in images])       # [B, H, W, 3]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] (or [3, H, W]) in [-1, 1] -> list of RGB PIL images (clamped, rounded)."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ImageError(f"expected images of shape [B, 3, H, W], got {list(images.shape)}")
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]


def save_image(image, path) -> None:
    """Write one image (PIL or [3, H, W] / [1, 3, H, W] tensor); the format follows the suffix."""
    if isinstance(image, torch.Tensor):
        if image.ndim == 4 and image.shape[0] != 1:
            raise ImageError(f"save_image writes one image, got a batch of {image.shape[0]}")
        image = to_pil(image)[0]
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise ImageError(f"unknown image file type {Path(path).suffix!r} for {path}; use .png or .jpg")
    image.save(path, format=fmt)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        return _sixteen_bit_to_rgb(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (PIL mode I;16* or I, as 16-bit PNGs load) scaled from 0..65535 to
    0..255 (PIL's own conversion clips at 255: nearly everything would read as white)."""
    grey = np.asarray(image).astype(np.float64)
    if grey.size and (grey.min() < 0 or grey.max() > 65535):
        raise ImageError(f"a {image.mode} image with values outside 0..65535 (from {grey.min():g} to {grey.max():g}) "
                         "is not a 16-bit image; save it as 8- or 16-bit")
    eight = np.rint(grey * (255 / 65535)).astype(np.uint8)
    return Image.fromarray(eight).convert("RGB")


def _size(size):
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ImageError(f"image size must be positive, got {h}x{w}")
    return h, w


def parse_size(text: str | None):
    """"512" or "512x768" (H x W) as (H, W); None stays None. Bad text raises ValueError."""
    if text is None:
        return None
    try:
        parts = [int(s) for s in text.lower().split("x")]
    except ValueError:
        raise ValueError(f"--size {text!r}: expected N or HxW, e.g. 512 or 512x768") from None
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise ValueError(f"--size {text!r}: expected N or HxW with positive numbers")
    return parts[0], parts[-1]
