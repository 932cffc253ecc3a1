"""The trainer end to end, on the one-tower `micro` model (configs/cambrian_tiny.py:micro).

Every run is a separate process (`python tests/test_train.py SPEC`, see `harness`), as a real
restart is: a SIGTERM, a kill in the middle of a checkpoint save, a restart on another mesh. The
processes share one XLA compilation cache and compile with cheap CPU optimisation flags, so each
distinct program is compiled once per test session.

  reference   stage 1 (4 steps) then stage 2 (4 steps), uninterrupted, 1 device
  resumed     the same two stages as five processes: SIGTERM at stage-1 step 2; resume, killed
              while committing the final stage-1 checkpoint; resume; --stage 2 alone, SIGTERM at
              step 2; resume. Losses and final parameters must equal the reference's bitwise.
  resharded   the 1-device step-2 checkpoint resumed on 8 devices as data=2 × fsdp=4; (slow) stage 1
              on 8 devices as fsdp=8, SIGTERM at step 2, resumed as data=2 × fsdp=4.
  two-process (slow) two processes × 4 devices (gloo) against one process with 8.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SWITCHES = "micro,steps1=4,steps2=4,batch=8"
BASE = {"log_every": 1, "checkpoint.save_interval_steps": 2}
# Cheap CPU code generation: compiles about twice as fast; the numbers are the same in every run.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# ------------------------------------------------------------------------------------------ harness

def harness(spec: dict) -> None:
    """One training process. spec: workdir, stage ('all'|'1'|'2'), switches, overrides (dotted config
    paths), sigterm_at [stage, step], kill_on_commit 'stage1/4', nan_at [stage, step], dump_init."""
    import logging

    import jax
    from absl import logging as absl_logging

    from cambrian_jax import optim, sharding
    from cambrian_jax import trainer as T
    from configs import cambrian_tiny

    logging.basicConfig(level=logging.INFO)
    absl_logging.set_verbosity(absl_logging.INFO)

    config = cambrian_tiny.get_config(spec.get("switches", SWITCHES))
    for path, value in {**BASE, **spec.get("overrides", {})}.items():
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = tuple(value) if isinstance(value, list) else value

    now = {"stage": None}
    seen: dict = {"opt_paths": {}, "train_paths": {}}
    run_stage, reached, loop, to_global = T.Trainer.run_stage, T.Preemption.reached, T.Trainer._loop, sharding.to_global

    def run_stage_(self, n):
        now["stage"] = n
        return run_stage(self, n)

    def reached_(self, step):
        if spec.get("sigterm_at") == [now["stage"], step]:
            os.kill(os.getpid(), signal.SIGTERM)     # a real signal, through the trainer's handler
            time.sleep(0.05)
        return reached(self, step)

    def loop_(self, plan, mgr, state, *args):
        paths = jax.tree_util.tree_leaves_with_path(state["opt"])
        seen["opt_paths"][plan.n] = sorted({optim.path_str(p) for p, x in paths if np.ndim(x) > 0})
        seen["train_paths"][plan.n] = plan.trainable_paths
        return loop(self, plan, mgr, state, *args)

    calls = {"n": 0}

    def to_global_(local, batch_sh):
        calls["n"] += 1
        step = None
        if spec.get("nan_at") and spec["nan_at"][0] == now["stage"]:
            step = calls["n"]
        if step is not None and step == spec["nan_at"][1]:
            local = dict(local, pixels_0=np.full_like(local["pixels_0"], np.nan))
        return to_global(local, batch_sh)

    T.Trainer.run_stage, T.Preemption.reached, T.Trainer._loop = run_stage_, reached_, loop_
    sharding.to_global = to_global_
    if spec.get("kill_on_commit"):
        from orbax.checkpoint._src.path import atomicity
        finalize = atomicity.AtomicRenameTemporaryPath.finalize
        target = spec["kill_on_commit"]

        async def finalize_(self):
            if str(self._final_path).endswith(target):   # killed after writing, before the commit
                os._exit(137)
            return await finalize(self)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize_

    tr = T.Trainer(config, spec["workdir"])
    arrays, result = {}, {"mesh": dict(tr.mesh.shape)}
    if spec.get("dump_init"):
        arrays.update(_flat(tr.init_params(), "init/"))
    stages = tr.stages if spec.get("stage", "all") == "all" else (int(spec["stage"]),)
    try:
        result["finished"] = tr.run(stages)
    except T.TrainingStopped as e:
        result["finished"], result["stopped"] = False, str(e)
    if result["finished"]:
        for n in stages:
            arrays.update(_flat(tr._final_params(n), f"stage{n}/"))
        state = tr.last_state["params"]
        result["param_specs"] = {optim.path_str(p): str(x.sharding.spec)
                                 for p, x in jax.tree_util.tree_leaves_with_path(state)}
    result.update(seen)
    tr.close()
    out = Path(spec["workdir"])
    np.savez(out / "harness.npz", **arrays)
    (out / "harness.json").write_text(json.dumps(result))


def _flat(state, prefix: str) -> dict:
    import jax

    from cambrian_jax import optim
    return {prefix + optim.path_str(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_leaves_with_path(state)}


def run(spec: dict, devices: int = 1, expect_rc: int = 0, timeout: int = 900) -> dict:
    """Run the harness in a fresh process with `devices` CPU devices; its result, logs and params."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")
    p = subprocess.run([sys.executable, __file__, json.dumps(spec)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == expect_rc, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    out = Path(spec["workdir"])
    result = {"log": p.stderr, "rc": p.returncode}
    if (out / "harness.json").exists() and p.returncode == 0:
        result.update(json.loads((out / "harness.json").read_text()))
        with np.load(out / "harness.npz") as z:
            result["params"] = {k: z[k] for k in z.files}
        (out / "harness.json").unlink()
    return result


def metrics(workdir) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(records) -> dict:
    return {(r["stage"], r["step"]): (r["loss"], r["grad_norm"]) for r in records}


def steps_on_disk(workdir, stage: int) -> list[str]:
    d = Path(workdir) / f"stage{stage}"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    w = tmp_path_factory.mktemp("reference")
    r = run(dict(workdir=str(w), overrides={"compilation_cache_dir": cache}, dump_init=True))
    return dict(r, workdir=w, metrics=metrics(w))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, cache, reference):
    w = str(tmp_path_factory.mktemp("resumed"))
    o = {"compilation_cache_dir": cache}
    runs = {}
    runs["sigterm"] = run(dict(workdir=w, overrides=o, sigterm_at=[1, 2]))
    runs["sigterm_disk"] = steps_on_disk(w, 1)
    runs["killed"] = run(dict(workdir=w, stage="1", overrides=o, kill_on_commit="stage1/4"), expect_rc=137)
    runs["killed_disk"] = steps_on_disk(w, 1)
    n = len(metrics(w))
    runs["stage1"] = run(dict(workdir=w, stage="1", overrides=o))
    runs["stage1_metrics"] = metrics(w)[n:]
    runs["stage1_disk"] = steps_on_disk(w, 1)
    runs["stage2_sigterm"] = run(dict(workdir=w, stage="2", overrides=o, sigterm_at=[2, 2]))
    runs["stage2"] = run(dict(workdir=w, stage="all", overrides=o))
    runs["metrics"] = metrics(w)
    runs["workdir"] = w
    return runs


# ------------------------------------------------------------------------------------------ tests

def test_resumed_run_equals_uninterrupted_run_bitwise(reference, resumed):
    ref = losses(reference["metrics"])
    assert sorted(ref) == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (2, 3), (2, 4)]
    got = losses(resumed["metrics"])          # every step logged once per process that ran it
    assert got == ref
    final = resumed["stage2"]["params"]
    for k, v in reference["params"].items():
        if k.startswith("stage2/"):
            np.testing.assert_array_equal(final[k], v, err_msg=k)
    for k, v in resumed["stage1"]["params"].items():    # stage 1's final, written by the 3rd process
        np.testing.assert_array_equal(v, reference["params"][k], err_msg=k)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(resumed):
    assert resumed["sigterm"]["rc"] == 0
    assert "checkpoint saved at step 2 after SIGTERM" in resumed["sigterm"]["log"]
    assert resumed["sigterm_disk"] == ["2"]
    assert "resumed from the checkpoint at step 2" in resumed["stage2"]["log"]


def test_a_save_killed_before_its_commit_is_never_used(resumed):
    # The process died committing step 4: only a temporary directory holds it.
    assert "2" in resumed["killed_disk"] and "4" not in resumed["killed_disk"]
    assert any(name.startswith("4.orbax-checkpoint-tmp") for name in resumed["killed_disk"])
    # The next run resumed from step 2 and redid steps 3 and 4; the debris is gone.
    assert "resumed from the checkpoint at step 2" in resumed["stage1"]["log"]
    assert [r["step"] for r in resumed["stage1_metrics"]] == [3, 4]
    assert resumed["stage1_disk"] == ["2", "4"]


def test_stage_two_alone_starts_from_stage_one_final_state(reference, resumed):
    assert "stage 2 starts from stage 1's final parameters" in resumed["stage2_sigterm"]["log"]
    assert "stage 1 already finished" in resumed["stage2"]["log"]
    first = [r for r in resumed["metrics"] if r["stage"] == 2][0]
    assert first["step"] == 1
    assert first["loss"] == losses(reference["metrics"])[(2, 1)][0]


def test_frozen_parameters_get_no_update_and_no_optimizer_state(reference):
    p = reference["params"]
    init = {k[len("init/"):]: v for k, v in p.items() if k.startswith("init/")}
    s1 = {k[len("stage1/"):]: v for k, v in p.items() if k.startswith("stage1/")}
    s2 = {k[len("stage2/"):]: v for k, v in p.items() if k.startswith("stage2/")}
    assert set(init) == set(s1) == set(s2)
    for k in init:
        if k.startswith("connector/"):
            continue
        np.testing.assert_array_equal(s1[k], init[k], err_msg=f"stage 1 changed frozen {k}")
        if k.startswith("towers/"):
            np.testing.assert_array_equal(s2[k], s1[k], err_msg=f"stage 2 changed frozen {k}")
    changed = lambda a, b, prefix: [k for k in a if k.startswith(prefix) and not np.array_equal(a[k], b[k])]
    assert changed(s1, init, "connector/vision_sampler_layers/")      # the in-LLM aggregators train in stage 1
    assert changed(s1, init, "connector/mm_projector/")
    assert changed(s2, s1, "decoder/layers/")
    # Optimizer state exists for the trainable parameters only.
    for n, prefixes in ((1, ("connector/",)), (2, ("connector/", "decoder/"))):
        train = reference["train_paths"][str(n)]
        assert train and all(t.startswith(prefixes) for t in train)
        opt = reference["opt_paths"][str(n)]
        assert opt and all(any(t in o for t in train) for o in opt), [o for o in opt if "towers" in o][:3]
        assert not [o for o in opt if "/towers/" in f"/{o}" or (n == 1 and "decoder/" in o)]


def test_metrics_name_every_group_and_the_figures_people_watch(reference):
    from cambrian_jax import optim
    from configs import cambrian_tiny

    cfg = cambrian_tiny.get_config(SWITCHES)
    for r in reference["metrics"]:
        for key in ("stage", "step", "loss", "lr", "grad_norm", "tokens_per_sec", "step_time", "mfu",
                    "tflops_per_device", "supervised_tokens"):
            assert key in r, key
        stage = cfg[f"stage{r['stage']}"]
        assert set(r["lr"]) == {g["name"] for g in stage.lr_groups}
        for g in stage.lr_groups:    # lr of the update that produced this step (HF: 0 on the first)
            want = float(optim.schedule(g["lr"], 4, stage.warmup_ratio)(r["step"] - 1))
            assert r["lr"][g["name"]] == pytest.approx(want, rel=1e-6)
    first = [r for r in reference["metrics"] if r["step"] == 1]
    assert all("compile_time" in r and r["compile_time"] > 0 for r in first)   # reported apart from step time
    assert (Path(reference["workdir"]) / "tensorboard").is_dir()


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, cache):
    r = run(dict(workdir=str(tmp_path), stage="1", overrides={"compilation_cache_dir": cache}, nan_at=[1, 3]))
    assert r["finished"] is False
    assert "the loss became nan at step 3" in r["stopped"]
    assert "last good checkpoint is step 2" in r["stopped"]
    assert steps_on_disk(tmp_path, 1) == ["2"]


def _check_resharded(workdir, second, reference) -> None:
    assert "resumed from the checkpoint at step 2" in second["log"]
    assert any("fsdp" in spec for spec in second["param_specs"].values())    # sharded on the new mesh
    ref = losses(reference["metrics"])
    got = losses(metrics(workdir))
    assert sorted(got)[-2:] == [(1, 3), (1, 4)]
    # Other reduction orders (8 devices, data=2 × fsdp=4): equal to float32 rounding, 1e-5 relative.
    # Observed (1 → 8 devices, test_restore_onto_another_device_count_and_mesh): loss 0 and 2.3e-7
    # relative at steps 3 and 4, grad_norm identical at both.
    for k, (loss, grad_norm) in got.items():
        assert loss == pytest.approx(ref[k][0], rel=1e-5) and grad_norm == pytest.approx(ref[k][1], rel=1e-5)
    for k, v in second["params"].items():
        np.testing.assert_allclose(v, reference["params"][k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_restore_onto_another_device_count_and_mesh(tmp_path, cache, reference, resumed):
    """Stage 1's step-2 checkpoint of the 1-device run, resumed on 8 devices as data=2 × fsdp=4."""
    import shutil

    src = Path(resumed["workdir"])
    shutil.copytree(src / "stage1" / "2", tmp_path / "stage1" / "2")
    shutil.copytree(src / "stage1_frozen", tmp_path / "stage1_frozen")
    o = {"compilation_cache_dir": cache, "mesh.data": 2, "mesh.fsdp": 4}
    second = run(dict(workdir=str(tmp_path), stage="1", overrides=o), devices=8)
    assert second["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    _check_resharded(tmp_path, second, reference)


@pytest.mark.slow
def test_restore_onto_another_mesh(tmp_path, cache, reference):
    """Saved on 8 devices as fsdp=8, resumed as data=2 × fsdp=4: the run continues where it was."""
    o = {"compilation_cache_dir": cache, "mesh.fsdp": 8}
    first = run(dict(workdir=str(tmp_path), stage="1", overrides=o, sigterm_at=[1, 2]), devices=8)
    assert first["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    o = {"compilation_cache_dir": cache, "mesh.data": 2, "mesh.fsdp": 4}
    second = run(dict(workdir=str(tmp_path), stage="1", overrides=o), devices=8)
    assert second["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sorted(losses(metrics(tmp_path))) == [(1, 1), (1, 2), (1, 3), (1, 4)]
    _check_resharded(tmp_path, second, reference)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, cache):
    """Two processes × 4 CPU devices (gloo) train exactly as one process with 8 devices."""
    one = tmp_path / "one"
    run(dict(workdir=str(one), overrides={"compilation_cache_dir": cache, "mesh.fsdp": 8}), devices=8)
    two = tmp_path / "two"
    port = 20000 + os.getpid() % 20000
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}")
    cmd = [sys.executable, "-m", "cambrian_jax.train", f"--config=configs/cambrian_tiny.py:{SWITCHES}",
           f"--workdir={two}", "--config.log_every=1", "--config.checkpoint.save_interval_steps=2",
           f"--config.compilation_cache_dir={cache}", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2"]
    procs = [subprocess.Popen(cmd + [f"--process_id={i}"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    ref, got = losses(metrics(one)), losses(metrics(two))
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k][0] == pytest.approx(ref[k][0], rel=1e-6, abs=1e-7), k


if __name__ == "__main__":
    harness(json.loads(sys.argv[1]))
