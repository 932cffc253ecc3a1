"""Will it fit, and how fast? The real training step compiled ahead of time for a slice this machine
does not have.

    python -m cambrian_jax.plan --config configs/cambrian_34b.py --topology v4-512 [--stage 1|2]
        [--json] [--search] [--compiler auto|tpu|cpu] [--mfu 0.4]

The step is the trainer's own (trainer.TrainSetup: same parameter tree, shardings, optimizer, remat
policy, accumulation and jitted function), lowered with abstract inputs — ShapeDtypeStructs carrying
their shardings, so no weight is ever allocated — and compiled by one of two compilers:

  tpu            the TPU compiler itself (libtpu, `pip install -e '.[tpu]'`) on compile-only devices of
                 the slice (topology.compile_only_devices), with the LIBTPU_INIT_ARGS the pod runs with
                 (topology.LIBTPU_FLAGS). Memory is the TPU compiler's; the step time is its roofline
                 (`optimal_seconds`) with every loop body counted by its trip count (compiled_cost.py),
                 raw and multiplied by the chip's calibration factor (CALIBRATION, docs/planning.md)
  cpu-estimate   as many simulated CPU devices as the slice has chips: the CPU compiler's temporaries
                 are an estimate of the accelerator's (other layouts, fusions, collectives there), and
                 the step time is the analytic FLOPs at an assumed MFU (--mfu)

`--compiler auto` (the default) takes the TPU compiler for TPU slices when libtpu is installed. Per
device it reports:

  parameters, optimizer state, gradients, batch   exact: each array's shard under its sharding
  activations / temporaries                       the compiler's temporary buffers less the gradients
  total                                           arguments + unaliased outputs + temporaries

against the chip's HBM (cambrian_jax/topology.py), with the analytic FLOPs of a step (cambrian_jax/
flops.py, the trainer's MFU formula) and the MFU the predicted time implies. A plan that does not fit
says which part is over and which knobs (accumulation, remat policy, tensor/fsdp degrees, batch) would
help, and exits 3 (2: a request it cannot plan, such as a config error, an unknown topology or a mesh
that does not divide the slice: one line, before anything compiles); --search compiles candidate
settings, prints a table of them and the one that fits with the shortest predicted step.

`--workdir W` plans the run recorded in W/config.json (what `train` wrote) instead of --config.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Sequence

from absl import app, flags
from ml_collections import config_flags

from cambrian_jax import topology

FLAGS = flags.FLAGS
GiB = 2 ** 30
PARTS = ("parameters", "optimizer", "gradients", "batch", "activations")
COMPILERS = ("auto", "tpu", "cpu")

# Published step time ÷ the TPU compiler's raw prediction, per chip generation, from our decoder
# compiled at the shapes of published MaxText runs (benchmarks/calibrate_tpu.py; docs/planning.md has
# the table). The roofline assumes perfect overlap and no host or input time, so it is optimistic.
# v4: MaxText's 22B on v4-128 (1.074) and 52B on v4-384 (1.197), geometric mean; both ran the same
# kind of attention as ours (no flash kernel, 1024 tokens). The v5p and v6e runs used flash/Splash
# attention at 2048–8192 tokens, which our einsum attention cannot match, so their ratios (0.39–0.78)
# measure the missing kernel, not the roofline: no factor for them until the kernels land.
CALIBRATION: dict[str, float] = {"v4": 1.134}


# ------------------------------------------------------------------------------------------ one plan

@dataclasses.dataclass
class StageReport:
    stage: int
    mesh: dict[str, int]
    remat: str
    fits: bool
    hbm_bytes: int
    per_device_bytes: dict[str, int]         # PARTS and total
    parameters_trainable: int                # counts, not bytes
    parameters_frozen: int
    replicated_parameter_bytes: int          # per device, of parameters no mesh axis divides
    global_batch: int
    accum_steps: int
    rows_per_device: int                     # per micro-batch
    seq_len: int
    flops_per_step: float
    recompute_flops_per_step: float
    predicted_step_time_s: float
    tokens_per_s: float
    mfu_assumed: float | None                # cpu-estimate: the MFU the step time assumes
    mfu_predicted: float                     # model FLOPs ÷ predicted step time ÷ the slice's peak
    compile_s: float
    xla_memory: dict[str, int]               # memory_analysis() of the compiled step
    advice: list[str]
    compiler: str = "cpu-estimate"           # "tpu": libtpu's compiler made every figure
    compiler_version: str = ""
    predicted_step_time_raw_s: float | None = None   # tpu: the compiler's roofline, loops counted
    calibration: float | None = None                 # tpu: the factor applied to the raw prediction
    cost: dict[str, Any] | None = None               # tpu: compiled_cost.ProgramCost per device

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each)."""
    import jax  # noqa: PLC0415
    total = 0
    for a in jax.tree.leaves(tree):
        shape = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        total += math.prod(shape) * a.dtype.itemsize
    return total


def count(tree) -> int:
    import jax  # noqa: PLC0415
    return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


def replicated(tree) -> list[tuple[str, tuple[int, ...], int]]:
    """(path, shape, bytes) of the arrays every device holds whole: no mesh axis divides any of their
    named dimensions (sharding.logical_spec then replicates), largest first."""
    import jax  # noqa: PLC0415

    from cambrian_jax import optim  # noqa: PLC0415
    out = []
    for path, a in jax.tree_util.tree_leaves_with_path(tree):
        if a.sharding is not None and a.sharding.shard_shape(a.shape) == a.shape and math.prod(a.shape) > 1:
            out.append((optim.path_str(path), tuple(a.shape), math.prod(a.shape) * a.dtype.itemsize))
    return sorted(out, key=lambda x: -x[2])


def simulated_mesh(config, topo: topology.Topology):
    """The config's mesh over the first `topo.chips` (simulated) devices."""
    import jax  # noqa: PLC0415
    from cambrian_jax import sharding  # noqa: PLC0415

    devices = jax.devices()
    if len(devices) < topo.chips:
        raise RuntimeError(f"planning {topo.name} needs {topo.chips} devices but JAX has {len(devices)}; run "
                           f"`python -m cambrian_jax.plan` (it simulates them), or set "
                           f"jax.config.update('jax_num_cpu_devices', {topo.chips}) before JAX starts")
    return sharding.make_mesh(dict(config.mesh), devices[:topo.chips])


def tpu_mesh(config, topo: topology.Topology):
    """The config's mesh over compile-only devices of the slice, laid out along its ICI links."""
    import jax  # noqa: PLC0415
    from cambrian_jax import sharding  # noqa: PLC0415

    devices = topology.compile_only_devices(topo)
    shape = sharding.mesh_shape(dict(config.mesh), len(devices))
    return jax.sharding.Mesh(topology.mesh_devices(topo, shape, devices), sharding.MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def resolve_compiler(requested: str, topo: topology.Topology) -> str:
    """'tpu' or 'cpu' for --compiler auto|tpu|cpu; ValueError (one sentence) when tpu cannot be had."""
    if requested not in COMPILERS:
        raise ValueError(f"--compiler {requested!r}: expected one of {', '.join(COMPILERS)}")
    if requested == "cpu":
        return "cpu"
    available = topo.is_tpu and topology.tpu_compiler_version() is not None
    if requested == "tpu" and not available:
        raise ValueError(f"--compiler tpu: {topo.name} is not a TPU slice" if not topo.is_tpu else
                         "--compiler tpu: libtpu is not installed (pip install -e '.[tpu]'); --compiler cpu "
                         "gives the CPU compiler's estimate")
    return "tpu" if available else "cpu"


def planning_mesh(config, topo: topology.Topology, compiler: str):
    return tpu_mesh(config, topo) if compiler == "tpu" else simulated_mesh(config, topo)


def plan_stage(config, topo: topology.Topology, n: int, *, mfu: float = 0.4, setup=None,
               compiler: str = "cpu") -> StageReport:
    """Compile stage n's training step for `topo` and account for its memory, FLOPs and time."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from cambrian_jax import compiled_cost, flops, sharding  # noqa: PLC0415
    from cambrian_jax.data.pipeline import batch_spec  # noqa: PLC0415
    from cambrian_jax.trainer import TrainSetup  # noqa: PLC0415

    if setup is None:
        setup = TrainSetup(config, planning_mesh(config, topo, compiler), process_count=topo.hosts)
    plan = setup.plan(n)
    program = setup.program(plan, total_steps=int(plan.stage.get("num_steps") or 1000))
    gb, accum = int(plan.stage.global_batch_size), int(plan.stage.accum_steps)
    spec = batch_spec(setup.model_cfg, config.get("data") or {}, gb)
    abs_batch = {k: jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=program.batch_sharding)
                 for k, (shape, dtype) in spec.items()}
    t0 = time.perf_counter()
    compiled = program.lower(abs_batch).compile()
    compile_s = time.perf_counter() - t0
    compile_rss = _peak_rss()

    exact = dict(parameters=shard_bytes(program.abs_state["params"]) + shard_bytes(program.abs_frozen),
                 optimizer=shard_bytes(program.abs_state["opt"]) + shard_bytes(program.abs_state["step"]),
                 gradients=shard_bytes(program.abs_state["params"]),   # float32, sharded like the parameters
                 batch=shard_bytes(abs_batch))
    whole = sorted(replicated(program.abs_state["params"]) + replicated(program.abs_frozen), key=lambda x: -x[2])
    mem = compiled.memory_analysis()
    xla = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    total = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
    # The gradients live among XLA's temporaries; what remains there is activations and scratch.
    parts = dict(exact, activations=max(0, total - sum(exact.values())))
    per_device = dict(parts, total=sum(parts.values()))

    seq_len = spec["input_ids"][0][1]
    flops_step = flops.train_flops_per_step(setup.model_cfg, gb, plan.trainable_paths, seq_len)
    recompute = gb * flops.recompute_flops_per_sample(setup.model_cfg, seq_len)
    cost, raw, factor = None, None, None
    if compiler == "tpu":
        t0 = time.perf_counter()
        cost = compiled_cost.program_cost(compiled, topo.chip.peak_flops, topo.chip.hbm_bandwidth)
        print(f"stage {n}: compiled in {compile_s:.0f} s (host peak {compile_rss / GiB:.1f} GiB); loops counted in "
              f"{time.perf_counter() - t0:.0f} s (host peak {_peak_rss() / GiB:.1f} GiB)", file=sys.stderr, flush=True)
        raw = cost.seconds
        factor = CALIBRATION.get(topo.chip.name)
        step_time = raw * (factor or 1.0)
    else:
        # Recomputed FLOPs run at the same rate as model FLOPs: they cost time but are not model work.
        step_time = (flops_step + recompute) / (topo.peak_flops * mfu)
    dp = sharding.data_parallel_size(setup.mesh)
    report = StageReport(
        stage=n, mesh=dict(setup.mesh.shape), remat=setup.model_cfg.remat, fits=per_device["total"] <= topo.hbm_bytes,
        hbm_bytes=topo.hbm_bytes, per_device_bytes=per_device,
        parameters_trainable=count(plan.abs_train), parameters_frozen=count(plan.abs_frozen),
        replicated_parameter_bytes=sum(b for *_, b in whole), global_batch=gb,
        accum_steps=accum, rows_per_device=gb // (dp * accum), seq_len=seq_len, flops_per_step=flops_step,
        recompute_flops_per_step=recompute, predicted_step_time_s=step_time, tokens_per_s=gb * seq_len / step_time,
        mfu_assumed=None if compiler == "tpu" else mfu, mfu_predicted=flops_step / (step_time * topo.peak_flops),
        compile_s=compile_s, xla_memory=xla, advice=[],
        compiler="tpu" if compiler == "tpu" else "cpu-estimate",
        compiler_version=(f"libtpu {topology.tpu_compiler_version()}" if compiler == "tpu"
                          else f"jaxlib {jax.__version__} (CPU)"),
        predicted_step_time_raw_s=raw, calibration=factor, cost=cost.to_json() if cost else None)
    if not report.fits:
        report.advice = advise(report, config, setup, topo, whole)
    return report


# ------------------------------------------------------------------------------------------ advice

def accum_choices(global_batch: int, dp: int) -> list[int]:
    """Accumulation steps that split the batch evenly over the data-parallel devices."""
    if global_batch % dp:
        return []
    per_device = global_batch // dp
    return [a for a in range(1, per_device + 1) if per_device % a == 0]


def advise(r: StageReport, config, setup, topo: topology.Topology, whole=()) -> list[str]:
    """Which part is over budget and the knobs that shrink it, most direct first."""
    from cambrian_jax import flops, sharding  # noqa: PLC0415

    b, hbm = r.per_device_bytes, r.hbm_bytes
    state = b["parameters"] + b["optimizer"] + b["gradients"]
    over = b["total"] - hbm
    mesh = dict(setup.mesh.shape)
    out = [f"stage {r.stage} needs {_gib(b['total'])} per device, {_gib(over)} more than the {_gib(hbm)} of HBM: "
           f"activations/temporaries {_gib(b['activations'])}, parameters + optimizer + gradients {_gib(state)}"]
    if r.replicated_parameter_bytes > 0.1 * b["parameters"]:
        names = ", ".join(f"{p} {list(shape)}" for p, shape, _ in whole[:3])
        out.append(f"{_gib(r.replicated_parameter_bytes)} of the parameters are whole on every device because no "
                   f"mesh axis divides their dimensions (largest: {names}); a mesh whose fsdp degree divides them, "
                   f"or a rule for another of their logical axes in config.sharding_rules, would shard them")
    if state >= hbm:
        out.append(f"the training state alone ({_gib(state)}) is over budget: shard it over more chips (a larger "
                   f"slice than {topo.name})" + (f", or move data={mesh['data']} into fsdp (mesh data=1, fsdp=-1)"
                                                 if mesh["data"] > 1 else ""))
        return out
    dp = sharding.data_parallel_size(setup.mesh)
    more = [a for a in accum_choices(r.global_batch, dp) if a > r.accum_steps]
    if more:
        rows = r.rows_per_device * r.accum_steps // more[0]
        out.append(f"accumulation: stage{r.stage}.accum_steps={more[0]} (now {r.accum_steps}) takes {rows} row(s) "
                   f"per device per micro-batch instead of {r.rows_per_device}, shrinking the batch-dependent "
                   f"activations in proportion (valid: {', '.join(map(str, more))})")
    cfg = setup.model_cfg
    frugal = max(flops.RECOMPUTED, key=lambda p: flops.recompute_flops_per_sample(
        dataclasses.replace(cfg, remat=p), cfg.max_len))
    if frugal != cfg.remat:
        out.append(f"remat: model.remat={frugal!r} keeps only each decoder layer's input for the backward pass "
                   f"(now {cfg.remat!r}), at the price of recomputing the layer")
    heads = setup.model_cfg.decoder.num_heads
    tensors = [t for t in (2, 4, 8) if t > mesh["tensor"] and heads % t == 0 and topo.chips % t == 0]
    if tensors:
        out.append(f"tensor parallelism: mesh.tensor={tensors[0]} splits heads, MLP and logits activations "
                   f"{tensors[0] // mesh['tensor']}× (fewer data-parallel rows per device, more communication)")
    if not more:
        out.append(f"batch: stage{r.stage}.global_batch_size below {r.global_batch} (the recipe's learning rates "
                   f"scale with sqrt(batch)), or a larger slice")
    return out


def _peak_rss() -> int:
    """This process's peak resident memory so far, bytes (Linux reports KiB)."""
    import resource  # noqa: PLC0415
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M" if n >= 1e5 else f"{n:,}"


# ------------------------------------------------------------------------------------------ search

@dataclasses.dataclass
class Candidate:
    remat: str
    tensor: int
    accum: dict[int, int]            # stage → accumulation steps

    def overrides(self) -> list[str]:
        return ([f"--config.model.remat={self.remat}", f"--config.mesh.tensor={self.tensor}"]
                + [f"--config.stage{n}.accum_steps={a}" for n, a in sorted(self.accum.items())])


def with_knobs(config, remat: str, tensor: int, accum: dict[int, int]):
    """A copy of config with the remat policy, tensor degree (fsdp takes the rest) and accumulation."""
    c = config.copy_and_resolve_references()
    c.model.remat = remat
    c.mesh.tensor = tensor
    c.mesh.fsdp = -1
    if c.mesh.data == -1:
        c.mesh.data = 1
    for n, a in accum.items():
        c[f"stage{n}"].accum_steps = a
    return c


def _first(items: Sequence, ok) -> int | None:
    """Index of the first item for which ok() holds, assuming once it holds it keeps holding (bisection)."""
    lo, hi = 0, len(items)
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(items[mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo if lo < len(items) else None


class Budget(Exception):
    pass


def search(config, topo: topology.Topology, stages: Sequence[int], *, mfu: float, max_compiles: int,
           compiler: str = "cpu", log=print) -> tuple[Candidate | None, dict[int, StageReport], list[dict]]:
    """Among the settings that fit, the one with the shortest predicted run (Σ over stages of num_steps ×
    predicted step time); ties go to the smaller tensor degree, then less recomputation, then fewer
    accumulation steps.

    Per tensor degree and remat policy (least recomputation first), each stage's fewest accumulation
    steps that fit are bisected: memory falls with more accumulation. A policy that does not fit a
    stage even at the most accumulation is skipped. Returns the best candidate, its reports and a row
    per candidate tried (for the table).
    """
    from cambrian_jax import config as config_lib  # noqa: PLC0415
    from cambrian_jax import flops, sharding  # noqa: PLC0415
    from cambrian_jax.config import ConfigError  # noqa: PLC0415
    from cambrian_jax.trainer import TrainSetup  # noqa: PLC0415

    from cambrian_jax.decoder import REMAT_ALIASES  # noqa: PLC0415

    model_cfg = config_lib.from_dict(config.model)
    # Not searched: aliases (MaxText's names for ours) and the host-offloading policies, whose transfers
    # over PCIe the compiler's roofline does not time. Least recomputation first; of two that recompute
    # alike ('none', 'dots_all'), 'none' keeps more.
    policies = {p for p in flops.RECOMPUTED if p not in REMAT_ALIASES and not p.endswith("_offloaded")}
    ladder = sorted(policies, key=lambda p: (flops.recompute_flops_per_sample(
        dataclasses.replace(model_cfg, remat=p), model_cfg.max_len), p != "none", p))
    heads = model_cfg.decoder.num_heads
    tensors = [t for t in (1, 2, 4, 8) if heads % t == 0 and topo.chips % t == 0]
    done: dict[tuple, StageReport] = {}
    rows: list[dict] = []
    best: tuple | None = None

    def report(remat, tensor, n, accum) -> StageReport:
        key = (remat, tensor, n, accum)
        if key not in done:
            if len(done) >= max_compiles:
                raise Budget
            c = with_knobs(config, remat, tensor, {n: accum})
            done[key] = r = plan_stage(c, topo, n, mfu=mfu, compiler=compiler)
            log(f"  remat={remat} tensor={tensor} stage {n} accum={accum}: {_gib(r.per_device_bytes['total'])} "
                f"per device → {'fits' if r.fits else 'over'}, predicted {r.predicted_step_time_s:.3g} s/step")
        return done[key]

    try:
        for tensor in tensors:
            try:
                c = with_knobs(config, ladder[0], tensor, {})
                setup = TrainSetup(c, planning_mesh(c, topo, compiler), topo.hosts)
            except ConfigError as e:
                log(f"  tensor={tensor}: {e}")
                continue
            dp = sharding.data_parallel_size(setup.mesh)
            accums = {n: accum_choices(int(config[f"stage{n}"].global_batch_size), dp) for n in stages}
            if not all(accums.values()):
                log(f"  tensor={tensor}: a global batch does not split over {dp} data-parallel devices")
                continue
            for remat in ladder:
                if not all(report(remat, tensor, n, accums[n][-1]).fits for n in stages):
                    continue
                chosen = {n: accums[n][_first(accums[n], lambda a, n=n: report(remat, tensor, n, a).fits)]
                          for n in stages}
                found = {n: done[(remat, tensor, n, a)] for n, a in chosen.items()}
                run_s = sum(int(config[f"stage{n}"].get("num_steps") or 1) * r.predicted_step_time_s
                            for n, r in found.items())
                rows.append(dict(remat=remat, tensor=tensor, accum_steps={str(n): a for n, a in chosen.items()},
                                 gib_per_chip=max(r.per_device_bytes["total"] for r in found.values()) / GiB,
                                 step_s={str(n): r.predicted_step_time_s for n, r in found.items()},
                                 mfu={str(n): r.mfu_predicted for n, r in found.items()}, run_s=run_s))
                if best is None or run_s < best[0] * (1 - 1e-9):
                    best = (run_s, Candidate(remat, tensor, chosen), found)
    except Budget:
        log(f"  stopped after {len(done)} compiles (--max_compiles); the best found so far follows")
    if best is None:
        return None, {}, rows
    return best[1], best[2], rows


def format_candidates(rows: Sequence[dict]) -> str:
    """The search's candidates as a table: one row per (remat, tensor) that fits."""
    lines = ["  remat             tensor  accum       GiB/chip  s/step (per stage)     MFU (per stage)   run s"]
    for r in sorted(rows, key=lambda r: r["run_s"]):
        acc = ",".join(f"{n}:{a}" for n, a in r["accum_steps"].items())
        step = ",".join(f"{n}:{t:.3g}" for n, t in r["step_s"].items())
        mfu = ",".join(f"{n}:{100 * m:.1f}%" for n, m in r["mfu"].items())
        lines.append(f"  {r['remat']:<17} {r['tensor']:<7} {acc:<11} {r['gib_per_chip']:8.2f}  {step:<22} "
                     f"{mfu:<17} {r['run_s']:.4g}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ report

def format_report(r: StageReport, config_name: str, topo: topology.Topology) -> str:
    b = r.per_device_bytes
    chip = topo.chip
    lines = [
        f"stage {r.stage}: {config_name} on {topo.name} = {topo.chips} × {chip.name} "
        f"({chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {_gib(chip.hbm_bytes)} HBM each), {topo.hosts} host(s)",
        f"  mesh {' '.join(f'{k}={v}' for k, v in r.mesh.items())}; remat {r.remat!r}; global batch "
        f"{r.global_batch} × {r.seq_len} tokens, accumulation {r.accum_steps} → {r.rows_per_device} row(s) per "
        f"device per micro-batch",
        f"  parameters: {_count(r.parameters_trainable)} trainable, {_count(r.parameters_frozen)} frozen; "
        f"{_gib(r.replicated_parameter_bytes)} per device of them unsharded (no mesh axis divides their dims)",
        "  per device                GiB",
    ]
    tpu = r.compiler == "tpu"
    notes = dict(parameters="exact (shards of trainable + frozen parameters)", optimizer="exact",
                 gradients="exact (float32, sharded like the parameters)", batch="exact",
                 activations=("the TPU compiler's temporaries less the gradients" if tpu else
                              "estimate: XLA's CPU-compiled temporaries less the gradients"))
    for k in PARTS:
        lines.append(f"    {k:<22}{b[k] / GiB:8.2f}   {notes[k]}")
    share = b["total"] / r.hbm_bytes
    lines.append(f"    {'total':<22}{b['total'] / GiB:8.2f}   of {r.hbm_bytes / GiB:.2f} GiB HBM "
                 f"({100 * share:.0f} %) → {'FITS' if r.fits else 'DOES NOT FIT'}")
    lines += [
        f"  FLOPs per step {r.flops_per_step:.3e} (model) + {r.recompute_flops_per_step:.3e} (remat recompute); "
        f"{r.flops_per_step / topo.chips:.3e} per device",
    ]
    if tpu:
        c = r.cost
        raw_mfu = r.flops_per_step / (r.predicted_step_time_raw_s * topo.peak_flops)
        source = ("the compiler's optimal_seconds" if c["time_source"] == "optimal_seconds" else
                  "the roofline of the compiler's FLOPs and bytes; its optimal_seconds was unusable")
        calibrated = (f", {r.predicted_step_time_s:.3g} s calibrated (×{r.calibration:.3f} for {topo.chip.name}: "
                      f"MFU {100 * r.mfu_predicted:.1f} %)" if r.calibration else
                      f"; no calibration for {topo.chip.name} (docs/planning.md says why)")
        lines += [
            f"  TPU compiler per device: {c['flops']:.3e} FLOPs, {c['bytes_accessed'] / GiB:.1f} GiB accessed with "
            f"{len(c['loops'])} loop(s) counted by trip count (XLA's once-counted figure: {c['reported_flops']:.3e})",
            f"  predicted step {r.predicted_step_time_raw_s:.3g} s raw ({source}; MFU {100 * raw_mfu:.1f} %){calibrated}",
            f"  {r.tokens_per_s:,.0f} tokens/s ({r.tokens_per_s / topo.chips:,.0f} per chip)",
            f"  compiled in {r.compile_s:.1f} s by the TPU compiler ({r.compiler_version}) for {topo.chips} "
            f"compile-only {topo.chip.name} devices",
        ]
    else:
        lines += [
            f"  predicted step {r.predicted_step_time_s:.3g} s, {r.tokens_per_s:,.0f} tokens/s "
            f"({r.tokens_per_s / topo.chips:,.0f} per device) at MFU {100 * r.mfu_assumed:.0f} % without "
            f"recompute ({100 * r.mfu_predicted:.1f} % with it)",
            f"  compiled in {r.compile_s:.1f} s on {topo.chips} simulated CPU devices: memory and time are "
            f"estimates (install the [tpu] extra for the TPU compiler's figures)",
        ]
    for i, a in enumerate(r.advice):
        lines.append(("  why: " if i == 0 else "  try: ") + a)
    return "\n".join(lines)


def summary(reports: Sequence[StageReport], config_name: str, topo: topology.Topology) -> dict[str, Any]:
    """One JSON object: the stage with the largest per-device total at the top level, every stage under
    'stages'; fits only if every planned stage fits."""
    worst = max(reports, key=lambda r: r.per_device_bytes["total"])
    out = dict(worst.to_json())
    tpu = worst.compiler == "tpu"
    out.update(fits=all(r.fits for r in reports), config=config_name, topology=topo.name, chips=topo.chips,
               chip=topo.chip.name, peak_flops_per_chip=topo.chip.peak_flops, binding_stage=worst.stage,
               stages=[r.to_json() for r in reports],
               note=("memory is the TPU compiler's; the step time its roofline with loops counted by trip count"
                     + (", calibrated on published runs" if worst.calibration else "") if tpu else
                     "activations are XLA's CPU-compiled temporaries less the gradients: an estimate of the "
                     "accelerator's; parameters, optimizer state, gradients and batch are exact; the step time "
                     "assumes --mfu"))
    return out


# ------------------------------------------------------------------------------------------ CLI

# CPU code generation the planner never runs: cheap LLVM passes compile about twice as fast and leave
# the HLO passes that decide buffer sizes (fusion, scheduling, buffer assignment) as they are.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def simulate(chips: int) -> None:
    """Make JAX start as `chips` CPU devices (before its backend exists)."""
    import jax  # noqa: PLC0415

    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", chips)
    if jax.device_count() != chips:
        raise RuntimeError(f"JAX started with {jax.device_count()} devices before the planner could ask for {chips}")


def _usage_error(message: str) -> None:
    """Exit status 2 for a request that cannot be planned (cli.EXIT_DOES_NOT_FIT is "does not fit")."""
    from cambrian_jax import cli  # noqa: PLC0415

    cli.fail(message)


def define_flags() -> None:
    """The CLI's flags, defined only when run as a program (importing the planner defines none)."""
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (with :switches).",
                                    lock_config=False)
    flags.DEFINE_string("topology", None, f"Target slice or host, e.g. {topology.examples()}.")
    flags.DEFINE_enum("stage", "all", ["1", "2", "all"], "Stage to plan (all = the config's stages).")
    flags.DEFINE_float("mfu", 0.4, "Assumed model-FLOPs utilisation: the fraction of peak bf16 FLOP/s a step "
                       "without recomputation would reach; recomputed FLOPs take time at the same rate.")
    flags.DEFINE_enum("compiler", "auto", list(COMPILERS), "tpu: libtpu's compiler on compile-only devices of "
                      "the slice; cpu: simulated CPU devices (an estimate); auto: tpu for TPU slices when "
                      "libtpu is installed.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of the report.")
    flags.DEFINE_string("workdir", None, "Plan the run recorded in WORKDIR/config.json (instead of --config).")
    flags.DEFINE_bool("search", False, "Try tensor degrees, remat policies and accumulation; print the "
                      "candidates that fit and the one with the shortest predicted run.")
    flags.DEFINE_integer("max_compiles", 16, "--search compiles at most this many candidates.")


def main(argv) -> None:
    del argv
    from cambrian_jax import cli  # noqa: PLC0415

    if (FLAGS.config is None) == (FLAGS.workdir is None) or FLAGS.topology is None:
        _usage_error("usage: python -m cambrian_jax.plan (--config configs/x.py[:switches] | --workdir W) "
                     "--topology v4-512 [--stage 1|2] [--json] [--search] [--compiler auto|tpu|cpu] [--mfu 0.4]")
    try:
        topo = topology.parse(FLAGS.topology)
    except ValueError as e:
        _usage_error(str(e))
    if not 0 < FLAGS.mfu <= 1:
        _usage_error(f"--mfu {FLAGS.mfu}: expected a fraction in (0, 1]")
    if FLAGS.workdir is not None:
        from cambrian_jax import workdir as workdir_lib  # noqa: PLC0415
        config = cli.guarded(workdir_lib.config)(FLAGS.workdir)
        name = f"{FLAGS.workdir}/config.json"
    else:
        config = FLAGS.config
        name = config_flags.get_config_filename(FLAGS["config"])
    try:
        compiler = resolve_compiler(FLAGS.compiler, topo)
    except ValueError as e:
        _usage_error(str(e))
    if compiler == "tpu":
        # JAX's own backend stays the CPU (nothing runs); the TPU compiler comes from libtpu's
        # compile-only client, which reads LIBTPU_INIT_ARGS when it loads.
        import jax  # noqa: PLC0415
        jax.config.update("jax_platforms", "cpu")
        topology.use_libtpu_flags()
    else:
        simulate(topo.chips)
    from cambrian_jax.config import ConfigError  # noqa: PLC0415
    from cambrian_jax.trainer import TrainSetup  # noqa: PLC0415

    stages = tuple(int(s) for s in config.get("stages", (1, 2))) if FLAGS.stage == "all" else (int(FLAGS.stage),)
    log = (lambda *a: print(*a, file=sys.stderr)) if FLAGS.json else print
    where = (f"the TPU compiler (libtpu {topology.tpu_compiler_version()}) for {topo.chips} compile-only "
             f"{topo.chip.name} devices" if compiler == "tpu" else f"{topo.chips} simulated CPU devices (an estimate)")
    try:
        setup = TrainSetup(config, planning_mesh(config, topo, compiler), process_count=topo.hosts)
        reports = []
        for n in stages:
            print(f"stage {n}: compiling the training step for {topo.name} with {where} (minutes for a large "
                  "model)…", file=sys.stderr, flush=True)
            reports.append(plan_stage(config, topo, n, mfu=FLAGS.mfu, setup=setup, compiler=compiler))
    except ConfigError as e:
        _usage_error(f"config error: {e}")
    except (ValueError, RuntimeError) as e:   # topology: a data axis the slices do not split; libtpu refusing
        _usage_error(str(e))
    if not FLAGS.json:
        print("\n\n".join(format_report(r, name, topo) for r in reports))
    out = summary(reports, name, topo)
    if FLAGS.search:
        log(f"search: tensor degrees × remat policies × accumulation on {topo.name}")
        cand, found, rows = search(config, topo, stages, mfu=FLAGS.mfu, max_compiles=FLAGS.max_compiles,
                                   compiler=compiler, log=log)
        if rows:
            log("search: the candidates that fit, shortest predicted run first\n" + format_candidates(rows))
        if cand is None:
            log("search: nothing tried fits; a larger slice (or a smaller batch) is needed")
            out["search"] = None
        else:
            best = summary(list(found.values()), name, topo)
            log(f"search: the shortest predicted run that fits: {' '.join(cand.overrides())}")
            for n, r in found.items():
                log(f"        stage {n}: {_gib(r.per_device_bytes['total'])} per device, predicted step "
                    f"{r.predicted_step_time_s:.3g} s (MFU {100 * r.mfu_predicted:.1f} %)")
            out["search"] = dict(overrides=cand.overrides(), remat=cand.remat, tensor=cand.tensor,
                                 accum_steps={str(n): a for n, a in cand.accum.items()}, plan=best,
                                 candidates=rows)
    if FLAGS.json:
        print(json.dumps(out, indent=2))
    sys.exit(cli.EXIT_OK if out["fits"] or (FLAGS.search and out.get("search")) else cli.EXIT_DOES_NOT_FIT)


if __name__ == "__main__":
    from cambrian_jax import cli as _cli

    define_flags()
    app.run(main, flags_parser=_cli.parse_absl_flags)
