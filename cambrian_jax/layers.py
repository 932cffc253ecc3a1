"""Small building blocks shared by the towers, the aggregator and the decoder.

Every parameter carries logical axis names (its `out_sharding` metadata); the trainer maps them to
mesh axes with the rules table in the config. The names used across the project:

  decoder     vocab, embed, mlp, heads, kv_heads, head_dim, layers
  connector   vision (the SVA width V), embed (the LLM width H), tower_embed (a tower's width C_k),
              aggregators (the stacked in-LLM aggregators)
  towers      tower_embed, tower_mlp, tower_layers

Modules create their parameters in float32 (training keeps them so); `dtype` is the compute dtype,
and `pretrained.load_pretrained(dtype=...)` stores loaded weights in that dtype for inference.
Normalisations and softmax run in float32 whatever the compute dtype; activations, and a biased
projection's bias add, run in float32 and are rounded to the compute dtype once, as torch's bf16
kernels round them.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = Sequence[str | None]


def torch_linear_init(fan_in: int):
    """PyTorch nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weights and biases.

    The reference creates its connector after the LLM is loaded, so PyTorch defaults apply (spec §3.6).
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def param(rngs: nnx.Rngs | None, init, shape, axes: Axes) -> nnx.Param:
    """A float32 parameter with logical axis names."""
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), jnp.float32), out_sharding=tuple(axes))


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). kernel is [in, out]; PyTorch's weight is its transpose."""

    def __init__(self, in_features: int, out_features: int, axes: Axes, *, use_bias: bool = True,
                 dtype=jnp.float32, init=None, rngs: nnx.Rngs):
        init = init or torch_linear_init(in_features)
        self.kernel = param(rngs, init, (in_features, out_features), axes)
        self.bias = param(rngs, init, (out_features,), (axes[-1],)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        if self.bias is None:
            return jnp.dot(x, kernel)
        # The bias joins the float32 accumulator and the sum is rounded once, as torch's nn.Linear
        # (addmm) does in bf16; rounding the product first and again after the bias add doubles the
        # rounding error of every biased projection (measured: tests/test_bf16.py).
        y = jnp.dot(x, kernel, preferred_element_type=jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis: str | None, *, use_bias: bool = True,
                 rngs: nnx.Rngs | None = None):
        self.scale = param(None, nnx.initializers.ones, (dim,), (axis,))
        self.bias = param(None, nnx.initializers.zeros, (dim,), (axis,)) if use_bias else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
        if self.bias is not None:
            h = h + self.bias[...]
        return h.astype(x.dtype)


class RMSNorm(nnx.Module):
    """Llama's RMSNorm: normalise in float32, cast back, then scale (as HF LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float, axis: str | None = "embed", rngs: nnx.Rngs | None = None):
        self.scale = param(None, nnx.initializers.ones, (dim,), (axis,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * h.astype(x.dtype)


def sequential(layers, x: jax.Array) -> jax.Array:
    """Apply a PyTorch-style Sequential (a list of modules and parameter-free functions) in order."""
    for f in layers:
        x = f(x)
    return x


# Activations are evaluated in float32 and rounded to the input dtype once, as torch's GELU and SiLU
# kernels do in bf16. Composed from bf16 ops, XLA rounds after each of them (x/√2, erf, 1 + ·, x·…):
# 20–45 % of bf16 outputs then differed from the once-rounded value, and the SVA's projectors lost
# ~8 % against the reference (tests/test_bf16.py).

def gelu(x):
    """Exact (erf) GELU, as torch.nn.GELU()."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def gelu_tanh(x):
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


def quick_gelu(x):
    h = x.astype(jnp.float32)
    return (h * jax.nn.sigmoid(1.702 * h)).astype(x.dtype)


def silu(x):
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


ACTIVATIONS = {"gelu": gelu, "gelu_tanh": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh,
               "quick_gelu": quick_gelu, "silu": silu}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
