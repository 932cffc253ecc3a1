"""Put converted tensors into a module's parameters, reporting every problem at once.

Converters (one per source format, in this package) turn a checkpoint's tensors into a flat mapping
{"path/to/param": array} whose paths are the module's own parameter paths joined by "/" (list indices
as numbers, e.g. "blocks/0/kernel"). `assign` checks that mapping against the module and fails with
one error listing missing keys, unexpected keys and shape mismatches, by name and expected shape.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class CheckpointMismatch(ValueError):
    """Missing, unexpected or mis-shaped tensors; the message lists all of them."""


def param_path(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def flat_params(module: nnx.Module) -> dict[str, nnx.Variable]:
    return {param_path(p): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def check(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]], source: str,
          *, allow_missing: tuple[str, ...] = ()) -> None:
    """Raise one CheckpointMismatch naming every missing/unexpected/mis-shaped key."""
    missing = [k for k in expected if k not in got and not k.startswith(allow_missing)]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"  {k}: expected shape {tuple(expected[k])}, got {tuple(got[k])}"
              for k in expected if k in got and tuple(expected[k]) != tuple(got[k])]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{source} does not match the model:"]
    if missing:
        lines.append(f" {len(missing)} missing: " + ", ".join(
            f"{k} {tuple(expected[k])}" for k in missing[:20]) + (" …" if len(missing) > 20 else ""))
    if unexpected:
        lines.append(f" {len(unexpected)} unexpected: " + ", ".join(unexpected[:20])
                     + (" …" if len(unexpected) > 20 else ""))
    if shapes:
        lines.append(f" {len(shapes)} with the wrong shape:")
        lines.extend(shapes[:20])
    raise CheckpointMismatch("\n".join(lines))


def assign(module: nnx.Module, tensors: Mapping[str, np.ndarray], source: str = "checkpoint") -> None:
    """Set module parameters from {path: array}; every path must exist with the same shape."""
    params = flat_params(module)
    check({k: v.get_value().shape for k, v in params.items()}, {k: np.shape(v) for k, v in tensors.items()}, source)
    for k, var in params.items():
        old = var.get_value()  # a concrete array, or a ShapeDtypeStruct in an nnx.eval_shape module
        value = np.asarray(tensors[k], dtype=old.dtype)
        sharding = getattr(old, "sharding", None)
        var.set_value(jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value))


def export(module: nnx.Module) -> dict[str, np.ndarray]:
    """The inverse of assign: {path: numpy array} of every parameter."""
    return {k: np.asarray(v.get_value()) for k, v in flat_params(module).items()}
