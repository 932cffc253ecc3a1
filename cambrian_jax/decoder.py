"""The Llama-family decoder (Llama-3, Vicuna, Yi, Phi-3) with Cambrian's in-LLM aggregation hook.

Pre-norm blocks exactly as Hugging Face's Llama (spec §5.3, §6.1):

    h = h + o( attention( rope(q(n1(h))), rope(k(n1(h))), v(n1(h)) ) )      n1 = RMSNorm
    h = h + down( silu(gate(n2(h))) * up(n2(h)) )                           n2 = RMSNorm

no biases, grouped-query attention, RoPE in the rotate-half convention (with Llama-3.1 `llama3`
frequency scaling), a final RMSNorm and an untied `lm_head`. Positions are given per token, because
Cambrian's come from a cumulative attention mask (masked tokens do not advance them, spec §3.5).

The L layers are one module whose parameters carry a leading 'layers' axis; they run under one
`jax.lax.scan` (one compiled layer body, whatever the depth). Cambrian's in-LLM aggregators (spec §3.4)
run after layers `start + j·stride`: the scan carries per-layer flags and aggregator indices, and after
each layer a checkpointed `lax.cond` applies aggregator j (its parameters indexed out of the stacked
aggregator state) or passes the hidden state through. This deliberately is not a scan per segment:
slicing the stacked layer parameters into segments makes XLA copy all of them (34B shapes, batch
1×64, CPU estimate: 170 GB of gradient temporaries, against 5.2 GB for this form and 2.4 GB with no
aggregators).

Parameter layout (L layers, H hidden, NH heads, KV kv-heads, D head size, F mlp, V vocab):

    embedding                  [V, H]          vocab, embed
    layers/attn_norm/scale     [L, H]          layers, embed
    layers/attn/q/kernel       [L, H, NH, D]   layers, embed, heads, head_dim
    layers/attn/k/kernel       [L, H, KV, D]   layers, embed, kv_heads, head_dim
    layers/attn/v/kernel       [L, H, KV, D]   layers, embed, kv_heads, head_dim
    layers/attn/o/kernel       [L, NH, D, H]   layers, heads, head_dim, embed
    layers/mlp_norm/scale      [L, H]          layers, embed
    layers/mlp/gate/kernel     [L, H, F]       layers, embed, mlp
    layers/mlp/up/kernel       [L, H, F]       layers, embed, mlp
    layers/mlp/down/kernel     [L, F, H]       layers, mlp, embed
    final_norm/scale           [H]             embed
    lm_head/kernel             [H, V]          embed, vocab

Activations pinned by logical names (`sharding.constrain`; the identity outside a rules context):
the residual stream (embeddings, each layer's input, after attention, output, after an aggregator,
final norm) [B, T, H] as HIDDEN; q and the attention output [B, T, NH, D] as QUERY_HEADS; k, v as
KV_HEADS; the MLP hidden [B, T, F] as MLP_HIDDEN; logits [B, T, V] as LOGITS.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from cambrian_jax import attention as attn
from cambrian_jax.config import DecoderConfig
from cambrian_jax.layers import Linear, RMSNorm, param, silu
from cambrian_jax.sharding import constrain

# Remat policies for the layer body, chosen by name from CambrianConfig.remat. 'none' = no remat.
# The named ones save (or offload to host memory) the tensors tagged with checkpoint_name in the layer
# body: query/key/value (the projections' outputs after RoPE), attn_out and mlp_out. MaxText's names
# (its `remat_policy`) are aliases of the nearest of ours.
_SAVE = jax.checkpoint_policies.save_only_these_names


def _offload(*names):
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(names), offload_src="device",
        offload_dst="pinned_host")


REMAT_POLICIES: dict[str, Any] = {
    "none": None,                                                     # save everything (no remat)
    "full": jax.checkpoint_policies.nothing_saveable,                 # save nothing: recompute the layer
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # every weight matmul's output
    "dots_all": jax.checkpoint_policies.dots_saveable,                # and the attention einsums'
    "qkv_proj": _SAVE("query", "key", "value"),
    "qkv_and_outputs": _SAVE("query", "key", "value", "attn_out", "mlp_out"),
    "save_dot_except_mlp": _SAVE("query", "key", "value", "attn_out"),   # everything but the MLP's
    "qkv_proj_offloaded": _offload("query", "key", "value"),          # to host memory (TPU, GPU)
    "minimal_offloaded": _offload("query", "key", "value", "attn_out", "mlp_out"),
}
REMAT_ALIASES = {"minimal": "dots", "save_qkv_proj": "qkv_proj"}   # MaxText's name: ours
REMAT_POLICIES.update({alias: REMAT_POLICIES[ours] for alias, ours in REMAT_ALIASES.items()})


def remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat policy {name!r} is not known; expected one of {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


INIT_STD = 0.02  # HF Llama's initializer_range

# Logical axes of the activations pinned with `constrain` (the rules table maps them to mesh axes).
HIDDEN = ("activation_batch", "activation_length", "activation_embed")
QUERY_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
MLP_HIDDEN = ("activation_batch", "activation_length", "activation_mlp")
LOGITS = ("activation_batch", "activation_length", "activation_vocab")


# ----------------------------------------------------------------------------------------------- RoPE

def rope_inv_freq(cfg: DecoderConfig) -> np.ndarray:
    """HF's inverse frequencies (float32, [head_size/2]), with Llama-3.1 scaling when configured."""
    dim = cfg.head_size
    inv = np.float32(1.0) / (np.float32(cfg.rope_theta) ** (
        np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)))
    scaling = dict(cfg.rope_scaling or ())
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return inv.astype(np.float32)
    if kind != "llama3":
        raise ValueError(f"decoder rope_scaling type {kind!r} is not supported; use None/'default' or "
                         "'llama3' (Llama-3.1: factor, low_freq_factor, high_freq_factor, "
                         "original_max_position_embeddings)")
    missing = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} - set(scaling)
    if missing:
        raise ValueError(f"decoder rope_scaling 'llama3' lacks {sorted(missing)}")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(inv_freq: np.ndarray, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, 1, D] (broadcast over heads), computed in float32 and cast like HF."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ------------------------------------------------------------------------------------------ the layer

class Projection(nnx.Module):
    """A bias-free projection with a multi-axis kernel, applied by an einsum spec."""

    def __init__(self, shape: Sequence[int], axes: Sequence[str], spec: str, *, dtype, rngs: nnx.Rngs):
        self.kernel = param(rngs, nnx.initializers.normal(INIT_STD), shape, axes)
        self.spec = spec
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum(self.spec, x.astype(self.dtype), self.kernel[...].astype(self.dtype))


# The XLA implementation, under its historical name.
attend = attn.xla


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        h, nh, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
        self.q = Projection((h, nh, d), ("embed", "heads", "head_dim"), "bth,hnd->btnd", dtype=dtype, rngs=rngs)
        self.k = Projection((h, kv, d), ("embed", "kv_heads", "head_dim"), "bth,hnd->btnd", dtype=dtype, rngs=rngs)
        self.v = Projection((h, kv, d), ("embed", "kv_heads", "head_dim"), "bth,hnd->btnd", dtype=dtype, rngs=rngs)
        self.o = Projection((nh, d, h), ("heads", "head_dim", "embed"), "btnd,ndh->bth", dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache=None, index=None, implementation="xla"):
        """Returns (output, (k, v) of the new tokens).

        Without a cache: causal self-attention, mask [B, T] the key mask, by `implementation`
        (attention.IMPLEMENTATIONS). With cache = (k, v) [B, S, KV, D] of this layer: the new keys/values
        are written at `index` and the queries attend over the whole cache, mask [B, T, S] the allowed
        pairs (the XLA implementation: one new token per step is no work for a kernel)."""
        # Pinned before naming, so a remat policy saves the tensor in its pinned layout.
        q = checkpoint_name(constrain(apply_rope(self.q(x), cos, sin), QUERY_HEADS), "query")
        k = checkpoint_name(constrain(apply_rope(self.k(x), cos, sin), KV_HEADS), "key")
        v = checkpoint_name(constrain(self.v(x), KV_HEADS), "value")
        if cache is None:
            out = attn.attend(q, k, v, mask, implementation=implementation)
        else:
            keys = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, index, 0, 0))
            values = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, index, 0, 0))
            out = attn.xla(q, keys.astype(q.dtype), values.astype(q.dtype), mask)
        out = self.o(constrain(out, QUERY_HEADS))
        return checkpoint_name(constrain(out, HIDDEN), "attn_out"), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        h, f = cfg.hidden_size, cfg.intermediate_size
        init = nnx.initializers.normal(INIT_STD)
        self.gate = Linear(h, f, ("embed", "mlp"), use_bias=False, dtype=dtype, init=init, rngs=rngs)
        self.up = Linear(h, f, ("embed", "mlp"), use_bias=False, dtype=dtype, init=init, rngs=rngs)
        self.down = Linear(f, h, ("mlp", "embed"), use_bias=False, dtype=dtype, init=init, rngs=rngs)

    def __call__(self, x):
        hidden = constrain(silu(self.gate(x)) * self.up(x), MLP_HIDDEN)
        return checkpoint_name(constrain(self.down(hidden), HIDDEN), "mlp_out")


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed")
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed")
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache=None, index=None, implementation="xla"):
        x = constrain(x, HIDDEN)     # the residual stream
        a, kv = self.attn(self.attn_norm(x), cos, sin, mask, cache, index, implementation)
        x = constrain(x + a.astype(x.dtype), HIDDEN)
        x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
        return constrain(x, HIDDEN), kv


def lm_logits(hidden: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
    """hidden [B, T, H] @ lm_head kernel [H, V] in `dtype`, accumulated and returned in float32."""
    return constrain(jnp.einsum("bth,hv->btv", hidden.astype(dtype), kernel.astype(dtype),
                                preferred_element_type=jnp.float32), LOGITS)


# ------------------------------------------------------------------------------------------ KV cache

@struct.dataclass
class KVCache:
    """Keys/values of every layer, [L, B, S, KV, D] (after RoPE), the key mask [B, S] (True = a real
    token was written there) and the next write index (one for the whole batch)."""
    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


# -------------------------------------------------------------------------------------------- decoder

Aggregate = Callable[[nnx.Module, jax.Array], jax.Array]


def check_agg_layers(agg_layers: Sequence[int], num_layers: int, num_aggregators: int | None = None):
    """agg_layers must be start + j·stride (stride ≥ 1), inside the decoder; returns (start, stride)."""
    layers = tuple(int(i) for i in agg_layers)
    if not layers:
        raise ValueError("agg_layers is empty but aggregators were given")
    stride = layers[1] - layers[0] if len(layers) > 1 else 1
    if stride < 1 or any(b - a != stride for a, b in zip(layers, layers[1:])):
        raise ValueError(f"agg_layers {list(layers)} is not an increasing arithmetic progression "
                         "start + j·stride (spec §3.4)")
    if layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"agg_layers {list(layers)} do not fit a decoder of {num_layers} layers")
    if num_aggregators is not None and num_aggregators != len(layers):
        raise ValueError(f"{num_aggregators} stacked aggregators for {len(layers)} agg_layers {list(layers)}")
    return layers[0], stride


class Decoder(nnx.Module):
    """Embeddings in, final-normed hidden states out; `embed(ids)` and `logits(hidden)` around it."""

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, remat: str = "none", attention: str = "auto",
                 rngs: nnx.Rngs):
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"decoder num_heads={cfg.num_heads} is not a multiple of num_kv_heads="
                             f"{cfg.num_kv_heads}")
        rope_inv_freq(cfg)     # validates rope_scaling now rather than at trace time
        remat_policy(remat)
        attn.resolve(attention, "cpu")     # validates the name now
        self.cfg = cfg
        self.attention = attention
        self.dtype = dtype
        self.remat = remat
        self.embedding = param(rngs, nnx.initializers.normal(INIT_STD), (cfg.vocab_size, cfg.hidden_size),
                               ("vocab", "embed"))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r):
            return DecoderLayer(cfg, dtype=dtype, rngs=r)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed")
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), use_bias=False,
                              dtype=dtype, init=nnx.initializers.normal(INIT_STD), rngs=rngs)

    # -- ends of the decoder
    def embed(self, ids: jax.Array) -> jax.Array:
        """Token embeddings [B, T, H] in the compute dtype. ids must lie in [0, V): map Cambrian's
        image sentinel (-200) to 0 first (out-of-range ids give NaN rows, negative ones wrap)."""
        return constrain(jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype), HIDDEN)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits [B, T, V] (matmul in the compute dtype, accumulated and returned in float32)."""
        return lm_logits(hidden, self.lm_head.kernel[...], self.dtype)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        c = self.cfg
        shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_size)
        dtype = dtype or self.dtype
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                       mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    # -- the layers
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, *,
                 aggregators: nnx.Module | None = None, aggregate: Aggregate | None = None,
                 agg_layers: Sequence[int] = (), cache: KVCache | None = None):
        """x [B, T, H] input embeddings, positions [B, T] int, mask [B, T] bool (True = real token).

        aggregators: one module whose parameters are stacked on a leading axis of size N =
        len(agg_layers); after decoder layer agg_layers[j], hidden = aggregate(aggregator_j, hidden).
        Its non-Param state (if any) is shared by all j and not updated.
        cache: from init_cache; the T new tokens are written at slots cache.index .. index+T-1 (the
        caller keeps index + T <= max_len) and attend over every written slot whose mask is True.
        Returns the final-normed hidden states [B, T, H], and with a cache (hidden, new cache).
        """
        cfg = self.cfg
        t = x.shape[1]
        h = constrain(x.astype(self.dtype), HIDDEN)
        mask = mask.astype(bool)
        cos, sin = rope_tables(rope_inv_freq(cfg), positions, self.dtype)

        if cache is None:
            attn_mask = mask                                                      # keys; causal by the layer
            index, kv, new_mask = None, None, None
        else:
            index = cache.index
            new_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, index))
            slots = jnp.arange(cache.max_len)
            causal = slots[None, :] <= (index + jnp.arange(t))[:, None]          # [T, S]
            attn_mask = causal[None] & new_mask[:, None, :]
            kv = (cache.k, cache.v)

        graphdef, params = nnx.split(self.layers)
        impl = attn.resolve(self.attention)

        def layer_fn(p, h, layer_cache):
            return nnx.merge(graphdef, p)(h, cos, sin, attn_mask, layer_cache, index, impl)

        policy = remat_policy(self.remat)
        if self.remat != "none":
            layer_fn = jax.checkpoint(layer_fn, policy=policy, prevent_cse=False)

        xs = (params, jnp.arange(cfg.num_layers))
        maybe_aggregate = None
        if aggregators is not None:
            if aggregate is None:
                raise ValueError("aggregators were given without an aggregate function")
            agg_def, agg_params, agg_rest = nnx.split(aggregators, nnx.Param, ...)
            sizes = {a.shape[0] for a in jax.tree.leaves(agg_params)}
            if len(sizes) != 1:
                raise ValueError(f"aggregator parameters must all be stacked on one leading axis; got sizes {sizes}")
            check_agg_layers(agg_layers, cfg.num_layers, sizes.pop())
            flags = np.zeros(cfg.num_layers, bool)
            flags[list(agg_layers)] = True
            which = np.zeros(cfg.num_layers, np.int32)
            which[list(agg_layers)] = np.arange(len(agg_layers))

            def apply_aggregator(h, j):
                p_j = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, j, keepdims=False), agg_params)
                return aggregate(nnx.merge(agg_def, p_j, agg_rest), h).astype(h.dtype)

            # Always checkpointed: its residuals are then h and the (loop-invariant) aggregator
            # parameters and vision features, not L stacked copies of whatever the branch computes.
            @functools.partial(jax.checkpoint, prevent_cse=False)
            def maybe_aggregate(h, flag, j):
                return jax.lax.cond(flag, apply_aggregator, lambda h, j: h, h, j)

            xs = xs + (jnp.asarray(flags), jnp.asarray(which))

        def step(carry, xs):
            h, kv = carry
            p, l = xs[:2]
            if kv is None:
                h, _ = layer_fn(p, h, None)
            else:
                ck, cv = kv
                h, (k_new, v_new) = layer_fn(p, h, (ck[l], cv[l]))
                ck = jax.lax.dynamic_update_slice(ck, k_new[None].astype(ck.dtype), (l, 0, index, 0, 0))
                cv = jax.lax.dynamic_update_slice(cv, v_new[None].astype(cv.dtype), (l, 0, index, 0, 0))
                kv = (ck, cv)
            if maybe_aggregate is not None:
                h = constrain(maybe_aggregate(h, *xs[2:]), HIDDEN)
            return (h, kv), None

        carry, _ = jax.lax.scan(step, (h, kv), xs)
        h, kv = carry
        h = constrain(self.final_norm(h), HIDDEN)
        if cache is None:
            return h
        return h, KVCache(k=kv[0], v=kv[1], mask=new_mask, index=cache.index + t)
