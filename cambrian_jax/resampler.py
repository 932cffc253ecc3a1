"""A resampler: learned queries attending globally to every tower token (no spatial windows).

The control that isolates the SVA's spatial inductive bias: everything else is the SVA's —

    f_k ─ mm_projector_aux_k (Linear, GELU, Linear, LayerNorm) ─► z_k [B, s_k², V]
    c = mean over all tokens of z_0
    q⁰ = vision_query [n², V]  (one learned query per LLM cell: without windows, a query's place in
         the grid can only come from the query itself)
    D layers, each as the SVA layer of spec §3.3 (proj_context, proj_in, LN+Linear q/k/v per tower,
         joint softmax, o_proj, norm, proj_out, residual) but every query reads all Σ s_k² keys
    mm_projector (Linear V→H, GELU, Linear H→H) ─► [B, n², H] ─ + image_newline per row

There is no position embedding on the keys, so the output does not depend on the order of a tower's
tokens (only on what the towers put into them); the SVA's does, through its windows. Key masks are
the SVA's tower masks (True = real cell); a row with no real key attends to all of them.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cambrian_jax.aggregator import LN_EPS, ProjOut, WindowCrossAttention, axes
from cambrian_jax.config import CambrianConfig, ConfigError
from cambrian_jax.layers import LayerNorm, Linear, param, sequential
from cambrian_jax.projector import aux_projector, check_tower_tokens, mlp2x_gelu, newline_param, with_newlines


def global_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float) -> jax.Array:
    """q [B, Q, NH, hd] attending to k/v [B, T, NH, hd]; mask [B, T] bool (True = may attend) or None.

    Logits and softmax in float32, as the SVA's window attention.
    """
    logits = jnp.einsum("bqhd,bthd->bhqt", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqt,bthd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype)


class GlobalCrossAttention(WindowCrossAttention):
    """The SVA's `cross_attn` parameters, with Q queries per image sharing all of its tower tokens."""

    def __call__(self, h: jax.Array, tokens: Sequence[jax.Array], mask: jax.Array | None) -> jax.Array:
        """h [B, Q, hidden]; tokens[k] [B, s_k², C_k]; mask [B, Σ s_k²] bool or None → [B, Q, hidden]."""
        if len(tokens) != self.num_towers:
            raise ValueError(f"expected {self.num_towers} towers' tokens, got {len(tokens)}")
        b, nq, hidden = h.shape
        hd = hidden // self.num_heads
        q = sequential(self.q_proj, h).reshape(b, nq, self.num_heads, hd)
        k, v = self.keys_values(tokens)
        k = k.reshape(b, -1, self.num_heads, hd)
        v = v.reshape(b, -1, self.num_heads, hd)
        out = global_attention(q, k, v, mask, 1.0 / math.sqrt(hd))
        return self.o_proj(out.reshape(b, nq, hidden))


class ResamplerLayer(nnx.Module):
    """One SVA layer (spec §3.3) with global instead of windowed keys; q_dim = hidden = V."""

    def __init__(self, hidden: int, kv_dims: Sequence[int], num_heads: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.proj_context = Linear(hidden, hidden, axes("vision", "vision"), use_bias=False, dtype=dtype, rngs=rngs)
        self.proj_in = Linear(2 * hidden, hidden, (None, "vision"), use_bias=False, dtype=dtype, rngs=rngs)
        self.proj_out = ProjOut(hidden, hidden, "vision", dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(hidden, LN_EPS, "vision")
        self.cross_attn = GlobalCrossAttention(hidden, kv_dims, num_heads, dtype=dtype, rngs=rngs)

    def __call__(self, queries: jax.Array, context: jax.Array, tokens: Sequence[jax.Array],
                 mask: jax.Array | None) -> jax.Array:
        """queries [B, Q, V]; context [B, V]; tokens[k] [B, s_k², V]; mask [B, Σ s_k²] or None."""
        res = queries
        ctx = jnp.broadcast_to(self.proj_context(context)[:, None], queries.shape)
        h = self.proj_in(jnp.concatenate([queries.astype(self.dtype), ctx.astype(self.dtype)], axis=-1))
        h = h + self.cross_attn(h, tokens, mask)
        h = self.norm(h)
        return res + self.proj_out(h).astype(res.dtype)


def key_mask(masks: Sequence[jax.Array | None], tokens: Sequence[jax.Array]) -> jax.Array | None:
    """Per-tower [B, s_k²] masks (None = all real) → [B, Σ s_k²]; a row with no real key is re-enabled."""
    if all(m is None for m in masks):
        return None
    m = jnp.concatenate([jnp.ones(t.shape[:2], bool) if w is None else w.astype(bool)
                         for t, w in zip(tokens, masks)], axis=1)
    return m | ~m.any(axis=-1, keepdims=True)


class ResamplerConnector(nnx.Module):
    """Aux projectors, learned queries `vision_query` [n², V], D global layers `vision_sampler/l`,
    `mm_projector`, `image_newline`; no in-LLM aggregators."""

    def __init__(self, tower_widths: Sequence[int], tower_sides: Sequence[int], grid: int, llm_hidden: int,
                 vision_hidden: int, depth: int, num_heads: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if not tower_widths or len(tower_widths) != len(tower_sides):
            raise ConfigError(f"connector: {len(tower_widths)} tower widths but {len(tower_sides)} tower sides")
        if vision_hidden % num_heads:
            raise ConfigError(f"config field model.connector.vision_hidden_size: {vision_hidden} is not divisible "
                              f"by the resampler's {num_heads} heads")
        v = vision_hidden
        self.dtype = dtype
        self.grid = grid
        self.tower_sides = tuple(int(s) for s in tower_sides)
        for k, c in enumerate(tower_widths):
            setattr(self, f"mm_projector_aux_{k}", aux_projector(c, v, dtype=dtype, rngs=rngs))
        self.vision_query = param(rngs, nnx.initializers.normal(1.0 / math.sqrt(v)), (grid * grid, v),
                                  (None, "vision"))
        self.vision_sampler = nnx.List([ResamplerLayer(v, [v] * len(tower_widths), num_heads, dtype=dtype, rngs=rngs)
                                        for _ in range(depth)])
        self.mm_projector = mlp2x_gelu(v, llm_hidden, "vision", dtype=dtype, rngs=rngs)
        self.image_newline = newline_param(rngs, llm_hidden)
        self.vision_sampler_layers = None

    @classmethod
    def from_config(cls, cfg: CambrianConfig, *, rngs: nnx.Rngs) -> "ResamplerConnector":
        con = cfg.connector
        return cls([t.width for t in cfg.towers], [t.side for t in cfg.towers], con.grid, cfg.decoder.hidden_size,
                   con.vision_hidden_size, con.connector_depth, con.num_heads, dtype=jnp.dtype(cfg.dtype), rngs=rngs)

    def resample(self, features: Sequence[jax.Array], masks: Sequence[jax.Array | None] | None = None) -> jax.Array:
        """features[k] [B, s_k², C_k] → the queries after the D layers, [B, n², V]."""
        check_tower_tokens(features, self.tower_sides)
        masks = [None] * len(features) if masks is None else list(masks)
        z = [sequential(getattr(self, f"mm_projector_aux_{k}"), f).astype(self.dtype) for k, f in enumerate(features)]
        context = z[0].astype(jnp.float32).mean(axis=1).astype(self.dtype)          # [B, V]
        mask = key_mask(masks, z)
        q = jnp.broadcast_to(self.vision_query[...].astype(self.dtype), (z[0].shape[0],) + self.vision_query.shape)
        for layer in self.vision_sampler:
            q = layer(q, context, z, mask)
        return q

    def __call__(self, features: Sequence[jax.Array], masks: Sequence[jax.Array | None] | None = None
                 ) -> tuple[jax.Array, None]:
        """features[k] [B, s_k², C_k]; masks[k] [B, s_k²] bool or None → (image block [B, n·(n+1), H], None)."""
        x = sequential(self.mm_projector, self.resample(features, masks))
        return with_newlines(x, self.image_newline[...], self.grid), None
