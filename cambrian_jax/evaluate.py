"""Evaluate a checkpoint on a local benchmark copy: `python -m cambrian_jax.evaluate`.

    python -m cambrian_jax.evaluate --checkpoint DIR [--towers NAME=DIR ...] [--config configs/x.py] \\
        --benchmark cv_bench --data /data/CV-Bench [--out eval/cv_bench] [--blind] [--batch-size 8]

--benchmark picks the reference's instruction and max_new_tokens (spec §8.1; `local` uses the data's
own prompts, e.g. the synthetic test split); --data is a CV-Bench copy (test_2d/test_3d parquet, or
jsonl + img/), or a LLaVA-conversation / LLaVA-eval / generic question file or folder (see
cambrian_jax.evaluation.benchmarks). Decoding is greedy unless --temperature is given.

Writes OUT/predictions.jsonl (one line per item: prediction, extracted answer, correctness),
OUT/predictions_blind.jsonl with --blind, and OUT/results.json; prints accuracy per task, source
and type, the CV-Bench score ½·((ADE20K + COCO)/2 + Omni3D), chance, and with --blind the accuracy
with every image blanked beside it (paper Fig. 3). Re-running the same command resumes.

Multi-host: run the same command on every host with --distributed; each host reads the benchmark,
generates its share of every batch, and host 0 writes the files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from cambrian_jax import generate
from cambrian_jax.evaluation import benchmarks, harness, scoring


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m cambrian_jax.evaluate", description=__doc__.split("\n\n")[0])
    generate.add_checkpoint_args(p)
    p.add_argument("--benchmark", default="cv_bench", help=f"one of {sorted(benchmarks.BENCHMARKS)}")
    p.add_argument("--data", required=True, help="the benchmark's local copy (folder or file)")
    p.add_argument("--out", default=None, help="output folder (default: eval_results/<benchmark>)")
    p.add_argument("--blind", action="store_true", help="also run with every image blanked; report both")
    p.add_argument("--batch-size", type=int, default=8, help="rows per generation batch over all hosts")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the benchmark's (spec §8.1)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    generate.setup_logging()
    if args.distributed:
        import jax
        jax.distributed.initialize()
    spec = benchmarks.get_benchmark(args.benchmark)
    items = benchmarks.load_items(args.data, args.benchmark, args.limit)
    if not items:
        sys.exit(f"{args.data}: no items")
    gen = generate.make_generator(args)
    sampling = generate.Sampling(args.max_new_tokens or spec.max_new_tokens, args.temperature, args.top_p, args.seed)
    out = args.out or os.path.join("eval_results", args.benchmark)
    results = harness.evaluate(gen, items, spec, sampling=sampling, out_dir=out, blind=args.blind,
                               batch_size=args.batch_size)
    if results is not None:
        results["checkpoint"] = os.fspath(args.checkpoint)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(scoring.format_report(results, f"{args.benchmark}: {len(items)} items, {args.checkpoint}"))
        print(f"predictions and results.json in {out}")
    return results


if __name__ == "__main__":
    main()
