"""Attention implementations, chosen by `model.attention`: the one place they live.

    xla      einsum → float32 softmax over an explicit [B, T, S] mask → einsum. Runs everywhere; the
             reference the others are tested against; the only one for the KV-cache decode path.
    splash   the Pallas Splash kernel (jax.experimental.pallas.ops.tpu.splash_attention): blockwise
             online softmax, never materialises the scores, skips the blocks the causal mask hides,
             grouped-query attention without repeating K/V. TPU; on a CPU in interpret mode (tests).
    cudnn    cuDNN's fused flash attention through jax.nn.dot_product_attention (NVIDIA GPUs).
    auto     splash on TPU, cudnn on NVIDIA GPUs, xla elsewhere.

Every implementation takes q [B, T, NH, D], k/v [B, S, KV, D] (NH a multiple of KV) and a key mask
[B, S] (True = a real token that may be attended to), with causal masking for self-attention, and
returns [B, T, NH, D]. Masked image cells and padded tokens are excluded as keys exactly as by the
XLA path; a query row with no allowed key (a fully padded row) gives finite values, which no loss
reads. On TPU, Splash needs the default matmul precision when it is lowered (Mosaic refuses bf16
operands at jax_default_matmul_precision='highest').

The kernels run under `shard_map` over the mesh axes the active sharding rules give the batch and the
heads (sharding.rules_context), so they compose with FSDP and tensor parallelism; outside a rules
context (one device, CPU tests) they are called directly.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cambrian_jax.config import ATTENTION as IMPLEMENTATIONS

_BLOCK = 128           # Splash's lane width: sequence lengths are padded to a multiple of it


def xla(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Grouped-query attention without repeating K/V; allowed [B, T, S] (True = may attend).

    Scores and softmax in float32; a row with no allowed key gets uniform weights (finite, never NaN).
    Two layouts of the same arithmetic, by the platform the program is traced for (see _heads_first).
    """
    return (_heads_first if platform() == "cpu" else _grouped)(q, k, v, allowed)


def _grouped(q, k, v, allowed):
    # The query heads as [KV, G] in place: the TPU compiler lays this out better than _heads_first
    # (benchmarks/attention.py, B=8 S=2048 on v5p-8: 1,577 MiB of temporaries and 3.6 ms, against
    # 2,081 MiB and 4.7 ms).
    b, t, nh, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, nh // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(d ** -0.5)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
    return out.reshape(b, t, nh, d)


def _heads_first(q, k, v, allowed):
    # The heads moved in front of the sequence, so each matmul is a plain batched one over (batch, KV
    # head) with a group's G query heads stacked along the rows. In _grouped's layout XLA:CPU ran
    # these dots and their gradients at a fraction of its GEMM rate and transposed the float32 scores
    # in the backward (benchmarks/decoder_vs_torch.py --compare-layouts: the step 1.15x faster this way).
    b, t, nh, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = nh // kv
    qg = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    scores = jnp.einsum("bkqd,bksd->bkqs", qg, k.transpose(0, 2, 1, 3), preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv, g, t, s) * jnp.float32(d ** -0.5)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, g * t, s)
    out = jnp.einsum("bkqs,bksd->bkqd", weights, v.transpose(0, 2, 1, 3))
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, nh, d)


def causal_allowed(key_mask: jax.Array, t: int) -> jax.Array:
    """[B, T, S]: query i may attend to key j ≤ i that the key mask keeps (self-attention, T = S)."""
    return jnp.tril(jnp.ones((t, t), bool))[None] & key_mask[:, None, :]


def platform() -> str:
    """The platform the program is being traced for: the active mesh's devices (compile-only TPU
    devices count as TPU), else JAX's default backend."""
    from cambrian_jax import sharding  # noqa: PLC0415

    pin = sharding.active()
    if pin is not None:
        return pin.mesh.devices.flat[0].platform
    return jax.default_backend()


def resolve(name: str, where: str | None = None) -> str:
    """'xla', 'splash' or 'cudnn' for a model.attention name on the platform being traced for."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"config field model.attention: {name!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    if name != "auto":
        return name
    where = where or platform()
    return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(where, "xla")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, *, implementation: str = "xla",
           causal: bool = True) -> jax.Array:
    """Self-attention of q over k/v with the key mask, by the named implementation (see the module)."""
    impl = resolve(implementation)
    if impl == "xla":
        t, s = q.shape[1], k.shape[1]
        allowed = (causal_allowed(key_mask, t) if causal
                   else jnp.broadcast_to(key_mask[:, None, :], (q.shape[0], t, s)))
        return xla(q, k, v, allowed)
    if impl == "splash":
        return _sharded(functools.partial(_splash, causal=causal, interpret=platform() != "tpu"), q, k, v, key_mask)
    return _sharded(functools.partial(_cudnn, causal=causal), q, k, v, key_mask)


# ------------------------------------------------------------------------------------------- splash

def _splash_kernel(heads: int, t: int, s: int, causal: bool, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # noqa: PLC0415
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # noqa: PLC0415

    one = sm.CausalMask((t, s)) if causal else sm.FullMask((t, s))
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _block(n: int) -> int:
    """The largest of 512, 256, 128 that divides n (n a multiple of 128)."""
    return next(b for b in (512, 256, _BLOCK) if n % b == 0)


def _splash(q, k, v, key_mask, *, causal: bool, interpret: bool):
    """Splash on local shards: q [b, T, nh, D], k/v [b, S, kv, D], key_mask [b, S]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # noqa: PLC0415

    b, t, nh, d = q.shape
    s = k.shape[1]
    # Lengths padded to the kernel's block: padded keys get segment 0 (never attended), queries 1.
    tp, sp = -(-t // _BLOCK) * _BLOCK, -(-s // _BLOCK) * _BLOCK
    q = jnp.pad(q * jnp.asarray(d ** -0.5, q.dtype), ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    kv_ids = jnp.pad(key_mask.astype(jnp.int32), ((0, 0), (0, sp - s)))
    q_ids = jnp.ones((b, tp), jnp.int32)
    # Built in the trace it runs in: its block tables are staged into that trace as constants.
    kernel = _splash_kernel(nh, tp, sp, causal, min(_block(tp), _block(sp)), interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)      # [b, heads, len, D], the kernel's layout
    out = jax.vmap(lambda q, k, v, qi, ki: kernel(q, k, v, segment_ids=sk.SegmentIds(q=qi, kv=ki)))(
        heads_first(q), heads_first(k), heads_first(v), q_ids, kv_ids)
    return jnp.swapaxes(out, 1, 2)[:, :t].astype(v.dtype)


# -------------------------------------------------------------------------------------------- cudnn

def _cudnn(q, k, v, key_mask, *, causal: bool):
    t, s = q.shape[1], k.shape[1]
    mask = jnp.broadcast_to(key_mask[:, None, None, :], (q.shape[0], 1, t, s))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")


# ------------------------------------------------------------------------------------------ sharding

def _sharded(kernel, q, k, v, key_mask):
    """`kernel` on each device's rows and heads under shard_map, by the active rules; directly without."""
    from cambrian_jax import sharding  # noqa: PLC0415

    pin = sharding.active()
    if pin is None:
        return kernel(q, k, v, key_mask)
    # The kernels need whole sequences: rows and heads are split, never the length or head size.
    q_spec = pin.spec(("activation_batch", None, "activation_heads", None), q.shape)
    kv_spec = pin.spec(("activation_batch", None, "activation_kv_heads", None), k.shape)
    if kv_spec[2] != q_spec[2]:
        # K/V heads split differently from the query heads (e.g. fewer KV heads than tensor shards):
        # repeat them per query head so each shard holds the K/V its queries read.
        g = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        kv_spec = q_spec
    mask_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    return jax.shard_map(kernel, mesh=pin.mesh, in_specs=(q_spec, kv_spec, kv_spec, mask_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, key_mask)

