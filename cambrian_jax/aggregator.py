"""The Spatial Vision Aggregator: windowed cross-attention from grid queries to tower features (spec §3).

Every query cell of an L×L grid reads only its own window of each tower: tower k's s_k×s_k token grid
is cut into L×L windows of side r_k = s_k // L, and the query attends jointly to the Σ r_k² keys of its
windows (1 + 1 + 1 + 16 = 19 in the released models). The attention is therefore a batched attention
with one query and a handful of keys per (image, cell), written as reshapes and einsums.

Layout conventions (spec §3.3):

  windows   tower tokens [B, s², C] (row-major over the s×s grid) → [B·L², r², C]; query index
            m = b·L² + i·L + j (cell row i, col j); key index in the window a·r + b' (window row a,
            col b'), i.e. tower cell (i·r + a, j·r + b').
  masks     [B, s²] bool, True = a real (non-padding) cell, windowed the same way; a window whose keys
            are all padding is re-enabled entirely so its softmax is never empty. Queries are never
            masked.

The module tree mirrors the reference's `VisionCrossAttentionLayer` / `VisionTokenSampler` so the
checkpoint conversion is a mechanical rename (kernel ↔ weightᵀ, scale ↔ weight, '/' ↔ '.').
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cambrian_jax.layers import LayerNorm, Linear, gelu, param, sequential
from cambrian_jax.sharding import constrain

LN_EPS = 1e-5   # every LayerNorm of the SVA and the projectors (spec §13)

# Logical axes of the queries [M, 1, width] and window keys/values [M, T, width] pinned with
# `sharding.constrain`: the M = B·L² rows split like the batch (b-major, so no row moves); a window's
# handful of keys is never split.
ROWS = ("activation_batch", None, "activation_embed")


def axes(a: str | None, b: str | None) -> tuple[str | None, str | None]:
    """Logical axes of a [in, out] kernel; a name used twice (a V×V kernel) is kept on `in` only."""
    return (a, b if b != a else None)


# ---------------------------------------------------------------------------------------------------
# Windowing


def window(tokens: jax.Array, side: int) -> jax.Array:
    """[B, s², ...] row-major grid tokens → [B·side², r², ...] windows, r = s // side.

    Row m = b·side² + i·side + j holds window (i, j) of image b; its keys are the tower cells
    (i·r + a, j·r + b') in order a·r + b'.
    """
    b, n = tokens.shape[:2]
    rest = tokens.shape[2:]
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"cannot window {n} tokens: not a square grid")
    if s % side:
        raise ValueError(f"a tower grid of side {s} cannot be cut into {side}×{side} windows "
                         f"(side must divide {s})")
    r = s // side
    x = tokens.reshape(b, side, r, side, r, *rest)
    x = jnp.moveaxis(x, 3, 2)                       # [B, i, j, a, b', ...]
    return x.reshape(b * side * side, r * r, *rest)


def window_mask(mask: jax.Array | None, side: int, tokens: int | None = None) -> jax.Array | None:
    """[B, s²] bool (True = real cell) → [B·side², r²] key masks; all-padding windows become all-True.

    None (no padding anywhere) stays None.
    """
    if mask is None:
        return None
    if tokens is not None and mask.shape[-1] != tokens:
        raise ValueError(f"a key mask of {mask.shape[-1]} cells does not match {tokens} tower tokens")
    w = window(mask.astype(bool), side)
    return w | ~w.any(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------------
# Attention


def window_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                     scale: float) -> jax.Array:
    """One query per row attending to its own T keys.

    q [M, NH, hd], k/v [M, T, NH, hd], mask [M, T] bool (True = may attend) or None → [M, NH, hd].
    Logits and softmax in float32; masked keys get −inf before the softmax.
    """
    logits = jnp.einsum("mhd,mthd->mht", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[:, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("mht,mthd->mhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype)


def _norm_linear(dim_in: int, dim_out: int, dtype, rngs: nnx.Rngs) -> nnx.List:
    """The reference's nn.Sequential(LayerNorm, Linear(bias=False)): slots 0 and 1."""
    return nnx.List([LayerNorm(dim_in, LN_EPS, "vision"),
                     Linear(dim_in, dim_out, axes("vision", "vision"), use_bias=False, dtype=dtype,
                            rngs=rngs)])


class WindowCrossAttention(nnx.Module):
    """`cross_attn`: LayerNorm+Linear projections per tower, joint softmax over all towers' keys."""

    def __init__(self, hidden: int, kv_dims: Sequence[int], num_heads: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if hidden % num_heads:
            raise ValueError(f"SVA width {hidden} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.num_towers = len(kv_dims)
        self.q_proj = _norm_linear(hidden, hidden, dtype, rngs)
        for k, c in enumerate(kv_dims):
            setattr(self, f"k_proj_{k}", _norm_linear(c, hidden, dtype, rngs))
            setattr(self, f"v_proj_{k}", _norm_linear(c, hidden, dtype, rngs))
        self.o_proj = Linear(hidden, hidden, axes("vision", "vision"), use_bias=False, dtype=dtype,
                             rngs=rngs)

    def keys_values(self, windows: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Per-tower projections, concatenated along the key axis in tower order: [M, Σ r_k², hidden]."""
        ks = [sequential(getattr(self, f"k_proj_{k}"), x) for k, x in enumerate(windows)]
        vs = [sequential(getattr(self, f"v_proj_{k}"), x) for k, x in enumerate(windows)]
        return constrain(jnp.concatenate(ks, axis=1), ROWS), constrain(jnp.concatenate(vs, axis=1), ROWS)

    def __call__(self, h: jax.Array, windows: Sequence[jax.Array],
                 masks: Sequence[jax.Array | None]) -> jax.Array:
        """h [M, 1, hidden] queries; windows[k] [M, r_k², C_k]; masks[k] [M, r_k²] bool or None."""
        if len(windows) != self.num_towers:
            raise ValueError(f"expected {self.num_towers} towers' windows, got {len(windows)}")
        m, _, hidden = h.shape
        hd = hidden // self.num_heads
        q = sequential(self.q_proj, h).reshape(m, self.num_heads, hd)
        k, v = self.keys_values(windows)
        k = k.reshape(m, -1, self.num_heads, hd)
        v = v.reshape(m, -1, self.num_heads, hd)
        if all(w is None for w in masks):
            mask = None
        else:
            mask = jnp.concatenate([jnp.ones(x.shape[:2], bool) if w is None else w
                                    for x, w in zip(windows, masks)], axis=1)
        out = window_attention(q, k, v, mask, 1.0 / math.sqrt(hd))
        return self.o_proj(out.reshape(m, 1, hidden))


class ProjOut(nnx.Module):
    """`proj_out`: Linear → exact GELU → Linear, no biases."""

    def __init__(self, hidden: int, q_dim: int, q_axis: str, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.linear_1 = Linear(hidden, hidden, axes("vision", "vision"), use_bias=False, dtype=dtype,
                               rngs=rngs)
        self.linear_2 = Linear(hidden, q_dim, axes("vision", q_axis), use_bias=False, dtype=dtype,
                               rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(gelu(self.linear_1(x)))


class VisionCrossAttentionLayer(nnx.Module):
    """One SVA layer (spec §3.3): queries [M, 1, q_dim] read their windows of K towers.

    q_dim is V for the connector's samplers and H for the in-LLM aggregators (`q_axis` names it for
    sharding: 'vision' or 'embed'). window_sides[k] = r_k; a learned window position embedding
    `pos_embed_k` [r_k², C_k] exists only for towers with r_k > 1.
    """

    def __init__(self, q_dim: int, context_dim: int, kv_dims: Sequence[int], window_sides: Sequence[int],
                 hidden: int, num_heads: int = 16, *, q_axis: str = "vision", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if len(kv_dims) != len(window_sides):
            raise ValueError(f"{len(kv_dims)} tower widths but {len(window_sides)} window sides")
        self.q_dim, self.hidden = q_dim, hidden
        self.window_sides = tuple(int(r) for r in window_sides)
        self.dtype = dtype
        self.proj_context = Linear(context_dim, hidden, axes("vision", "vision"), use_bias=False,
                                   dtype=dtype, rngs=rngs)
        self.proj_in = Linear(q_dim + hidden, hidden, (None, "vision"), use_bias=False, dtype=dtype,
                              rngs=rngs)
        self.proj_out = ProjOut(hidden, q_dim, q_axis, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(hidden, LN_EPS, "vision")
        self.cross_attn = WindowCrossAttention(hidden, kv_dims, num_heads, dtype=dtype, rngs=rngs)
        for k, (c, r) in enumerate(zip(kv_dims, self.window_sides)):
            if r > 1:   # unscaled N(0, 1), spec §3.6
                setattr(self, f"pos_embed_{k}",
                        param(rngs, nnx.initializers.normal(1.0), (r * r, c), (None, "vision")))

    def key_inputs(self, windows: Sequence[jax.Array]) -> list[jax.Array]:
        """X_k + pos_embed_k (shared by all windows) where r_k > 1, X_k unchanged otherwise."""
        out = []
        for k, (x, r) in enumerate(zip(windows, self.window_sides)):
            if x.shape[1] != r * r:
                raise ValueError(f"tower {k}: windows of {x.shape[1]} keys, but this layer was built for "
                                 f"window side {r} ({r * r} keys)")
            x = x.astype(self.dtype)
            if r > 1:
                x = x + getattr(self, f"pos_embed_{k}")[...].astype(self.dtype)
            out.append(constrain(x, ROWS))
        return out

    def __call__(self, queries: jax.Array, context: jax.Array, windows: Sequence[jax.Array],
                 masks: Sequence[jax.Array | None] | None = None) -> jax.Array:
        """queries [M, 1, q_dim]; context [Bc, 1, ctx] with each row serving M/Bc consecutive queries
        (Bc = B for m = b·L² + …, or Bc = M); windows[k] [M, r_k², C_k]; masks[k] [M, r_k²] bool
        (True = attend) or None. Returns queries + Δ, [M, 1, q_dim], in the queries' dtype."""
        m = queries.shape[0]
        masks = [None] * len(windows) if masks is None else list(masks)
        res = queries = constrain(queries, ROWS)
        ctx = self.proj_context(context)
        if ctx.shape[0] != m:
            if m % ctx.shape[0]:
                raise ValueError(f"{ctx.shape[0]} context rows cannot serve {m} queries")
            ctx = jnp.repeat(ctx, m // ctx.shape[0], axis=0)
        h = self.proj_in(jnp.concatenate([queries.astype(self.dtype), ctx.astype(self.dtype)], axis=-1))
        h = constrain(h, ROWS)
        h = h + self.cross_attn(h, self.key_inputs(windows), masks)
        h = self.norm(h)
        return constrain(res + self.proj_out(h).astype(res.dtype), ROWS)


class VisionTokenSampler(nnx.Module):
    """`vision_sampler_g`: a stack of D layers applied in sequence with the same context and windows."""

    def __init__(self, q_dim: int, context_dim: int, kv_dims: Sequence[int], window_sides: Sequence[int],
                 hidden: int, num_layers: int, num_heads: int = 16, *, q_axis: str = "vision",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.layers = nnx.List([
            VisionCrossAttentionLayer(q_dim, context_dim, kv_dims, window_sides, hidden, num_heads,
                                      q_axis=q_axis, dtype=dtype, rngs=rngs)
            for _ in range(num_layers)])

    def __call__(self, queries, context, windows, masks=None):
        for layer in self.layers:
            queries = layer(queries, context, windows, masks)
        return queries
