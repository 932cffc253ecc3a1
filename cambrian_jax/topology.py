"""The accelerators a run may be planned for: one table of chips, slice names → chip counts, and the
compile-only TPU devices of a slice (the real TPU compiler, from libtpu, without a TPU).

Figures are the vendors' published per-chip numbers (dense bf16 peak, HBM capacity and bandwidth):

  chip   bf16 peak    HBM      HBM GB/s  slice names
  v4     275 TFLOP/s  32 GiB   1228      v4-N     N counts TensorCores, 2 per chip: v4-512 = 256 chips
  v5e    197 TFLOP/s  16 GiB    819      v5e-N, v5litepod-N   N counts chips (1 TensorCore each)
  v5p    459 TFLOP/s  95 GiB   2765      v5p-N    N counts TensorCores, 2 per chip: v5p-512 = 256 chips
  v6e    918 TFLOP/s  32 GiB   1640      v6e-N    N counts chips (1 TensorCore each)
  H100   989 TFLOP/s  80 GiB   3350      h100xN   N GPUs, 8 per host (SXM, dense, no sparsity)
  H200   989 TFLOP/s  141 GB   4800      h200xN   N GPUs, 8 per host

`2xv5p-256` is two v5p-256 slices joined over the data-centre network (DCN). JAX shows one device per
chip on all of them (a v4/v5p chip's two TensorCores are one "megacore" device), so a slice's device
count is its chip count.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float                 # dense bf16 FLOP/s per chip
    hbm_bytes: int                    # memory per chip
    hbm_bandwidth: float              # bytes/s per chip
    cores_per_chip: int               # what a slice name's number counts per chip (1: it counts chips)
    device_kinds: tuple[str, ...]     # lower-case fragments of jax's Device.device_kind for this chip
    slice_prefixes: tuple[str, ...]   # slice-name prefixes ("v4" in v4-512)
    host_chips: int = 4               # chips per host of a multi-host slice (one process each)


CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", 275e12, 32 * GiB, 1228e9, 2, ("tpu v4",), ("v4",)),
    Chip("v5e", 197e12, 16 * GiB, 819e9, 1, ("tpu v5 lite", "tpu v5e"), ("v5e", "v5litepod")),
    Chip("v5p", 459e12, 95 * GiB, 2765e9, 2, ("tpu v5p", "tpu v5"), ("v5p",)),
    Chip("v6e", 918e12, 32 * GiB, 1640e9, 1, ("tpu v6 lite", "tpu v6e"), ("v6e",)),
    Chip("h100", 989e12, 80 * GiB, 3350e9, 1, ("h100",), ("h100x",), host_chips=8),
    Chip("h200", 989e12, 141 * 10 ** 9, 4800e9, 1, ("h200",), ("h200x",), host_chips=8),
    # Not planning targets, only MFU denominators for the trainer's log.
    Chip("a100", 312e12, 80 * GiB, 2039e9, 1, ("a100",), (), host_chips=8),
)}
CPU_PEAK_FLOPS = 1e12   # a nominal figure so CPU runs log a finite MFU; not a measurement


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str          # as given: v4-512, v5litepod-256, h100x8, 2xv5p-256
    chip: Chip
    chips: int         # = JAX devices, all slices together
    slices: int = 1    # slices joined over DCN

    @property
    def hosts(self) -> int:
        return self.slices * max(1, -(-self.chips // self.slices // self.chip.host_chips))

    @property
    def is_tpu(self) -> bool:
        return self.chip.name.startswith("v")

    @property
    def peak_flops(self) -> float:
        return self.chips * self.chip.peak_flops

    @property
    def hbm_bytes(self) -> int:
        return self.chip.hbm_bytes


def examples() -> str:
    return "v4-512, v5p-128, v5e-256 (= v5litepod-256), v6e-256, 2xv5p-256, h100x8, h200x16"


def parse(name: str) -> Topology:
    """'v4-512' → 256 v4 chips; '2xv5p-256' → two slices of 128 v5p chips; 'h100x8' → one host of 8
    H100s. Errors list what is accepted."""
    text = name.strip().lower()
    m = re.fullmatch(r"(?:(\d+)x)?(v4|v5e|v5litepod|v5p|v6e)-(\d+)|(h100|h200)x(\d+)", text)
    if not m or m.group(1) == "0":
        raise ValueError(f"topology {name!r}: expected a TPU slice or GPU host name such as {examples()}")
    slices = int(m.group(1) or 1)
    prefix, count = (m.group(2), m.group(3)) if m.group(2) else (m.group(4) + "x", m.group(5))
    chip = next(c for c in CHIPS.values() if prefix in c.slice_prefixes)
    count = int(count)
    if count < chip.cores_per_chip or count % chip.cores_per_chip:
        raise ValueError(f"topology {name!r}: {chip.name} slice names count TensorCores ({chip.cores_per_chip} "
                         f"per chip), so the number must be a multiple of {chip.cores_per_chip}; e.g. {examples()}")
    return Topology(name=text, chip=chip, chips=slices * count // chip.cores_per_chip, slices=slices)


# ------------------------------------------------------------------------------------------ libtpu

# XLA/libtpu flags every TPU run gets: the trainer sets them before JAX starts (cambrian_jax/train.py;
# launch_tpu.sh adds nothing of its own) and the planner compiles with them, so a plan is the program
# the pod runs. They overlap FSDP's all-gathers and reduce-scatters with compute, as MaxText does on
# v4/v5p. A flag the user already gives in LIBTPU_INIT_ARGS wins.
LIBTPU_FLAGS = (
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
)


def use_libtpu_flags(environ=os.environ) -> str:
    """Add LIBTPU_FLAGS to LIBTPU_INIT_ARGS (before libtpu loads); returns the resulting value."""
    given = environ.get("LIBTPU_INIT_ARGS", "").split()
    names = {f.split("=", 1)[0] for f in given}
    environ["LIBTPU_INIT_ARGS"] = " ".join(given + [f for f in LIBTPU_FLAGS if f.split("=", 1)[0] not in names])
    return environ["LIBTPU_INIT_ARGS"]


def tpu_compiler_version() -> str | None:
    """libtpu's version when it is installed (`pip install -e '.[tpu]'`), else None."""
    from importlib import metadata  # noqa: PLC0415

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


def slice_shape(topo: Topology) -> tuple[int, ...]:
    """The chip grid of one slice as libtpu names it: 3-D for v4/v5p (v4-512 → 8x8x4, v4-384 → 4x4x12),
    2-D for v5e/v6e (v6e-256 → 16x16)."""
    n = topo.chips // topo.slices
    dims = [1, 1, 1] if topo.chip.cores_per_chip == 2 else [1, 1]
    while n % 2 == 0:
        dims[dims.index(min(dims))] *= 2
        n //= 2
    dims[-1] *= n
    return tuple(sorted(dims)) if len(dims) == 2 else tuple(dims)


@contextlib.contextmanager
def _quiet_stderr():
    """libtpu writes warnings about TPU hostnames it cannot find to file descriptor 2 when it starts
    on a machine without TPUs; keep them, and show them only if starting fails."""
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def compile_only_devices(topo: Topology) -> list:
    """The slice's devices as libtpu's compile-only client sees them (one per chip: megacore on v4/v5p),
    for compiling with the real TPU compiler on a machine without TPUs. Needs libtpu."""
    if not topo.is_tpu:
        raise ValueError(f"topology {topo.name!r}: compile-only devices exist for TPU slices only")
    if tpu_compiler_version() is None:
        raise RuntimeError("the TPU compiler is not installed: pip install -e '.[tpu]' (libtpu)")
    use_libtpu_flags()
    # Compile-only clients touch no chip, so several planners (or a planner beside the trainer) may
    # load libtpu at once; without this the second waits on libtpu's lock file and fails.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # noqa: PLC0415

    dims = slice_shape(topo)
    kwargs = dict(topology_name=f"{topo.chip.name}:{'x'.join(map(str, dims))}", platform="tpu",
                  num_slices=topo.slices)
    if topo.chip.cores_per_chip == 2:
        kwargs.update(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1),
                      wrap=tuple(d >= 4 and min(dims) >= 4 for d in dims))
    with _quiet_stderr() as sink:
        try:
            devices = list(topologies.get_topology_desc(**kwargs).devices)
        except Exception as e:
            sink.seek(0)
            log = sink.read().decode(errors="replace")
            if "INVALID_ARGUMENT" in str(e) or "not divisible" in str(e):
                unit = topo.chip.cores_per_chip
                raise ValueError(f"topology {topo.name!r}: libtpu has no {topo.chip.name} slice of "
                                 f"{topo.chips // topo.slices} chips ({kwargs['topology_name']}: "
                                 f"{str(e).splitlines()[0]}); {topo.chip.name} slices have 4, 8, 16, … chips, e.g. "
                                 f"{topo.chip.name}-{4 * unit}, {topo.chip.name}-{16 * unit}") from None
            raise RuntimeError(f"libtpu could not describe {topo.name} ({kwargs['topology_name']}): {e}; its "
                               f"log: {log[-800:]}") from e
    if len(devices) != topo.chips:
        raise RuntimeError(f"libtpu describes {topo.name} with {len(devices)} devices, expected {topo.chips}")
    return devices


def mesh_devices(topo: Topology, shape: tuple[int, ...], devices, data_axis: int = 0):
    """`devices` arranged as a mesh of `shape` the way the chips are wired: ICI-neighbours along the
    inner axes (jax's mesh_utils); over several slices the data axis spans them (DCN)."""
    import numpy as np  # noqa: PLC0415
    from jax.experimental import mesh_utils  # noqa: PLC0415

    if topo.slices > 1:
        if shape[data_axis] % topo.slices:
            raise ValueError(f"config field mesh.data: {shape[data_axis]} does not split over the {topo.slices} "
                             f"slices of {topo.name} (data parallelism crosses the DCN); make it a multiple of "
                             f"{topo.slices}")
        ici = list(shape)
        ici[data_axis] //= topo.slices
        dcn = [1] * len(shape)
        dcn[data_axis] = topo.slices
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        return np.asarray(devices).reshape(shape)       # a mesh the physical grid does not tile: any order


def chip_for_device_kind(device_kind: str) -> Chip | None:
    """The chip whose device-kind fragment matches, longest fragment first ('tpu v5 lite' before 'tpu v5')."""
    kind = device_kind.lower()
    fragments = sorted(((f, c) for c in CHIPS.values() for f in c.device_kinds), key=lambda x: -len(x[0]))
    for fragment, chip in fragments:
        if fragment in kind:
            return chip
    return None
