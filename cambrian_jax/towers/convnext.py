"""The ConvNeXt tower (spec §2.1, k = 3): stem, four stages, no final norm and no head.

The layout is the one shared by the original ConvNeXt, timm/open_clip trunks and HF ConvNextModel;
only key names differ, and those live in the converters:

  stem    4×4 stride-4 conv (with bias) → LayerNorm
  stage i (i ≥ 1 first halves the grid: LayerNorm → 2×2 stride-2 conv), then depths[i] blocks of
          x + gamma * fc2(gelu(fc1(LayerNorm(dwconv7×7(x)))))

Every LayerNorm uses cfg.layer_norm_eps: 1e-5 for open_clip/timm weights, 1e-6 for HF-format weights
(spec §14.6). Features: the last stage map, or with cfg.multi_stage all four, each resized bilinearly
to side×side and concatenated along channels in stage order (384+768+1536+3072 = 5760 for XXL).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cambrian_jax.config import ConfigError, TowerConfig
from cambrian_jax.layers import LayerNorm, Linear, activation, param, torch_linear_init
from cambrian_jax.resize import resize_grid
from cambrian_jax.sharding import constrain
from cambrian_jax.towers import GRID, GRID_MLP, TOKENS, PatchConv, scan_layers, stack_layers

DWCONV_KERNEL = 7


class DepthwiseConv(nnx.Module):
    """7×7 depthwise conv, stride 1, 'same' padding; kernel [7, 7, 1, C] (HWIO with one input channel)."""

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
        k = DWCONV_KERNEL
        init = torch_linear_init(k * k)
        self.kernel = param(rngs, init, (k, k, 1, channels), (None, None, None, "tower_embed"))
        self.bias = param(rngs, init, (channels,), ("tower_embed",))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        pad = DWCONV_KERNEL // 2
        # float32 accumulator with the bias added before the one rounding, as torch's conv2d in bf16
        # (see layers.Linear).
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), (1, 1), ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
            preferred_element_type=jnp.float32)
        return (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class ConvNeXtBlock(nnx.Module):
    def __init__(self, dim: int, cfg: TowerConfig, *, dtype, rngs: nnx.Rngs):
        self.dwconv = DepthwiseConv(dim, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(dim, cfg.layer_norm_eps, "tower_embed")
        self.fc1 = Linear(dim, 4 * dim, ("tower_embed", "tower_mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Linear(4 * dim, dim, ("tower_mlp", "tower_embed"), dtype=dtype, rngs=rngs)
        self.gamma = param(rngs, lambda key, shape, dtype: jnp.full(shape, 1e-6, dtype), (dim,), ("tower_embed",))
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = constrain(x, GRID)
        h = self.fc2(constrain(self.act(self.fc1(self.norm(self.dwconv(x)))), GRID_MLP))
        return constrain(x + self.gamma[...].astype(h.dtype) * h, GRID)


class Downsample(nnx.Module):
    """Halve the grid between stages: LayerNorm over channels, then a 2×2 stride-2 conv."""

    def __init__(self, in_dim: int, out_dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.norm = LayerNorm(in_dim, eps, "tower_embed")
        self.conv = PatchConv(2, in_dim, out_dim, use_bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(self.norm(x))


class Stage(nnx.Module):
    def __init__(self, index: int, cfg: TowerConfig, *, dtype, rngs: nnx.Rngs):
        dim = cfg.dims[index]
        self.downsample = (Downsample(cfg.dims[index - 1], dim, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
                           if index > 0 else None)
        self.blocks = stack_layers(lambda r: ConvNeXtBlock(dim, cfg, dtype=dtype, rngs=r), cfg.depths[index], rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample is not None:
            x = self.downsample(x)
        return scan_layers(self.blocks, x)


class Stem(nnx.Module):
    def __init__(self, cfg: TowerConfig, *, dtype, rngs: nnx.Rngs):
        self.conv = PatchConv(4, 3, cfg.dims[0], use_bias=True, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(cfg.dims[0], cfg.layer_norm_eps, "tower_embed")

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return self.norm(self.conv(pixels))


class ConvNeXtTower(nnx.Module):
    def __init__(self, cfg: TowerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if len(cfg.dims) != 4 or len(cfg.depths) != 4:
            raise ConfigError(f"tower {cfg.name!r}: ConvNeXt needs four depths and four dims, got "
                              f"depths={cfg.depths} dims={cfg.dims}")
        self.stem = Stem(cfg, dtype=dtype, rngs=rngs)
        self.stages = nnx.List([Stage(i, cfg, dtype=dtype, rngs=rngs) for i in range(4)])
        self.cfg, self.dtype = cfg, dtype

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = constrain(self.stem(pixels.astype(self.dtype)), GRID)
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        if not self.cfg.multi_stage:
            maps = maps[-1:]
        s = self.cfg.side
        grid = jnp.concatenate([resize_grid(m, (s, s)) for m in maps], axis=-1)
        return constrain(grid.reshape(grid.shape[0], s * s, grid.shape[-1]), TOKENS)
