"""Per-tower image preprocessing (spec §2.2) and the padding masks that follow from it (§3.5).

For every tower independently: convert to RGB, pad to square with the tower's padding colour
("expand2square", offset (max−min)//2), PIL-resize to R×R with bicubic, ×1/255, normalise with the
tower's mean/std → float32 [R, R, 3] (NHWC). The towers' own processors (open_clip / HF) then only
normalise, since their resize and centre crop are no-ops on an R×R image.

`mode` selects the image treatment for ablations; only 'pad' (the reference's only training mode)
leaves padding, so only 'pad' gives the masks anything to mask:

  'pad'          pad to square, resize (default; the reference)
  'resize'       squash to R×R (aspect ratio not kept)
  'resize_crop'  resize the shortest side to R, centre-crop R×R (HF CLIPImageProcessor style)

Host-side numpy and PIL only: this runs in the data workers.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from PIL import Image

from cambrian_jax import layout
from cambrian_jax.config import TowerConfig

MODES = ("pad", "resize", "resize_crop")

# Modes holding more than 8 bits per channel, as PIL opens 16-bit PNG/TIFF and float TIFF images.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"image mode {mode!r} is not one of {MODES}")


def _wide_to_uint8(image: Image.Image) -> np.ndarray:
    """16-bit / 32-bit / float greyscale → uint8, scaling the full range instead of clipping at 255."""
    arr = np.asarray(image)
    if image.mode == "F":
        arr = arr.astype(np.float64)
        arr = np.nan_to_num(arr)
        hi = float(arr.max()) if arr.size else 0.0
        if hi <= 1.0:
            arr = arr * 255.0
        elif hi > 255.0:
            arr = arr / 257.0
    else:
        arr = arr.astype(np.float64)
        # "I" holds 8-bit data for some files and 16-bit data for others: judge by the values.
        if image.mode != "I" or (arr.size and arr.max() > 255):
            arr = arr / 257.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL image → 8-bit RGB.

    CMYK, greyscale, bilevel and palette images use PIL's conversion; 16-bit and float greyscale
    are rescaled to 8 bits (PIL's own conversion clips them to white); images with transparency
    (RGBA, LA, palettes with a transparent index) are composited over `background` — white, as a
    viewer shows them — rather than exposing whatever colour the transparent pixels happen to hold
    (PIL's plain convert('RGB'), which the reference uses, turns black-on-transparent into black).
    """
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        return Image.fromarray(_wide_to_uint8(image), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def expand2square(image: Image.Image, color: Sequence[int]) -> Image.Image:
    """Pad to a square of side max(W, H) with `color`, the image centred ((max−min)//2 offset)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), tuple(color))
    out.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def _resize_crop(image: Image.Image, r: int) -> Image.Image:
    w, h = image.size
    # The short side becomes r and the long side is truncated, as CLIPImageProcessor and torchvision do.
    nw, nh = (r, max(r, int(r * h / w))) if w <= h else (max(r, int(r * w / h)), r)
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - r) // 2, (nh - r) // 2
    return image.crop((left, top, left + r, top + r))


@functools.lru_cache(maxsize=32)
def _table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[256, 3] float32: the normalised value of every uint8 level per channel."""
    x = np.arange(256, dtype=np.float32)[:, None] * np.float32(1.0 / 255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def normalize(image: Image.Image | np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 RGB → float32 (x·(1/255) − mean)/std, [H, W, 3].

    A 256-entry table per channel: the same float32 operations as computing it per pixel, at a
    quarter of the cost for the 1024 px tower.
    """
    return _table(tuple(mean), tuple(std))[np.asarray(image, np.uint8), np.arange(3)]


def normalize_device(pixels, tower: TowerConfig):
    """Device-side normalisation of uint8 pixels (data.pixel_format = 'uint8'): same formula, in jnp."""
    import jax.numpy as jnp  # noqa: PLC0415 — the host-side data path never needs JAX
    x = pixels.astype(jnp.float32) * jnp.float32(1.0 / 255.0)
    return (x - jnp.asarray(tower.image_mean, jnp.float32)) / jnp.asarray(tower.image_std, jnp.float32)


def resized(image: Image.Image, size: int, pad_color: Sequence[int], mode: str = "pad") -> Image.Image:
    """The RGB image a tower of input size `size` sees, before normalisation."""
    _check_mode(mode)
    image = to_rgb(image)
    if mode == "pad":
        return expand2square(image, pad_color).resize((size, size), Image.BICUBIC)
    if mode == "resize":
        return image.resize((size, size), Image.BICUBIC)
    return _resize_crop(image, size)


def preprocess(image: Image.Image, tower: TowerConfig, mode: str = "pad") -> np.ndarray:
    """float32 [R, R, 3] pixels of one tower (spec §2.2)."""
    return normalize(resized(image, tower.image_size, tower.pad_color, mode), tower.image_mean, tower.image_std)


def preprocess_towers(image: Image.Image, towers: Sequence[TowerConfig], mode: str = "pad",
                      normalized: bool = True) -> list[np.ndarray]:
    """Pixels for every tower; towers sharing (R, pad colour) share the resize. With
    normalized=False: the uint8 [R, R, 3] images, to normalise on device (normalize_device)."""
    image = to_rgb(image)
    cache: dict[tuple, Image.Image] = {}
    out = []
    for t in towers:
        key = (t.image_size, tuple(t.pad_color) if mode == "pad" else None)
        if key not in cache:
            cache[key] = resized(image, t.image_size, t.pad_color, mode)
        out.append(normalize(cache[key], t.image_mean, t.image_std) if normalized else np.asarray(cache[key]))
    return out


def blank_pixels(tower: TowerConfig, normalized: bool = True) -> np.ndarray:
    """Text-only samples: all-zero pixels in normalised space, as the reference feeds them (uint8:
    the mean colour, the nearest to zero after normalisation)."""
    r = tower.image_size
    if normalized:
        return np.zeros((r, r, 3), np.float32)
    return np.broadcast_to(np.round(np.asarray(tower.image_mean) * 255).astype(np.uint8), (r, r, 3)).copy()


def effective_size(size: tuple[int, int] | None, mode: str = "pad") -> tuple[int, int] | None:
    """The size to give layout.grid_mask: the original (W, H) under 'pad', None (no padding) otherwise."""
    _check_mode(mode)
    return tuple(size) if (mode == "pad" and size is not None) else None


def clamp_aspect(size: tuple[int, int] | None, side: int) -> tuple[int, int] | None:
    """Limit the aspect ratio to side:1 so a side×side grid keeps at least one real row/column.

    Beyond that ratio the reference's formula gives an empty band and crashes (spec §3.5); the
    image is still drawn, only as a thinner line than one grid cell, so keep the centre band.
    """
    if size is None:
        return None
    w, h = size
    if w / h > side:
        return (side, 1)
    if h / w > side:
        return (1, side)
    return (w, h)


def image_masks(size: tuple[int, int] | None, towers: Sequence[TowerConfig], n: int,
                mode: str = "pad") -> tuple[list[np.ndarray], np.ndarray]:
    """(per-tower key masks [s_k²], LLM image-block mask [n·(n+1)]) for an image of original `size`.

    `size` None means no padding (a text-only sample's dummy block is masked by the caller).
    """
    eff = effective_size(size, mode)
    tower_masks = [layout.grid_mask(clamp_aspect(eff, t.side), t.side) for t in towers]
    return tower_masks, layout.block_mask(clamp_aspect(eff, n), n)

