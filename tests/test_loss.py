"""The training loss and the step's gradient, checked against implementations written here.

  token_losses   (sum, count) of next-token cross-entropy equal a plain numpy float64 version (the
                 target at t+1 scored by the logits at t, IGNORE_INDEX targets skipped) on hand-built
                 rows: a masked prompt, right padding, several conversations packed in one row, a row
                 with nothing supervised, a supervised token id 0
  the step       on the micro model (configs/cambrian_tiny.py:micro, stage 2's trainable split), the
                 gradient make_step's train() hands the optimizer equals jax.grad of a loss written
                 here (the model's forward → explicit log-softmax → explicit shift and mask → mean over
                 the supervised tokens of the whole batch), leaf by leaf; the step's loss, token count,
                 grad_norm (before clipping) and StepFns.loss agree with it; the same loss with labels
                 shifted by one position is far outside the tolerance

The reference's loss: token-level cross-entropy, mean over the non-ignored tokens, logits in float32,
the standard next-token shift (LLaVA's train.py / transformers' LlamaForCausalLM loss, IGNORE_INDEX −100).
Float32 on CPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cambrian_jax import config as config_lib
from cambrian_jax import optim
from cambrian_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from cambrian_jax.train_step import chunked_token_losses, make_step, token_losses
from configs import cambrian_tiny


def numpy_token_losses(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """Next-token cross-entropy in float64, one token at a time: logits[b, t] predict labels[b, t + 1]."""
    logits = logits.astype(np.float64)
    total, count = 0.0, 0
    b_size, t_size, _ = logits.shape
    for b in range(b_size):
        for t in range(t_size - 1):
            target = labels[b, t + 1]
            if target == IGNORE_INDEX:
                continue
            row = logits[b, t]
            m = row.max()
            log_z = m + np.log(np.sum(np.exp(row - m)))
            total += log_z - row[target]
            count += 1
    return total, count


def _hand_built(seed: int):
    """Logits [4, 14, 11] and labels with every masking pattern the data pipeline produces."""
    rng = np.random.default_rng(seed)
    b, t, v = 4, 14, 11
    logits = (rng.standard_normal((b, t, v)) * 2.5).astype(np.float32)
    labels = rng.integers(0, v, (b, t)).astype(np.int32)
    ign = IGNORE_INDEX
    labels[0, :5] = ign                  # row 0: a prompt, a reply, right padding
    labels[0, 10:] = ign
    labels[1, [0, 1, 5, 6, 7, 11]] = ign  # row 1: three conversations packed (masked turns between replies)
    labels[2, :] = ign                   # row 2: nothing supervised
    labels[3, 0] = ign                   # row 3: everything after the first token, with token id 0 in it
    labels[3, 4] = labels[3, 9] = 0
    # Large logits wherever nothing is scored (positions whose next label is masked, the last position):
    # a mask dropped, or shifted, changes the sum by thousands.
    unscored = np.concatenate([labels[:, 1:] == ign, np.ones((b, 1), bool)], axis=1)
    logits[unscored] += 50.0 * rng.standard_normal((int(unscored.sum()), v)).astype(np.float32)
    return logits, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_token_losses_equal_a_numpy_next_token_cross_entropy(seed):
    logits, labels = _hand_built(seed)
    total, count = jax.jit(token_losses)(jnp.asarray(logits), jnp.asarray(labels))
    ref_total, ref_count = numpy_token_losses(logits, labels)
    assert int(count) == ref_count == 5 + 8 + 0 + 13
    # float32 log-sum-exp of logits of magnitude ≲ 10 (scored positions): ~1e-7 relative per token, 26 terms.
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-6)
    # Per row: the empty row contributes exactly nothing.
    for r in range(len(labels)):
        t_r, n_r = token_losses(jnp.asarray(logits[r:r + 1]), jnp.asarray(labels[r:r + 1]))
        ref_r, ref_n = numpy_token_losses(logits[r:r + 1], labels[r:r + 1])
        assert int(n_r) == ref_n
        if ref_n:
            np.testing.assert_allclose(float(t_r), ref_r, rtol=1e-6)
        else:
            assert float(t_r) == 0.0


@pytest.mark.parametrize("chunk", [1, 4, 13, 32])
def test_the_chunked_loss_equals_the_whole_one(chunk):
    """chunked_token_losses (hidden states → logits a chunk at a time, recomputed in the backward) has
    token_losses' sum, count and gradients (of the hidden states and the head) on the hand-built rows,
    for chunks that divide the 13 scored positions, leave a padded tail, or exceed them."""
    logits, labels = _hand_built(0)
    rng = np.random.default_rng(5)
    b, t, v = logits.shape
    hidden = jnp.asarray(rng.standard_normal((b, t, 6)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((6, v)), jnp.float32)
    labels = jnp.asarray(labels)

    def whole(hidden, head):
        return token_losses(hidden @ head, labels)

    def chunked(hidden, head):
        return chunked_token_losses(hidden, lambda h: h @ head, labels, chunk)

    (ref, ref_n), (got, got_n) = jax.jit(whole)(hidden, head), jax.jit(chunked)(hidden, head)
    assert int(got_n) == int(ref_n) == 26
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    ref_g = jax.jit(jax.grad(lambda *a: whole(*a)[0], argnums=(0, 1)))(hidden, head)
    got_g = jax.jit(jax.grad(lambda *a: chunked(*a)[0], argnums=(0, 1)))(hidden, head)
    for r, g in zip(ref_g, got_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=1e-5 * float(jnp.abs(r).max()))
    # It can fail: a chunking that dropped the padded tail's neighbour or shifted a target would not match.
    assert abs(float(chunked_token_losses(hidden, lambda h: h @ head, jnp.roll(labels, 1, axis=1), chunk)[0])
               - float(ref)) > 1e-3 * float(ref)


# -------------------------------------------------------------------------- the step's gradient

def capture_gradient() -> optax.GradientTransformation:
    """An 'optimizer' whose state after update() is the gradient it was given, and that changes nothing."""
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _step_batch(cfg, rows: int = 4, seed: int = 0):
    """A batch of the data contract for the micro model: image prompts of different lengths (wide and tall
    images: padding masks), labels masked on the prompt, the image block, padding, between packed replies,
    and one row with nothing supervised."""
    from cambrian_jax.model import static_layout

    rng = np.random.default_rng(seed)
    v = cfg.decoder.vocab_size
    ids = [np.concatenate([rng.integers(1, v, cfg.image_position), [IMAGE_TOKEN_INDEX], rng.integers(0, v, n)])
           for n in (14, 9, 12, 6)][:rows]
    sizes = [(44, 20), (18, 40), (30, 30), (50, 16)][:rows]
    lay = static_layout(cfg, ids, sizes)
    labels = np.where(lay["attention_mask"], lay["input_ids"], IGNORE_INDEX).astype(np.int32)
    after = cfg.image_position + cfg.connector.block_len       # first text position after the image block
    labels[:, :after + 1] = IGNORE_INDEX                       # system/user turn and the image block
    labels[1, after + 4:after + 6] = IGNORE_INDEX              # row 1: two replies with a user turn between
    labels[2, :] = IGNORE_INDEX                                # row 2: nothing supervised
    tower = cfg.towers[0]
    batch = dict(input_ids=lay["input_ids"], labels=labels, attention_mask=lay["attention_mask"],
                 positions=lay["positions"], tower_mask_0=lay["tower_masks"][0],
                 pixels_0=rng.standard_normal((rows, tower.image_size, tower.image_size, 3)).astype(np.float32))
    assert (labels[:, 1:] != IGNORE_INDEX).sum(axis=1).tolist()[2] == 0
    return batch


class Toy(nnx.Module):
    """A model with the Cambrian call signature that compiles in about a second: embedding (+ position
    embedding) → tanh layer (trainable) → head (frozen); the attention mask zeroes padded positions."""

    def __init__(self, vocab: int, hidden: int, length: int, rngs: nnx.Rngs):
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (vocab, hidden)))
        self.pos = nnx.Param(0.1 * jax.random.normal(rngs.params(), (length, hidden)))
        self.mix = nnx.Param(jax.random.normal(rngs.params(), (hidden, hidden)) / np.sqrt(hidden))
        self.head = nnx.Param(jax.random.normal(rngs.params(), (hidden, vocab)))

    def __call__(self, input_ids, pixels, tower_masks, attention_mask, positions):
        x = jnp.take(self.embed[...], input_ids, axis=0) + jnp.take(self.pos[...], positions, axis=0)
        x = jnp.tanh(x @ self.mix[...]) * attention_mask[..., None]
        return x @ self.head[...]


def independent_loss(graphdef, trainable, frozen, batch, pixels, tower_masks):
    """Mean next-token cross-entropy over the supervised tokens of the whole batch, written out."""
    model = nnx.merge(graphdef, trainable, frozen)
    logits = model(batch["input_ids"], pixels, tower_masks, batch["attention_mask"], batch["positions"])
    logits = logits.astype(jnp.float32)
    m = jnp.max(logits, axis=-1, keepdims=True)
    log_probs = logits - m - jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True))
    predicted, targets = log_probs[:, :-1], batch["labels"][:, 1:]        # position t scores token t + 1
    scored = targets != IGNORE_INDEX
    picked = jnp.take_along_axis(predicted, jnp.where(scored, targets, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(scored, picked, 0.0)) / jnp.sum(scored)


def check_step_gradient(graphdef, towers, train, frozen, batch, inputs, loss_chunk=0):
    """make_step's gradient, loss, tokens, grad_norm and StepFns.loss against independent_loss.
    `inputs(batch)` -> (pixels, tower_masks) as the model takes them, read from the batch here."""
    def ref(trainable, frozen, batch):
        return independent_loss(graphdef, trainable, frozen, batch, *inputs(batch))

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(ref))(train, frozen, batch)

    # accum_steps=2: micro-batches of rows {0, 2} and {1, 3} hold different token counts (row 2 has none),
    # so a per-micro-batch mean would differ from the token mean over the batch.
    tx = capture_gradient()
    fns = make_step(graphdef, tx, towers, accum_steps=2, loss_chunk=loss_chunk)
    state = dict(params=train, opt=tx.init(train), step=jnp.int32(0))
    new_state, metrics = jax.jit(fns.train)(state, frozen, batch)
    step_grads = new_state["opt"]

    assert int(metrics["tokens"]) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    # Loss: float32 forwards in both; the step sums two micro-batches, then divides. 1e-6 relative ≈ 10 ulps.
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-6)
    np.testing.assert_allclose(float(jax.jit(fns.loss)(state, frozen, batch)), float(ref_loss), rtol=1e-6)

    ref_leaves = jax.tree_util.tree_leaves_with_path(ref_grads)
    step_leaves = jax.tree.leaves(step_grads)
    assert len(ref_leaves) == len(step_leaves)
    norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(ref_grads)))
    worst, zero = 0.0, []
    for (path, ref_g), got in zip(ref_leaves, step_leaves):
        ref_g, got = np.asarray(ref_g, np.float64), np.asarray(got, np.float64)
        scale = np.linalg.norm(ref_g)
        if scale <= 1e-7 * norm:
            # A gradient that is zero in exact arithmetic (e.g. an attention key bias: softmax is shift
            # invariant): only float noise on either side.
            assert np.linalg.norm(got) <= 1e-6 * norm, optim.path_str(path)
            zero.append(optim.path_str(path))
            continue
        rel = np.linalg.norm(got - ref_g) / scale
        worst = max(worst, rel)
        # Both are float32 backward passes of the same forward, summed in other orders.
        assert rel <= 1e-5, f"{optim.path_str(path)}: relative difference {rel:.2e}"
    assert len(zero) <= len(ref_leaves) // 4, zero
    print(f"step gradient vs jax.grad of the independent loss: {len(ref_leaves) - len(zero)} leaves, worst "
          f"relative difference {worst:.1e}; zero in both: {zero}")
    # grad_norm: the global L2 norm of the gradient before the optimizer (clipping is the optimizer's).
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
    assert int(new_state["step"]) == 1

    # The comparison can tell a label shift by one: the independent loss of shifted labels is far away.
    rows = batch["labels"].shape[0]
    shifted = dict(batch, labels=np.concatenate([batch["labels"][:, 1:], np.full((rows, 1), IGNORE_INDEX, np.int32)],
                                                axis=1))
    off_by_one = float(jax.jit(ref)(train, frozen, shifted))
    assert abs(off_by_one - float(metrics["loss"])) > 1e-3 * float(ref_loss)


def test_the_steps_gradient_on_a_toy_model():
    """The step's own arithmetic (shift, mask, token mean over micro-batches, grad_norm) in a second."""
    v, length = 13, 12
    graphdef, params = nnx.split(Toy(v, 8, length, nnx.Rngs(0)), nnx.Param)
    train, frozen = nnx.split_state(params, optim.trainable_filter(["^embed", "^pos", "^mix"]), ...)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, v, (4, length)).astype(np.int32)
    mask = np.ones((4, length), bool)
    mask[0, 9:] = False                            # row 0: right padding
    labels = np.where(mask, ids, IGNORE_INDEX).astype(np.int32)
    labels[:, :3] = IGNORE_INDEX                   # prompts
    labels[1, 6:8] = IGNORE_INDEX                  # row 1: two packed replies
    labels[2, :] = IGNORE_INDEX                    # row 2: nothing supervised
    batch = dict(input_ids=ids, labels=labels, attention_mask=mask,
                 positions=np.tile(np.arange(length, dtype=np.int32), (4, 1)))
    check_step_gradient(graphdef, [], train, frozen, batch, lambda b: ([], []))


@pytest.fixture(scope="module")
def micro():
    from cambrian_jax.model import init_model

    config = cambrian_tiny.get_config("micro")
    cfg = config_lib.from_dict(config.model)
    graphdef, params = nnx.split(init_model(cfg, 0), nnx.Param)
    train, frozen = nnx.split_state(params, optim.trainable_filter(list(config.stage2.trainable)), ...)
    return cfg, graphdef, train, frozen


@pytest.mark.slow
@pytest.mark.parametrize("loss_chunk", [0, 7])
def test_the_steps_gradient_on_the_micro_model(micro, loss_chunk):
    """The same on the micro Cambrian (one tower frozen, SVA and decoder trained, ~1 min to compile): also
    the batch → model wiring (pixels, tower masks, positions) of train_step.model_inputs; and with the
    cross-entropy computed 7 positions at a time (the released configs' loss_chunk path)."""
    cfg, graphdef, train, frozen = micro
    assert jax.tree.leaves(frozen), "stage 2 keeps the towers frozen"
    batch = _step_batch(cfg)
    check_step_gradient(graphdef, cfg.towers, train, frozen, batch,
                        lambda b: ([b["pixels_0"]], [b["tower_mask_0"]]), loss_chunk=loss_chunk)
