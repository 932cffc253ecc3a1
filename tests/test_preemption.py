"""SIGTERM on one host of a two-process run: every host saves at the same step, exits 75, and resumes.

With several processes the trainer (cambrian_jax/trainer.py Preemption) asks JAX's preemption sync
point (jax.experimental.multihost_utils.reached_preemption_sync_point) after each step; the
preemption service that jax.distributed.initialize starts catches SIGTERM in whichever process gets
it and agrees with the others on one step (the fastest host's step + 1) at which all of them save.
A TPU maintenance event signals the hosts of a slice one by one, so the test signals one process
only, through the real entry point (`python -m cambrian_jax.train`), two processes × 1 CPU device
talking through gloo:

  reference    stage 1 of the micro config, STEPS steps, uninterrupted
  preempted    the same run; once process 0 has logged step 1, process 1 gets a SIGTERM
  resumed      the same command again, to the end

The preempted and resumed runs together must log each step once, with the reference's losses, and
end with the reference's parameters, bitwise: the same two processes, mesh and compiled step.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# The preemption notifier polls for SIGTERM once a second (xla/tsl preemption_notifier.cc
# SigtermNotifier), so the stage must outlast the signal by a few seconds: at ~0.1-0.25 s/step on
# an idle 2-core CPU (~0.6 s under load), 30 steps leave 4-7 s after step 1.
STEPS = 30
SWITCHES = f"micro,steps1={STEPS},batch=4"
# Cheap CPU code generation (as tests/test_train.py): compiles about twice as fast, same numbers each run.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
EXIT_PREEMPTED = 75       # cambrian_jax/cli.py EXIT_PREEMPTED
DEADLINE_S = 600          # per run: two processes start, compile (cached after the first run) and train
SAVED = re.compile(r"stage 1: checkpoint saved at step (\d+) after SIGTERM; exiting")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwoProcesses:
    """`python -m cambrian_jax.train` as processes 0 and 1 of one run (1 CPU device each), logs in files."""

    def __init__(self, workdir: Path, cache: str, name: str):
        self.workdir, self.logs = workdir, [workdir.parent / f"{name}.{i}.log" for i in range(2)]
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}")
        # save_interval_steps beyond the stage: the only checkpoints are the preemption's and the final one.
        cmd = [sys.executable, "-m", "cambrian_jax.train", f"--config=configs/cambrian_tiny.py:{SWITCHES}",
               f"--workdir={workdir}", "--stage=1", "--config.log_every=1",
               f"--config.checkpoint.save_interval_steps={10 * STEPS}", f"--config.compilation_cache_dir={cache}",
               f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2"]
        self.procs = []
        for i, log in enumerate(self.logs):
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(cmd + [f"--process_id={i}"], env=env, cwd=REPO, stdout=f,
                                                   stderr=subprocess.STDOUT))
        self.deadline = time.monotonic() + DEADLINE_S

    def log(self, i: int) -> str:
        return self.logs[i].read_text()

    def tails(self) -> str:
        return "".join(f"\n--- process {i} ---\n{self.log(i)[-4000:]}" for i in range(2))

    def wait_for_step(self, step: int) -> None:
        """Until metrics.jsonl (written by process 0 after each logged step) holds `step`."""
        path = self.workdir / "metrics.jsonl"
        while time.monotonic() < self.deadline:
            if path.exists() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()
                                     if line.endswith("}")):
                return
            if any(p.poll() is not None for p in self.procs):
                pytest.fail(f"a process ended before step {step}: {[p.poll() for p in self.procs]}{self.tails()}")
            time.sleep(0.05)
        pytest.fail(f"no step {step} within {DEADLINE_S} s{self.tails()}")

    def wait(self) -> list[int]:
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(1.0, self.deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the run did not end within {DEADLINE_S} s{self.tails()}")
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _run(workdir: Path, cache: str, name: str, sigterm_after_step: int | None = None) -> dict:
    run = TwoProcesses(workdir, cache, name)
    try:
        if sigterm_after_step is not None:
            run.wait_for_step(sigterm_after_step)
            run.procs[1].send_signal(signal.SIGTERM)       # one host only: the service tells the other
        codes = run.wait()
        return dict(codes=codes, logs=[run.log(0), run.log(1)])
    finally:
        run.kill()


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "stage1").iterdir() if p.name.isdigit())


def _final_params(workdir: Path) -> dict:
    import jax

    from cambrian_jax import config as config_lib
    from cambrian_jax import export_hf, optim
    from configs import cambrian_tiny

    cfg = config_lib.from_dict(cambrian_tiny.get_config(SWITCHES).model)
    params, stage, step = export_hf.restore_params(workdir, cfg, stage=1)
    assert (stage, step) == (1, STEPS)
    return {optim.path_str(p): np.asarray(jax.device_get(x)) for p, x in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("preemption")
    cache = str(root / "xla_cache")
    out = {"reference": _run(root / "reference", cache, "reference")}
    out["reference_metrics"] = _metrics(root / "reference")
    w = root / "preempted"
    out["preempted"] = _run(w, cache, "preempted", sigterm_after_step=1)
    out["preempted_metrics"] = _metrics(w)
    out["preempted_checkpoints"] = _checkpoints(w)
    out["resumed"] = _run(w, cache, "resumed")
    out["metrics"] = _metrics(w)
    out["checkpoints"] = _checkpoints(w)
    out["params"], out["reference_params"] = _final_params(w), _final_params(root / "reference")
    return out


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_with_one_checkpoint(runs):
    pre = runs["preempted"]
    assert pre["codes"] == [EXIT_PREEMPTED, EXIT_PREEMPTED], "".join(log[-4000:] for log in pre["logs"])
    # Only process 1 was signalled: the notifier fires there, and the sync point stops both.
    assert "SIGTERM caught" in pre["logs"][1] and "SIGTERM caught" not in pre["logs"][0]
    stops = [SAVED.findall(log) for log in pre["logs"]]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops
    stop = int(stops[0][0])
    assert 1 < stop < STEPS, f"stopped at step {stop} of {STEPS}: not in the middle of the stage"
    assert runs["preempted_checkpoints"] == [stop]
    assert [r["step"] for r in runs["preempted_metrics"]] == list(range(1, stop + 1))
    assert f"resumed from the checkpoint at step {stop}" in runs["resumed"]["logs"][0]
    assert f"resumed from the checkpoint at step {stop}" in runs["resumed"]["logs"][1]


@pytest.mark.slow
def test_resumed_two_process_run_equals_an_uninterrupted_one_bitwise(runs):
    assert runs["reference"]["codes"] == [0, 0], "".join(log[-4000:] for log in runs["reference"]["logs"])
    assert runs["resumed"]["codes"] == [0, 0], "".join(log[-4000:] for log in runs["resumed"]["logs"])
    steps = [r["step"] for r in runs["metrics"]]
    assert steps == list(range(1, STEPS + 1)), steps        # no step lost, none repeated
    assert [r["step"] for r in runs["reference_metrics"]] == steps
    # The same two processes, mesh and compiled step: the restart changes nothing, to the bit.
    ref = {r["step"]: (r["loss"], r["grad_norm"]) for r in runs["reference_metrics"]}
    got = {r["step"]: (r["loss"], r["grad_norm"]) for r in runs["metrics"]}
    assert got == ref
    assert runs["checkpoints"] == sorted({int(SAVED.findall(runs["preempted"]["logs"][0])[0]), STEPS})
    ref_params, params = runs["reference_params"], runs["params"]
    assert set(params) == set(ref_params)
    for k, v in ref_params.items():
        np.testing.assert_array_equal(params[k], v, err_msg=k)
