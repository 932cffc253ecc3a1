"""What a person sees from `train` and `plan` on an ordinary mistake, and the run's record.

Each mistake runs the real command line in a fresh process and must end in one line on stderr, no
traceback, exit 2 (cambrian_jax/cli.py), with nothing written: the workdir is not created. The
record (WORKDIR/config.json, cambrian_jax/workdir.py) makes a workdir refuse another config in one
line naming the fields, and lets the same config (or a change of where it runs) resume. A SIGTERM
exits 75, which a scheduler restarts, not 0, which it reads as finished.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cambrian_jax import cli, workdir
from cambrian_jax.config import ConfigError
from configs import cambrian_tiny

REPO = Path(__file__).resolve().parents[1]
MICRO = "configs/cambrian_tiny.py:micro,steps1=2,steps2=2,batch=8,unfreeze_towers=2"    # conftest.MICRO_RUN


def run(module: str, *args: str, timeout: int = 300, cwd=REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_line(p: subprocess.CompletedProcess, code: int = cli.EXIT_BAD_INPUT) -> str:
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr[-3000:]
    assert p.returncode == code, p.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


TRAIN_MISTAKES = {
    "config path typo": (["--config", "configs/cambrain_tiny.py"], "configs/cambrain_tiny.py does not exist"),
    "override of a field that does not exist": (
        ["--config", "configs/cambrian_tiny.py", "--config.stage2.num_step=100"],
        "--config.stage2.num_step: the config has no field 'num_step' (did you mean 'num_steps'?)"),
    "unknown switch": (["--config", "configs/cambrian_tiny.py:towerz=clip"], "unknown config switch 'towerz'"),
    "remat policy": (["--config", "configs/cambrian_tiny.py", "--config.model.remat=ful"],
                     "config field model.remat: 'ful' is not one of none, full"),
    "template": (["--config", "configs/cambrian_tiny.py", "--config.data.template=llama3"],
                 "config field data.template: unknown conversation template 'llama3'"),
    "prepared data that does not exist": (["--config", "configs/cambrian_tiny.py:data2=/no/such/prepared,one_stage"],
                                          "config field stage2.data.paths: /no/such/prepared does not exist"),
    "schedule": (["--config", "configs/cambrian_tiny.py", "--config.stage2.schedule=linear"],
                 "config field stage2.schedule: 'linear' is not one of cosine"),
    "list override": (["--config", "configs/cambrian_tiny.py", "--config.data.paths=[1]"],
                      "config.data.paths is a list"),
    "unknown flag": (["--config", "configs/cambrian_tiny.py", "--workdirr=/x"], "Unknown command line flag"),
}


@pytest.mark.parametrize("name", sorted(TRAIN_MISTAKES))
def test_train_mistake_is_one_line_exit_2_and_writes_nothing(tmp_path, name):
    args, expected = TRAIN_MISTAKES[name]
    wd = tmp_path / "wd"
    line = one_line(run("cambrian_jax.train", *args, "--workdir", str(wd)))
    assert expected in line, line
    assert not wd.exists()


def test_plan_mistakes_are_one_line_exit_2():
    assert "does not exist" in one_line(run("cambrian_jax.plan", "--config", "configs/cambrain_tiny.py",
                                            "--topology", "v4-8"))
    assert "topology 'v9-8'" in one_line(run("cambrian_jax.plan", "--config", "configs/cambrian_tiny.py",
                                             "--topology", "v9-8"))
    assert "workdir /no/such/run does not exist" in one_line(run("cambrian_jax.plan", "--workdir", "/no/such/run",
                                                                 "--topology", "v4-8"))


# ------------------------------------------------------------------------------------------ the record

def test_record_refuses_another_config_and_accepts_where_it_runs(tmp_path):
    config = cambrian_tiny.get_config("micro")
    assert workdir.check_or_write(tmp_path, config, {"argv": ["x"]}) is False
    rec = json.loads((tmp_path / "config.json").read_text())
    assert rec["config"]["seed"] == 0 and rec["command"] == {"argv": ["x"]} and rec[workdir.MARKER] == 1
    assert workdir.check_or_write(tmp_path, cambrian_tiny.get_config("micro")) is True      # equal: resume
    moved = cambrian_tiny.get_config("micro")
    moved.mesh.fsdp, moved.log_every, moved.checkpoint.keep, moved.data.worker_count = 2, 5, 9, 3
    assert workdir.check_or_write(tmp_path, moved) is True                                  # operational only
    other = cambrian_tiny.get_config("micro,steps2=7")
    other.seed = 1
    with pytest.raises(ConfigError) as e:
        workdir.check_or_write(tmp_path, other)
    msg = str(e.value)
    assert "seed: 0 recorded, 1 now" in msg and "stage2.num_steps: 600 recorded, 7 now" in msg
    assert "\n" not in msg
    assert workdir.config(tmp_path).seed == 0


def test_train_refuses_a_workdir_of_another_config_in_one_line(tmp_path):
    wd = tmp_path / "run"
    workdir.check_or_write(wd, cambrian_tiny.get_config(MICRO.partition(":")[2]))
    before = sorted(os.listdir(wd))
    line = one_line(run("cambrian_jax.train", "--config", MICRO, "--config.seed=1", "--workdir", str(wd)))
    assert f"workdir {wd} belongs to another config (seed: 0 recorded, 1 now)" in line
    assert sorted(os.listdir(wd)) == before


def test_sigterm_exits_75_with_a_checkpoint_and_the_record(tmp_path):
    """The CLI's own SIGTERM path: checkpoint saved, exit EX_TEMPFAIL; then the same command resumes."""
    wd = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "cambrian_jax.train", "--config", "configs/cambrian_tiny.py:micro,steps1=400,batch=8",
           "--config.log_every=1", "--config.stages=(1,)", "--workdir", str(wd)]
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    for line in p.stderr:
        if "stage 1 step 2/" in line or time.time() > deadline:
            break
    p.send_signal(signal.SIGTERM)
    rest = p.stderr.read()
    assert p.wait(timeout=120) == cli.EXIT_PREEMPTED, rest[-3000:]
    assert "after SIGTERM" in rest
    record = json.loads((wd / "config.json").read_text())
    assert record["command"]["switches"] == "micro,steps1=400,batch=8"
    assert "--config.stages=(1,)" in record["command"]["overrides"]
    assert any(d.isdigit() for d in os.listdir(wd / "stage1"))


def test_plan_reads_the_record_and_says_it_is_compiling(tmp_path):
    workdir.check_or_write(tmp_path, cambrian_tiny.get_config("micro,batch=8"))
    p = run("cambrian_jax.plan", "--workdir", str(tmp_path), "--topology", "v4-8", "--stage", "1", "--json",
            "--compiler", "cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "stage 1: compiling the training step for v4-8 with 4 simulated CPU devices (an estimate)" in p.stderr
    out = json.loads(p.stdout)
    assert out["config"] == f"{tmp_path}/config.json" and out["fits"] and out["global_batch"] == 8


def test_plan_help_says_what_search_prefers():
    p = run("cambrian_jax.plan", "--helpshort")
    text = " ".join(p.stdout.split())
    assert "the one with the shortest predicted run" in text and "--compiler" in text


def test_progress_bar_postfix_fits_and_the_whole_line_is_printed(monkeypatch, capsys):
    from cambrian_jax import trainer

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    progress = trainer.Progress(2, 0, 450)
    assert progress.bar is not None
    rec = dict(loss=1.23456, grad_norm=0.5, lr={"towers": 2e-3, "rest": 2e-3}, tokens_per_sec=1234.0, step_time=0.5,
               tflops_per_device=0.01, mfu=0.001)
    progress.step()
    progress.log(1, rec)
    assert len(progress.bar.postfix) <= 20, progress.bar.postfix
    progress.close()
    err = capsys.readouterr().err
    assert "stage 2 step 1/450: loss 1.2346 grad_norm 0.500 lr towers=2.00e-03 rest=2.00e-03" in err


def test_the_backend_probe_is_kept_out_of_the_log():
    import logging

    from cambrian_jax import train

    quiet = train._QuietLibraries()

    def record(path, level=logging.INFO, msg="x"):
        return logging.LogRecord("absl", level, path, 1, msg, None, None)

    assert not quiet.filter(record("/site-packages/jax/_src/xla_bridge.py", msg="Unable to initialize backend 'tpu'"))
    assert quiet.filter(record("/site-packages/jax/_src/xla_bridge.py", level=logging.WARNING))
    assert quiet.filter(record("/work/cambrian_jax/trainer.py"))


# ------------------------------------------------------------------------------------------ a finished run

@pytest.fixture(scope="module")
def micro_run(micro_workdir, tmp_path_factory) -> Path:
    """A copy of conftest's finished micro run (these tests resume it)."""
    import shutil

    wd = tmp_path_factory.mktemp("micro") / "run"
    shutil.copytree(micro_workdir[0], wd)
    return wd


def test_a_finished_run_resumes_only_with_its_own_config(micro_run):
    p = run("cambrian_jax.train", "--config", MICRO, "--workdir", str(micro_run))
    assert p.returncode == 0 and "stage 2 already finished" in p.stderr, p.stderr[-3000:]
    line = one_line(run("cambrian_jax.train", "--config", MICRO.replace("batch=8", "batch=4"), "--workdir",
                        str(micro_run)))
    assert "belongs to another config (stage1.global_batch_size: 8 recorded, 4 now; stage2.global_batch_size" in line


def test_generate_and_export_refuse_a_config_that_is_not_the_runs(micro_run, tmp_path):
    other = MICRO + ",connector_only"
    out = tmp_path / "hf"
    for module, args in (("cambrian_jax.generate", ["--checkpoint", str(micro_run), "--prompt", "hi"]),
                         ("cambrian_jax.export_hf", ["--workdir", str(micro_run), "--out", str(out)])):
        line = one_line(run(module, *args, "--config", other))
        assert f"--config {other} is not the config of the run in {micro_run}" in line
        assert "model.connector.connector_only" in line
    assert not out.exists()


def test_a_mismatched_checkpoint_without_a_record_is_one_line(micro_run, tmp_path):
    """A workdir from before the record: the restore itself names the mismatch."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(micro_run, old)
    (old / "config.json").unlink()
    other = MICRO + ",connector_only"
    line = one_line(run("cambrian_jax.generate", "--checkpoint", str(old), "--config", other, "--prompt", "hi"))
    assert "does not hold the parameters of this model config" in line
