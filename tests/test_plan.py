"""The ahead-of-time planner (cambrian_jax/plan.py) and the topology table (cambrian_jax/topology.py).

The planner simulates a topology's devices, which JAX fixes when it starts, so every plan runs in its
own process: the CLI itself, or `python tests/test_plan.py SPEC` for the checks that look inside.

  micro          the micro config on v4-16 (8 devices), both stages: its exact per-device bytes are
                 XLA's argument buffers, its FLOPs the trainer's formula
  misfit         the micro config made to overflow a v5e-8 (16 GiB) with long rows: the report names
                 the part over budget and the knobs, and exits 3 (cli.EXIT_DOES_NOT_FIT)
  34b-state      the 34B config on v4-512's 256 devices, not compiled: every trainable parameter and
                 its optimizer state sharded 256 ways, exactly
  (slow)         the shipped configs compiled for their documented topologies, both stages; --search
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cambrian_jax import flops, topology
from cambrian_jax import config as config_lib
from configs import cambrian_tiny

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def plan_json(*args: str, expect_rc: int = 0, timeout: int = 900, compiler: str = "cpu") -> dict:
    """The planner's JSON; with the CPU compiler unless asked (tests/test_plan_tpu.py has the TPU one's)."""
    p = run("-m", "cambrian_jax.plan", "--json", "--compiler", compiler, *args, timeout=timeout)
    assert p.returncode == expect_rc, p.stderr[-3000:]
    return json.loads(p.stdout)


# ------------------------------------------------------------------------------------------ topology

@pytest.mark.parametrize("name, chip, chips", [
    ("v4-512", "v4", 256), ("v4-8", "v4", 4), ("v5p-128", "v5p", 64), ("v5e-256", "v5e", 256),
    ("v5litepod-16", "v5e", 16), ("v6e-64", "v6e", 64), ("h100x8", "h100", 8), ("H200x16", "h200", 16),
])
def test_slice_names_count_chips(name, chip, chips):
    t = topology.parse(name)
    assert (t.chip.name, t.chips) == (chip, chips)
    assert t.peak_flops == chips * t.chip.peak_flops


def test_chip_table_holds_the_published_figures():
    gib = 2 ** 30
    table = {c.name: (c.peak_flops / 1e12, c.hbm_bytes) for c in topology.CHIPS.values()}
    assert table["v4"] == (275, 32 * gib) and table["v5e"] == (197, 16 * gib) and table["v5p"] == (459, 95 * gib)
    assert table["v6e"] == (918, 32 * gib) and table["h100"] == (989, 80 * gib) and table["h200"] == (989, 141e9)


@pytest.mark.parametrize("bad", ["v4-7", "v4-1", "tpu", "v7-8", "h100"])
def test_bad_topology_names_say_what_is_accepted(bad):
    with pytest.raises(ValueError, match="v4-512"):
        topology.parse(bad)


def test_mfu_peak_comes_from_the_same_table():
    class Device:
        def __init__(self, kind):
            self.device_kind = kind

    assert flops.peak_flops(Device("TPU v4")) == 275e12
    assert flops.peak_flops(Device("TPU v5 lite")) == 197e12
    assert flops.peak_flops(Device("TPU v5")) == 459e12         # v5p's device kind
    assert flops.peak_flops(Device("TPU v6 lite")) == 918e12
    assert flops.peak_flops(Device("NVIDIA H100 80GB HBM3")) == 989e12
    assert flops.peak_flops(Device("cpu")) == topology.CPU_PEAK_FLOPS
    assert {k: v for k, v in flops.PEAK_FLOPS.items() if k != "cpu"} == {
        c.name: c.peak_flops for c in topology.CHIPS.values()}


# ------------------------------------------------------------------------------------------ batch

def test_batch_spec_is_the_pipelines_batch(tmp_path):
    from cambrian_jax.data import pipeline

    config = cambrian_tiny.get_config("micro,batch=4")
    config.data.synthetic.num_samples = 8
    model_cfg = config_lib.from_dict(config.model)
    it, _ = pipeline.stage_dataset(config, config.stage1, model_cfg, tmp_path, 0, 1)
    try:
        got = {k: (v.shape, str(v.dtype)) for k, v in next(it).items()}
    finally:
        it.close()
    assert got == pipeline.batch_spec(model_cfg, config.data, 4)


# ------------------------------------------------------------------------------------------ micro

@pytest.fixture(scope="module")
def micro():
    return plan_json("--config", "configs/cambrian_tiny.py:micro", "--topology", "v4-16")


def test_plan_reports_every_part_and_stage(micro):
    for key in ("fits", "hbm_bytes", "per_device_bytes", "flops_per_step", "predicted_step_time_s", "mfu_assumed"):
        assert key in micro, key
    assert micro["fits"] is True and micro["chips"] == 8 and micro["hbm_bytes"] == 32 * 2 ** 30
    assert [s["stage"] for s in micro["stages"]] == [1, 2]
    assert micro["binding_stage"] in (1, 2)
    for s in micro["stages"]:
        b = s["per_device_bytes"]
        assert set(b) == {"parameters", "optimizer", "gradients", "batch", "activations", "total"}
        assert sum(v for k, v in b.items() if k != "total") == b["total"]


def test_exact_bytes_are_xlas_argument_buffers(micro):
    """Parameters (trainable + frozen), optimizer state and batch, from the shardings alone, are
    exactly what the compiled step takes as arguments on each device, but for the batch's has_image
    flags (bool [B], one byte a row), which the step never reads and jit therefore drops."""
    for s in micro["stages"]:
        b, x = s["per_device_bytes"], s["xla_memory"]
        has_image = s["global_batch"] // 8
        assert b["parameters"] + b["optimizer"] + b["batch"] - has_image == x["argument"]
        assert b["total"] == x["argument"] + x["output"] - x["alias"] + x["temp"]
        assert 0 < b["gradients"] < b["parameters"]


def test_flops_and_time_are_the_trainers_formula(micro):
    config = cambrian_tiny.get_config("micro")
    cfg = config_lib.from_dict(config.model)
    chips, peak = 8, topology.CHIPS["v4"].peak_flops
    for s, trainable in zip(micro["stages"], (["connector/"], ["connector/", "decoder/"])):
        gb = config[f"stage{s['stage']}"].global_batch_size
        assert s["global_batch"] == gb and s["rows_per_device"] == gb // chips and s["seq_len"] == cfg.max_len
        assert s["flops_per_step"] == pytest.approx(flops.train_flops_per_step(cfg, gb, trainable), rel=1e-12)
        assert s["recompute_flops_per_step"] == pytest.approx(
            gb * flops.recompute_flops_per_sample(cfg, cfg.max_len), rel=1e-12)
        step = (s["flops_per_step"] + s["recompute_flops_per_step"]) / (chips * peak * 0.4)
        assert s["predicted_step_time_s"] == pytest.approx(step, rel=1e-12)
        assert s["tokens_per_s"] == pytest.approx(gb * cfg.max_len / step, rel=1e-12)


# 128 rows of 2048 tokens per device: the micro model's attention scores alone overflow a v5e's 16 GiB.
OVERFLOW = ("--config", "configs/cambrian_tiny.py:micro,batch=1024", "--config.model.max_len=2048",
            "--topology", "v5e-8", "--stage", "1")


def test_misfit_names_the_part_and_the_knobs():
    """Activations over budget, the state tiny: the report says so, offers the knobs, and exits 3."""
    out = plan_json(*OVERFLOW, expect_rc=3)
    b = out["per_device_bytes"]
    assert out["fits"] is False and b["total"] > out["hbm_bytes"] == 16 * 2 ** 30
    assert b["activations"] > 0.9 * b["total"]
    advice = " ".join(out["advice"])
    assert "activations/temporaries" in advice
    assert "stage1.accum_steps=2 (now 1)" in advice and "valid: 2, 4, 8, 16, 32, 64, 128" in advice
    assert "model.remat='full'" in advice
    assert "mesh.tensor=2" in advice


def test_requests_it_cannot_plan_exit_2_naming_the_field():
    p = run("-m", "cambrian_jax.plan", "--config", "configs/cambrian_tiny.py:micro,batch=6", "--topology", "v4-8",
            timeout=300)
    assert p.returncode == 2 and "config field stage1.global_batch_size" in p.stderr
    p = run("-m", "cambrian_jax.plan", "--config", "configs/cambrian_tiny.py:micro", "--topology", "v4-7")
    assert p.returncode == 2 and "multiple of 2" in p.stderr


# ------------------------------------------------------------------------------------------ 34B

def state_harness(spec: str) -> None:
    """`python tests/test_plan.py 34b-state`: the 34B's per-device state bytes on v4-512, uncompiled."""
    assert spec == "34b-state"
    from cambrian_jax import plan
    from cambrian_jax.trainer import TrainSetup
    from configs import cambrian_34b

    topo = topology.parse("v4-512")
    plan.simulate(topo.chips)
    config = cambrian_34b.get_config()
    setup = TrainSetup(config, plan.simulated_mesh(config, topo), process_count=topo.hosts)
    out = {}
    for n in (1, 2):
        p = setup.plan(n)
        program = setup.program(p, 1000)
        whole = plan.replicated(program.abs_state["params"])
        out[n] = dict(trainable=plan.count(p.abs_train), frozen=plan.count(p.abs_frozen),
                      trainable_unsharded=sum(math.prod(shape) for _, shape, _ in whole),
                      trainable_bytes=plan.shard_bytes(program.abs_state["params"]),
                      optimizer_bytes=plan.shard_bytes(program.abs_state["opt"]),
                      frozen_bytes=plan.shard_bytes(program.abs_frozen), mesh=dict(setup.mesh.shape))
    print(json.dumps(out))


def test_34b_state_is_sharded_over_every_chip_of_v4_512():
    p = run(__file__, "34b-state", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    s1, s2 = out["1"], out["2"]
    assert s1["mesh"] == {"data": 1, "fsdp": 256, "tensor": 1}
    assert 34.7e9 < s2["trainable"] < 34.9e9 and 2.6e9 < s2["frozen"] < 2.8e9          # Yi-34B + connector; towers
    assert s1["trainable"] + s1["frozen"] == s2["trainable"] + s2["frozen"]
    for s in (s1, s2):
        # float32 parameters split 256 ways but for a few biases no rule shards (< 0.01 %), Adam's two
        # moments likewise, plus a step count per learning-rate group.
        whole = s["trainable_unsharded"]
        assert whole < 1e-4 * s["trainable"]
        assert s["trainable_bytes"] == (s["trainable"] - whole) * 4 // 256 + whole * 4
        assert 0 <= s["optimizer_bytes"] - 2 * s["trainable_bytes"] <= 64
        assert s["frozen_bytes"] >= math.ceil(s["frozen"] * 4 / 256)


# ------------------------------------------------------------------------------------------ slow

SHIPPED = [("configs/cambrian_34b.py", "v4-512"), ("configs/cambrian_13b.py", "v4-512"),
           ("configs/cambrian_8b.py", "v4-64"), ("configs/cambrian_3b.py", "v4-64")]


@pytest.mark.slow
@pytest.mark.parametrize("config, topo", SHIPPED)
def test_shipped_configs_fit_their_documented_topology(config, topo):
    """Each config's docstring names its topology; both stages must fit there (minutes each on 2 CPUs)."""
    assert f"on {topo}" in (REPO / config).read_text()
    out = plan_json("--config", config, "--topology", topo, timeout=3600)
    assert out["fits"], json.dumps({s["stage"]: s["per_device_bytes"] for s in out["stages"]})
    assert all(s["fits"] for s in out["stages"])


@pytest.mark.slow
def test_search_finds_the_fastest_setting_that_fits():
    out = plan_json(*OVERFLOW, "--search", timeout=3600)
    assert out["fits"] is False and out["search"]["plan"]["fits"] is True
    found = out["search"]
    assert found["tensor"] == 1 and int(found["accum_steps"]["1"]) > 1
    assert f"--config.stage1.accum_steps={found['accum_steps']['1']}" in found["overrides"]


if __name__ == "__main__":
    state_harness(sys.argv[1])
