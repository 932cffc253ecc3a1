"""The step function on a toy model with the Cambrian call signature: accumulation and frozen parameters.

The toy is small enough to compile in about a second, so the step's own logic is checked here and
the real model end to end in test_train.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cambrian_jax import optim
from cambrian_jax.config import IGNORE_INDEX
from cambrian_jax.train_step import make_step

V, H = 11, 7          # odd sizes: a [7, 11] array in the compiled step can only be the head or its gradient


class Toy(nnx.Module):
    """Embedding (trainable) → head (frozen): logits [B, T, V]."""

    def __init__(self, rngs):
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (V, H)))
        self.head = nnx.Param(jax.random.normal(rngs.params(), (H, V)))

    def __call__(self, input_ids, pixels, tower_masks, attention_mask, positions):
        return jnp.take(self.embed[...], input_ids, axis=0) @ self.head[...]


def _setup(accum):
    model = Toy(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    keep = optim.trainable_filter(["^embed"])
    train, frozen = nnx.split_state(params, keep, ...)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.0))
    fns = make_step(graphdef, tx, [], accum)
    state = dict(params=train, opt=tx.init(train), step=jnp.int32(0))
    return fns, state, frozen


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (8, 6)).astype(np.int32)
    labels = ids.copy()
    labels[:, :2] = IGNORE_INDEX
    labels[::3, 2:5] = IGNORE_INDEX         # rows with different numbers of supervised tokens
    return dict(input_ids=ids, labels=labels, attention_mask=np.ones((8, 6), bool),
                positions=np.tile(np.arange(6, dtype=np.int32), (8, 1)))


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulation_is_the_token_mean_over_the_whole_batch(accum):
    batch = _batch()
    fns1, s1, frozen = _setup(1)
    fnsk, sk, _ = _setup(accum)
    for _ in range(3):
        s1, m1 = jax.jit(fns1.train)(s1, frozen, batch)
        sk, mk = jax.jit(fnsk.train)(sk, frozen, batch)
        assert int(mk["tokens"]) == int(m1["tokens"]) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        np.testing.assert_allclose(mk["loss"], m1["loss"], rtol=1e-6)
        np.testing.assert_allclose(mk["grad_norm"], m1["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(sk["params"]["embed"][...], s1["params"]["embed"][...], rtol=1e-5, atol=1e-6)
    assert int(sk["step"]) == 3


def test_frozen_parameters_have_no_optimizer_state_and_no_gradient():
    fns, state, frozen = _setup(1)
    assert [optim.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state["params"])] == ["embed"]
    shapes = {x.shape for x in jax.tree.leaves(state["opt"])}
    assert (H, V) not in shapes                       # Adam moments only for the embedding
    before = np.asarray(frozen["head"][...])
    compiled = jax.jit(fns.train).lower(state, frozen, _batch()).compile()
    new_state, _ = compiled(state, frozen, _batch())
    np.testing.assert_array_equal(frozen["head"][...], before)
    # The compiled step computes no [H, V] array: no gradient for the frozen head exists.
    hlo = compiled.as_text()
    produced = [line for line in hlo.splitlines() if f"f32[{H},{V}]" in line.split("=", 1)[-1].split("(")[0]
                and "parameter(" not in line]
    assert not produced, produced[:3]
