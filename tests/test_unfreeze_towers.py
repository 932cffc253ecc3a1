"""Unfreezing the vision towers with their own learning rate, in stage 1 and in stage 2 (issue 8).

`unfreeze_towers=12,towers_lr=…` (configs/common.py stage_options) adds the towers to both stages'
trainable sets in a learning-rate group of their own. tests/test_train_config.py checks the config
this makes; here: the trainer's plan on the real parameter tree, the rate each tower parameter
gets from the stage's optimizer, and (slow) a real two-stage run in which the towers move.

Adam's first update with a learning rate lr moves every element by lr·m̂/(√v̂+ε). With the HF
schedule the first update of a stage has lr 0 (warmup), so after two steps an element has moved by
lr₂·m̂/√v̂ with m̂/√v̂ ≤ √(Σ a_i²/b_i) = 1.0014 (a, b: Adam's bias-corrected weights of the two
gradients), and by about lr₂ where the two gradients agree: max |Δ| ∈ [0.9, 1.0014]·lr.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cambrian_jax import optim
from configs import cambrian_tiny, common

TOWERS_LR = 1e-2
SWITCHES = f"micro,steps1=2,steps2=2,batch=8,unfreeze_towers=12,towers_lr={TOWERS_LR}"


def _trainer(config, workdir):
    from cambrian_jax.trainer import Trainer
    return Trainer(config, workdir)


def test_every_tower_parameter_gets_the_towers_rate_in_both_stages(tmp_path):
    config = cambrian_tiny.get_config(SWITCHES)
    t = _trainer(config, tmp_path)
    t.close()
    towers = [p for p in t.param_paths if p.startswith("towers/")]
    assert towers
    for n in (1, 2):
        plan = t.plans[n]
        assert set(towers) <= set(plan.trainable_paths)
        assert plan.groups["towers"] == len(towers)
        stage = config[f"stage{n}"]
        tx, schedules = optim.make_optimizer(stage, plan.abs_train, 4)
        assert float(schedules["towers"](1)) == pytest.approx(TOWERS_LR)     # warmup is 1 step of 4
        # Constant gradients: Adam moves each element by exactly lr_t; read each group's rate off the
        # second update (the first has lr 0).
        def two_updates(abstract=plan.abs_train, tx=tx):
            params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
            grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
            state = tx.init(params)
            for _ in range(2):
                updates, state = tx.update(grads, state, params)
            return updates

        updates = jax.jit(two_updates)()
        moved = {optim.path_str(p): float(jnp.abs(u).max()) for p, u in jax.tree_util.tree_leaves_with_path(updates)}
        rates = {g["name"]: g["lr"] for g in stage.lr_groups}
        for path, size in moved.items():
            group = optim.group_of(path, [(g["pattern"], g["lr"]) for g in stage.lr_groups])
            want = rates[stage.lr_groups[group]["name"]]
            assert size == pytest.approx(want, rel=1e-4), (n, path)
        assert {p for p in moved if p.startswith("towers/")} == set(towers)


def _flat(state, prefix=""):
    return {prefix + optim.path_str(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_leaves_with_path(state)}


@pytest.mark.slow
def test_towers_train_at_their_own_rate_in_stage_one_and_two(tmp_path):
    """A real micro run, 2 + 2 steps, towers unfrozen in both stages (~2 min on 2 cores)."""
    config = cambrian_tiny.get_config(SWITCHES)
    config.log_every = 1
    t = _trainer(config, tmp_path)
    try:
        params = t.init_params()
        init = _flat(params)                      # copied: stage 1 donates these buffers
        t.init_params = lambda: params            # one random initialisation to compile, not two
        assert t.run()
        s1, s2 = _flat(t._final_params(1)), _flat(t._final_params(2))
    finally:
        t.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for n, before, after in ((1, init, s1), (2, s1, s2)):
        lrs = {r["step"]: r["lr"] for r in records if r["stage"] == n}
        assert lrs[1]["towers"] == 0.0 and lrs[2]["towers"] == pytest.approx(TOWERS_LR)
        step = {k: np.abs(after[k] - before[k]).max() for k in before}
        towers = [k for k in step if k.startswith("towers/")]
        assert all(step[k] > 0 for k in towers), [k for k in towers if step[k] == 0]   # every tower tensor moved
        assert max(step[k] for k in towers) == pytest.approx(TOWERS_LR, rel=0.1)
        assert max(step[k] for k in towers) <= 1.0015 * TOWERS_LR
        others = [g["lr"] for g in config[f"stage{n}"].lr_groups if g["name"] != "towers"]
        connector = [step[k] for k in step if k.startswith("connector/")]
        assert max(connector) <= 1.0015 * max(others) < TOWERS_LR              # the other groups keep theirs
        if n == 1:
            assert all(step[k] == 0 for k in step if k.startswith("decoder/"))         # the LLM stays frozen
    assert common.TOWERS in config.stage1.trainable and common.TOWERS in config.stage2.trainable
