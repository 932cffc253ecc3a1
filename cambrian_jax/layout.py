"""Where the image goes: padding masks and the static token layout (spec §3.5, §4, §14.1–14.2).

Images are padded to square before every tower, so some grid cells show only padding. The masks
computed here say which cells are real, at any grid side S: a tower's own grid (SVA key masks) or the
LLM's n×n grid (attention over the n×(n+1) image block). All of this is host-side numpy: it runs in
the data workers, never inside the jitted step.
"""
from __future__ import annotations

import numpy as np

from cambrian_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX


def padding(size: tuple[int, int], side: int) -> tuple[str, int]:
    """(axis, pad) for an image of size (W, H) padded to square and seen on a side×side grid.

    Reproduces the reference's floating-point order exactly: int(H * (S / W)), not int(H*S/W)
    (176×110 at S=24 gives 14, not 15). The kept band is side - 2*pad, which may be new+1.
    """
    w, h = size
    if w <= 0 or h <= 0:
        raise ValueError(f"image size {size} must be positive")
    if w / h > 1:
        new = int(h * (side / w))
        axis = "rows"
    else:
        new = int(w * (side / h))
        axis = "cols"
    if new == 0:
        raise ValueError(f"image of size {w}×{h} is too elongated for a {side}×{side} grid "
                         f"(aspect ratio beyond {side}:1 leaves no real cell); crop or pad it first")
    return axis, (side - new) // 2


def grid_mask(size: tuple[int, int] | None, side: int) -> np.ndarray:
    """[side*side] bool, row-major; True where the cell shows the image. None (no image) = all True."""
    m = np.ones((side, side), bool)
    if size is None:
        return m.reshape(-1)
    axis, pad = padding(size, side)
    if pad:
        if axis == "rows":
            m[:pad], m[side - pad:] = False, False
        else:
            m[:, :pad], m[:, side - pad:] = False, False
    return m.reshape(-1)


def block_mask(size: tuple[int, int] | None, n: int) -> np.ndarray:
    """[n*(n+1)] attention mask of the image block: n rows of n cells plus a newline token.

    Wide images mask whole padded rows including their newline; tall images mask the padded columns
    of each row and keep the newline visible (spec §3.5).
    """
    cells = grid_mask(size, n).reshape(n, n)
    newline = cells.any(axis=1, keepdims=True)
    return np.concatenate([cells, newline], axis=1).reshape(-1)


def positions(attention_mask: np.ndarray) -> np.ndarray:
    """Position ids from the cumulative mask: masked tokens do not advance positions."""
    return np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0).astype(np.int32)


def expand_image_block(ids: np.ndarray, image_position: int, n: int, size: tuple[int, int] | None = None,
                       labels: np.ndarray | None = None, has_image: bool = True):
    """Replace the one −200 sentinel in `ids` [T] by an n×(n+1) block of filler id 0.

    Returns (ids [T-1+block], attention_mask, labels) with the block's cells masked per `size`
    (all masked when has_image is False) and labels IGNORE_INDEX on the block.
    """
    ids = np.asarray(ids)
    where = np.flatnonzero(ids == IMAGE_TOKEN_INDEX)
    if len(where) != 1:
        raise ValueError(f"expected exactly one image sentinel {IMAGE_TOKEN_INDEX} in the tokens, found {len(where)}")
    if where[0] != image_position:
        raise ValueError(f"the image sentinel is at token {where[0]} but the model's image_position is "
                         f"{image_position}; the prompt template must put the image there")
    block = n * (n + 1)
    out = np.concatenate([ids[:image_position], np.zeros(block, ids.dtype), ids[image_position + 1:]])
    mask = np.ones(out.shape, bool)
    mask[image_position:image_position + block] = block_mask(size, n) if has_image else False
    lab = None
    if labels is not None:
        labels = np.asarray(labels)
        lab = np.concatenate([labels[:image_position], np.full(block, IGNORE_INDEX, labels.dtype),
                              labels[image_position + 1:]])
    return out, mask, lab
