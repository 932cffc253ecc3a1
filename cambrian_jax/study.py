"""Run a design-space study: one base config, a list of changes, one table (the paper's Tables 3–5).

    python -m cambrian_jax.study --config configs/cambrian_tiny.py[:switches] --workdir DIR \\
        --sweep 'connector=sva,concat,mlp2x_gelu' [--sweep 'steps1=0,60'] [--runs FILE] \\
        [--set key=value ...] [--benchmark cv_bench --benchmark-data DIR] [--timeout SECONDS] [--dry-run]

The runs are the cross product of the --sweep lists (times the lines of --runs FILE, each a run's
`key=value key=value`). A key is either a switch of the config's get_config (`steps1`, the `:arg`
part) or, when it holds a dot, an override path (`model.connector.type`, `config.seed`); values
are parsed as the `--config.x=y` flags are, by the type of the field they replace (Python literals
for tuples, dicts and fields that are None). --set applies to every run. Every run's config is
built and its model config validated before the first run starts.

Each run trains and evaluates in DIR/<key=value,...>/, a workdir of its own (checkpoints,
metrics.jsonl, eval_results.json, train.log, config.json). The evaluation is the config's
(config.eval: the synthetic held-out split and its blind pass) or, with --benchmark, that
benchmark through cambrian_jax.evaluate --blind (real data). Each run is a fresh child process:
its compiled programs and memory go when it ends, the trainer's global JAX settings do not leak
into the next run, a crash or --timeout stops only that run, and on an accelerator the parent
never holds the device. The children share the persistent compilation cache DIR/xla_cache, so a
program two runs have in common compiles once.

A run with an eval_results.json is done and skipped, so re-running the command resumes an
interrupted study (a half-trained run resumes from its checkpoints); a failed run is recorded and
the others go on. After every run DIR/study.csv and DIR/study.md are rewritten: one row per run
with the swept values, status, accuracy, blind accuracy, chance, per-task accuracies, steps, last
loss per stage and wall time.

One host: on a multi-host TPU slice run `cambrian_jax.train` instead.
"""
from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from cambrian_jax import cli
from cambrian_jax.config import ConfigError

RUN_SPEC = "run.json"          # what the run is: config file, switches, overrides
RUN_RECORD = "study_run.json"  # what happened: exit status and wall time of each attempt
RESULTS = "eval_results.json"
LOG = "train.log"
_REPO = Path(__file__).resolve().parents[1]
RESULT_COLUMNS = ("run", "status", "accuracy", "accuracy_blind", "chance", "s1_steps", "s1_loss", "s2_steps",
                  "s2_loss", "wall_s")


# ------------------------------------------------------------------------------------------ values

def split_values(text: str) -> list[str]:
    """'a,b,(1, 2),{"k": 1}' → ['a', 'b', '(1, 2)', '{"k": 1}']: commas inside brackets or quotes stay."""
    out, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return out


def _pair(item: str, where: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"{where} {item!r}: expected key=value")
    return key.strip(), value.strip()


def is_override(key: str) -> bool:
    """Dotted keys are config paths; plain keys are get_config switches."""
    return "." in key


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_override(config, path: str, text: str) -> Any:
    """The value `--config.path=text` would give: typed by the field it replaces."""
    import ml_collections  # noqa: PLC0415

    node, leaf = _parent(config, path)
    current = node[leaf]
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true/false")
            value: Any = text.lower() in ("true", "1", "yes")
        elif isinstance(current, int):
            value = int(text)
        elif isinstance(current, float):
            value = float(text)
        elif isinstance(current, str):
            value = text
        elif isinstance(current, (tuple, list)):
            value = ast.literal_eval(text)
            if not isinstance(value, (tuple, list)):
                raise ValueError("expected a tuple or list literal, e.g. ('count', 'depth')")
            value = type(current)(value)
        elif isinstance(current, (dict, ml_collections.ConfigDict)):
            value = ast.literal_eval(text)
            if not isinstance(value, dict):
                raise ValueError("expected a dict literal")
        else:            # None or another type: whatever the literal says, else the text
            value = _literal(text)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"config field {path}: cannot read {text!r} as {type(current).__name__} ({e})") from None
    if isinstance(value, dict):
        value = ml_collections.ConfigDict(value)
    return value


def _parent(config, path: str):
    *parents, leaf = path.split(".")
    node = config
    for i, p in enumerate(parents):
        where = ".".join(parents[:i + 1])
        if not hasattr(node, "keys") or p not in node:
            raise ConfigError(f"config field {where}: not in the config (override {path})")
        if node[p] is None:
            raise ConfigError(f"config field {where}: is None, so {path} cannot be set alone; set {where} whole, "
                              f"e.g. {where}={{'{path.split('.')[i + 1]}': ...}}")
        node = node[p]
    if not hasattr(node, "keys") or leaf not in node:
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        raise ConfigError(f"config field {path}: not in the config; {'.'.join(parents) or 'config'} has {known}")
    return node, leaf


def apply_overrides(config, overrides: Sequence[tuple[str, str]]):
    for path, text in overrides:
        path = path[len("config."):] if path.startswith("config.") else path
        node, leaf = _parent(config, path)
        node[leaf] = parse_override(config, path, text)
    return config


def build_config(config_file: str, switches: Sequence[str], overrides: Sequence[tuple[str, str]]):
    """get_config(','.join(switches)) of config_file, then the dotted overrides."""
    from cambrian_jax.export_hf import load_config_file  # noqa: PLC0415

    for s in switches:
        if "," in s.partition("=")[2]:
            raise ConfigError(f"switch {s!r}: a switch value cannot hold a comma")
    spec = config_file + (":" + ",".join(switches) if switches else "")
    try:
        config = load_config_file(spec)
    except ValueError as e:          # parse_arg: unknown switch, a value of the wrong type
        hint = ""
        unknown = re.search(r"unknown config switch '([^']+)'", str(e))
        if unknown:
            hint = (f"; to set the config field {unknown.group(1)} write config.{unknown.group(1)}=... "
                    "(keys with a dot are config paths)")
        raise ConfigError(f"--config {spec}: {e}{hint}") from None
    return apply_overrides(config, overrides)


# ------------------------------------------------------------------------------------------ the plan

@dataclasses.dataclass
class Run:
    name: str                             # also the folder under the study's workdir
    values: dict[str, str]                # the keys that vary between runs, as given
    switches: list[str]
    overrides: list[tuple[str, str]]

    def spec(self, config_file: str, benchmark: tuple[str, str] | None = None) -> dict:
        out = dict(config=config_file, switches=self.switches, overrides=[list(o) for o in self.overrides])
        if benchmark:
            out["benchmark"], out["benchmark_data"] = benchmark
        return out


def run_name(values: dict[str, str]) -> str:
    if not values:
        return "base"

    def tidy(v: str) -> str:      # ('count', 'depth') → count+depth
        v = re.sub(r"\s*,\s*", "+", re.sub(r"[\s'\"()\[\]{}]+", " ", v).strip().rstrip(","))
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", v).strip("_") or "_"

    name = ",".join(f"{re.sub(r'[^A-Za-z0-9._-]+', '_', k)}={tidy(v)}" for k, v in values.items())
    if len(name) > 120:
        name = name[:100] + "~" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def read_runs_file(path: str) -> list[dict[str, str]]:
    """One run per line: `key=value key=value` (shell quoting); blank lines and # comments skipped."""
    runs = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        words = shlex.split(line, comments=True)
        if words:
            runs.append(dict(_pair(w, f"{path}:{i}:") for w in words))
    if not runs:
        raise ConfigError(f"--runs {path}: no runs in the file")
    return runs


def plan(config: str, sweeps: Sequence[str] = (), sets: Sequence[str] = (), runs_file: str | None = None,
         benchmark: tuple[str, str] | None = None) -> list[Run]:
    """The runs of a study, each config built and its model validated (nothing runs, nothing compiles)."""
    from cambrian_jax import config as config_lib  # noqa: PLC0415

    config_file, _, base_arg = config.partition(":")
    if not os.path.isfile(config_file):
        raise ConfigError(f"--config {config_file}: no such config file")
    config_file = os.path.abspath(config_file)     # the children may start elsewhere
    base_switches = [s for s in base_arg.split(",") if s]
    fixed = [_pair(s, "--set") for s in sets]
    axes: list[list[tuple[str, str]]] = []
    for s in sweeps:
        key, text = _pair(s, "--sweep")
        values = split_values(text)
        if not all(values):
            raise ConfigError(f"--sweep {s!r}: an empty value")
        axes.append([(key, v) for v in values])
    listed = read_runs_file(runs_file) if runs_file else [{}]
    swept = [a[0][0] for a in axes]
    for key in swept + [k for r in listed for k in r]:
        if key in dict(fixed):
            raise ConfigError(f"{key!r} is both --set and varied; give it in one place")
    if len(set(swept)) != len(swept):
        raise ConfigError(f"a key is swept twice: {swept}")
    clash = set(swept + [k for r in listed for k in r]) & set(RESULT_COLUMNS)
    if clash:
        raise ConfigError(f"{sorted(clash)}: the name of a table column; write it as a config path instead")
    out: list[Run] = []
    for extra in listed:
        for combo in itertools.product(*axes) if axes else [()]:
            values = dict(extra)
            values.update(combo)
            changes = fixed + list(values.items())
            switches = base_switches + [f"{k}={v}" for k, v in changes if not is_override(k)]
            overrides = [(k, v) for k, v in changes if is_override(k)]
            out.append(Run(run_name(values), values, switches, overrides))
    names = [r.name for r in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"two runs would share the folder(s) {dupes}; make their values differ")
    for r in out:
        try:
            cfg = build_config(config_file, r.switches, r.overrides)
            config_lib.from_dict(cfg.model)
        except ConfigError as e:
            raise ConfigError(f"run {r.name}: {e}") from None
        if not cfg.get("eval") and not benchmark:
            raise ConfigError(f"run {r.name}: config field eval is empty, so the run would have no evaluation; "
                              "give the config's eval switch, --set \"config.eval={'num_samples': 64, "
                              "'tasks': ('count', 'relation', 'depth')}\" or --benchmark/--benchmark-data")
    return out


# ------------------------------------------------------------------------------------------ running

def _check_same(run_dir: Path, spec: dict) -> None:
    path = run_dir / RUN_SPEC
    if path.exists():
        old = json.loads(path.read_text())
        if old != spec:
            raise ConfigError(f"{run_dir} holds a run with other settings ({path}: {old}); this study asks for "
                              f"{spec}. Use another --workdir, or delete that folder to redo it.")


def launch(run_dir: Path, cache_dir: str | None, timeout: float | None) -> int:
    """One run in a child process (`--run-one`), its output appended to run_dir/train.log."""
    cmd = [sys.executable, "-m", "cambrian_jax.study", "--run-one", str(run_dir.resolve())]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    with open(run_dir / LOG, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        try:
            return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n=== stopped after --timeout {timeout:g} s\n")
            return 124


def run_one(run_dir: str, cache_dir: str | None = None) -> int:
    """The child: train the run's config.stages in run_dir, then its evaluation."""
    import logging  # noqa: PLC0415

    from absl import logging as absl_logging  # noqa: PLC0415

    from cambrian_jax.trainer import Trainer  # noqa: PLC0415

    absl_logging.set_verbosity(absl_logging.INFO)
    # One handler (force: a library may have installed one already): the trainer's progress at INFO,
    # without orbax's per-save INFO lines, which would bury it.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda rec: rec.levelno >= logging.WARNING or "/orbax/" not in rec.pathname)
    d = Path(run_dir)
    spec = json.loads((d / RUN_SPEC).read_text())
    config = build_config(spec["config"], spec["switches"], [tuple(o) for o in spec["overrides"]])
    if cache_dir and "compilation_cache_dir" in config and not config.compilation_cache_dir:
        config.compilation_cache_dir = cache_dir
    trainer = Trainer(config, d, command=dict(study=spec))   # writes d/config.json: generate/export_hf read it
    try:
        finished = trainer.run()
        if finished and not spec.get("benchmark"):
            trainer.evaluate()
    finally:
        trainer.close()
    if not finished:
        return cli.EXIT_PREEMPTED     # stopped by SIGTERM after a checkpoint; re-running resumes
    if spec.get("benchmark"):
        del trainer                   # its parameters: the evaluation restores the final checkpoint itself
        from cambrian_jax import evaluate  # noqa: PLC0415

        name = spec["benchmark"]
        results = evaluate.main(["--checkpoint", str(d), "--benchmark", name, "--data", spec["benchmark_data"],
                                 "--out", str(d / f"eval_{name}"), "--blind"])
        if results is not None:
            (d / RESULTS).write_text(json.dumps(results, indent=2))
    return 0


# ------------------------------------------------------------------------------------------ the table

def _metrics_by_stage(run_dir: Path) -> dict[int, dict]:
    """Per stage: the last logged step and loss (a stage's final step is always logged)."""
    out: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        s = int(r["stage"])
        if r["step"] >= out.get(s, {}).get("step", -1):
            out[s] = dict(step=int(r["step"]), loss=float(r["loss"]))
    return out


def _attempts(run_dir: Path) -> list[dict]:
    path = run_dir / RUN_RECORD
    return json.loads(path.read_text())["attempts"] if path.exists() else []


def row(run: Run, run_dir: Path) -> dict[str, Any]:
    r: dict[str, Any] = dict(run=run.name, **run.values)
    attempts = _attempts(run_dir)
    res_path = run_dir / RESULTS
    if res_path.exists():
        res = json.loads(res_path.read_text())
        r.update(status="ok", accuracy=res.get("accuracy"), accuracy_blind=res.get("accuracy_blind"),
                 chance=res.get("chance"))
        for task, v in sorted(res.get("per_task", {}).items()):
            r[task] = v.get("accuracy")
            r[f"{task}_blind"] = v.get("accuracy_blind")
    elif attempts:
        last = attempts[-1]
        r["status"] = f"failed (exit {last['rc']})" if last["rc"] != cli.EXIT_PREEMPTED else "stopped (SIGTERM)"
    else:
        r["status"] = "pending"
    for s, m in sorted(_metrics_by_stage(run_dir).items()):
        r[f"s{s}_steps"], r[f"s{s}_loss"] = m["step"], m["loss"]
    if attempts:
        r["wall_s"] = round(sum(a["wall_s"] for a in attempts), 1)
    return r


def _columns(rows: list[dict], keys: list[str]) -> list[str]:
    lead = ["run"] + keys + ["status", "accuracy", "accuracy_blind", "chance"]
    tasks = sorted({k for r in rows for k in r if f"{k}_blind" in r and k not in lead})
    cols = lead + [c for t in tasks for c in (t, f"{t}_blind")]
    tail = [c for s in (1, 2) for c in (f"s{s}_steps", f"s{s}_loss")] + ["wall_s"]
    return cols + [c for c in tail if any(c in r for r in rows)]


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def write_tables(out_dir: Path, runs: list[Run], keys: list[str], title: str) -> list[dict]:
    """DIR/study.csv (every column) and DIR/study.md (blind per task left out); returns the rows."""
    rows = [row(r, out_dir / r.name) for r in runs]
    cols = _columns(rows, keys)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    (out_dir / "study.csv").write_text(buf.getvalue())
    md_cols = [c for c in cols if not (c.endswith("_blind") and c != "accuracy_blind") and (c != "run" or not keys)]
    head = {"accuracy_blind": "blind", "wall_s": "wall"}
    lines = [f"{title}\n", "| " + " | ".join(head.get(c, c) for c in md_cols) + " |",
             "|" + "|".join("---" if c in keys or c == "status" else "---:" for c in md_cols) + "|"]
    for r in rows:
        cells = [(_duration(r[c]) if c == "wall_s" and c in r else _cell(r.get(c))) for c in md_cols]
        lines.append("| " + " | ".join(cells) + " |")
    (out_dir / "study.md").write_text("\n".join(lines) + "\n")
    return rows


# ------------------------------------------------------------------------------------------ the study

def run_study(config: str, workdir: str, sweeps: Sequence[str] = (), sets: Sequence[str] = (),
              runs_file: str | None = None, timeout: float | None = None, cache: bool = True,
              dry_run: bool = False, benchmark: tuple[str, str] | None = None, out=None) -> list[dict]:
    """Plan, then run what is not finished, rewriting DIR/study.csv and DIR/study.md after each run.
    benchmark: (name, data) evaluates each run with cambrian_jax.evaluate instead of config.eval."""
    out = out or sys.stdout
    if benchmark:
        benchmark = (benchmark[0], os.path.abspath(benchmark[1]))
    runs = plan(config, sweeps, sets, runs_file, benchmark)
    config_file = os.path.abspath(config.partition(":")[0])
    keys = list(dict.fromkeys(k for r in runs for k in r.values))
    d = Path(workdir)
    d.mkdir(parents=True, exist_ok=True)
    for r in runs:
        _check_same(d / r.name, r.spec(config_file, benchmark))
    title = f"Study: `{config}`" + "".join(f" `--set {s}`" for s in sets)
    if benchmark:
        title += f", evaluated on {benchmark[0]} ({benchmark[1]})"
    done = [r for r in runs if (d / r.name / RESULTS).exists()]
    todo = [r for r in runs if r not in done]
    print(f"{len(runs)} runs in {d}: {len(done)} finished earlier, {len(todo)} to run", file=out, flush=True)
    if dry_run:
        for i, r in enumerate(runs, 1):
            print(f"[{i}/{len(runs)}] {r.name}: switches {','.join(r.switches) or '-'} overrides "
                  f"{' '.join(f'{k}={v}' for k, v in r.overrides) or '-'}", file=out)
        return []
    cache_dir = str((d / "xla_cache").resolve()) if cache else None
    start, spent, ran = time.time(), 0.0, 0
    for i, r in enumerate(runs, 1):
        run_dir = d / r.name
        if r in done:
            print(f"[{i}/{len(runs)}] {r.name}: finished earlier, skipped", file=out, flush=True)
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_SPEC).write_text(json.dumps(r.spec(config_file, benchmark), indent=2) + "\n")
        print(f"[{i}/{len(runs)}] {r.name}: running (log {run_dir / LOG})", file=out, flush=True)
        t0 = time.time()
        rc = launch(run_dir, cache_dir, timeout)
        wall = time.time() - t0
        attempts = _attempts(run_dir) + [dict(rc=rc, wall_s=round(wall, 1), finished=time.time())]
        (run_dir / RUN_RECORD).write_text(json.dumps(dict(attempts=attempts), indent=2) + "\n")
        spent, ran = spent + wall, ran + 1
        rows = write_tables(d, runs, keys, title)
        res = rows[i - 1]
        if res["status"] == "ok":
            what = (f"accuracy {res['accuracy']:.3f} blind {_cell(res.get('accuracy_blind'))} "
                    f"chance {_cell(res.get('chance'))}")
        else:
            what = f"{res['status']}: {_last_line(run_dir / LOG)} (see {run_dir / LOG})"
        left = len(todo) - ran
        print(f"[{i}/{len(runs)}] {r.name}: {what} in {_duration(wall)}; elapsed {_duration(time.time() - start)}, "
              f"ETA {_duration(spent / ran * left)} for {left} more", file=out, flush=True)
    rows = write_tables(d, runs, keys, title)
    failed = [x["run"] for x in rows if x["status"] != "ok"]
    print(f"table: {d / 'study.md'} and {d / 'study.csv'}" + (f"; not finished: {failed}" if failed else ""),
          file=out, flush=True)
    return rows


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="python -m cambrian_jax.study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", help="configs/x.py[:switches], the base of every run")
    p.add_argument("--workdir", help="the study's folder: one subfolder per run, study.csv, study.md")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="a switch or a dotted config path and its values (repeat: cross product)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V", help="a change for every run (repeat)")
    p.add_argument("--runs", default=None, metavar="FILE", help="explicit runs, one `key=value ...` line each")
    p.add_argument("--benchmark", default=None, help="evaluate each run on this benchmark (cambrian_jax.evaluate "
                   "--blind) instead of config.eval: cv_bench, local, …")
    p.add_argument("--benchmark-data", default=None, help="the benchmark's local copy (with --benchmark)")
    p.add_argument("--timeout", type=float, default=None, help="seconds after which a run is stopped (failed)")
    p.add_argument("--no-cache", action="store_true", help="no shared compilation cache (DIR/xla_cache)")
    p.add_argument("--dry-run", action="store_true", help="check every run's config and list the runs")
    p.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_one is None and (not args.config or not args.workdir):
        p.error("--config and --workdir are required")
    if bool(args.benchmark) != bool(args.benchmark_data):
        p.error("--benchmark and --benchmark-data go together")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_one is not None:
        return run_one(args.run_one, args.cache_dir)
    try:
        rows = run_study(args.config, args.workdir, args.sweep, args.set, args.runs, args.timeout,
                         cache=not args.no_cache, dry_run=args.dry_run,
                         benchmark=(args.benchmark, args.benchmark_data) if args.benchmark else None)
    except ConfigError as e:
        sys.stderr.write(f"config error: {e}\n")
        return 2
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
