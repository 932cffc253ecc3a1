"""The one training step: loss, gradient accumulation, clipping, AdamW, compiled once per stage.

Stages differ only by which parameters are trainable (a filter) and by the optimizer's groups: the
step is the same function. Frozen parameters are a separate argument that is never differentiated.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cambrian_jax.config import IGNORE_INDEX


def model_inputs(batch: dict[str, jax.Array], num_towers: int) -> dict[str, Any]:
    return dict(input_ids=batch["input_ids"],
                pixels=[batch[f"pixels_{k}"] for k in range(num_towers)],
                tower_masks=[batch[f"tower_mask_{k}"] for k in range(num_towers)],
                attention_mask=batch["attention_mask"], positions=batch["positions"])


def token_losses(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token cross-entropy over supervised tokens, number of supervised tokens)."""
    targets = labels[:, 1:]
    weights = targets != IGNORE_INDEX
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), jnp.where(weights, targets, 0))
    return jnp.sum(ce * weights), jnp.sum(weights)


@dataclasses.dataclass(frozen=True)
class StepFns:
    train: Callable
    loss: Callable


def make_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, num_towers: int,
              accum_steps: int) -> StepFns:
    """train(state, frozen, batch) -> (state, metrics); state = {'params', 'opt', 'step'}.

    The batch's leading axis is split into `accum_steps` micro-batches whose gradients are summed
    and then divided by the total number of supervised tokens: the loss is the token mean over the
    whole global batch, whatever the accumulation.
    """

    def loss_sum(trainable, frozen, batch):
        model = nnx.merge(graphdef, trainable, frozen)
        logits = model(**model_inputs(batch, num_towers))
        return token_losses(logits, batch["labels"])

    def train(state, frozen, batch):
        def micro(carry, mb):
            grads, loss, count = carry
            (l, n), g = jax.value_and_grad(loss_sum, has_aux=True)(state["params"], frozen, mb)
            return (jax.tree.map(jnp.add, grads, g), loss + l, count + n), None

        split = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)
        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        (grads, loss, count), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.int32(0)), split)
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(loss=loss / denom, grad_norm=optax.global_norm(grads), tokens=count)
        return dict(params=params, opt=opt, step=state["step"] + 1), metrics

    def loss(state, frozen, batch):
        l, n = loss_sum(state["params"], frozen, batch)
        return l / jnp.maximum(n, 1)

    return StepFns(train=train, loss=loss)
