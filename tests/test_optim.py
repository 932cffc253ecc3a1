"""The stage optimizer (cambrian_jax/optim.py make_optimizer) against PyTorch's, as the reference's HF
Trainer runs it: `torch.nn.utils.clip_grad_norm_` over every trainable parameter together, then
`torch.optim.AdamW` with one parameter group per learning rate (and weight decay 0 for biases and
norm scales), the lr from `transformers.get_cosine_schedule_with_warmup` (HF Trainer's
`_inner_training_loop`: clip, `optimizer.step()`, `lr_scheduler.step()`).

Adam divides by the gradient's running scale, so a gradient clipped by the same factor at every step
gives the same update as an unclipped one: the gradients here change norm from step to step, above
and below the threshold, which is when clipping changes Adam's update. The PyTorch side runs in
float64, so the tolerances below are the float32 side's rounding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx
from transformers import get_cosine_schedule_with_warmup

from cambrian_jax import optim
from cambrian_jax.config import IGNORE_INDEX
from cambrian_jax.train_step import make_step
from configs import common

TOTAL = 8                      # schedule length; warmup ceil(0.25 · 8) = 2 updates
NORMS = [5.0, 0.4, 3.0, 0.7, 2.0, 0.9]   # global gradient norm of each step: clipped, not, clipped, …
SHAPES = {"connector/mm_projector/kernel": (3, 4), "connector/mm_projector/bias": (4,),
          "connector/image_newline": (4,), "connector/vision_sampler_layers/0/kernel": (4, 5),
          "connector/vision_sampler_layers/0/scale": (5,), "connector/vision_query": (2, 5)}
LRS = {"projectors": 0.05, "samplers": 0.02}


def _stage():
    s = common.stage(trainable=[common.CONNECTOR], warmup_ratio=0.25, global_batch_size=8,
                     lr_groups=[("projectors", common.PROJECTORS, LRS["projectors"]),
                                ("samplers", common.SAMPLERS, LRS["samplers"])])
    s.weight_decay = 0.1           # nonzero, so the no-decay rule for biases and scales is exercised
    return s


def _nest(flat):
    """{'a/b/c': x} → {'a': {'b': {'c': x}}}: the tree make_optimizer sees, paths as in the model."""
    out = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = v
    return out


def _flat(tree):
    return {optim.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _gradients(seed=0):
    """One gradient per step: random directions, rescaled to the global norms NORMS, most of the norm
    in the projector group (so clipping each group by its own norm would give other factors)."""
    rng = np.random.default_rng(seed)
    steps = []
    for norm in NORMS:
        g = {k: rng.normal(size=s) * (3.0 if "mm_projector" in k else 1.0) for k, s in SHAPES.items()}
        total = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
        steps.append({k: v * norm / total for k, v in g.items()})
    return steps


def _torch_updates(params0, grads, *, lrs=LRS, weight_decay=0.1, clip=1.0, per_group_clip=False):
    """PyTorch float64: each step's parameter change, HF Trainer's order of clip / step / schedule."""
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params0.items()}
    group = lambda k: "samplers" if ("vision_sampler" in k or "vision_query" in k) else "projectors"
    no_decay = lambda k: k.rsplit("/", 1)[-1] in ("bias", "scale")
    groups = [dict(params=[p[k] for k in p if group(k) == g and no_decay(k) == nd], lr=lr,
                   weight_decay=0.0 if nd else weight_decay, name=g)
              for g, lr in lrs.items() for nd in (False, True)]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.999), eps=1e-8)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=TOTAL)
    out = []
    for g in grads:
        for k, t in p.items():
            t.grad = torch.tensor(g[k], dtype=torch.float64)
        if clip is not None:
            if per_group_clip:
                for name in lrs:
                    torch.nn.utils.clip_grad_norm_([p[k] for k in p if group(k) == name], clip)
            else:
                torch.nn.utils.clip_grad_norm_(list(p.values()), clip)
        before = {k: t.detach().clone() for k, t in p.items()}
        opt.step()
        sched.step()
        out.append({k: (p[k].detach() - before[k]).numpy() for k in p})
    return out


def _jax_updates(params0, grads, stage):
    params = _nest({k: jnp.asarray(v, jnp.float32) for k, v in params0.items()})
    tx, _ = optim.make_optimizer(stage, params, TOTAL)
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for g in grads:
        u, state = update(_nest({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}), state, params)
        params = optax.apply_updates(params, u)
        out.append(_flat(u))
    return out


def _rel(a, b):
    return max(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max() for k in b)


def test_clip_over_all_groups_then_adamw_per_group_equals_torch():
    rng = np.random.default_rng(1)
    params0 = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    grads = _gradients()
    got = _jax_updates(params0, grads, _stage())
    want = _torch_updates(params0, grads)
    assert all(not v.any() for v in got[0].values())     # HF's warmup: the first update has lr 0 …
    for step, (g, w) in enumerate(zip(got, want)):       # … yet its gradient is in Adam's moments
        for k in w:
            # Relative to the step's largest change of the parameter. optax evaluates Adam's bias
            # correction 1 − β₂ᵗ in float32 (PyTorch in double): for t = 1, 2, … that difference of
            # nearly equal numbers keeps ~4 digits, ≈2e-5 relative, ≈1e-5 after the square root
            # (observed 1.0e-5; the same comparison with JAX in float64 differs by 2e-7, torch's
            # clip eps). 3e-5 covers that; the alternatives below differ by 1e-2 or more.
            scale = np.abs(w[k]).max()
            np.testing.assert_allclose(g[k], w[k], rtol=0, atol=3e-5 * scale, err_msg=f"step {step} {k}")
    # The comparison can tell: without clipping, or clipping each lr group by its own norm, the
    # updates differ from the ones above by far more than the tolerance.
    unclipped = _torch_updates(params0, grads, clip=None)
    per_group = _torch_updates(params0, grads, per_group_clip=True)
    assert max(_rel(u, w) for u, w in zip(unclipped[2:], want[2:])) > 1e-2
    assert max(_rel(u, w) for u, w in zip(per_group[2:], want[2:])) > 1e-2


# ----------------------------------------------------------------- the step that uses the optimizer

V, H, B, T = 13, 6, 4, 5


class Toy(nnx.Module):
    """Embedding → head, both trainable; the step's call signature."""

    def __init__(self, rngs):
        self.embed = nnx.Param(3.0 * jax.random.normal(rngs.params(), (V, H)))     # large: norm ≫ 1
        self.head = nnx.Param(jax.random.normal(rngs.params(), (H, V)))

    def __call__(self, input_ids, pixels, tower_masks, attention_mask, positions):
        return jnp.take(self.embed[...], input_ids, axis=0) @ self.head[...]


def test_step_reports_the_norm_before_clipping_and_applies_the_clipped_update():
    """Two steps of make_step with make_optimizer on a toy whose gradient norm is ≫ 1, against PyTorch."""
    rng = np.random.default_rng(2)
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    labels = np.roll(ids, -1, axis=1)
    labels[:, :2] = IGNORE_INDEX
    batch = dict(input_ids=ids, labels=labels, attention_mask=np.ones((B, T), bool),
                 positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)))
    stage = common.stage(trainable=["."], warmup_ratio=0.0, global_batch_size=B, lr_groups=[("all", ".", 0.1)])
    graphdef, params = nnx.split(Toy(nnx.Rngs(0)), nnx.Param)
    p0 = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
    tx, _ = optim.make_optimizer(stage, params, 4)
    step = jax.jit(make_step(graphdef, tx, [], 1).train)
    state = dict(params=params, opt=tx.init(params), step=jnp.int32(0))

    def torch_run(clip):
        """PyTorch float32: the same next-token loss (mean over supervised targets), backward, clip, AdamW
        (the lr schedule without warmup is 0.1·cos² of progress: set per step as HF's would be)."""
        w = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in p0.items()}
        opt = torch.optim.AdamW([dict(params=list(w.values()), lr=0.1, weight_decay=0.0)], betas=(0.9, 0.999),
                                eps=1e-8)
        sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=4)
        record = []
        for _ in range(2):
            opt.zero_grad()
            logits = (w["embed"][torch.tensor(ids).long()] @ w["head"])[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.tensor(labels[:, 1:]).long()
                                                     .reshape(-1), ignore_index=IGNORE_INDEX)
            loss.backward()
            norm = float(torch.sqrt(sum(t.grad.double().square().sum() for t in w.values())))
            if clip:
                torch.nn.utils.clip_grad_norm_(list(w.values()), 1.0)
            opt.step()
            sched.step()
            record.append((loss.item(), norm, {k: t.detach().numpy().copy() for k, t in w.items()}))
        return record

    want = torch_run(clip=True)
    for loss, norm, params_after in want:
        state, metrics = step(state, {}, batch)
        assert norm > 3.0                # far above grad_clip = 1: a clipped norm (≤ 1) cannot pass
        np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)   # float32 CE, two float32 sides
        np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)   # float32 gradients
        got = _flat(state["params"])
        for k, v in params_after.items():
            # Each Adam step moves an entry by up to lr = 0.1; float32 rounding of entries of size ~5 and
            # of the two sides' gradients: a few 1e-7 (observed below 1e-6).
            np.testing.assert_allclose(got[k], v, rtol=0, atol=5e-6, err_msg=k)
    # The second step tells clipped from unclipped (its gradient's norm differs from the first's).
    unclipped = torch_run(clip=False)[1][2]
    assert max(np.abs(unclipped[k] - want[1][2][k]).max() for k in unclipped) > 1e-3
