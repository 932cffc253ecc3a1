"""The accelerators a run may be planned for: one table of chips, and slice names → chip counts.

Figures are the vendors' published per-chip numbers (dense bf16 peak, HBM capacity):

  chip   bf16 peak    HBM        slice names
  v4     275 TFLOP/s  32 GiB     v4-N     N counts TensorCores, 2 per chip: v4-512 = 256 chips
  v5e    197 TFLOP/s  16 GiB     v5e-N, v5litepod-N   N counts chips (1 TensorCore each)
  v5p    459 TFLOP/s  95 GiB     v5p-N    N counts TensorCores, 2 per chip: v5p-512 = 256 chips
  v6e    918 TFLOP/s  32 GiB     v6e-N    N counts chips (1 TensorCore each)
  H100   989 TFLOP/s  80 GiB     h100xN   N GPUs, 8 per host (SXM, dense, no sparsity)
  H200   989 TFLOP/s  141 GB     h200xN   N GPUs, 8 per host

JAX shows one device per chip on all of them (a v4/v5p chip's two TensorCores are one "megacore"
device), so a slice's device count is its chip count.
"""
from __future__ import annotations

import dataclasses
import re

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float                 # dense bf16 FLOP/s per chip
    hbm_bytes: int                    # memory per chip
    cores_per_chip: int               # what a slice name's number counts per chip (1: it counts chips)
    device_kinds: tuple[str, ...]     # lower-case fragments of jax's Device.device_kind for this chip
    slice_prefixes: tuple[str, ...]   # slice-name prefixes ("v4" in v4-512)
    host_chips: int = 4               # chips per host of a multi-host slice (one process each)


CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", 275e12, 32 * GiB, 2, ("tpu v4",), ("v4",)),
    Chip("v5e", 197e12, 16 * GiB, 1, ("tpu v5 lite", "tpu v5e"), ("v5e", "v5litepod")),
    Chip("v5p", 459e12, 95 * GiB, 2, ("tpu v5p", "tpu v5"), ("v5p",)),
    Chip("v6e", 918e12, 32 * GiB, 1, ("tpu v6 lite", "tpu v6e"), ("v6e",)),
    Chip("h100", 989e12, 80 * GiB, 1, ("h100",), ("h100x",), host_chips=8),
    Chip("h200", 989e12, 141 * 10 ** 9, 1, ("h200",), ("h200x",), host_chips=8),
    # Not planning targets, only MFU denominators for the trainer's log.
    Chip("a100", 312e12, 80 * GiB, 1, ("a100",), (), host_chips=8),
)}
CPU_PEAK_FLOPS = 1e12   # a nominal figure so CPU runs log a finite MFU; not a measurement


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str          # as given: v4-512, v5litepod-256, h100x8
    chip: Chip
    chips: int         # = JAX devices

    @property
    def hosts(self) -> int:
        return max(1, -(-self.chips // self.chip.host_chips))

    @property
    def peak_flops(self) -> float:
        return self.chips * self.chip.peak_flops

    @property
    def hbm_bytes(self) -> int:
        return self.chip.hbm_bytes


def examples() -> str:
    return "v4-512, v5p-128, v5e-256 (= v5litepod-256), v6e-256, h100x8, h200x16"


def parse(name: str) -> Topology:
    """'v4-512' → 256 v4 chips; 'h100x8' → one host of 8 H100s. Errors list what is accepted."""
    text = name.strip().lower()
    m = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)|(h100|h200)x(\d+)", text)
    if not m:
        raise ValueError(f"topology {name!r}: expected a TPU slice or GPU host name such as {examples()}")
    prefix, count = (m.group(1), m.group(2)) if m.group(1) else (m.group(3) + "x", m.group(4))
    chip = next(c for c in CHIPS.values() if prefix in c.slice_prefixes)
    count = int(count)
    if count < chip.cores_per_chip or count % chip.cores_per_chip:
        raise ValueError(f"topology {name!r}: {chip.name} slice names count TensorCores ({chip.cores_per_chip} "
                         f"per chip), so the number must be a multiple of {chip.cores_per_chip}; e.g. {examples()}")
    return Topology(name=text, chip=chip, chips=count // chip.cores_per_chip)


def chip_for_device_kind(device_kind: str) -> Chip | None:
    """The chip whose device-kind fragment matches, longest fragment first ('tpu v5 lite' before 'tpu v5')."""
    kind = device_kind.lower()
    fragments = sorted(((f, c) for c in CHIPS.values() for f in c.device_kinds), key=lambda x: -len(x[0]))
    for fragment, chip in fragments:
        if fragment in kind:
            return chip
    return None
