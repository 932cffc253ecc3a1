"""What a stage trains and how: trainable masks, learning-rate groups, AdamW with clipping (spec §7.1).

A stage names its trainable parameters and its learning-rate groups with regular expressions over
parameter paths ("connector/aggregators/...", "decoder/layers/..."). Frozen parameters are split
off before differentiation, so they get neither gradients nor optimizer state.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cambrian_jax.config import ConfigError


def path_str(path: Sequence[Any]) -> str:
    """'decoder/layers/attn/q/kernel' from a pytree path (the Variable's own '.value' entry dropped)."""
    parts = []
    for p in path:
        if hasattr(p, "key"):
            parts.append(str(p.key))
        elif hasattr(p, "idx"):
            parts.append(str(p.idx))
        elif getattr(p, "name", None) != "value":
            parts.append(str(p))
    return "/".join(parts)


def trainable_filter(patterns: Sequence[str]):
    """An nnx filter: Params whose path matches any of the patterns (re.search)."""
    regexes = [re.compile(p) for p in patterns]

    def keep(path, value) -> bool:
        return isinstance(value, nnx.Param) and any(r.search(path_str(path)) for r in regexes)

    return keep


def check_trainable(paths: Sequence[str], patterns: Sequence[str], field: str) -> None:
    for p in patterns:
        if not any(re.search(p, x) for x in paths):
            raise ConfigError(f"config field {field}: pattern {p!r} matches no parameter "
                              f"(paths look like {paths[0]!r}, {paths[-1]!r})")


def group_of(path: str, groups: Sequence[tuple[str, float]]) -> int:
    """Index of the first learning-rate group whose pattern matches; the last group is the default."""
    for i, (pattern, _) in enumerate(groups):
        if re.search(pattern, path):
            return i
    return len(groups) - 1


def schedule(peak_lr: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """Linear warmup from 0 then cosine to 0 (HF get_cosine_schedule_with_warmup)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    return optax.warmup_cosine_decay_schedule(0.0, peak_lr, max(warmup, 1), max(total_steps, warmup + 1), 0.0)


def make_optimizer(stage, trainable_state: nnx.State, total_steps: int):
    """(optax transform, {group name: schedule}) for the stage's trainable parameters."""
    groups = [(g["pattern"], g["lr"]) for g in stage.lr_groups]
    if not groups:
        raise ConfigError("config field lr_groups: a stage needs at least one learning-rate group")
    scheds = {i: schedule(lr, total_steps, stage.warmup_ratio) for i, (_, lr) in enumerate(groups)}

    def labels(state):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: group_of(path_str(path), groups), state)

    def decay_mask(state):
        # LayerNorm scales and biases are in the no-decay group, as in HF Trainer.
        return jax.tree.map(lambda x: jnp.ndim(x) >= 2, state)

    per_group = {i: optax.chain(
        optax.scale_by_adam(b1=stage.adam_b1, b2=stage.adam_b2, eps=stage.adam_eps),
        optax.add_decayed_weights(stage.weight_decay, decay_mask),
        optax.scale_by_learning_rate(s)) for i, s in scheds.items()}
    tx = optax.chain(optax.clip_by_global_norm(stage.grad_clip), optax.multi_transform(per_group, labels))
    names = {str(stage.lr_groups[i].get("name", i)): s for i, s in scheds.items()}
    return tx, names
