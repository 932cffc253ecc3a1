"""The device mesh and the logical→mesh rules that place every parameter and activation.

Modules name their axes (layers.py lists the names); the config holds one ordered rules table
mapping each logical name to mesh axes. The first rule whose mesh axes are still free and divide the
dimension wins; otherwise the dimension is replicated. No PartitionSpec literal lives in model code.

Model code pins its key activations with `constrain(x, ("activation_batch", ...))`: inside
`rules_context(rules, mesh)` (entered by whoever lowers the step) that is a sharding constraint from
the same table; outside one (CPU tests, single-device generation) it is the identity.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cambrian_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis → mesh axes, in priority order (the first whose mesh axes are free and divide wins).
# Parameters are sharded FSDP-style over `fsdp` and Megatron-style over `tensor`. The configs hold a
# copy (config.sharding_rules); inference without a config uses this one.
DEFAULT_RULES = (
    ("vocab", "tensor"), ("vocab", "fsdp"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vision", "fsdp"),
    ("tower_embed", "fsdp"),
    ("tower_mlp", "tensor"),
    ("head_dim", None), ("layers", None), ("aggregators", None), ("tower_layers", None),
    # Activations (`constrain` in model code, the train step's batch and logits): rows over every
    # data-parallel axis; Megatron layout over `tensor` (heads, MLP hidden, vocab split; the residual
    # stream whole on every tensor shard, so the only tensor collectives are the row-parallel sums).
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def mesh_shape(parallelism: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Degrees per mesh axis; one axis may be -1 = whatever devices remain."""
    dims = [int(parallelism.get(a, 1)) for a in MESH_AXES]
    if dims.count(-1) > 1:
        raise ConfigError("config field mesh: at most one axis may be -1 (the rest of the devices)")
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
        if num_devices % known:
            raise ConfigError(f"config field mesh: {dict(zip(MESH_AXES, dims))} cannot fill {num_devices} devices "
                              f"({num_devices} is not a multiple of {known})")
        dims[dims.index(-1)] = num_devices // known
    if math.prod(dims) != num_devices:
        raise ConfigError(f"config field mesh: {dict(zip(MESH_AXES, dims))} uses {math.prod(dims)} devices but "
                          f"{num_devices} are present; make the product match or set one axis to -1")
    return tuple(dims)


def make_mesh(parallelism: dict[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(dict(parallelism), len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_spec(names: Sequence[str | None], shape: Sequence[int], rules: Sequence[tuple[str, Any]],
                 mesh: Mesh) -> PartitionSpec:
    """Resolve logical axis names to a PartitionSpec for an array of `shape` on `mesh`."""
    table: dict[str, list] = {}
    for logical, axes in rules:
        table.setdefault(logical, []).append(axes)
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape):
        chosen = None
        for axes in table.get(name, []) if name else []:
            axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
            size = math.prod(mesh.shape[a] for a in axes_t) if axes_t else 1
            if axes_t and not used.intersection(axes_t) and dim % size == 0 and size > 1:
                chosen = axes_t[0] if len(axes_t) == 1 else axes_t
                used.update(axes_t)
                break
        out.append(chosen)
    return PartitionSpec(*out)


def state_shardings(state: Any, rules: Sequence[tuple[str, Any]], mesh: Mesh) -> Any:
    """NamedShardings for an (abstract) nnx.State from each variable's `out_sharding` names."""
    def one(x):
        if isinstance(x, nnx.Variable):
            if not hasattr(x.get_value(), "shape"):  # optax's MaskedNode: an empty subtree
                return x
            shape = x.get_value().shape
            names = x.get_metadata().get("out_sharding") or (None,) * len(shape)
            return x.replace(NamedSharding(mesh, logical_spec(names, shape, rules, mesh)))
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


class Constrainer:
    """`constrain(x, logical_names)`: pin an activation's sharding with the same rules table.

    The train step pins its inputs ('activation_batch') and the logits ('activation_batch',
    'activation_length', 'activation_vocab'); model code pins the rest through `constrain` below.
    Names without a rule, and dimensions no rule divides, stay replicated.
    """

    def __init__(self, rules: Sequence[tuple[str, Any]], mesh: Mesh):
        self.rules, self.mesh = list(rules), mesh

    def spec(self, names: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
        return logical_spec(names, shape, self.rules, self.mesh)

    def __call__(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
        _check_rank(x, names)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(names, x.shape)))


# The rules and mesh that model code's `constrain` resolves against, set by whoever lowers a step.
_ACTIVE: contextvars.ContextVar[Constrainer | None] = contextvars.ContextVar("cambrian_activation_rules",
                                                                             default=None)


@contextlib.contextmanager
def rules_context(rules: Sequence[tuple[str, Any]], mesh: Mesh) -> Iterator[Constrainer]:
    """Within it, `constrain` pins activations on `mesh` by `rules` (and `mesh` is the current mesh).

    It must be active while the function is traced (`jax.jit(...).lower(...)` or the first call):
    jit's cache does not key on the rules, so a trace made outside it keeps no constraints.
    """
    pin = Constrainer(rules, mesh)
    token = _ACTIVE.set(pin)
    try:
        with jax.set_mesh(mesh):
            yield pin
    finally:
        _ACTIVE.reset(token)


def active() -> Constrainer | None:
    """The rules and mesh of the enclosing `rules_context`, or None outside one."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin activation `x` to the sharding its logical axis names resolve to in the active
    `rules_context`; the identity (nothing enters the program) when none is active."""
    pin = _ACTIVE.get()
    if pin is None:
        _check_rank(x, names)
        return x
    return pin(x, names)


def _check_rank(x: jax.Array, names: Sequence[str | None]) -> None:
    # Checked with or without a context so a wrong name tuple fails in single-device tests too.
    if len(names) != x.ndim:
        raise ValueError(f"sharding names {tuple(names)} do not match an activation of shape {tuple(x.shape)}: "
                         f"give one name (or None) per axis")


def data_parallel_size(mesh: Mesh) -> int:
    """Devices a batch's rows are split over (data × fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_trained_towers(kinds: Sequence[str], trainable_paths: Sequence[str], mesh: Mesh, field: str) -> None:
    """Refuse to train a ConvNeXt tower with tensor > 1: under SPMD partitioning jax 0.10.2's XLA
    returns its depthwise-convolution kernel gradients multiplied by the tensor degree (input
    gradients and ordinary convolutions are right), so such a run would silently train wrong."""
    tensor = int(dict(mesh.shape).get("tensor", 1))
    convnext = tuple(f"towers/{k}/" for k, kind in enumerate(kinds) if kind == "convnext")
    trained = sorted({p.split("/")[1] for p in trainable_paths if convnext and p.startswith(convnext)})
    if tensor > 1 and trained:
        raise ConfigError(f"config field {field}: ConvNeXt tower(s) {', '.join(trained)} are trainable on a mesh "
                          f"with tensor={tensor}, where XLA computes their depthwise-convolution gradients "
                          f"{tensor}x too large; freeze them in this stage or use mesh.tensor=1")


def check_batch(global_batch: int, accum_steps: int, mesh: Mesh, process_count: int, field: str) -> None:
    """A ConfigError naming `field` unless every micro-batch splits evenly over the data-parallel devices."""
    dp = data_parallel_size(mesh)
    if accum_steps < 1:
        raise ConfigError(f"config field {field.rsplit('.', 1)[0]}.accum_steps: {accum_steps} must be >= 1")
    if global_batch <= 0 or global_batch % (dp * accum_steps):
        good = dp * accum_steps * max(1, round(global_batch / (dp * accum_steps)))
        raise ConfigError(f"config field {field}: {global_batch} rows do not split into {accum_steps} micro-batch(es) "
                          f"over the data-parallel size {dp} (mesh data × fsdp = {dict(mesh.shape)}); use a "
                          f"multiple of {dp * accum_steps}, e.g. {good}")
    if global_batch % process_count:
        raise ConfigError(f"config field {field}: {global_batch} rows cannot be split over {process_count} hosts")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch are split over every data-parallel axis (data × fsdp)."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def to_global(local_batch: dict[str, np.ndarray], batch_sh: NamedSharding) -> dict[str, jax.Array]:
    """Each host's rows → one global array per field, sharded over the data-parallel axes."""
    return {k: jax.make_array_from_process_local_data(batch_sh, np.asarray(v)) for k, v in local_batch.items()}
