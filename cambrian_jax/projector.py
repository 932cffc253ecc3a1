"""The LLaVA-style MLP projector and the image block every connector fills (spec §3.1, §3.7).

    mlp2x_gelu   f [B, n², C] ─ mm_projector (Linear C→H, GELU, Linear H→H) ─► [B, n², H]
                 LLaVA-1.5's projector on one tower.
    concat       f_k [B, s_k², C_k] ─ bilinear → n×n ─ concat channels ─ mm_projector ─► [B, n², H]
                 the multi-encoder baseline (paper Table 3; Prismatic's fused SigLIP+DINOv2).
    then         + image_newline after every row ─► image block [B, n·(n+1), H]

These are the reference's non-SVA path (`mm_projector_type: mlp2x_gelu`): the towers' tokens are
concatenated along channels, projected by `mm_projector`, and laid out with `image_newline` exactly
as the SVA's output, so the checkpoint keys are `model.mm_projector.{0,2}` and `model.image_newline`.
The reference needs every tower at image_token_len tokens (each tower interpolates its own grid,
`-interp<N>`); here a tower at another grid side is resized by the connector with the same
interpolation the towers use — bilinear, align_corners=False, no antialiasing (spec §2.1) — so with
every tower at n² tokens nothing is resized and the computation is the reference's.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cambrian_jax.aggregator import LN_EPS, axes
from cambrian_jax.config import CambrianConfig, ConfigError
from cambrian_jax.layers import LayerNorm, Linear, gelu, param, sequential
from cambrian_jax.resize import resize_grid


def mlp2x_gelu(d_in: int, d_out: int, in_axis: str | None, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.List:
    """nn.Sequential(Linear(d_in→d_out), GELU, Linear(d_out→d_out)): slots 0 and 2 hold weights."""
    return nnx.List([Linear(d_in, d_out, (in_axis, "embed"), dtype=dtype, rngs=rngs),
                     gelu,
                     Linear(d_out, d_out, axes("embed", "embed"), dtype=dtype, rngs=rngs)])


def aux_projector(c: int, v: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.List:
    """`mm_projector_aux_k` of the SVA and the resampler: Linear(C_k→V), GELU, Linear(V→V), LayerNorm(V)."""
    return nnx.List([Linear(c, v, ("tower_embed", "vision"), dtype=dtype, rngs=rngs),
                     gelu,
                     Linear(v, v, axes("vision", "vision"), dtype=dtype, rngs=rngs),
                     LayerNorm(v, LN_EPS, "vision")])


def newline_param(rngs: nnx.Rngs, h: int) -> nnx.Param:
    """`image_newline` [H], N(0, 1)/√H (spec §3.6)."""
    return param(rngs, nnx.initializers.normal(1.0 / math.sqrt(h)), (h,), ("embed",))


def with_newlines(x: jax.Array, newline: jax.Array, n: int) -> jax.Array:
    """[B, n², H] row-major image tokens → [B, n·(n+1), H] with `newline` closing every row."""
    b, _, h = x.shape
    nl = jnp.broadcast_to(newline.astype(x.dtype), (b, n, 1, h))
    return jnp.concatenate([x.reshape(b, n, n, h), nl], axis=2).reshape(b, n * (n + 1), h)


def to_grid(tokens: jax.Array, rows: int, cols: int) -> jax.Array:
    """[B, s², C] row-major tower tokens → [B, rows·cols, C], bilinear as F.interpolate (no-op if equal)."""
    b, t, c = tokens.shape
    s = math.isqrt(t)
    if s * s != t:
        raise ValueError(f"cannot resize {t} tokens: not a square grid")
    if (s, s) == (rows, cols):
        return tokens
    return resize_grid(tokens.reshape(b, s, s, c), (rows, cols)).reshape(b, rows * cols, c)


def check_tower_tokens(features: Sequence[jax.Array], sides: Sequence[int]) -> None:
    if len(features) != len(sides):
        raise ValueError(f"the connector was built for {len(sides)} towers, got {len(features)} feature maps")
    for k, (f, s) in enumerate(zip(features, sides)):
        if f.shape[1] != s * s:
            raise ValueError(f"tower {k}: {f.shape[1]} tokens, expected {s}×{s} = {s * s}")


class MLPConnector(nnx.Module):
    """`mlp2x_gelu` (one tower) and `concat` (several): resize to n×n, concat channels, MLP, newlines.

    No in-LLM aggregators (`vision_sampler_layers` is None) and no key masks: padding cells are
    hidden from the LLM by the attention mask of the image block, as for the SVA.
    """

    def __init__(self, tower_widths: Sequence[int], tower_sides: Sequence[int], grid: int, llm_hidden: int, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if not tower_widths or len(tower_widths) != len(tower_sides):
            raise ConfigError(f"connector: {len(tower_widths)} tower widths but {len(tower_sides)} tower sides")
        self.dtype = dtype
        self.grid = grid
        self.tower_sides = tuple(int(s) for s in tower_sides)
        self.mm_projector = mlp2x_gelu(sum(tower_widths), llm_hidden, "tower_embed", dtype=dtype, rngs=rngs)
        self.image_newline = newline_param(rngs, llm_hidden)
        self.vision_sampler_layers = None

    @classmethod
    def from_config(cls, cfg: CambrianConfig, *, rngs: nnx.Rngs) -> "MLPConnector":
        return cls([t.width for t in cfg.towers], [t.side for t in cfg.towers], cfg.connector.grid,
                   cfg.decoder.hidden_size, dtype=jnp.dtype(cfg.dtype), rngs=rngs)

    def __call__(self, features: Sequence[jax.Array], masks: Sequence[jax.Array | None] | None = None
                 ) -> tuple[jax.Array, None]:
        """features[k] [B, s_k², C_k] → (image block [B, n·(n+1), H], None); masks are not used."""
        check_tower_tokens(features, self.tower_sides)
        n = self.grid
        x = jnp.concatenate([to_grid(f, n, n).astype(self.dtype) for f in features], axis=-1)
        x = sequential(self.mm_projector, x)
        return with_newlines(x, self.image_newline[...], n), None
