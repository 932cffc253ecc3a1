"""Every example the README and docs/ present as something to run is run here, as a new user would.

A fenced block's info string says what it is:

  ```sh        commands, run from the root of a fresh copy of the repository (the tracked files only),
               in order within the file; `\\` continues a line, `#` starts a comment
  ```console   the same with `$ ` before each command and, below it, the output it prints, which must
               appear in what the command prints when the run is the real main job (see below)
  ```python    a snippet, run in a fresh process from a directory outside the repository
  ```sh skip: <why>   (or console/python) shown, not run here, for the reason given (a TPU pod, released
               weights, an interactive chat, the test suite itself)
  ```text / json / anything else   not code: outputs, file layouts, synopses with placeholders

Commands and snippets that are not fenced cannot hide from this: a README line indented as code that
starts a command (`python -m`, `$ `, `./`) fails the layout test.

`/tmp/cambrian_tiny` in an example is the README main job's workdir. With CAMBRIAN_MAIN_JOB set to the
workdir of that job run as written (CI does so), examples run against it and shown outputs are
compared; otherwise a shortened run of the same config stands in (2 + 2 steps) and only the exit codes
are checked. Training commands (`cambrian_jax.train`, `cambrian_jax.study`) and `launch_tpu.sh` run
with their dry-run flags: every check they make before training, none of the training, which the main
job itself covers.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]
MAIN_WORKDIR = "/tmp/cambrian_tiny"
RUN = ("sh", "console", "python")
DRY = {"cambrian_jax.train": "--dry_run", "cambrian_jax.study": "--dry-run", "launch_tpu.sh": "--dry-run"}


def blocks(path: Path) -> list[dict]:
    """Fenced blocks of a Markdown file: lang, flags (the rest of the info string), text, line."""
    out, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*(.*)$", lines[i])
        if m:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append(dict(lang=m.group(1), flags=m.group(2), text="\n".join(lines[i + 1:j]), line=i + 1,
                            file=path.relative_to(REPO).as_posix()))
            i = j
        i += 1
    return out


def examples() -> list[dict]:
    return [b for p in DOCS for b in blocks(p) if b["lang"] in RUN and not b["flags"].startswith("skip")]


def _id(b: dict) -> str:
    return f"{b['file']}:{b['line']}"


def commands(block: dict) -> list[tuple[str, str]]:
    """(command, expected output) pairs: console blocks keep the output below each `$ ` line."""
    pairs: list[list[str]] = []
    lines = block["text"].splitlines()
    k = 0
    while k < len(lines):
        line = lines[k]
        if block["lang"] == "console" and not line.startswith("$ "):
            if pairs:
                pairs[-1][1] += line + "\n"
            k += 1
            continue
        cmd = line[2:] if block["lang"] == "console" else line
        while cmd.rstrip().endswith("\\") and k + 1 < len(lines):
            k += 1
            cmd = cmd.rstrip()[:-1] + " " + lines[k].strip()
        heredoc = re.search(r"<<\s*'?(\w+)'?\s*$", cmd)
        if heredoc:                          # cat > file <<'EOF' … EOF: the body belongs to the command
            end = heredoc.group(1)
            body = []
            while k + 1 < len(lines) and lines[k + 1].strip() != end:
                k += 1
                body.append(lines[k])
            k += 1
            cmd = cmd + "\n" + "\n".join(body) + "\n" + end
        k += 1
        if cmd.strip() and not cmd.lstrip().startswith("#"):
            pairs.append([cmd, ""])
    return [(c, o) for c, o in pairs]


def dry(cmd: str) -> str:
    for marker, flag in DRY.items():
        if marker in cmd.split("\n")[0] and flag not in cmd:
            head, sep, rest = cmd.partition("#")           # before a trailing comment
            return head.rstrip() + f" {flag}" + (f"  {sep}{rest}" if sep else "")
    return cmd


# ------------------------------------------------------------------------------------------ layout

def test_every_example_is_fenced_and_labelled():
    """No command hides in an indented block; every runnable-looking fence has a label this file knows."""
    problems = []
    for path in DOCS:
        fenced = False
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```"):
                fenced = not fenced
                if fenced and line.strip() == "```":
                    problems.append(f"{path.name}:{n}: a fence without a label (sh, console, python, text, json…)")
                continue
            if not fenced and re.match(r"^ {4,}(\$ |python3? -m |\./|\.venv/bin/)", line):
                problems.append(f"{path.name}:{n}: a command in an indented block: fence it (```sh)")
    for b in (b for p in DOCS for b in blocks(p)):
        if b["flags"].startswith("skip") and not re.match(r"skip: \S", b["flags"]):
            problems.append(f"{_id(b)}: `skip` needs a reason (```sh skip: needs a TPU pod)")
    assert not problems, "\n".join(problems)


def test_the_readme_starts_with_the_two_commands():
    """.ci/run runs these two lines (the main job and the tests) exactly as the README gives them."""
    first = [c for b in blocks(REPO / "README.md")[:2] for c, _ in commands(b)]
    assert len(first) == 2 and all(c.startswith("python3 -m venv .venv") for c in first), first
    assert "cambrian_jax.train --config configs/cambrian_tiny.py --workdir /tmp/cambrian_tiny" in first[0]
    assert "pytest -q tests" in first[1]
    assert "readme_commands" in (REPO / ".ci" / "run").read_text()


# ------------------------------------------------------------------------------------------ running

@pytest.fixture(scope="module")
def main_job(tmp_path_factory) -> tuple[str, bool]:
    """(workdir, real): the README main job's workdir, or a shortened run of the same config."""
    given = os.environ.get("CAMBRIAN_MAIN_JOB")
    if given:
        assert (Path(given) / "eval_results.json").exists(), f"CAMBRIAN_MAIN_JOB={given} holds no finished main job"
        return given, True
    wd = tmp_path_factory.mktemp("main_job") / "cambrian_tiny"
    p = subprocess.run([sys.executable, "-m", "cambrian_jax.train", "--config",
                        "configs/cambrian_tiny.py:steps1=2,steps2=2,eval_samples=8", "--workdir", str(wd)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    return str(wd), False


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory) -> Path:
    """The tracked files of the repository, as a fresh clone has them."""
    dest = tmp_path_factory.mktemp("clone") / "cambrian_jax"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    return dest


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])   # `python` = ours
    env.pop("XLA_FLAGS", None)
    return env


# An accuracy the main job's model scores on the 40-question synthetic split (0.000-1.000, three decimals)
# may differ from the one shown by one question of its smallest group (13): XLA rounds differently on
# another processor, and 600 training steps amplify it (as TABLE_TOLERANCE for the 240-question table).
ACCURACY = re.compile(r"^[01]\.\d{3}$")
EXAMPLE_ACCURACY_TOLERANCE = 1 / 13 + 1e-3


def _same_line(shown: str, printed: str) -> bool:
    a, b = shown.split(), printed.split()
    return len(a) == len(b) and all(
        x == y or (ACCURACY.match(x) and ACCURACY.match(y) and abs(float(x) - float(y)) <= EXAMPLE_ACCURACY_TOLERANCE)
        for x, y in zip(a, b))


def _shown_in(expected: str, got: str) -> bool:
    """Every non-empty line shown appears in the output, in order (whitespace runs compared as one;
    accuracies within EXAMPLE_ACCURACY_TOLERANCE)."""
    norm = [" ".join(line.split()) for line in got.splitlines()]
    pos = 0
    for line in (" ".join(x.split()) for x in expected.splitlines() if x.strip()):
        while pos < len(norm) and not _same_line(line, norm[pos]):
            pos += 1
        if pos == len(norm):
            return False
        pos += 1
    return True


def test_shown_output_allows_one_question_in_an_accuracy_and_nothing_else():
    shown = "task count                        0.429   0.286   0.250     14"
    assert _shown_in(shown, "x\ntask count 0.357 0.286 0.250 14\ny")           # one question of 14 fewer
    assert not _shown_in(shown, "task count 0.286 0.286 0.250 14")              # two
    assert not _shown_in(shown, "task count 0.429 0.286 0.250 13")              # a count is exact
    assert not _shown_in(shown, "task depth 0.429 0.286 0.250 14")              # and so is every word


@pytest.mark.parametrize("block", examples(), ids=_id)
def test_example_runs(block, main_job, fresh_copy, tmp_path):
    workdir, real = main_job
    if block["lang"] == "python":
        script = tmp_path / "example.py"
        script.write_text(block["text"].replace(MAIN_WORKDIR, workdir))
        p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, f"{_id(block)}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
        return
    for cmd, expected in commands(block):
        if cmd.startswith("python3 -m venv"):
            continue                      # the two README commands: .ci/run runs them as written
        run = dry(cmd.replace(MAIN_WORKDIR, workdir))
        p = subprocess.run(["bash", "-c", "set -eo pipefail\n" + run], cwd=fresh_copy, env=_env(),
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, f"{_id(block)}: {run}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
        if expected and real:
            got = p.stdout + p.stderr
            assert _shown_in(expected, got), f"{_id(block)}: {cmd}\nshown:\n{expected}\nprinted:\n{got[-3000:]}"


TABLE_TOLERANCE = 0.03


def test_the_main_job_table_is_the_real_one(main_job):
    """The README's table of the main job is what the main job prints (its eval_results.json)."""
    import json

    workdir, real = main_job
    if not real:
        pytest.skip("CAMBRIAN_MAIN_JOB is not set: the table belongs to the full main job, which CI runs")
    r = json.loads((Path(workdir) / "eval_results.json").read_text())
    text = "\n".join(p.read_text() for p in DOCS)
    table = re.search(r"```text\ntask        accuracy   blind  chance     n\n(.*?)```", text, re.S).group(1)
    rows = {line.split()[0]: [float(x) for x in line.split()[1:4]] for line in table.strip().splitlines()}
    # XLA compiles CPU code for the processor it runs on, so another machine rounds differently and 600
    # steps amplify it: the figures shown were made on one machine (and repeat there exactly); elsewhere
    # each must be within TABLE_TOLERANCE (2 of 80 questions), chance exactly.
    assert rows["all"][2] == round(r["chance"], 3), rows
    assert rows["all"][:2] == pytest.approx([r["accuracy"], r["accuracy_blind"]], abs=TABLE_TOLERANCE), rows
    for task, v in r["per_task"].items():
        assert rows[task][:2] == pytest.approx([v["accuracy"], v["accuracy_blind"]], abs=TABLE_TOLERANCE), (
            task, rows[task], v)


# What "the main job learns" means, as issue thresholds: with images well above chance, without them at chance.
LEARNED_MARGIN = 0.25     # accuracy with images >= chance + this
BLIND_MARGIN = 0.10       # accuracy with grey images <= chance + this (the text alone must not tell)


def test_the_main_job_learns(main_job):
    """The README main job, as written, beats chance by LEARNED_MARGIN with images and not blind, and its
    loss falls in both stages (metrics.jsonl): figures of the run CI makes, not timings."""
    import json

    workdir, real = main_job
    if not real:
        pytest.skip("CAMBRIAN_MAIN_JOB is not set: only the full main job, which CI runs, has learned")
    r = json.loads((Path(workdir) / "eval_results.json").read_text())
    assert r["accuracy"] >= r["chance"] + LEARNED_MARGIN, (
        f"accuracy {r['accuracy']:.3f} < chance {r['chance']:.3f} + {LEARNED_MARGIN}: the main job no longer learns")
    assert r["accuracy_blind"] <= r["chance"] + BLIND_MARGIN, (
        f"blind accuracy {r['accuracy_blind']:.3f} > chance {r['chance']:.3f} + {BLIND_MARGIN}: the answers leak "
        "through the text")
    losses: dict[int, list[float]] = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:
            losses.setdefault(m["stage"], []).append(m["loss"])
    assert sorted(losses) == [1, 2], sorted(losses)
    # Stage 1 logs only steps 20 and 30 (log_every 20): its loss must be below a uniform guess over the
    # vocabulary, ln V, where random weights start. Stage 2 must at least halve from its first logged step.
    vocab = json.loads((Path(workdir) / "config.json").read_text())["config"]["model"]["decoder"]["vocab_size"]
    assert losses[1][-1] < np.log(vocab), (losses[1], np.log(vocab))
    assert losses[2][-1] < 0.5 * losses[2][0], losses[2]


def test_what_the_examples_write_is_ignored_by_git():
    """The examples write into the checkout (data/synth, eval_results/); git must not offer to commit it."""
    written = ["data/synth/train.jsonl", "data/synth_prepared/prepare.json", "eval_results/cambrian_tiny/local/x.json"]
    for path in written:
        p = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert p.returncode == 0, f"{path} is not ignored by .gitignore"
    assert subprocess.run(["git", "check-ignore", "-q", "data/README.md"], cwd=REPO).returncode == 1
