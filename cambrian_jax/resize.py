"""Resizing of token grids exactly as PyTorch's F.interpolate does it.

`jax.image.resize` antialiases when downsampling and uses a different bicubic kernel constant, so the
reference's numbers (bilinear, align_corners=False, no antialiasing; bicubic a=-0.75) are reproduced
here as separable interpolation matrices built in numpy at trace time and applied with einsum.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def bilinear_matrix(in_size: int, out_size: int, scale: float | None = None) -> np.ndarray:
    """[out, in] weights of torch bilinear, align_corners=False. scale = out/in unless given."""
    # float32 coordinate arithmetic, as torch's CPU kernel does it for float inputs.
    ratio = np.float32(1.0 / scale if scale else in_size / out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = np.maximum((dst + np.float32(0.5)) * ratio - np.float32(0.5), np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = src - i0
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), i0), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), i1), frac)
    return m.astype(np.float32)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """The four taps of torch's cubic convolution kernel at fractional offset t."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int, scale: float | None = None) -> np.ndarray:
    """[out, in] weights of torch bicubic (a=-0.75), align_corners=False, borders clamped."""
    ratio = np.float32(1.0 / scale if scale else in_size / out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = (dst + np.float32(0.5)) * ratio - np.float32(0.5)  # no clamping at 0 for cubic, as torch
    i0 = np.floor(src).astype(np.int64)
    w = _cubic_weights((src - i0).astype(np.float32))
    m = np.zeros((out_size, in_size), np.float64)
    for tap in range(4):
        idx = np.clip(i0 - 1 + tap, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), w[:, tap])
    return m.astype(np.float32)


def resize_grid(x: jnp.ndarray, out_hw: tuple[int, int], method: str = "bilinear",
                scale: tuple[float, float] | None = None) -> jnp.ndarray:
    """Resize a [..., H, W, C] grid to [..., out_h, out_w, C] as torch F.interpolate would.

    `scale` reproduces interpolate(scale_factor=...) calls, whose coordinate mapping uses the given
    factor rather than out/in.
    """
    build = {"bilinear": bilinear_matrix, "bicubic": bicubic_matrix}[method]
    h, w = x.shape[-3], x.shape[-2]
    if (h, w) == tuple(out_hw) and scale is None:
        return x
    sh, sw = scale if scale else (None, None)
    mh = jnp.asarray(build(h, out_hw[0], sh))
    mw = jnp.asarray(build(w, out_hw[1], sw))
    y = jnp.einsum("oh,...hwc->...owc", mh, x.astype(jnp.float32))
    y = jnp.einsum("pw,...owc->...opc", mw, y)
    return y.astype(x.dtype)


def resize_tokens(tokens: jnp.ndarray, out_side: int) -> jnp.ndarray:
    """[B, s*s, C] row-major tokens → [B, out_side², C], bilinear (the reference's 27×27 → 24×24)."""
    b, n, c = tokens.shape
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"cannot resize {n} tokens: not a square grid")
    if side == out_side:
        return tokens
    grid = resize_grid(tokens.reshape(b, side, side, c), (out_side, out_side))
    return grid.reshape(b, out_side * out_side, c)
