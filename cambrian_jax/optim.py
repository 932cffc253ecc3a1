"""What a stage trains and how: trainable masks, learning-rate groups, AdamW with clipping (spec §7.1).

A stage names its trainable parameters and its learning-rate groups with regular expressions over
parameter paths ("connector/vision_sampler_layers/...", "decoder/layers/..."). Frozen parameters
are split off before differentiation, so they get neither gradients nor optimizer state.

Learning-rate groups are tried in order, the first whose pattern matches wins, and the last group
takes every trainable parameter no earlier group matched. Each group has its own schedule: linear
warmup from 0, then cosine to 0 (HF `get_cosine_schedule_with_warmup`), with the warmup length
`ceil(warmup_ratio · total_steps)` as HF Trainer computes it.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cambrian_jax.config import ConfigError

# Parameter names that HF Trainer keeps out of weight decay (biases and LayerNorm/RMSNorm weights).
NO_DECAY = ("bias", "scale")


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


def check_trainable(paths: Sequence[str], patterns: Sequence[str], field: str) -> list[str]:
    """The trainable paths; a ConfigError naming `field` for an empty set or a pattern matching nothing."""
    if not patterns:
        raise ConfigError(f"config field {field}: no trainable parameters; list path patterns such as "
                          f"'^connector/' or '^decoder/'")
    for p in patterns:
        try:
            regex = re.compile(p)
        except re.error as e:
            raise ConfigError(f"config field {field}: {p!r} is not a regular expression ({e})") from None
        if not any(regex.search(x) for x in paths):
            raise ConfigError(f"config field {field}: pattern {p!r} matches no parameter "
                              f"(paths look like {paths[0]!r}, {paths[-1]!r})")
    return [x for x in paths if any(re.search(p, x) for p in patterns)]


def group_of(path: str, groups: Sequence[tuple[str, float]]) -> int:
    """Index of the first learning-rate group whose pattern matches; the last group is the default."""
    for i, (pattern, _) in enumerate(groups):
        if re.search(pattern, path):
            return i
    return len(groups) - 1


def check_lr_groups(trainable_paths: Sequence[str], lr_groups: Sequence[Any], field: str) -> dict[str, int]:
    """{group name: number of trainable parameters in it}; a ConfigError for a group nothing falls into."""
    if not lr_groups:
        raise ConfigError(f"config field {field}: a stage needs at least one learning-rate group")
    groups = [(g["pattern"], g["lr"]) for g in lr_groups]
    counts = [0] * len(groups)
    for p in trainable_paths:
        counts[group_of(p, groups)] += 1
    names = group_names(lr_groups)
    for name, (pattern, _), n, g in zip(names, groups, counts, lr_groups):
        if n == 0 and not g.get("optional", False):
            raise ConfigError(f"config field {field}: group {name!r} (pattern {pattern!r}) gets no trainable "
                              f"parameter; earlier groups or the stage's trainable patterns take them all")
    return dict(zip(names, counts))


def group_names(lr_groups: Sequence[Any]) -> list[str]:
    return [str(g.get("name", i)) if hasattr(g, "get") else str(i) for i, g in enumerate(lr_groups)]


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(warmup_ratio * total_steps)


def schedule(peak_lr: float, total_steps: int, warmup_ratio: float) -> Callable[[Any], jax.Array]:
    """HF get_cosine_schedule_with_warmup: lr(t) for the t-th optimizer update (t = 0, 1, …).

    t < W: peak·t/W (so the first update has lr 0 when W > 0); then peak·½(1 + cos(π·(t−W)/(T−W))).
    """
    warm = warmup_steps(total_steps, warmup_ratio)
    decay = max(1, total_steps - warm)

    def lr(step):
        t = jnp.asarray(step, jnp.float32)
        up = peak_lr * t / max(1, warm)
        progress = jnp.clip((t - warm) / decay, 0.0, 1.0)
        down = peak_lr * jnp.square(jnp.cos(0.5 * jnp.pi * progress))   # = ½(1 + cos πp), exact near 0 in float32
        return jnp.where(t < warm, up, down)

    return lr


def decay_mask(state):
    """True for parameters that take weight decay: not biases, not normalisation scales (HF's rule)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path_str(path).split("/")[-1] not in NO_DECAY, state)


def make_optimizer(stage, trainable_state: nnx.State, total_steps: int):
    """(optax transform, {group name: schedule}) for the stage's trainable parameters.

    clip_by_global_norm over all groups together (torch's clip_grad_norm_), then AdamW per group.
    """
    groups = [(g["pattern"], g["lr"]) for g in stage.lr_groups]
    if not groups:
        raise ConfigError("config field lr_groups: a stage needs at least one learning-rate group")
    scheds = {i: schedule(lr, total_steps, stage.warmup_ratio) for i, (_, lr) in enumerate(groups)}

    def labels(state):
        return jax.tree_util.tree_map_with_path(lambda path, _: group_of(path_str(path), groups), state)

    per_group = {i: optax.chain(
        optax.scale_by_adam(b1=stage.adam_b1, b2=stage.adam_b2, eps=stage.adam_eps),
        optax.add_decayed_weights(stage.weight_decay, decay_mask),
        optax.scale_by_learning_rate(s)) for i, s in scheds.items()}
    tx = optax.chain(optax.clip_by_global_norm(stage.grad_clip), optax.multi_transform(per_group, labels))
    names = dict(zip(group_names(stage.lr_groups), scheds.values()))
    return tx, names
