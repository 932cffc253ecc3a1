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
from cambrian_jax.decoder import LOGITS, lm_logits


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


def chunked_token_losses(hidden: jax.Array, logits_fn: Callable[[jax.Array], jax.Array], labels: jax.Array,
                         chunk: int) -> tuple[jax.Array, jax.Array]:
    """token_losses(logits_fn(hidden), labels), never holding more than `chunk` positions' logits.

    hidden [B, T, H] → (loss sum, count). The positions are cut into chunks of `chunk` (the last
    padded with ignored targets) and scanned; each chunk's logits are recomputed in the backward pass
    (jax.checkpoint), so the float32 [B, T, V] logits and their gradient never exist whole: for a
    128,256-token vocabulary at 2048 positions that is 1 GiB per row, against chunk/2048 of it.
    """
    b, t, _ = hidden.shape
    targets = labels[:, 1:]
    n = -(-(t - 1) // chunk)
    pad = n * chunk - (t - 1)
    h = jnp.pad(hidden[:, :-1], ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    chunks = lambda x: jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)    # [n, B, chunk, ...]

    @jax.checkpoint
    def one(h_c, t_c):
        weights = t_c != IGNORE_INDEX
        ce = optax.softmax_cross_entropy_with_integer_labels(logits_fn(h_c).astype(jnp.float32),
                                                             jnp.where(weights, t_c, 0))
        return jnp.sum(ce * weights), jnp.sum(weights)

    def body(carry, xs):
        loss, count = one(*xs)
        return (carry[0] + loss, carry[1] + count), None

    (loss, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), (chunks(h), chunks(targets)))
    return loss, count


@dataclasses.dataclass(frozen=True)
class StepFns:
    train: Callable
    loss: Callable


def make_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, towers: Sequence[TowerConfig],
              accum_steps: int, constrain: Callable[[jax.Array, tuple], jax.Array] | None = None,
              loss_chunk: int = 0) -> StepFns:
    """train(state, frozen, batch) -> (state, metrics); state = {'params', 'opt', 'step'}.

    The batch's leading axis is split into `accum_steps` micro-batches whose gradients are summed
    and then divided by the total number of supervised tokens: the loss is the token mean over the
    whole global batch, whatever the accumulation. No randomness: a step is a pure function of
    (state, frozen, batch), which is what makes a resumed run equal an uninterrupted one.

    `constrain(x, logical_names)` pins an activation's sharding (sharding.Constrainer); by default
    activations follow the compiler's propagation from the inputs. `loss_chunk` > 0 computes the
    cross-entropy `loss_chunk` positions at a time (chunked_token_losses); 0 from the whole logits.
    """
    pin = constrain or (lambda x, names: x)

    def loss_sum(trainable, frozen, batch):
        model = nnx.merge(graphdef, trainable, frozen)
        batch = {k: pin(v, ("activation_batch",) + (None,) * (v.ndim - 1)) for k, v in batch.items()}
        if loss_chunk:
            hidden = model.hidden_states(**model_inputs(batch, towers))
            kernel, dtype = model.decoder.lm_head.kernel[...], model.decoder.dtype
            logits_fn = lambda h: pin(lm_logits(h, kernel, dtype), LOGITS)
            return chunked_token_losses(hidden, logits_fn, batch["labels"], loss_chunk)
        logits = pin(model(**model_inputs(batch, towers)), LOGITS)
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
