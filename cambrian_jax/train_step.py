"""The one training step: loss, gradient accumulation, clipping, AdamW, compiled once per stage.

Stages differ only by which parameters are trainable (a filter) and by the optimizer's groups: the
step is the same function. Frozen parameters are a separate argument that is never differentiated,
so XLA computes no weight gradient for them and the optimizer holds no state for them.

Precision: parameters (and optimizer state) are float32 master weights; the model computes in
`model.dtype` (bfloat16 for the released configs), with norms, softmax, logits and the loss in
float32.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cambrian_jax.config import IGNORE_INDEX, TowerConfig


def model_inputs(batch: dict[str, jax.Array], towers: Sequence[TowerConfig]) -> dict[str, Any]:
    """The model's keyword arguments from a batch of the data contract (cambrian_jax.data.pipeline).

    uint8 pixels (data.pixel_format = "uint8": 4× less to move from host to device) are normalised
    here, on device, with each tower's mean and std.
    """
    from cambrian_jax.preprocess import normalize_device  # noqa: PLC0415

    pixels = []
    for k, tower in enumerate(towers):
        px = batch[f"pixels_{k}"]
        pixels.append(normalize_device(px, tower) if px.dtype == jnp.uint8 else px)
    return dict(input_ids=batch["input_ids"], pixels=pixels,
                tower_masks=[batch[f"tower_mask_{k}"] for k in range(len(towers))],
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


def make_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, towers: Sequence[TowerConfig],
              accum_steps: int, constrain: Callable[[jax.Array, tuple], jax.Array] | None = None) -> StepFns:
    """train(state, frozen, batch) -> (state, metrics); state = {'params', 'opt', 'step'}.

    The batch's leading axis is split into `accum_steps` micro-batches whose gradients are summed
    and then divided by the total number of supervised tokens: the loss is the token mean over the
    whole global batch, whatever the accumulation. No randomness: a step is a pure function of
    (state, frozen, batch), which is what makes a resumed run equal an uninterrupted one.

    `constrain(x, logical_names)` pins an activation's sharding (sharding.Constrainer); by default
    activations follow the compiler's propagation from the inputs.
    """
    pin = constrain or (lambda x, names: x)

    def loss_sum(trainable, frozen, batch):
        model = nnx.merge(graphdef, trainable, frozen)
        batch = {k: pin(v, ("activation_batch",) + (None,) * (v.ndim - 1)) for k, v in batch.items()}
        logits = model(**model_inputs(batch, towers))
        logits = pin(logits, ("activation_batch", "activation_length", "activation_vocab"))
        return token_losses(logits, batch["labels"])

    def train(state, frozen, batch):
        def micro(carry, mb):
            grads, loss, count = carry
            (l, n), g = jax.value_and_grad(loss_sum, has_aux=True)(state["params"], frozen, mb)
            return (jax.tree.map(jnp.add, grads, g), loss + l, count + n), None

        # Micro-batch i takes rows i, i + accum_steps, …: every device holds a block of rows, so each
        # micro-batch keeps the batch's sharding (no rows move between devices).
        split = jax.tree.map(lambda x: jnp.swapaxes(
            x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1), batch)
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
