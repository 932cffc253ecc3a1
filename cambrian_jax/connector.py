"""The connector: tower features → the LLM's image block, and the in-LLM aggregators (spec §3.3, §3.4).

    f_k [B, s_k², C_k] ─ mm_projector_aux_k ─► z_k [B, s_k², V]       (Linear, GELU, Linear, LayerNorm)
    c = mean over all tokens of z_0                                     (padding included, spec §10.5)
    per group g: vision_query[g] on an L_g×L_g grid ─ vision_sampler_g (D layers) ─► [B, L_g², V]
                 bilinear L_g×L_g → n×n if L_g ≠ n
    concat groups [B, n², V·G] ─ mm_projector ─► [B, n², H]           (Linear, GELU, Linear)
    + image_newline after every row ─► image_block [B, n·(n+1), H]

The returned `VisionContext` carries what the N in-LLM aggregators re-read: c and the z_k windowed at
the LLM grid n with their key masks. It is computed once here and shared by all N aggregators.

Module names mirror the reference (`mm_projector_aux_k.{0,2,3}`, `mm_projector.{0,2}`,
`vision_sampler_g.layers.l`, `vision_query`, `image_newline`); the in-LLM aggregators are stacked on a
leading 'aggregators' axis in `vision_sampler_layers.layer` (reference: `vision_sampler_layers.j.layers.0`).

`build_connector` picks the connector named by `model.connector.type`: this SVA (`sva`, the default),
or the ablation connectors `mlp2x_gelu` / `concat` (projector.py), `interleave` (interleave.py) and
`resampler` (resampler.py). Every connector maps tower features to the same n×(n+1) image block and
has a `vision_sampler_layers` attribute (None except for the SVA with in-LLM aggregators), so the
model, generation and the trainer treat them alike.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from cambrian_jax.aggregator import VisionCrossAttentionLayer, VisionTokenSampler, window, window_mask
from cambrian_jax.config import CambrianConfig, ConfigError, ConnectorConfig
from cambrian_jax.interleave import InterleaveConnector
from cambrian_jax.layers import param, sequential
from cambrian_jax.projector import MLPConnector, aux_projector, mlp2x_gelu, newline_param, with_newlines
from cambrian_jax.resampler import ResamplerConnector
from cambrian_jax.resize import resize_grid


@flax.struct.dataclass
class VisionContext:
    """What the in-LLM aggregators read, prepared once per image batch by the connector.

    context       [B, V]                  global context c (mean of the projected first tower)
    windows       per tower [B·n², r_k², V]  projected features z_k windowed at the LLM grid n
    window_masks  per tower [B·n², r_k²] bool or None  (True = real cell; all-padding windows re-enabled)
    grid          n (static)
    """
    context: jax.Array
    windows: tuple[jax.Array, ...]
    window_masks: tuple[jax.Array | None, ...]
    grid: int = flax.struct.field(pytree_node=False)


class AggregatorStack(nnx.Module):
    """N single-layer in-LLM aggregators (q_dim = H) with parameters stacked on a leading axis.

    `layer` holds the stacked parameters ('aggregators' is the leading logical axis); `layer_at(j)`
    returns aggregator j as an ordinary VisionCrossAttentionLayer for `aggregate`.
    """

    def __init__(self, num: int, q_dim: int, context_dim: int, kv_dims: Sequence[int],
                 window_sides: Sequence[int], hidden: int, num_heads: int = 16, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.num = num
        kv_dims, window_sides = tuple(kv_dims), tuple(window_sides)

        @nnx.split_rngs(splits=num)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "aggregators"})
        def make(r: nnx.Rngs) -> VisionCrossAttentionLayer:
            return VisionCrossAttentionLayer(q_dim, context_dim, kv_dims, window_sides, hidden, num_heads,
                                             q_axis="embed", dtype=dtype, rngs=r)

        self.layer = make(rngs)

    def __len__(self) -> int:
        return self.num

    def layer_at(self, j) -> VisionCrossAttentionLayer:
        """Aggregator j (a python int or a traced index) as an unstacked module sharing no state."""
        graphdef, state = nnx.split(self.layer)
        layer = nnx.merge(graphdef, jax.tree.map(lambda x: x[j], state))
        for _, var in nnx.iter_graph(layer):
            if isinstance(var, nnx.Variable):
                names = var.get_metadata().get("out_sharding")
                if names and names[0] == "aggregators":
                    var.set_metadata(out_sharding=tuple(names[1:]))
        return layer


def aggregate(layer: VisionCrossAttentionLayer, hidden: jax.Array, vision_ctx: VisionContext,
              image_position: int, n: int | None = None) -> jax.Array:
    """One in-LLM aggregation (spec §3.4): update the image cells of the block at `image_position`.

    hidden [B, T, H]. The n×n image cells of the n×(n+1) block are the queries (no norm before
    proj_in); their outputs hidden + Δ overwrite them. Newline tokens and every position outside the
    block are returned bit-identical.
    """
    n = vision_ctx.grid if n is None else n
    if n != vision_ctx.grid:
        raise ValueError(f"aggregate: n={n} but the vision context was windowed for an {vision_ctx.grid}-grid")
    b, t, h = hidden.shape
    block = n * (n + 1)
    p = int(image_position)
    if p < 0 or p + block > t:
        raise ValueError(f"aggregate: an image block of {block} positions at {p} does not fit in {t} tokens")
    y = hidden[:, p:p + block].reshape(b, n, n + 1, h)
    queries = y[:, :, :n].reshape(b * n * n, 1, h)
    out = layer(queries, vision_ctx.context[:, None], vision_ctx.windows, vision_ctx.window_masks)
    y = jnp.concatenate([out.reshape(b, n, n, h).astype(hidden.dtype), y[:, :, n:]], axis=2)
    return jax.lax.dynamic_update_slice_in_dim(hidden, y.reshape(b, block, h), p, axis=1)


class Connector(nnx.Module):
    """Per-tower projectors, the SVA connector, the output projector, the newline and the in-LLM stack.

    tower_widths = C_k, tower_sides = s_k (each s_k divisible by every L_g and, with in-LLM
    aggregators, by n); llm_hidden = H.
    """

    def __init__(self, cfg: ConnectorConfig, tower_widths: Sequence[int], tower_sides: Sequence[int],
                 llm_hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        _check(cfg, tower_widths, tower_sides)
        v, h, n = cfg.vision_hidden_size, llm_hidden, cfg.grid
        self.dtype = dtype
        self.grid = n
        self.tower_sides = tuple(int(s) for s in tower_sides)
        self.group_sides = tuple(math.isqrt(q) for q in cfg.query_num_list)
        kv_dims = [v] * len(tower_widths)

        for k, c in enumerate(tower_widths):
            setattr(self, f"mm_projector_aux_{k}", aux_projector(c, v, dtype=dtype, rngs=rngs))
        self.vision_query = param(rngs, nnx.initializers.normal(1.0 / math.sqrt(v)), (cfg.num_query_group, v),
                                  (None, "vision"))
        for g, side in enumerate(self.group_sides):
            setattr(self, f"vision_sampler_{g}", VisionTokenSampler(
                v, v, kv_dims, [s // side for s in self.tower_sides], v, cfg.connector_depth, cfg.num_heads,
                q_axis="vision", dtype=dtype, rngs=rngs))
        self.mm_projector = mlp2x_gelu(v * cfg.num_query_group, h, "vision", dtype=dtype, rngs=rngs)
        self.image_newline = newline_param(rngs, h)
        if cfg.connector_only or cfg.num_of_vision_sampler_layers == 0:
            self.vision_sampler_layers = None
        else:
            self.vision_sampler_layers = AggregatorStack(
                cfg.num_of_vision_sampler_layers, h, v, kv_dims, [s // n for s in self.tower_sides], v,
                cfg.num_heads, dtype=dtype, rngs=rngs)

    @classmethod
    def from_config(cls, cfg: CambrianConfig, *, rngs: nnx.Rngs) -> "Connector":
        return cls(cfg.connector, [t.width for t in cfg.towers], [t.side for t in cfg.towers],
                   cfg.decoder.hidden_size, dtype=jnp.dtype(cfg.dtype), rngs=rngs)

    def project(self, features: Sequence[jax.Array]) -> list[jax.Array]:
        """z_k = mm_projector_aux_k(f_k): [B, s_k², C_k] → [B, s_k², V] in the compute dtype."""
        if len(features) != len(self.tower_sides):
            raise ValueError(f"the connector was built for {len(self.tower_sides)} towers, "
                             f"got {len(features)} feature maps")
        for k, (f, s) in enumerate(zip(features, self.tower_sides)):
            if f.shape[1] != s * s:
                raise ValueError(f"tower {k}: {f.shape[1]} tokens, expected {s}×{s} = {s * s}")
        return [sequential(getattr(self, f"mm_projector_aux_{k}"), f).astype(self.dtype)
                for k, f in enumerate(features)]

    def sample(self, g: int, z: Sequence[jax.Array], context: jax.Array,
               masks: Sequence[jax.Array | None]) -> jax.Array:
        """Group g's queries read the towers: [B, L_g², V] (before any resize to n×n)."""
        side = self.group_sides[g]
        b = z[0].shape[0]
        windows = [window(x, side) for x in z]
        wmasks = [window_mask(m, side, x.shape[1]) for x, m in zip(z, masks)]
        q = jnp.broadcast_to(self.vision_query[g].astype(self.dtype), (b * side * side, 1, z[0].shape[-1]))
        out = getattr(self, f"vision_sampler_{g}")(q, context[:, None], windows, wmasks)
        return out.reshape(b, side * side, -1)

    def __call__(self, features: Sequence[jax.Array], masks: Sequence[jax.Array | None] | None = None
                 ) -> tuple[jax.Array, VisionContext]:
        """features[k] [B, s_k², C_k]; masks[k] [B, s_k²] bool (True = real cell) or None.

        Returns (image_block [B, n·(n+1), H], VisionContext for the in-LLM aggregators, or None
        without them).
        """
        masks = [None] * len(features) if masks is None else list(masks)
        n = self.grid
        z = self.project(features)
        b = z[0].shape[0]
        context = z[0].astype(jnp.float32).mean(axis=1).astype(self.dtype)      # [B, V]
        groups = []
        for g, side in enumerate(self.group_sides):
            out = self.sample(g, z, context, masks)
            if side != n:
                out = resize_grid(out.reshape(b, side, side, -1), (n, n)).reshape(b, n * n, -1)
            groups.append(out)
        x = sequential(self.mm_projector, jnp.concatenate(groups, axis=-1))           # [B, n², H]
        image_block = with_newlines(x, self.image_newline[...], n)
        if self.vision_sampler_layers is None:     # connector_only: no in-LLM aggregator reads windows at n
            return image_block, None
        vision_ctx = VisionContext(
            context=context,
            windows=tuple(window(x, n) for x in z),
            window_masks=tuple(window_mask(m, n, x.shape[1]) for x, m in zip(z, masks)),
            grid=n)
        return image_block, vision_ctx


# model.connector.type → the connector module (each with from_config(cfg, rngs=...)).
CONNECTORS = {"sva": Connector, "mlp2x_gelu": MLPConnector, "concat": MLPConnector,
              "interleave": InterleaveConnector, "resampler": ResamplerConnector}


def build_connector(cfg: CambrianConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """The connector of `cfg.connector.type`: (features, masks) → (image block, VisionContext or None)."""
    kind = cfg.connector.type
    if kind not in CONNECTORS:
        raise ConfigError(f"config field model.connector.type: {kind!r} is not one of {sorted(CONNECTORS)}")
    return CONNECTORS[kind].from_config(cfg, rngs=rngs)


def _check(cfg: ConnectorConfig, widths: Sequence[int], sides: Sequence[int]) -> None:
    if len(widths) != len(sides) or not widths:
        raise ConfigError(f"connector: {len(widths)} tower widths but {len(sides)} tower sides")
    if cfg.vision_hidden_size % cfg.num_heads:
        raise ConfigError(f"config field model.vision_hidden_size: {cfg.vision_hidden_size} is not divisible "
                          f"by the aggregator's {cfg.num_heads} heads")
    if len(cfg.query_num_list) != cfg.num_query_group:
        raise ConfigError(f"config field model.query_num_list: has {len(cfg.query_num_list)} entries but "
                          f"num_query_group is {cfg.num_query_group}")
    for g, q in enumerate(cfg.query_num_list):
        side = math.isqrt(q)
        if side * side != q:
            raise ConfigError(f"config field model.query_num_list[{g}]: {q} is not a square number")
        for k, s in enumerate(sides):
            if s % side:
                raise ConfigError(f"config field model.query_num_list[{g}]: tower {k}'s grid side {s} is not a "
                                  f"multiple of the query grid side {side}")
    if not cfg.connector_only:
        for k, s in enumerate(sides):
            if s % cfg.grid:
                raise ConfigError(f"config field model.image_token_len: tower {k}'s grid side {s} is not a "
                                  f"multiple of the LLM grid side {cfg.grid} (needed by the in-LLM aggregators)")
