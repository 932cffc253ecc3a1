"""Evaluate a checkpoint on a local benchmark copy: `python -m cambrian_jax.evaluate`.

    python -m cambrian_jax.evaluate --checkpoint DIR [--towers NAME=DIR ...] [--config configs/x.py] \\
        --benchmark cv_bench --data /data/CV-Bench [--out eval/cv_bench] [--blind] [--batch-size 8]

--benchmark picks the reference's instruction and max_new_tokens (spec §8.1; `local` uses the data's
own prompts, e.g. the synthetic test split); --data is a CV-Bench copy (test_2d/test_3d parquet, or
jsonl + img/), or a LLaVA-conversation / LLaVA-eval / generic question file or folder (see
cambrian_jax.evaluation.benchmarks). Decoding is greedy unless --temperature is given.

Writes OUT/settings.json (what makes the predictions: the checkpoint — a workdir's stage and step,
an HF directory's file sizes and times —, config, towers, tokenizer, template, dtype, image mode,
benchmark, data, max_new_tokens, temperature, top_p, seed) before the first prediction, then
OUT/predictions.jsonl (one line per item: prediction, extracted answer, correctness),
OUT/predictions_blind.jsonl with --blind, and OUT/results.json (with the settings); prints accuracy
per task, source and type, the CV-Bench score ½·((ADE20K + COCO)/2 + Omni3D), chance, and with
--blind the accuracy with every image blanked beside it (paper Fig. 3). OUT defaults to
eval_results/<checkpoint folder's name>/<benchmark>.

Re-running the same command resumes: items already in the predictions are not generated again (a
larger --limit extends the run). A folder whose settings.json differs from this run's — another
checkpoint, other generation settings — or that holds predictions without a settings.json (an older
cambrian_jax) is refused before anything is loaded or generated, naming the differing fields; use
another --out, or --overwrite to start over there.

Every input is checked before the model is loaded and before anything is written: the benchmark
name, --data (exists, holds items), every item's image (exists and decodes), the checkpoint folder.
A mistake ends the command with one line on stderr and exit 2 (cambrian_jax.cli).

Multi-host: run the same command on every host with --distributed; each host reads the benchmark,
generates its share of every batch, and host 0 writes the files.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Mapping

from cambrian_jax import cli, generate
from cambrian_jax.evaluation import benchmarks, harness, scoring

log = logging.getLogger(__name__)

SETTINGS = "settings.json"
MARKER = "cambrian_jax_eval"
VERSION = 1
OUTPUTS = ("predictions.jsonl", "predictions_blind.jsonl", "results.json", SETTINGS)
# Known only once the model is loaded (what --template/--dtype resolve to, the run's image mode).
RESOLVED = ("template", "dtype", "image_mode")


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="python -m cambrian_jax.evaluate", description=__doc__.split("\n\n")[0])
    generate.add_checkpoint_args(p)
    p.add_argument("--benchmark", default="cv_bench", help=f"one of {sorted(benchmarks.BENCHMARKS)}")
    p.add_argument("--data", default=None, help="the benchmark's local copy (folder or file); required")
    p.add_argument("--out", default=None,
                   help="output folder (default: eval_results/<checkpoint folder's name>/<benchmark>)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in --out, replacing predictions made there before (with other settings)")
    p.add_argument("--blind", action="store_true", help="also run with every image blanked; report both")
    p.add_argument("--batch-size", type=int, default=8, help="rows per generation batch over all hosts")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the benchmark's (spec §8.1)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
    return p.parse_args(argv)


def default_out(checkpoint: str | os.PathLike, benchmark: str) -> str:
    """eval_results/<the checkpoint folder's name>/<benchmark> (settings.json tells two folders of the
    same name apart)."""
    name = os.path.basename(os.path.normpath(os.fspath(checkpoint).rstrip("/"))) or "checkpoint"
    return os.path.join("eval_results", name, benchmark)


def _absolute(path: str | None) -> str | None:
    if not path:
        return path
    return path if "://" in path else os.path.abspath(path)


def given_settings(args, spec: benchmarks.BenchmarkSpec, sampling: generate.Sampling) -> dict[str, Any]:
    """The settings known before the model is loaded (all but RESOLVED)."""
    config = None
    if args.config:
        file, sep, switches = args.config.partition(":")
        config = _absolute(file) + sep + switches
    return {
        MARKER: VERSION,
        "checkpoint": generate.checkpoint_identity(args.checkpoint),
        "config": config,
        "towers": {k: _absolute(v) for k, v in sorted(generate.parse_towers(args.towers).items())},
        "tokenizer": _absolute(args.tokenizer),
        "benchmark": spec.name,
        "instruction": spec.instruction,
        "data": _absolute(os.fspath(args.data)),
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
    }


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _short(v: Any) -> str:
    text = json.dumps(v)
    limit = 200 if isinstance(v, str) else 70           # paths are shown whole
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_settings(out: str) -> dict | None:
    """OUT/settings.json, or None when there is none (or it is not one)."""
    try:
        with open(os.path.join(out, SETTINGS), encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return recorded if isinstance(recorded, dict) and MARKER in recorded else None


def compare(out: str, settings: Mapping[str, Any], skip=()) -> str | None:
    """Why the predictions in `out` are not this run's (None: there are none, or they are)."""
    recorded = read_settings(out)
    if recorded is None:
        if not any(os.path.exists(os.path.join(out, f)) for f in OUTPUTS):
            return None
        what = "an unreadable " + SETTINGS if os.path.exists(os.path.join(out, SETTINGS)) else f"no {SETTINGS}"
        return (f"{out} holds predictions with {what} (an older cambrian_jax wrote none): nothing says which "
                "checkpoint and settings made them")
    a, b = _flat(recorded), _flat(dict(settings))
    fields = [f for f in sorted(set(a) | set(b)) if f.split(".")[0] not in skip]
    diff = [f for f in fields if a.get(f, "<absent>") != b.get(f, "<absent>")]
    if not diff:
        return None
    shown = "; ".join(f"{f}: {_short(a.get(f, '<absent>'))} there, {_short(b.get(f, '<absent>'))} now"
                      for f in diff[:4])
    more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
    return f"{out} holds predictions made with other settings ({shown}{more})"


def _agreed(reason: str | None) -> str | None:
    """Process 0's verdict on every process (only process 0 reads and writes the output folder)."""
    import jax

    if jax.process_count() == 1:
        return reason
    import numpy as np
    from jax.experimental import multihost_utils

    flag = int(multihost_utils.broadcast_one_to_all(np.int32(reason is not None)))
    if jax.process_index() == 0 or not flag:
        return reason
    return "process 0 found predictions of other settings in --out (see its log)"


def check_out(out: str, settings: Mapping[str, Any], overwrite: bool, skip=()) -> str | None:
    """Refuse (InputError) when `out` holds predictions of other settings, unless `overwrite`;
    returns why the folder is started over (None: fresh, or resumed)."""
    import jax

    if os.path.exists(out) and not os.path.isdir(out):
        raise cli.InputError(f"--out {out} is a file, not a folder; give a folder for the predictions")
    reason = compare(out, settings, skip) if jax.process_index() == 0 else None
    reason = _agreed(reason)
    if reason is not None and not overwrite:
        raise cli.InputError(f"{reason}; use another --out, or --overwrite to start over there")
    return reason


def start(out: str, settings: Mapping[str, Any], overwrite: bool, reason: str | None) -> None:
    """Process 0: clear the folder when starting over, then write settings.json (before any prediction)."""
    import jax

    if jax.process_index() != 0:
        return
    if overwrite and any(os.path.exists(os.path.join(out, f)) for f in OUTPUTS):
        log.warning("--overwrite: starting over in %s%s", out, f" ({reason})" if reason else "")
        for f in OUTPUTS:
            path = os.path.join(out, f)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, SETTINGS), "w", encoding="utf-8") as f:
        f.write(json.dumps(settings, indent=2, sort_keys=True) + "\n")


@cli.guarded
def main(argv=None) -> dict | None:
    import jax

    args = parse_args(argv)
    generate.setup_logging()
    if args.distributed:
        jax.distributed.initialize()
    # 1. The inputs, cheapest first; nothing is loaded or written before they are all good.
    spec = benchmarks.get_benchmark(args.benchmark)
    if args.data is None:
        raise cli.InputError("--data is required: the benchmark's local copy (a folder such as a CV-Bench copy, or "
                             "a .jsonl/.json/.parquet question file)")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise cli.InputError(f"--batch-size and --limit must be ≥ 1, got {args.batch_size} and {args.limit}")
    if args.batch_size % jax.process_count():
        raise cli.InputError(f"--batch-size {args.batch_size} is not a multiple of the {jax.process_count()} "
                             "processes (each generates its share of every batch)")
    max_new = spec.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    sampling = generate.Sampling(max_new, args.temperature, args.top_p, args.seed)
    generate.check_checkpoint(args.checkpoint)
    generate.parse_mesh(args.mesh)
    settings = given_settings(args, spec, sampling)
    out = args.out or default_out(args.checkpoint, args.benchmark)
    check_out(out, settings, args.overwrite, skip=RESOLVED)      # the model is not loaded to be refused
    items = benchmarks.load_items(args.data, args.benchmark, args.limit)
    benchmarks.check_images(items, args.data)
    # 2. The model: exactly the checkpoint the settings name.
    ck = settings["checkpoint"]
    gen = generate.make_generator(args, stage=ck.get("stage"), step=ck.get("step"))
    settings.update(template=gen.template, dtype=str(gen.cfg.dtype), image_mode=gen.image_mode)
    reason = check_out(out, settings, args.overwrite)
    start(out, settings, args.overwrite, reason)
    # 3. Generate (resuming what is there), score, report.
    results = harness.evaluate(gen, items, spec, sampling=sampling, out_dir=out, blind=args.blind,
                               batch_size=args.batch_size)
    if results is not None:
        results["checkpoint"] = settings["checkpoint"]["path"]
        results["settings"] = dict(settings)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(scoring.format_report(results, f"{args.benchmark}: {len(items)} items, {args.checkpoint}"))
        print(f"predictions and results.json in {out}")
    return results


if __name__ == "__main__":
    main()
