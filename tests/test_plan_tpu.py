"""The planner on the real TPU compiler (libtpu's compile-only devices) and the loop accounting of
cambrian_jax/compiled_cost.py.

Everything here compiles for a v5p-8 (4 chips) or smaller, so it stays fast. Without libtpu the
compiling tests skip with one line; CI installs the [tpu] extra and runs them in their own step.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cambrian_jax import compiled_cost, topology
from tests.test_plan import run

needs_libtpu = pytest.mark.skipif(topology.tpu_compiler_version() is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler")
V5P = topology.CHIPS["v5p"]


# ------------------------------------------------------------------------------------------ flags

def test_libtpu_flags_are_added_once_and_the_users_win():
    env = {"LIBTPU_INIT_ARGS": "--xla_tpu_overlap_compute_collective_tc=false --xla_foo=1"}
    got = topology.use_libtpu_flags(env).split()
    assert got[:2] == ["--xla_tpu_overlap_compute_collective_tc=false", "--xla_foo=1"]
    assert "--xla_tpu_overlap_compute_collective_tc=true" not in got
    assert set(topology.LIBTPU_FLAGS) - set(got) == {"--xla_tpu_overlap_compute_collective_tc=true"}
    assert topology.use_libtpu_flags(env).split() == got                     # idempotent
    assert topology.use_libtpu_flags({}).split() == list(topology.LIBTPU_FLAGS)


def test_launch_tpu_leaves_the_flags_to_the_trainer():
    from tests.test_plan import REPO
    assert "--xla_tpu" not in (REPO / "launch_tpu.sh").read_text()
    assert "topology.use_libtpu_flags()" in (REPO / "cambrian_jax" / "train.py").read_text()


@pytest.mark.parametrize("name, shape", [("v4-512", (8, 8, 4)), ("v4-384", (4, 4, 12)), ("v5p-8", (2, 2, 1)),
                                         ("v6e-256", (16, 16)), ("v5e-8", (2, 4)), ("2xv5p-256", (8, 4, 4))])
def test_slice_shapes_are_libtpus(name, shape):
    assert topology.slice_shape(topology.parse(name)) == shape


def test_multislice_names():
    t = topology.parse("2xv5p-256")
    assert (t.chips, t.slices, t.hosts, t.chip.name) == (256, 2, 64, "v5p")


# ------------------------------------------------------------------------------------------ loops

@pytest.fixture(scope="module")
def v5p8():
    return Mesh(topology.compile_only_devices(topology.parse("v5p-8")), ("x",))


def accumulated_layers(mesh, unroll, accum=3, layers=4, d=512, rows=256):
    """A gradient-accumulation scan around a layer scan and its transpose, like the training step;
    the gradient is taken for the inputs too, so unrolling removes no work."""
    def step(ws, x):
        def micro(g, xm):
            def loss(ws, xm):
                return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), xm, ws, unroll=unroll)[0].sum()
            gw, gx = jax.grad(loss, argnums=(0, 1))(ws, xm)
            return g + gw, gx
        return jax.lax.scan(micro, jnp.zeros_like(ws), x.reshape(accum, -1, x.shape[-1]), unroll=unroll)
    ws = jax.ShapeDtypeStruct((layers, d, d), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, None, "x")))
    x = jax.ShapeDtypeStruct((accum * rows, d), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
    return jax.jit(step).lower(ws, x).compile()


@needs_libtpu
def test_loop_bodies_count_by_trip_count_as_if_unrolled(v5p8):
    scanned = compiled_cost.program_cost(accumulated_layers(v5p8, 1), V5P.peak_flops, V5P.hbm_bandwidth)
    unrolled = compiled_cost.program_cost(accumulated_layers(v5p8, True), V5P.peak_flops, V5P.hbm_bandwidth)
    assert not unrolled.loops and unrolled.flops == unrolled.reported_flops
    # The accumulation loop runs once, each layer loop (forward, backward) once per micro-batch.
    assert sorted((lp.trips, lp.runs) for lp in scanned.loops) == [(3, 1), (4, 3), (4, 3)]
    assert scanned.reported_flops < 0.2 * unrolled.flops          # XLA's own figure: bodies once
    # Equal but for the elementwise work XLA fuses differently unrolled (0.4 % at these widths); the
    # matmuls alone are 3 micro-batches × 4 layers × 3 dots × 2·64·512·512 per device.
    assert scanned.flops == pytest.approx(unrolled.flops, rel=1e-2)
    assert scanned.flops == pytest.approx(3 * 4 * 3 * 2 * 64 * 512 * 512, rel=2e-2)
    # Bytes and time differ for real (a scan reads its stacked weights by dynamic slices, writes its
    # residuals into stacked buffers): within a factor, not equal.
    assert 0.7 < scanned.bytes_accessed / unrolled.bytes_accessed < 1.6
    assert 0.7 < scanned.seconds / unrolled.optimal_seconds < 1.6
    assert scanned.seconds > 5 * scanned.optimal_seconds and scanned.time_source == "optimal_seconds"
    # The additive roofline is the compiler's own time to a few per cent where nothing loops.
    assert unrolled.roofline_seconds == pytest.approx(unrolled.optimal_seconds, rel=0.15)


def test_a_splash_call_with_one_row_per_device_is_counted():
    # With one row per device the kernel's operands lose their batch axis (q [heads, T, d]); the grid
    # s8[1, 1, 1] is one block a side, so nothing is causally skipped.
    line = ('  %splash_mha_fwd_segmented_residuals.1 = (f32[128,128]{1,0}) custom-call(%a, %b), '
            'custom_call_target="tpu_custom_call", operand_layout_constraints={s8[1,1,1]{2,1,0}, '
            's8[1,1,1]{2,1,0}, f32[2,128,16]{2,1,0}, f32[1,128,16]{2,1,0}, f32[1,128,16]{2,1,0}, '
            's32[128,128]{1,0}}, frontend_attributes={}')
    assert compiled_cost._kernel_flops(line) == 4 * 2 * 128 * 128 * 16
    batched = line.replace("f32[2,128,16]", "bf16[3,2,128,16]").replace("f32[1,128,16]", "bf16[3,1,128,16]")
    assert compiled_cost._kernel_flops(batched) == 3 * 4 * 2 * 128 * 128 * 16
    assert compiled_cost._kernel_flops(line.replace("splash_mha_fwd", "fusion")) == 0.0


@needs_libtpu
def test_splash_compiles_for_tpu_and_its_kernels_are_counted():
    """Splash is a Pallas custom call that XLA's cost analysis cannot see: compiled_cost counts its FLOPs
    from the operands (forward 4, dq 6, dk/dv 8 per query-key pair and head dim, over the causal blocks),
    so its step is not predicted as free; and it holds far fewer temporaries than the einsum form."""
    from benchmarks.attention import compile_attention, tpu_mesh

    mesh = tpu_mesh(topology.parse("v5p-8"))
    xla, splash = (compile_attention(impl, mesh, b=8, t=1024, nh=8, kv=2, d=128) for impl in ("xla", "splash"))
    assert "tpu_custom_call" in splash.as_text() and "tpu_custom_call" not in xla.as_text()
    cost = compiled_cost.program_cost(splash, V5P.peak_flops, V5P.hbm_bandwidth)
    per_chip_pairs = 8 // 4 * 8 * 1024 * 1024 * 128 * (2 + 1) / 4      # 1024 = 2 blocks of 512: 3 of 4 visited
    assert cost.kernel_flops == pytest.approx((4 + 6 + 8) * per_chip_pairs, rel=1e-9)
    assert cost.reported_flops < 0.01 * cost.kernel_flops                # what XLA alone would have said
    assert cost.seconds > cost.kernel_flops / V5P.peak_flops
    # 4.9x fewer temporaries here at 1024 tokens (9.4x at 2048: benchmarks/attention.py).
    assert xla.memory_analysis().temp_size_in_bytes > 4 * splash.memory_analysis().temp_size_in_bytes


@needs_libtpu
def test_the_trip_count_is_read_from_the_loop_condition(v5p8):
    for accum, layers in ((2, 5), (5, 2)):
        c = compiled_cost.program_cost(accumulated_layers(v5p8, 1, accum, layers), V5P.peak_flops,
                                       V5P.hbm_bandwidth)
        assert sorted((lp.trips, lp.runs) for lp in c.loops) == sorted([(accum, 1), (layers, accum),
                                                                         (layers, accum)])


def _counted_loop(start: int, bound: int, step: int) -> str:
    return f"""HloModule m

%cond (p: (s32[], f32[])) -> pred[] {{
  %p = (s32[], f32[]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant({bound})
  ROOT %c = pred[] compare(%i, %n), direction=LT
}}

%body (q: (s32[], f32[])) -> (s32[], f32[]) {{
  %q = (s32[], f32[]) parameter(0)
  %i = s32[] get-tuple-element(%q), index=0
  %x = f32[] get-tuple-element(%q), index=1
  %k = s32[] constant({step})
  %j = s32[] add(%i, %k)
  ROOT %t = (s32[], f32[]) tuple(%j, %x)
}}

ENTRY %main (a: f32[]) -> (s32[], f32[]) {{
  %a = f32[] parameter(0)
  %z = s32[] constant({start})
  %t = (s32[], f32[]) tuple(%z, %a)
  ROOT %w = (s32[], f32[]) while(%t), condition=%cond, body=%body
}}
"""


@pytest.mark.parametrize("start, bound, step, trips", [(0, 16, 1, 16), (0, 16, 2, 8), (3, 10, 1, 7), (0, 7, 2, 4)])
def test_the_trip_count_takes_the_start_and_the_step(start, bound, step, trips):
    comps, entry = compiled_cost._parse(_counted_loop(start, bound, step))
    assert [t for _, t, _ in comps[entry].loops] == [trips]


def test_an_unreadable_loop_condition_is_an_error_not_a_guess():
    hlo = """HloModule m

%cond (p: (s32[], f32[])) -> pred[] {
  %p = (s32[], f32[]) parameter(0)
  %x = f32[] get-tuple-element(%p), index=1
  %zero = f32[] constant(0)
  ROOT %c = pred[] compare(%x, %zero), direction=GT
}

%body (p.1: (s32[], f32[])) -> (s32[], f32[]) {
  ROOT %p.1 = (s32[], f32[]) parameter(0)
}

ENTRY %main (a: f32[]) -> (s32[], f32[]) {
  %a = f32[] parameter(0)
  %i = s32[] constant(0)
  %t = (s32[], f32[]) tuple(%i, %a)
  ROOT %w = (s32[], f32[]) while(%t), condition=%cond, body=%body
}
"""
    with pytest.raises(ValueError, match="cannot read the trip count of the loop whose condition is %cond"):
        compiled_cost._parse(hlo)


# ------------------------------------------------------------------------------------------ the planner

@pytest.fixture(scope="module")
def tpu_plan():
    """The micro config planned on v5p-8 by the TPU compiler, in-process (compile-only devices need no
    special JAX start), with the compiled program kept to compare against."""
    from cambrian_jax import plan
    from cambrian_jax.trainer import TrainSetup
    from configs import cambrian_tiny

    topo = topology.parse("v5p-8")
    config = cambrian_tiny.get_config("micro")
    setup = TrainSetup(config, plan.planning_mesh(config, topo, "tpu"), process_count=topo.hosts)
    return setup, topo, plan.plan_stage(config, topo, 2, setup=setup, compiler="tpu")


@needs_libtpu
def test_the_report_is_the_tpu_compilers_own(tpu_plan):
    import numpy as np

    from cambrian_jax.data.pipeline import batch_spec

    setup, topo, r = tpu_plan
    assert r.compiler == "tpu" and r.compiler_version == f"libtpu {topology.tpu_compiler_version()}"
    assert {d.device_kind for d in setup.mesh.devices.flat} == {"TPU v5"}
    p = setup.plan(2)
    program = setup.program(p, total_steps=int(p.stage.get("num_steps") or 1000))
    spec = batch_spec(setup.model_cfg, setup.config.get("data") or {}, int(p.stage.global_batch_size))
    batch = {k: jax.ShapeDtypeStruct(s, np.dtype(d), sharding=program.batch_sharding) for k, (s, d) in spec.items()}
    mem = program.lower(batch).compile().memory_analysis()
    assert r.xla_memory == {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
                            ("argument", "output", "alias", "temp", "generated_code")}
    b = r.per_device_bytes
    assert b["total"] == mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes \
        + mem.temp_size_in_bytes
    # The step time is the compiler's, its MFU our FLOPs over it.
    c = r.cost
    assert r.predicted_step_time_raw_s == c["seconds"] > c["optimal_seconds"] > 0
    assert r.predicted_step_time_s == pytest.approx(r.predicted_step_time_raw_s * (r.calibration or 1.0))
    assert r.mfu_predicted == pytest.approx(r.flops_per_step / (r.predicted_step_time_s * topo.peak_flops))
    assert r.mfu_assumed is None
    # The decoder's layer scan and its transpose are the loops counted (the micro towers have one layer).
    layers = setup.model_cfg.decoder.num_layers
    assert sorted((lp["op_name"].endswith("transpose(jvp())/while"), lp["trips"]) for lp in c["loops"]) == [
        (False, layers), (True, layers)]
    assert c["flops"] > c["reported_flops"]


@needs_libtpu
def test_more_layers_cost_more_though_xla_counts_them_once(tpu_plan):
    from cambrian_jax import plan
    from configs import cambrian_tiny

    _, topo, base = tpu_plan
    flops, reported = [], []
    for layers in (2, 4, 6):
        config = cambrian_tiny.get_config("micro")
        config.model.decoder.num_layers = layers
        r = plan.plan_stage(config, topo, 2, compiler="tpu")
        flops.append(r.cost["flops"])
        reported.append(r.cost["reported_flops"])
    assert reported[2] == pytest.approx(reported[0], rel=0.02)
    # Linear in depth: each two layers add the same FLOPs.
    assert flops[2] - flops[1] == pytest.approx(flops[1] - flops[0], rel=1e-3)
    assert flops[1] - flops[0] > 0.1 * flops[0]


@needs_libtpu
def test_cli_reports_the_tpu_compiler_quietly():
    p = run("-m", "cambrian_jax.plan", "--config", "configs/cambrian_tiny.py:micro", "--topology", "v5p-8",
            "--stage", "1", "--json", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert out["compiler"] == "tpu" and out["stages"][0]["compiler"] == "tpu"
    assert "TPU compiler" in out["note"] and out["chip"] == "v5p"
    assert "with the TPU compiler (libtpu" in p.stderr
    for noise in ("InitGoogle", "TPU_WORKER_HOSTNAMES", "Source Location Trace", "stack_frame_id"):
        assert noise not in p.stderr, noise


@needs_libtpu
@pytest.mark.parametrize("args, says", [
    (("--topology", "v5p-6"), "topology 'v5p-6': libtpu has no v5p slice of 3 chips"),
    (("--topology", "2xv5p-8"), "config field mesh.data: 1 does not split over the 2 slices of 2xv5p-8"),
    (("--topology", "v5p-8", "--config.mesh.tensor=3"), "config field mesh"),
])
def test_requests_libtpu_cannot_plan_exit_2_in_one_line(args, says):
    p = run("-m", "cambrian_jax.plan", "--config", "configs/cambrian_tiny.py:micro", "--compiler", "tpu", *args,
            timeout=300)
    assert p.returncode == 2 and says in p.stderr, p.stderr[-2000:]
    assert "compiling the training step" not in p.stderr          # refused before anything compiles
    assert "Traceback" not in p.stderr


def test_tpu_compiler_for_a_gpu_is_a_usage_error():
    p = run("-m", "cambrian_jax.plan", "--config", "configs/cambrian_tiny.py:micro", "--topology", "h100x8",
            "--compiler", "tpu", timeout=120)
    assert p.returncode == 2 and "--compiler tpu: h100x8 is not a TPU slice" in p.stderr


@needs_libtpu
@pytest.mark.slow
def test_34b_on_v4_512_by_the_tpu_compiler():
    """The flagship recipe's binding stage on its slice as the TPU compiler sees it (minutes)."""
    from tests.test_plan import plan_json

    out = plan_json("--config", "configs/cambrian_34b.py", "--topology", "v4-512", "--stage", "2", compiler="tpu",
                    timeout=3600)
    assert out["compiler"] == "tpu" and out["fits"], json.dumps([s["per_device_bytes"] for s in out["stages"]])
    for s in out["stages"]:
        assert s["mesh"] == {"data": 1, "fsdp": 256, "tensor": 1}
        assert 0.2 < s["mfu_predicted"] < 1.0
        assert s["cost"]["flops"] > 10 * s["cost"]["reported_flops"]        # 60 layers × accumulation


@needs_libtpu
def test_search_picks_the_shortest_predicted_run_among_those_that_fit():
    # One row per chip: no accumulation to bisect, so each compile is a candidate (three remat policies).
    p = run("-m", "cambrian_jax.plan", "--config", "configs/cambrian_tiny.py:micro,batch=4", "--topology", "v5p-8",
            "--stage", "1", "--json", "--search", "--max_compiles", "3", timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    found = json.loads(p.stdout)["search"]
    rows = found["candidates"]
    assert len(rows) == 3 and all(r["gib_per_chip"] < 95 for r in rows)
    assert len({r["remat"] for r in rows}) == 3
    best = min(rows, key=lambda r: r["run_s"])
    assert (found["remat"], found["tensor"], found["accum_steps"]) == (best["remat"], best["tensor"],
                                                                       best["accum_steps"])
    assert found["plan"]["compiler"] == "tpu"
    assert found["plan"]["predicted_step_time_s"] == pytest.approx(best["step_s"]["1"])
    assert "shortest predicted run first" in p.stderr and "GiB/chip" in p.stderr


@needs_libtpu
def test_the_calibration_benchmark_runs_at_its_smallest(tmp_path):
    """benchmarks/calibrate_tpu.py on its development shape: our decoder's step on v5p-8, its loops
    counted, its compiler FLOPs close to the analytic count (the published figures need the big runs)."""
    out = tmp_path / "tiny.json"
    p = run("benchmarks/calibrate_tpu.py", "--runs", "tiny", "--out", str(out), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    row = json.loads(out.read_text())["rows"][0]
    assert row["run"] == "tiny" and row["chip"] == "v5p" and row["fits"]
    assert sorted(lp["trips"] for lp in row["loops"]) == [row["layers"], row["layers"]]
    assert 0.95 < row["compiler_flops_over_ours"] < 1.2 and row["predicted_s"] > 0
