"""What a compiled program costs per device, every loop body counted as often as it runs.

XLA's `compiled.cost_analysis()` (CPU and TPU alike) counts the body of a while loop once, whatever
its trip count: the decoder's layer scan, its transpose in the backward pass, the towers' layer
scans and the gradient-accumulation scan each cost one iteration. For a 60-layer decoder under 4
accumulation steps that is 1/240 of the work.

This module reads the compiled (optimised, partitioned) HLO instead:

1. every `while` loop, its body and its trip count, from the loop condition JAX's scans compile to:
   `ROOT compare(get-tuple-element(param, index=i), constant(N)), direction=LT` with the counter's
   initial value a constant in the loop's operand tuple (0 for a scan) and its step the constant the
   body adds to it (1 for a scan; 2 in some loops XLA makes itself);
2. the FLOPs and bytes of each computation, by XLA's generic HloCostAnalysis run on a copy of the
   module whose entry is that computation (so a body's figure includes its nested loops once, like
   the whole program's), rescaled so that the once-counted program totals what the compiler's own
   `cost_analysis()` says;
3. each computation's own cost (its figure less its loops' bodies) times how often it runs (the
   product of the trip counts of the loops around it);
4. Pallas kernels (custom calls, invisible to the cost analysis): Splash's FLOPs from its operand
   shapes (`_kernel_flops`), timed at peak and added to the prediction.

The time is a roofline, FLOPs / peak + bytes / HBM bandwidth per computation (additive, as the TPU
compiler's own `optimal_seconds` behaves: within 5 % of it on the programs in tests/test_plan_tpu.py),
times its runs. Where the compiler's `optimal_seconds` (its time for the program, loop bodies counted
once) is valid, the prediction takes its scale: roofline × optimal_seconds / (the once-counted
roofline). libtpu reports a negative `optimal_seconds` for some large programs (each op it cannot time
seems to count -1 s: the 34B step gets -236.8); then the roofline stands alone, and `time_source`
says which. tests/test_plan_tpu.py checks all of it against compiles with the loops unrolled.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\{$")
_WHILE = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? while\(%([\w.\-]+)\), condition=%([\w.\-]+), "
                    r"body=%([\w.\-]+)(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Loop:
    body: str                # the body computation's name in the compiled HLO
    op_name: str             # JAX's name for it (e.g. "jit(step)/while/body/.../transpose(jvp())/while")
    trips: int               # iterations per run of the loop
    runs: int                # how often the loop itself runs (product of the enclosing loops' trips)
    flops_per_trip: float    # the body's FLOPs, its own nested loops counted by their trip counts
    bytes_per_trip: float    # and its bytes accessed, likewise


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    flops: float                  # per device, every loop body counted by its trip count
    bytes_accessed: float
    seconds: float                # predicted: the roofline below, in the compiler's own scale when it has one
    roofline_seconds: float       # Σ over computations × runs of FLOPs / peak + bytes / HBM bandwidth
    time_source: str              # "optimal_seconds" (scaled by the compiler's figure) or "roofline"
    reported_flops: float         # cost_analysis() as XLA gives it: loop bodies counted once
    reported_bytes: float
    optimal_seconds: float        # cost_analysis()["optimal_seconds"] (TPU only; 0 elsewhere)
    loops: tuple[Loop, ...]
    kernel_flops: float = 0.0     # of Pallas kernels (Splash), which XLA's cost analysis cannot see; in flops

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Computation:
    lines: list[str]
    loops: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)   # (body, trips, op_name)
    flops: float = 0.0            # as an entry: nested loops counted once
    bytes: float = 0.0


def _parse(text: str) -> tuple[dict[str, _Computation], str]:
    comps: dict[str, _Computation] = {}
    entry, current = None, None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            current = m.group(2)
            comps[current] = _Computation([line])
            if m.group(1):
                entry = current
        elif current is not None:
            comps[current].lines.append(line)
            if line == "}":
                current = None
    if entry is None:
        raise ValueError("compiled HLO has no ENTRY computation")
    for comp in comps.values():
        for line in comp.lines:
            w = _WHILE.match(line)
            if w:
                _, init, cond, body, rest = w.groups()
                op = _OP_NAME.search(rest)
                comp.loops.append((body, _trips(comps, comp, init, cond, body, rest), op.group(1) if op else ""))
    return comps, entry


def _defs(lines: list[str]) -> dict[str, str]:
    return {d.group(1): d.group(2) for d in (re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", ln) for ln in lines) if d}


def _trips(comps: dict[str, _Computation], comp: _Computation, init: str, cond: str, body: str, rest: str) -> int:
    known = _KNOWN_TRIPS.search(rest)
    if known:
        return int(known.group(1))
    lines = comps[cond].lines
    root = next((ln for ln in lines if ln.lstrip().startswith("ROOT ")), "")
    m = re.search(r"compare\(%([\w.\-]+), %([\w.\-]+)\), direction=LT", root)
    if m:
        defs = _defs(lines)
        counter, limit = defs.get(m.group(1), ""), defs.get(m.group(2), "")
        bound = re.search(r"constant\((-?\d+)\)", limit)
        index = re.search(r"get-tuple-element\(%[\w.\-]+\), index=(\d+)", counter)
        if bound and index:
            i = int(index.group(1))
            span = int(bound.group(1)) - _initial(comp, init, i)
            step = _step(comps[body], i)
            return max(0, -(-span // step))
    raise ValueError(f"cannot read the trip count of the loop whose condition is %{cond} (expected JAX's "
                     f"'counter < constant' form): {root.strip()[:200]}")


def _step(body: _Computation, index: int) -> int:
    """How much the body adds to the loop counter (tuple element `index`): 1 for JAX's scans; XLA's own
    loops (the windowed einsums it makes of FSDP matmuls) may step by 2."""
    defs = _defs(body.lines)
    root = next((ln for ln in body.lines if ln.lstrip().startswith("ROOT ")), "")
    operands = re.search(r"\btuple\((.*?)\)(?:,|$)", root)
    if operands:
        names = re.findall(r"%([\w.\-]+)", operands.group(1))
        if index < len(names):
            add = re.match(r".*?\badd\(%([\w.\-]+), %([\w.\-]+)\)", defs.get(names[index], ""))
            if add:
                for operand in add.groups():
                    c = re.search(r"constant\((\d+)\)", defs.get(operand, ""))
                    if c and int(c.group(1)) > 0:
                        return int(c.group(1))
    return 1


def _initial(comp: _Computation, tuple_name: str, index: int) -> int:
    """The constant the loop counter starts from (element `index` of the loop's operand tuple)."""
    defs = _defs(comp.lines)
    operands = re.search(r"\btuple\((.*?)\)(?:,|$)", defs.get(tuple_name, ""))
    if operands:
        names = re.findall(r"%([\w.\-]+)", operands.group(1))
        if index < len(names):
            c = re.search(r"constant\((-?\d+)\)", defs.get(names[index], ""))
            if c:
                return int(c.group(1))
    return 0


def _callees(comps: dict[str, _Computation]) -> dict[str, set[str]]:
    """Which computations each one calls (fusions, reductions, loop bodies, branches): names it mentions."""
    out = {}
    for name, comp in comps.items():
        mentioned = set(re.findall(r"%([\w.\-]+)", "\n".join(comp.lines[1:])))
        out[name] = {m for m in mentioned if m in comps and m != name}
    return out


def _module_text(comps: dict[str, _Computation], entry: str, callees: dict[str, set[str]]) -> str:
    """A module of `entry` and what it reaches, with `entry` as its entry (callees first, as XLA prints)."""
    reach, todo = set(), [entry]
    while todo:
        n = todo.pop()
        if n not in reach:
            reach.add(n)
            todo.extend(callees[n])
    parts = []
    for name, comp in comps.items():
        if name in reach:
            head = comp.lines[0].removeprefix("ENTRY ")
            parts.append("\n".join([("ENTRY " if name == entry else "") + head] + comp.lines[1:]))
    return "HloModule entry_" + re.sub(r"\W", "_", entry) + "\n\n" + "\n\n".join(parts)


def _analyse(comps: dict[str, _Computation], names) -> None:
    import jax  # noqa: PLC0415
    from jax._src.lib import xla_client  # noqa: PLC0415
    from jaxlib import _hlo  # noqa: PLC0415

    cpu = jax.devices("cpu")[0].client
    callees = _callees(comps)
    for name in names:
        module = _hlo.hlo_module_from_text(_module_text(comps, name, callees))
        cost = xla_client._xla.hlo_module_cost_analysis(cpu, module)
        comps[name].flops = float(cost.get("flops", 0.0))
        comps[name].bytes = float(cost.get("bytes accessed", 0.0))


# Pallas kernels are custom calls whose FLOPs XLA's cost analysis cannot see. Splash's (the decoder's
# causal self-attention, cambrian_jax/attention.py) are counted from their operands: q [b, nh, T, d],
# k [b, kv, S, d] and the block grid [1, T/bq, S/bk], matmul FLOPs per (query, key) pair and head dim
# 4 forward (q·k, p·v), 6 for dq (q·k, do·v, ds·k) and 8 for dk/dv (q·k, p·do, do·v, ds·q), over the
# blocks a causal mask leaves (n(n+1)/2 of n² for n blocks a side).
_SPLASH = re.compile(r"^\s*(?:ROOT )?%splash_mha_(fwd|dq|dkv)\S* = .*custom_call_target=\"tpu_custom_call\", "
                     r"operand_layout_constraints=\{([^=]*)\}")
_SPLASH_WORK = {"fwd": 4, "dq": 6, "dkv": 8}


def _kernel_flops(line: str) -> float:
    m = _SPLASH.match(line)
    if not m:
        return 0.0
    operands = [(dtype, [int(x) for x in dims.split(",")])
                for dtype, dims in re.findall(r"(\w+)\[([\d,]+)\]", m.group(2))]
    grid = next((d for t, d in operands if t == "s8" and len(d) == 3 and d[0] == 1), None)
    # q and k are the first floating operands; a batch of one per device loses its axis ([nh, T, d]).
    q, k = [[1] * (4 - len(d)) + d for t, d in operands if t[0] in "fb" and len(d) in (3, 4)][:2]
    n = grid[1] if grid and grid[1] == grid[2] else 0
    causal = (n + 1) / (2 * n) if n else 1.0
    return _SPLASH_WORK[m.group(1)] * q[0] * q[1] * q[2] * k[2] * q[3] * causal


def hlo_text(compiled) -> str:
    """The compiled module's HLO, less the stack-frame references the text parser cannot resolve."""
    return re.sub(r"\s*stack_frame_id=\d+", "", compiled.as_text())


def program_cost(compiled, peak_flops: float, hbm_bandwidth: float) -> ProgramCost:
    """Per-device FLOPs, bytes and predicted seconds of `compiled`, loops counted by their trip counts."""
    reported = compiled.cost_analysis() or {}
    comps, entry = _parse(hlo_text(compiled))
    bodies = {body for c in comps.values() for body, _, _ in c.loops}
    _analyse(comps, [entry, *sorted(bodies)])
    # The generic analysis splits the program into computations; the TPU compiler's own totals (which
    # count TPU layouts and fusions: its bytes differ from the generic count by up to 40 %) set the scale.
    for key, attr in (("flops", "flops"), ("bytes accessed", "bytes")):
        generic = getattr(comps[entry], attr)
        if reported.get(key) and generic > 0:
            k = float(reported[key]) / generic
            for name in (entry, *bodies):
                setattr(comps[name], attr, getattr(comps[name], attr) * k)
    # The kernels' FLOPs (kept apart: the compiler's optimal_seconds does not include them either),
    # counted like the rest: each computation's figure includes what it reaches, nested loops once.
    callees, kernels = _callees(comps), {}

    def kernel(name: str) -> float:
        if name not in kernels:
            kernels[name] = 0.0       # a computation reached twice on one path is counted once
            kernels[name] = (sum(_kernel_flops(ln) for ln in comps[name].lines)
                             + sum(kernel(c) for c in callees[name]))
        return kernels[name]

    def roofline(flops: float, nbytes: float) -> float:
        return flops / peak_flops + nbytes / hbm_bandwidth

    # Each computation's own cost: its figure less its loops' bodies (which it counts once).
    own = {name: (max(c.flops - sum(comps[b].flops for b, _, _ in c.loops), 0.0),
                  max(c.bytes - sum(comps[b].bytes for b, _, _ in c.loops), 0.0),
                  max(kernel(name) - sum(kernel(b) for b, _, _ in c.loops), 0.0))
           for name, c in comps.items() if name == entry or name in bodies}
    totals: dict[str, tuple[float, float, float, float]] = {}   # per run: flops, bytes, roofline s, kernel flops

    def total(name: str, stack=()) -> tuple[float, float, float, float]:
        if name in stack:
            raise ValueError(f"loop body %{name} contains itself")
        if name not in totals:
            f, b, kf = own[name]
            t = roofline(f, b)
            for body, trips, _ in comps[name].loops:
                bf, bb, bt, bk = total(body, (*stack, name))
                f, b, t, kf = f + trips * bf, b + trips * bb, t + trips * bt, kf + trips * bk
            totals[name] = (f, b, t, kf)
        return totals[name]

    flops, nbytes, rt, kflops = total(entry)
    once = sum(roofline(f, b) for f, b, _ in own.values())
    optimal = float(reported.get("optimal_seconds", 0.0) or 0.0)
    scaled = optimal > 0 and once > 0
    loops, runs, stack = [], {entry: 1}, [entry]
    while stack:
        name = stack.pop()
        for body, trips, op in comps[name].loops:
            runs[body] = runs[name] * trips
            loops.append(Loop(body, op, trips, runs[name], totals[body][0] + totals[body][3], totals[body][1]))
            stack.append(body)
    kernel_s = kflops / peak_flops
    return ProgramCost(flops=flops + kflops, bytes_accessed=nbytes,
                       seconds=(rt * optimal / once if scaled else rt) + kernel_s,
                       roofline_seconds=rt + kernel_s, time_source="optimal_seconds" if scaled else "roofline",
                       reported_flops=float(reported.get("flops", 0.0)),
                       reported_bytes=float(reported.get("bytes accessed", 0.0)),
                       optimal_seconds=optimal, loops=tuple(loops), kernel_flops=kflops)
