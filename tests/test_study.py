"""The study runner (cambrian_jax.study): its plan, its value parsing, its table, resuming and failures.

The fast tests replace the child process by a fake that writes what a run writes (eval_results.json,
metrics.jsonl), so the plan, the table and the skip/failure logic are checked in milliseconds. The
real child: one killed at --timeout (seconds); the slow tests train real `micro` runs end to end in
child processes, and stop one mid-stage with SIGTERM to resume it.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cambrian_jax import study, workdir
from cambrian_jax.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "cambrian_tiny.py")
MICRO = f"{TINY}:micro,steps1=1,steps2=1,batch=8"
EVAL = "config.eval={'num_samples': 8, 'tasks': ('count', 'depth'), 'batch_size': 8}"


def _read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _md_rows(path) -> list[list[str]]:
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


# ------------------------------------------------------------------------------------------ the plan

def test_plan_is_the_cross_product_of_switches_and_config_paths():
    runs = study.plan(MICRO, sweeps=["steps2=1,3", "model.connector.connector_only=false,true"], sets=[EVAL])
    assert [r.name for r in runs] == [
        "steps2=1,model.connector.connector_only=false", "steps2=1,model.connector.connector_only=true",
        "steps2=3,model.connector.connector_only=false", "steps2=3,model.connector.connector_only=true"]
    for r in runs:
        c = study.build_config(TINY, r.switches, r.overrides)
        assert c.stage2.num_steps == int(r.values["steps2"])
        assert c.model.connector.connector_only is (r.values["model.connector.connector_only"] == "true")
        assert c.stage1.num_steps == 1 and c.eval.num_samples == 8 and c.eval.tasks == ("count", "depth")


def test_runs_file_times_sweeps(tmp_path):
    f = tmp_path / "runs.txt"
    f.write_text("# tower sets\nconfig.seed=1 steps1=2\n\nconfig.seed=2 steps1=3  # another\n")
    runs = study.plan(MICRO, sweeps=["steps2=1,2"], sets=[EVAL], runs_file=str(f))
    assert [r.name for r in runs] == ["config.seed=1,steps1=2,steps2=1", "config.seed=1,steps1=2,steps2=2",
                                      "config.seed=2,steps1=3,steps2=1", "config.seed=2,steps1=3,steps2=2"]
    c = study.build_config(TINY, runs[3].switches, runs[3].overrides)
    assert (c.seed, c.stage1.num_steps, c.stage2.num_steps) == (2, 3, 2)


def test_values_split_on_top_level_commas_only():
    assert study.split_values("a,(1, 2),'x,y',{'k': [1, 2]}") == ["a", "(1, 2)", "'x,y'", "{'k': [1, 2]}"]
    assert study.run_name({"data.synthetic.tasks": "('count', 'depth')", "lr": "1e-3"}) == \
        "data.synthetic.tasks=count+depth,lr=1e-3"


def test_overrides_are_parsed_as_the_config_flags_parse_them():
    """The same `--config.x=y` texts through ml_collections' own flag parser give the same config."""
    from absl import flags
    from ml_collections import config_flags

    overrides = {"stage2.num_steps": "7", "seed": "3", "data.synthetic.tasks": "('count', 'depth')",
                 "model.connector.connector_only": "true", "stage2.warmup_ratio": "0.5",
                 "data.template": "llama_3", "data.shuffle": "False"}
    argv = ["prog", f"--config={TINY}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=False, sys_argv=argv)
    fv(argv)
    ours = study.build_config(TINY, [], list(overrides.items()))
    assert ours.to_dict() == fv.config.to_dict()
    assert ours.stage2.warmup_ratio == 0.5 and ours.data.shuffle is False


@pytest.mark.parametrize("kw, message", [
    (dict(sweeps=["stepz=1,2"]), r"unknown config switch 'stepz'"),
    (dict(sweeps=["log_every=1,2"]), r"write config\.log_every=\.\.\."),
    (dict(sweeps=["stage2.num_stepz=1,2"]), r"config field stage2\.num_stepz: not in the config"),
    (dict(sweeps=["stage2.num_steps=1,x"]), r"config field stage2\.num_steps: cannot read 'x' as int"),
    (dict(sweeps=["model.connector.image_token_len=16,15"]), r"run model\.connector\.image_token_len=15: "
                                                              r"config field model\.image_token_len"),
    (dict(sweeps=["steps2=1,2"], sets=["steps2=3"]), r"'steps2' is both --set and varied"),
    (dict(sweeps=["steps2=1,01"]), r"share the folder"),
    (dict(sweeps=["steps2=1,2"], sets=[]), r"config field eval is empty"),
    (dict(sweeps=["steps2=1,2"], sets=["config.eval.num_samples=4"]), r"config field eval: is None"),
])
def test_config_errors_stop_the_study_before_any_run(kw, message, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "launch", lambda *a: pytest.fail("a run started"))
    kw = dict(dict(sets=[EVAL]), **kw)
    if "share the folder" in message:       # 1 and 01 are both valid, distinct texts for one folder name
        monkeypatch.setattr(study, "run_name", lambda values: "same")
    with pytest.raises(ConfigError, match=message):
        study.run_study(MICRO, str(tmp_path), **kw)
    assert not list(tmp_path.glob("*/run.json"))


def test_planning_never_starts_a_jax_backend():
    """The parent only plans: on an accelerator the device stays free for each run's child process."""
    code = ("from cambrian_jax import study\n"
            f"runs = study.plan({MICRO!r}, ['steps2=1,2'], [{EVAL!r}])\n"
            "import jax._src.xla_bridge as xb\n"
            "print(len(runs), sorted(xb._backends))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split("\n")[-2] == "2 []"


# ------------------------------------------------------------------------------------------ the table

def _fake_results(steps2: int) -> dict:
    return {"accuracy": 0.25 * steps2, "accuracy_blind": 0.125 * steps2, "chance": 0.375, "num_questions": 8,
            "per_task": {"count": {"accuracy": 0.5 / steps2, "accuracy_blind": 0.25, "chance": 0.25, "count": 4},
                         "depth": {"accuracy": 0.0, "accuracy_blind": 0.5, "chance": 0.5, "count": 4}}}


class FakeLauncher:
    """Writes what a child writes; runs whose steps2 is in `fail` exit 1 without results."""

    def __init__(self, fail=()):
        self.calls: list[str] = []
        self.fail = set(fail)

    def __call__(self, run_dir, cache_dir, timeout):
        spec = json.loads((run_dir / "run.json").read_text())
        config = study.build_config(spec["config"], spec["switches"], [tuple(o) for o in spec["overrides"]])
        steps2 = config.stage2.num_steps
        self.calls.append(run_dir.name)
        with open(run_dir / "metrics.jsonl", "a") as f:
            for stage, steps in ((1, config.stage1.num_steps), (2, steps2)):
                for step in range(1, steps + 1):
                    f.write(json.dumps({"stage": stage, "step": step, "loss": 10.0 * stage - step}) + "\n")
        if steps2 in self.fail:
            (run_dir / "train.log").write_text("Traceback ...\nValueError: the fake run broke\n")
            return 1
        (run_dir / "eval_results.json").write_text(json.dumps(_fake_results(steps2)))
        return 0


def test_table_holds_each_runs_results_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    fake = FakeLauncher(fail={2})
    monkeypatch.setattr(study, "launch", fake)
    rows = study.run_study(MICRO, str(tmp_path), sweeps=["steps2=1,2,3"], sets=[EVAL])
    assert fake.calls == ["steps2=1", "steps2=2", "steps2=3"]
    out = capsys.readouterr().out
    assert "[1/3] steps2=1: accuracy 0.250 blind 0.125 chance 0.375" in out and "ETA" in out
    assert "[2/3] steps2=2: failed (exit 1): ValueError: the fake run broke" in out
    assert "not finished: ['steps2=2']" in out

    table = _read_csv(tmp_path / "study.csv")
    assert [r["run"] for r in table] == ["steps2=1", "steps2=2", "steps2=3"]
    assert list(table[0])[:10] == ["run", "steps2", "status", "accuracy", "accuracy_blind", "chance", "count",
                                   "count_blind", "depth", "depth_blind"]
    for r, raw in zip(table, rows):
        run_dir = tmp_path / r["run"]
        assert r["steps2"] == run_dir.name.split("=")[1]
        assert float(r["s1_steps"]) == 1 and float(r["s1_loss"]) == 9.0
        assert float(r["wall_s"]) >= 0
        if r["status"] != "ok":
            assert r["status"] == "failed (exit 1)" and r["accuracy"] == ""
            continue
        res = json.loads((run_dir / "eval_results.json").read_text())
        for key in ("accuracy", "accuracy_blind", "chance"):
            assert float(r[key]) == res[key] == raw[key]
        for task, v in res["per_task"].items():
            assert float(r[task]) == v["accuracy"] and float(r[f"{task}_blind"]) == v["accuracy_blind"]
        assert int(r["s2_steps"]) == int(r["steps2"]) and float(r["s2_loss"]) == 20.0 - int(r["steps2"])

    md = _md_rows(tmp_path / "study.md")
    assert md[0] == ["steps2", "status", "accuracy", "blind", "chance", "count", "depth", "s1_steps", "s1_loss",
                     "s2_steps", "s2_loss", "wall"]
    assert md[2][:7] == ["1", "ok", "0.250", "0.125", "0.375", "0.500", "0.000"]
    assert md[3][:3] == ["2", "failed (exit 1)", ""]
    assert md[4][:7] == ["3", "ok", "0.750", "0.375", "0.375", "0.167", "0.000"]

    # Re-running: finished runs are skipped, the failed one is tried again (and now succeeds).
    again = FakeLauncher()
    monkeypatch.setattr(study, "launch", again)
    study.run_study(MICRO, str(tmp_path), sweeps=["steps2=1,2,3"], sets=[EVAL])
    assert again.calls == ["steps2=2"]
    assert "[1/3] steps2=1: finished earlier, skipped" in capsys.readouterr().out
    table2 = _read_csv(tmp_path / "study.csv")
    assert table2[0] == table[0] and table2[2] == table[2]
    assert table2[1]["status"] == "ok" and float(table2[1]["accuracy"]) == 0.5
    attempts = json.loads((tmp_path / "steps2=2" / "study_run.json").read_text())["attempts"]
    assert [a["rc"] for a in attempts] == [1, 0]

    # The same folder with other settings is refused rather than mixed into the table.
    with pytest.raises(ConfigError, match=r"holds a run with other settings"):
        study.run_study(MICRO, str(tmp_path), sweeps=["steps2=1,2,3"], sets=[EVAL, "config.seed=5"])


def test_cli_exit_codes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "launch", FakeLauncher())
    assert study.main(["--config", MICRO, "--workdir", str(tmp_path), "--sweep", "steps2=1", "--set", EVAL]) == 0
    monkeypatch.setattr(study, "launch", FakeLauncher(fail={2}))
    assert study.main(["--config", MICRO, "--workdir", str(tmp_path), "--sweep", "steps2=1,2", "--set", EVAL]) == 1
    assert study.main(["--config", MICRO, "--workdir", str(tmp_path), "--sweep", "stepz=1"]) == 2
    assert "config error: run stepz=1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ end to end

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.mark.slow
def test_two_real_runs_train_evaluate_and_resume(tmp_path, monkeypatch, capsys):
    """Two micro runs (1 + 1 and 1 + 2 steps, 8 eval questions) in child processes, ~3 min on 2 cores."""
    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)
    args = dict(sweeps=["steps2=1,2"], sets=[EVAL, "config.log_every=1"])
    rows = study.run_study(MICRO, str(tmp_path), **args)
    assert [r["status"] for r in rows] == ["ok", "ok"], capsys.readouterr().out
    table = _read_csv(tmp_path / "study.csv")
    for r in table:
        run_dir = tmp_path / r["run"]
        res = json.loads((run_dir / "eval_results.json").read_text())
        assert res["num_questions"] == 8 and set(res["per_task"]) == {"count", "depth"}
        for key in ("accuracy", "accuracy_blind", "chance"):
            assert float(r[key]) == pytest.approx(res[key], abs=0)
        for task, v in res["per_task"].items():
            assert float(r[task]) == v["accuracy"]
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert int(r["s1_steps"]) == 1 and int(r["s2_steps"]) == int(r["steps2"])
        assert float(r["s2_loss"]) == [m["loss"] for m in metrics if m["stage"] == 2][-1]
        assert workdir.config(run_dir).stage2.num_steps == int(r["steps2"])     # the run record
    assert list((tmp_path / "xla_cache").iterdir())       # the children shared their compiled programs
    monkeypatch.setattr(study, "launch", lambda *a: pytest.fail("a finished run started again"))
    study.run_study(MICRO, str(tmp_path), **args)
    assert _read_csv(tmp_path / "study.csv") == table


def test_a_benchmark_replaces_the_config_evaluation(tmp_path, monkeypatch):
    fake = FakeLauncher()
    monkeypatch.setattr(study, "launch", fake)
    bench = ("cv_bench", str(tmp_path / "cvb"))
    study.run_study(MICRO, str(tmp_path), sweeps=["steps2=1"], benchmark=bench)     # micro: no config.eval
    spec = json.loads((tmp_path / "steps2=1" / "run.json").read_text())
    assert (spec["benchmark"], spec["benchmark_data"]) == bench
    assert "evaluated on cv_bench" in (tmp_path / "study.md").read_text()
    with pytest.raises(ConfigError, match="holds a run with other settings"):
        study.run_study(MICRO, str(tmp_path), sweeps=["steps2=1"], benchmark=("local", bench[1]))


@pytest.mark.slow
def test_a_real_run_evaluated_on_a_local_benchmark(tmp_path, monkeypatch):
    """One micro run (1 + 1 steps) evaluated by cambrian_jax.evaluate on 8 synthetic test questions."""
    from cambrian_jax.data import synthetic

    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)
    data = synthetic.write(str(tmp_path / "synth"), 8, "test")
    rows = study.run_study(MICRO, str(tmp_path / "study"), sweeps=["steps2=1"], benchmark=("local", data))
    assert rows[0]["status"] == "ok"
    run_dir = tmp_path / "study" / "steps2=1"
    res = json.loads((run_dir / "eval_results.json").read_text())
    assert res == json.loads((run_dir / "eval_local" / "results.json").read_text())
    assert res["num_questions"] == 8 and set(res["per_task"]) == {"count", "relation", "depth"}
    row = _read_csv(tmp_path / "study" / "study.csv")[0]
    for key in ("accuracy", "accuracy_blind", "chance"):
        assert float(row[key]) == res[key]
    for task, v in res["per_task"].items():
        assert float(row[task]) == v["accuracy"] and float(row[f"{task}_blind"]) == v["accuracy_blind"]


# ------------------------------------------------------------------------------------------ the real child

def _children(run_dir: Path) -> list[int]:
    """Live (not zombie) processes whose command line is the study's `--run-one run_dir` child."""
    target = str(run_dir.resolve()).encode()
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"--run-one" in cmd and target in cmd and state != "Z":
            pids.append(int(p.name))
    return pids


def test_a_real_child_past_the_timeout_is_killed_and_recorded(tmp_path, capsys):
    """The real launch: the child (a micro run, minutes of compiling) is stopped at --timeout 3 s."""
    t0 = time.time()
    rows = study.run_study(MICRO, str(tmp_path), sweeps=["steps2=1"], sets=[EVAL], timeout=3)
    wall = time.time() - t0
    run_dir = tmp_path / "steps2=1"
    assert wall < 60                                  # not the whole run: ~2 min of compiling and training
    assert not _children(run_dir)                     # killed, not left running
    assert rows[0]["status"] == "failed (exit 124)"
    assert _read_csv(tmp_path / "study.csv")[0]["status"] == "failed (exit 124)"
    attempts = json.loads((run_dir / "study_run.json").read_text())["attempts"]
    assert [a["rc"] for a in attempts] == [124] and 3 <= attempts[0]["wall_s"] < 60
    assert (run_dir / "train.log").read_text().rstrip().endswith("=== stopped after --timeout 3 s")
    assert not (run_dir / "eval_results.json").exists()
    assert "steps2=1: failed (exit 124)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_real_run_stopped_mid_stage_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """SIGTERM to the real child during stage 1 (40 steps): it checkpoints and exits 75; the study
    re-run resumes the run from that checkpoint instead of restarting it (~2 min on 2 cores)."""
    import signal
    import threading

    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)
    args = dict(sweeps=["steps1=40"], sets=[EVAL, "config.log_every=1"])
    run_dir = tmp_path / "steps1=40"

    def stage1_steps() -> list[int]:
        path = run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(x)["step"] for x in lines if x.strip() and json.loads(x)["stage"] == 1]

    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(rows=study.run_study(MICRO, str(tmp_path), **args)))
    thread.start()
    deadline = time.time() + 600
    while thread.is_alive() and not stage1_steps() and time.time() < deadline:
        time.sleep(0.05)
    pids = _children(run_dir)
    assert len(pids) == 1 and stage1_steps(), "the child never reached its first step"
    os.kill(pids[0], signal.SIGTERM)
    thread.join(600)
    assert first["rows"][0]["status"] == "stopped (SIGTERM)"
    k = stage1_steps()[-1]
    assert 1 <= k < 40 and stage1_steps() == list(range(1, k + 1))
    assert (run_dir / "stage1" / str(k)).is_dir() and not (run_dir / "eval_results.json").exists()

    rows = study.run_study(MICRO, str(tmp_path), **args)
    assert rows[0]["status"] == "ok"
    log = (run_dir / "train.log").read_text()
    assert f"stage 1: resumed from the checkpoint at step {k}" in log
    assert stage1_steps() == list(range(1, 41))       # steps k+1 … 40 follow k: nothing trained twice
    assert [a["rc"] for a in json.loads((run_dir / "study_run.json").read_text())["attempts"]] == [75, 0]
    assert int(_read_csv(tmp_path / "study.csv")[0]["s1_steps"]) == 40
