"""A training run's record in its workdir: WORKDIR/config.json says what made every file beside it.

`train` writes the record when it starts (after the config has been validated), with the resolved
config and the command line that produced it:

    {"cambrian_jax_run": 1,
     "config":  {...the resolved config: every field, switches and overrides applied...},
     "command": {"config_file": "configs/cambrian_tiny.py", "switches": "steps2=100",
                 "overrides": ["--config.seed=1"], "argv": [...]}}

A later `train` on the same workdir compares its config with the record: equal (apart from the
OPERATIONAL fields, which say where and how a run executes, not what it computes) resumes;
different refuses in one line naming the fields. `generate`, `evaluate`, `export_hf` and `plan`
read the record, so `--checkpoint WORKDIR` alone is enough.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

import ml_collections

from cambrian_jax.config import ConfigError

RECORD = "config.json"
MARKER = "cambrian_jax_run"
VERSION = 1

# Fields a resumed run may change: the mesh and sharding (restores reshard), input workers and
# prefetching (the data position does not depend on them), logging, checkpoint cadence, the
# compilation cache and the evaluation after training. A field matches itself and everything below it.
OPERATIONAL = ("mesh", "sharding_rules", "data.worker_count", "data.worker_buffer_size", "data.read_threads",
               "data.cache_rows", "log_every", "checkpoint", "compilation_cache_dir", "eval",
               "stage1.save_interval_steps", "stage2.save_interval_steps")


def plain(config) -> dict[str, Any]:
    """The config as JSON values (tuples become lists), as the record stores it."""
    if isinstance(config, ml_collections.ConfigDict):
        text = config.to_json_best_effort(sort_keys=True)
    else:
        text = json.dumps(config, sort_keys=True, default=str)
    return json.loads(text)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping) and d:
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _operational(field: str, operational: Iterable[str]) -> bool:
    return any(field == o or field.startswith(o + ".") for o in operational)


def differences(recorded: Mapping[str, Any], config: Mapping[str, Any],
                operational: Iterable[str] = OPERATIONAL) -> list[tuple[str, Any, Any]]:
    """(field, recorded value, new value) for every non-operational field that differs."""
    a, b = _flat(plain(dict(recorded))), _flat(plain(dict(config)))
    out = []
    for field in sorted(set(a) | set(b)):
        if _operational(field, operational):
            continue
        if a.get(field, "<absent>") != b.get(field, "<absent>"):
            out.append((field, a.get(field, "<absent>"), b.get(field, "<absent>")))
    return out


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) or v == "<absent>" else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _path(workdir: str | os.PathLike):
    from etils import epath  # noqa: PLC0415

    return epath.Path(workdir) / RECORD


def read(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The record of a run in `workdir` ({'config', 'command'}), or None when there is none. A
    config.json of an older cambrian_jax (the config alone) reads as {'config': it, 'command': {}}."""
    path = _path(workdir)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a valid run record ({e}); it is written by `python -m cambrian_jax.train`")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a run record (a JSON object with 'config' was expected)")
    if MARKER in data:
        return data
    if "model" in data and ("stage1" in data or "stage2" in data):      # written by an older study runner
        return {"config": data, "command": {}}
    return None      # some other config.json (e.g. an HF checkpoint's)


def is_run(path: str | os.PathLike) -> bool:
    """Whether `path` holds a training run: its record, or the trainer's stage checkpoints."""
    from etils import epath  # noqa: PLC0415

    p = epath.Path(path)
    return (p / "stage1").is_dir() or (p / "stage2").is_dir() or read(p) is not None


def config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The recorded config of the run in `workdir`, or a ConfigError saying how to get one."""
    from etils import epath  # noqa: PLC0415

    if not epath.Path(workdir).is_dir():
        raise ConfigError(f"workdir {workdir} does not exist; give the --workdir of a `python -m cambrian_jax.train` run")
    rec = read(workdir)
    if rec is None:
        raise ConfigError(f"{_path(workdir)} does not exist: this is not a workdir written by "
                          "`python -m cambrian_jax.train` (or one from before it recorded its config); pass the "
                          "run's config file with --config configs/x.py[:switches]")
    return ml_collections.ConfigDict(rec["config"])


def check_or_write(workdir: str | os.PathLike, config_: ml_collections.ConfigDict,
                   command: Mapping[str, Any] | None = None, *, write: bool = True) -> bool:
    """Compare `config_` with the record in `workdir`; refuse (ConfigError naming the differing
    fields) when they differ, else write the record if there is none (when `write`: process 0).
    Returns True when a record was already there (a resumed run)."""
    rec = read(workdir)
    if rec is not None:
        diff = differences(rec["config"], plain(config_))
        if diff:
            shown = "; ".join(f"{f}: {_short(a)} recorded, {_short(b)} now" for f, a, b in diff[:6])
            more = f" (and {len(diff) - 6} more)" if len(diff) > 6 else ""
            raise ConfigError(f"workdir {workdir} belongs to another config ({shown}{more}); use another --workdir, "
                              f"or the recorded settings ({_path(workdir)})")
        return True
    if write:
        record = {MARKER: VERSION, "config": plain(config_), "command": dict(command or {})}
        path = _path(workdir)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record, indent=2, sort_keys=True) + "\n"
        if "://" in str(path):          # an object store shows an object only once it is whole
            path.write_text(text)
        else:                           # other hosts may read it while it is written: rename into place
            tmp = f"{path}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
    return False


def command_line(argv: Iterable[str], config_spec: str | None) -> dict[str, Any]:
    """What the record says about the command: the config file, its switches, the --config.* overrides."""
    argv = list(argv)
    path, _, switches = (config_spec or "").partition(":")
    return dict(config_file=path, switches=switches, argv=argv,
                overrides=[a for a in argv if a.startswith("--config.")])
