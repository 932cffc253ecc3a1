"""The vision towers of Cambrian-1 (spec §2.1) and the pieces they share.

Every tower maps normalised pixels [B, R, R, 3] (NHWC, R = cfg.image_size) to features
[B, cfg.token_len, cfg.width]: its own token grid, row-major, bilinearly resized to the target side
s = sqrt(token_len) exactly as the reference's F.interpolate (cambrian_jax.resize).

  vit.py       CLIP (hidden_states[select_layer]), SigLIP (final LayerNorm), DINOv2 (final LayerNorm)
  convnext.py  ConvNeXt (one or all four stage maps, concatenated along channels)

Transformer layers and ConvNeXt blocks are created once per stack with `nnx.vmap` (parameters carry
a leading 'tower_layers' axis) and run with `jax.lax.scan`, so compile time does not grow with depth.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cambrian_jax.config import ConfigError, TowerConfig
from cambrian_jax.convert.assign import check, param_path
from cambrian_jax.layers import param, torch_linear_init

# Logical axes of the tower activations pinned with `sharding.constrain`: token sequences [B, N, C]
# (ViT hidden states, every tower's features) and their MLP hidden [B, N, F]; ConvNeXt maps
# [B, H, W, C] and their MLP hidden (the spatial axes are never split).
TOKENS = ("activation_batch", "activation_length", "activation_embed")
TOKENS_MLP = ("activation_batch", "activation_length", "activation_mlp")
GRID = ("activation_batch", None, None, "activation_embed")
GRID_MLP = ("activation_batch", None, None, "activation_mlp")


class PatchConv(nnx.Module):
    """A conv whose kernel equals its stride, VALID padding: ViT patch embeddings, ConvNeXt stem and
    downsampling. Rows/columns that do not fill a whole patch are dropped, as torch's conv drops them
    (SigLIP at 384 px with patch 14 ignores the last 6)."""

    def __init__(self, patch: int, in_channels: int, out_channels: int, *, use_bias: bool, dtype,
                 rngs: nnx.Rngs):
        # torch's default conv init has the same bound as its Linear init, with fan_in = p*p*C_in.
        init = torch_linear_init(patch * patch * in_channels)
        self.kernel = param(rngs, init, (patch, patch, in_channels, out_channels),
                            (None, None, None, "tower_embed"))
        self.bias = param(rngs, init, (out_channels,), ("tower_embed",)) if use_bias else None
        self.patch = patch
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C_in] → [B, H // p, W // p, C_out]."""
        # float32 accumulator with the bias added before the one rounding, as torch's conv2d in bf16
        # (see layers.Linear).
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.patch, self.patch), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """One module holding n independently initialised layers, parameters stacked on axis 0."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "tower_layers"})
    def create(layer_rngs):
        return make(layer_rngs)

    return create(rngs)


def scan_layers(layers: nnx.Module, x: jax.Array, num: int | None = None) -> jax.Array:
    """Apply the first `num` (default all) stacked layers in order, traced once whatever the depth."""
    graphdef, state = nnx.split(layers)
    if num is not None:
        state = jax.tree.map(lambda a: a[:num], state)

    def step(h, layer_state):
        return nnx.merge(graphdef, layer_state)(h), None

    return jax.lax.scan(step, x, state)[0]


def build_tower(cfg: TowerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
    """The tower for cfg.kind, randomly initialised (load weights with cambrian_jax.convert)."""
    # Imported here: vit and convnext import the shared pieces above from this package.
    from cambrian_jax.towers.convnext import ConvNeXtTower
    from cambrian_jax.towers.vit import CLIPTower, DINOv2Tower, SigLIPTower

    towers = {"clip": CLIPTower, "siglip": SigLIPTower, "dinov2": DINOv2Tower, "convnext": ConvNeXtTower}
    if cfg.kind not in towers:
        raise ConfigError(f"tower {cfg.name!r}: kind {cfg.kind!r} is not one of {sorted(towers)}")
    return towers[cfg.kind](cfg, dtype=dtype, rngs=rngs)


def load_tower(cfg: TowerConfig, tensors: Mapping[str, np.ndarray], *, dtype=jnp.float32,
               source: str = "checkpoint") -> nnx.Module:
    """The tower with its parameters taken from {path: array} (what the converters produce).

    Skips random initialisation, which is wasted on a frozen tower (1.1B parameters for DINOv2-g) and,
    run eagerly on CPU, compiles one small program per parameter shape. Mismatches are reported as
    `assign` reports them, all at once.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_tower(cfg, dtype=dtype, rngs=nnx.Rngs(0))))
    flat = list(nnx.to_flat_state(state))
    check({param_path(p): v.shape for p, v in flat}, {k: np.shape(t) for k, t in tensors.items()}, source)
    filled = [(p, v.replace(jnp.asarray(tensors[param_path(p)], v.dtype))) for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
