"""The three ViT towers: CLIP, SigLIP and DINOv2 (spec §2.1).

They share the pre-LN transformer block (attention with biased q/k/v/o projections, an MLP) and differ
in their ends, which each tower class spells out:

            patch conv   class token   position table     in the block                 features
  CLIP      no bias      yes           (R/p)² + 1         quick-GELU MLP               hidden_states[select_layer]
                                                                                       (after pre_norm), CLS dropped
  SigLIP    bias         no            (R/p)²             gelu-tanh MLP                after post_norm
  DINOv2    bias         yes           G² + 1, resized    layer scale; GELU MLP or     after norm, CLS dropped
                                       to (R/p)² (4.37)   SwiGLU

Features are then resized bilinearly from the raw (R/p)×(R/p) grid to cfg.side×cfg.side.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cambrian_jax.config import ConfigError, TowerConfig
from cambrian_jax.layers import LayerNorm, Linear, activation, param, silu
from cambrian_jax.resize import resize_grid, resize_tokens
from cambrian_jax.sharding import constrain
from cambrian_jax.towers import TOKENS, TOKENS_MLP, PatchConv, scan_layers, stack_layers

_EMBED = ("tower_embed",)


class Attention(nnx.Module):
    """Bidirectional multi-head self-attention; softmax in float32."""

    def __init__(self, width: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        self.q = Linear(width, width, ("tower_embed", None), dtype=dtype, rngs=rngs)
        self.k = Linear(width, width, ("tower_embed", None), dtype=dtype, rngs=rngs)
        self.v = Linear(width, width, ("tower_embed", None), dtype=dtype, rngs=rngs)
        self.o = Linear(width, width, (None, "tower_embed"), dtype=dtype, rngs=rngs)
        self.num_heads = num_heads

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        head_dim = c // self.num_heads

        def heads(t):
            return t.reshape(b, n, self.num_heads, head_dim)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim ** -0.5
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        return self.o(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, c))


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.fc1 = Linear(width, hidden, ("tower_embed", "tower_mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Linear(hidden, width, ("tower_mlp", "tower_embed"), dtype=dtype, rngs=rngs)
        self.act = activation(act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(constrain(self.act(self.fc1(x)), TOKENS_MLP))


class SwiGLU(nnx.Module):
    """DINOv2-giant's feed-forward: down(silu(gate(x)) * up(x)).

    `hidden` is the width of each branch (cfg.intermediate_size); the original checkpoint stores gate
    and up fused as `weights_in` = [gate; up], which the converter splits.
    """

    def __init__(self, width: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.gate = Linear(width, hidden, ("tower_embed", "tower_mlp"), dtype=dtype, rngs=rngs)
        self.up = Linear(width, hidden, ("tower_embed", "tower_mlp"), dtype=dtype, rngs=rngs)
        self.down = Linear(hidden, width, ("tower_mlp", "tower_embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(constrain(silu(self.gate(x)) * self.up(x), TOKENS_MLP))


class Block(nnx.Module):
    """Pre-LN transformer block. With layer_scale (DINOv2), each residual branch is multiplied by a
    learned per-channel vector (ls1, ls2) before it is added."""

    def __init__(self, cfg: TowerConfig, *, layer_scale: bool = False, dtype, rngs: nnx.Rngs):
        c, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.norm1 = LayerNorm(c, eps, "tower_embed")
        self.attn = Attention(c, cfg.num_heads, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(c, eps, "tower_embed")
        if cfg.use_swiglu:
            self.mlp = SwiGLU(c, cfg.intermediate_size, dtype=dtype, rngs=rngs)
        else:
            self.mlp = Mlp(c, cfg.intermediate_size, cfg.hidden_act, dtype=dtype, rngs=rngs)
        ones = nnx.initializers.ones
        self.ls1 = param(rngs, ones, (c,), _EMBED) if layer_scale else None
        self.ls2 = param(rngs, ones, (c,), _EMBED) if layer_scale else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = constrain(x, TOKENS)
        h = self.attn(self.norm1(x))
        if self.ls1 is not None:
            h = h * self.ls1[...].astype(h.dtype)
        x = constrain(x + h, TOKENS)
        h = self.mlp(self.norm2(x))
        if self.ls2 is not None:
            h = h * self.ls2[...].astype(h.dtype)
        return constrain(x + h, TOKENS)


def _blocks(cfg: TowerConfig, *, layer_scale: bool = False, dtype, rngs: nnx.Rngs) -> nnx.Module:
    return stack_layers(lambda r: Block(cfg, layer_scale=layer_scale, dtype=dtype, rngs=r), cfg.num_layers, rngs)


def _patch_tokens(embed: PatchConv, pixels: jax.Array, dtype) -> jax.Array:
    """[B, R, R, 3] → [B, g*g, C], row-major over the g×g patch grid."""
    grid = embed(pixels.astype(dtype))
    b, gh, gw, c = grid.shape
    return constrain(grid.reshape(b, gh * gw, c), TOKENS)


def _with_cls(cls_token: nnx.Param, tokens: jax.Array) -> jax.Array:
    b, _, c = tokens.shape
    cls = jnp.broadcast_to(cls_token[...].astype(tokens.dtype), (b, 1, c))
    return jnp.concatenate([cls, tokens], axis=1)


def clip_layers_run(select_layer: int, num_layers: int) -> int:
    """How many encoder layers produce hidden_states[select_layer].

    hidden_states has num_layers + 1 entries (entry 0 is the pre-normed embedding), so -2 is the
    output of the second-to-last layer and the last layer never needs to run.
    """
    n = num_layers + 1 + select_layer if select_layer < 0 else select_layer
    if not 0 <= n <= num_layers:
        raise ConfigError(f"select_layer={select_layer} does not index the {num_layers + 1} hidden states "
                          f"of a {num_layers}-layer CLIP tower")
    return n


class CLIPTower(nnx.Module):
    """OpenAI CLIP vision model; features = hidden_states[select_layer] without the class token."""

    def __init__(self, cfg: TowerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c, g = cfg.hidden_size, cfg.raw_side
        self.patch_embed = PatchConv(cfg.patch_size, 3, c, use_bias=False, dtype=dtype, rngs=rngs)
        self.cls_token = param(rngs, nnx.initializers.normal(c ** -0.5), (c,), _EMBED)
        self.pos_embed = param(rngs, nnx.initializers.normal(0.02), (g * g + 1, c), (None, "tower_embed"))
        self.pre_norm = LayerNorm(c, cfg.layer_norm_eps, "tower_embed")
        self.blocks = _blocks(cfg, dtype=dtype, rngs=rngs)
        self.layers_run = clip_layers_run(cfg.select_layer, cfg.num_layers)
        self.cfg, self.dtype = cfg, dtype

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = _with_cls(self.cls_token, _patch_tokens(self.patch_embed, pixels, self.dtype))
        x = self.pre_norm(x + self.pos_embed[...].astype(x.dtype))
        x = scan_layers(self.blocks, x, self.layers_run)
        return constrain(resize_tokens(x[:, 1:], self.cfg.side), TOKENS)


class SigLIPTower(nnx.Module):
    """SigLIP vision trunk; features = output of the final LayerNorm (the pooling head is not used)."""

    def __init__(self, cfg: TowerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c, g = cfg.hidden_size, cfg.raw_side
        self.patch_embed = PatchConv(cfg.patch_size, 3, c, use_bias=True, dtype=dtype, rngs=rngs)
        self.pos_embed = param(rngs, nnx.initializers.normal(c ** -0.5), (g * g, c), (None, "tower_embed"))
        self.blocks = _blocks(cfg, dtype=dtype, rngs=rngs)
        self.post_norm = LayerNorm(c, cfg.layer_norm_eps, "tower_embed")
        self.cfg, self.dtype = cfg, dtype

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = _patch_tokens(self.patch_embed, pixels, self.dtype)
        x = scan_layers(self.blocks, x + self.pos_embed[...].astype(x.dtype))
        return constrain(resize_tokens(self.post_norm(x), self.cfg.side), TOKENS)


def dinov2_positions(table: jax.Array, grid: int, side: int) -> jax.Array:
    """[1 + grid², C] learned positions (class first) → [1 + side², C] for a side×side patch grid.

    Reproduces transformers 4.37, which the released model ran (spec §14.7): torch bicubic (a = -0.75,
    align_corners=False) called with scale_factor=((side+0.1)/grid, …) rather than size=(side, side);
    the factor, not side/grid, sets the sampling positions. At side == grid the table is used as is.
    """
    if side == grid:
        return table
    scale = (side + 0.1) / grid
    patches = resize_grid(table[1:].reshape(1, grid, grid, -1), (side, side), "bicubic", scale=(scale, scale))
    return jnp.concatenate([table[:1], patches.reshape(side * side, -1)], axis=0)


class DINOv2Tower(nnx.Module):
    """DINOv2 (optionally with SwiGLU, as ViT-g); features = last_hidden_state after the final
    LayerNorm, class token dropped. The mask token of the checkpoint is never used at inference."""

    def __init__(self, cfg: TowerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c, pg = cfg.hidden_size, cfg.pos_grid
        if pg < 1:
            raise ConfigError(f"tower {cfg.name!r}: DINOv2 needs pos_grid (the side of its learned position grid)")
        self.patch_embed = PatchConv(cfg.patch_size, 3, c, use_bias=True, dtype=dtype, rngs=rngs)
        self.cls_token = param(rngs, nnx.initializers.normal(0.02), (c,), _EMBED)
        self.pos_embed = param(rngs, nnx.initializers.normal(0.02), (pg * pg + 1, c), (None, "tower_embed"))
        self.blocks = _blocks(cfg, layer_scale=True, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(c, cfg.layer_norm_eps, "tower_embed")
        self.cfg, self.dtype = cfg, dtype

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = _with_cls(self.cls_token, _patch_tokens(self.patch_embed, pixels, self.dtype))
        x = x + dinov2_positions(self.pos_embed[...], self.cfg.pos_grid, self.cfg.raw_side).astype(x.dtype)
        x = self.norm(scan_layers(self.blocks, x))
        return constrain(resize_tokens(x[:, 1:], self.cfg.side), TOKENS)
