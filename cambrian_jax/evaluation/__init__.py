"""Evaluation: benchmark readers, answer extraction, scoring and the generation harness (spec §8).

  answers.py     the reference's multiple-choice answer extraction and short-answer matching
  benchmarks.py  benchmark presets (instruction, max_new_tokens) and readers: CV-Bench (parquet or
                 jsonl + img/), LLaVA conversations (the synthetic set), LLaVA-eval question files
  scoring.py     accuracy per task / source / type, the CV-Bench score, chance, vision vs blind
  harness.py     generation over a benchmark: batched, sharded over devices and hosts, per-item
                 predictions in JSONL, resumable, optionally repeated with blank images

The command line is `python -m cambrian_jax.evaluate`.
"""
from cambrian_jax.evaluation.answers import extract_choice, is_correct, is_correct_choice, is_correct_short
from cambrian_jax.evaluation.benchmarks import BENCHMARKS, BenchmarkSpec, Item, load_items
from cambrian_jax.evaluation.harness import evaluate
from cambrian_jax.evaluation.scoring import combine, format_report, score

__all__ = ["BENCHMARKS", "BenchmarkSpec", "Item", "combine", "evaluate", "extract_choice", "format_report",
           "is_correct", "is_correct_choice", "is_correct_short", "load_items", "score"]
