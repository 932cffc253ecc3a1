"""Interleaved mixture of features: two towers, each through its own projector, alternating token by
token in their spatial order (the Interleaved-MoF of "Eyes Wide Shut", Tong et al. 2024).

    f_a [B, s_a², C_a] ─ bilinear → n × n/2 ─ mm_projector_0 ─► a [B, n·n/2, H]
    f_b [B, s_b², C_b] ─ bilinear → n × n/2 ─ mm_projector_1 ─► b [B, n·n/2, H]
    row i of the n×n image grid:  a(i,0) b(i,0) a(i,1) b(i,1) … a(i,n/2−1) b(i,n/2−1)
    + image_newline after every row ─► image block [B, n·(n+1), H]

The LLM sees the same n×(n+1) block as with every other connector (so the static layout, padding
masks, generation and the data pipeline are unchanged): each tower contributes n·n/2 tokens, the two
tokens of a pair describe the same image region. Eyes Wide Shut keeps both full grids (twice the
tokens); at equal token budget each tower is seen at half the horizontal resolution. A tower at
side n is reduced by bilinear interpolation to n × n/2, which at exactly half the width is the mean
of horizontally adjacent cells (align_corners=False, spec §2.1).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cambrian_jax.config import CambrianConfig, ConfigError
from cambrian_jax.layers import sequential
from cambrian_jax.projector import check_tower_tokens, mlp2x_gelu, newline_param, to_grid, with_newlines


def interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """[B, T, H] and [B, T, H] → [B, 2T, H] as a0 b0 a1 b1 … (row-major n × n/2 grids → n×n grid)."""
    if a.shape != b.shape:
        raise ValueError(f"cannot interleave token sets of shapes {a.shape} and {b.shape}")
    bsz, t, h = a.shape
    return jnp.stack([a, b], axis=2).reshape(bsz, 2 * t, h)


class InterleaveConnector(nnx.Module):
    """Two towers, per-tower mlp2x_gelu projectors `mm_projector_{0,1}`, tokens interleaved, newlines."""

    def __init__(self, tower_widths: Sequence[int], tower_sides: Sequence[int], grid: int, llm_hidden: int, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if len(tower_widths) != 2 or len(tower_sides) != 2:
            raise ConfigError(f"interleave connector: needs exactly two towers, got {len(tower_widths)}")
        if grid % 2:
            raise ConfigError(f"interleave connector: the LLM grid side {grid} must be even (pairs of tokens per row)")
        self.dtype = dtype
        self.grid = grid
        self.tower_sides = tuple(int(s) for s in tower_sides)
        for k, c in enumerate(tower_widths):
            setattr(self, f"mm_projector_{k}", mlp2x_gelu(c, llm_hidden, "tower_embed", dtype=dtype, rngs=rngs))
        self.image_newline = newline_param(rngs, llm_hidden)
        self.vision_sampler_layers = None

    @classmethod
    def from_config(cls, cfg: CambrianConfig, *, rngs: nnx.Rngs) -> "InterleaveConnector":
        return cls([t.width for t in cfg.towers], [t.side for t in cfg.towers], cfg.connector.grid,
                   cfg.decoder.hidden_size, dtype=jnp.dtype(cfg.dtype), rngs=rngs)

    def __call__(self, features: Sequence[jax.Array], masks: Sequence[jax.Array | None] | None = None
                 ) -> tuple[jax.Array, None]:
        """features[k] [B, s_k², C_k] → (image block [B, n·(n+1), H], None); masks are not used."""
        check_tower_tokens(features, self.tower_sides)
        n = self.grid
        a, b = (sequential(getattr(self, f"mm_projector_{k}"), to_grid(f, n, n // 2).astype(self.dtype))
                for k, f in enumerate(features))
        return with_newlines(interleave(a, b), self.image_newline[...], n), None
