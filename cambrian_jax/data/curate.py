"""Data curation: per-source caps, category rebalancing, response-format prompts (spec §7.3).

    python -m cambrian_jax.data.curate --jsonl in.jsonl [--jsonl …] --out out.jsonl \\
        --categories source_categories.json [--cap 350000] [--ratios ratios.json] \\
        [--response-prompts prompts.json] [--seed 0] [--report report.json]

1. Cap: every source keeps at most `cap` samples (Cambrian-10M → 7M used t = 350k), a seeded random
   subset. A sample's source is its "source" field, else its file's name.
2. Rebalance: categories (source → category from a JSON file) are downsampled to the target ratios
   (default: Cambrian-7M's), taking the largest total every category can supply; inside a category
   each source keeps the same fraction. Categories without data are left out and the ratios of the
   others renormalised (reported).
3. Response-format prompts: each human turn of a source listed in the prompts file gets "\\n" +
   instruction appended (inside the user turn, after the image, so image_position is unchanged),
   unless it already ends with it. Values may be a key of RESPONSE_PROMPTS or literal text.

Two streaming passes over the inputs (count, then write); memory is one bit per input sample.
The report (counts per source and category before/after) is printed and written to --report.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from typing import Mapping

import numpy as np

from cambrian_jax.data.templates import IMAGE_PLACEHOLDER

# Cambrian-7M category ratios in percent (spec §7.3).
CAMBRIAN_7M_RATIOS = {"Language": 21.00, "General": 34.52, "OCR": 27.22, "Counting": 8.71, "Math": 7.20,
                      "Code": 0.87, "Science": 0.88}
DEFAULT_CAP = 350_000

# The "answer machine" fix's response-format instructions (spec §7.3, §8.1).
RESPONSE_PROMPTS = {
    "short": "Answer the question using a single word or phrase.",
    "multiple_choice": "Answer with the option's letter from the given choices directly.",
    "letter_only": "Please answer directly with only the letter of the correct option and nothing else.",
    "number": "Answer the question using a single number or phrase.",
    "short_direct": "Give the short answer directly.",
    "reasoning": "First show your reasoning process and then give the final answer.",
}


def _source(sample, file: str) -> str:
    src = sample.get("source") if isinstance(sample, dict) else None
    return str(src) if src else os.path.basename(file)


def _iter(files):
    for file in files:
        with open(file, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    sample = json.loads(line)
                except ValueError:
                    yield file, lineno, None, line
                    continue
                yield file, lineno, sample, line


def _seed(seed: int, source: str) -> list[int]:
    return [seed, zlib.crc32(source.encode())]


def select(counts: Mapping[str, int], categories: Mapping[str, str], cap: int = DEFAULT_CAP,
           ratios: Mapping[str, float] | None = None, seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Per source, a bool mask over its samples (in input order) of those kept; plus the report."""
    ratios = dict(CAMBRIAN_7M_RATIOS if ratios is None else ratios)
    unmapped = sorted(s for s in counts if s not in categories)
    if unmapped:
        raise ValueError(f"sources without a category: {unmapped[:10]}{' …' if len(unmapped) > 10 else ''}; add "
                         f"them to the --categories file (categories: {sorted(ratios)})")
    unknown = sorted({categories[s] for s in counts} - set(ratios))
    if unknown:
        raise ValueError(f"categories {unknown} have no target ratio; known: {sorted(ratios)}")
    capped = {s: min(n, cap) for s, n in counts.items()}
    per_cat: dict[str, int] = {}
    for s, n in capped.items():
        per_cat[categories[s]] = per_cat.get(categories[s], 0) + n
    present = {c: r for c, r in ratios.items() if per_cat.get(c, 0) > 0 and r > 0}
    norm = sum(present.values())
    share = {c: r / norm for c, r in present.items()}
    total = min(per_cat[c] / share[c] for c in share) if share else 0.0
    keep_frac = {c: min(1.0, total * share[c] / per_cat[c]) for c in share}
    masks, report_sources = {}, {}
    for s in sorted(counts):
        rng = np.random.default_rng(_seed(seed, s))
        frac = keep_frac.get(categories[s], 0.0)
        keep = int(round(capped[s] * frac))
        chosen = rng.permutation(counts[s])[:capped[s]][:keep] if keep else np.zeros(0, np.int64)
        mask = np.zeros(counts[s], bool)
        mask[chosen] = True
        masks[s] = mask
        report_sources[s] = {"category": categories[s], "input": counts[s], "after_cap": capped[s], "kept": keep}
    cats = {}
    for c in sorted(set(per_cat) | set(ratios)):
        kept = sum(v["kept"] for v in report_sources.values() if v["category"] == c)
        cats[c] = {"after_cap": per_cat.get(c, 0), "kept": kept, "target_percent": ratios.get(c, 0.0)}
    kept_total = sum(v["kept"] for v in cats.values())
    for v in cats.values():
        v["percent"] = round(100.0 * v["kept"] / kept_total, 2) if kept_total else 0.0
    report = {"cap": cap, "seed": seed, "input": sum(counts.values()), "kept": kept_total,
              "missing_categories": sorted(c for c in ratios if c not in present), "categories": cats,
              "sources": report_sources}
    return masks, report


def add_response_prompt(conversations: list, instruction: str) -> list:
    """Append "\\n" + instruction to every human turn that does not already end with it."""
    out = []
    for turn in conversations:
        if isinstance(turn, dict) and turn.get("from") in ("human", "user") and isinstance(turn.get("value"), str):
            value = turn["value"].rstrip()
            if not value.endswith(instruction):
                body = value.replace(IMAGE_PLACEHOLDER, "").strip()
                value = value + ("\n" if body else "") + instruction
            turn = dict(turn, value=value)
        out.append(turn)
    return out


def curate(jsonl: list[str], out: str, categories: Mapping[str, str], cap: int = DEFAULT_CAP,
           ratios: Mapping[str, float] | None = None, response_prompts: Mapping[str, str] | None = None,
           seed: int = 0, report_path: str | None = None, verbose: bool = True) -> dict:
    counts: dict[str, int] = {}
    malformed = 0
    for file, _, sample, _ in _iter(jsonl):
        if sample is None:
            malformed += 1
            continue
        s = _source(sample, file)
        counts[s] = counts.get(s, 0) + 1
    masks, report = select(counts, categories, cap, ratios, seed)
    prompts = {s: RESPONSE_PROMPTS.get(v, v) for s, v in (response_prompts or {}).items()}
    seen = dict.fromkeys(counts, 0)
    prompted = 0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        for file, _, sample, _ in _iter(jsonl):
            if sample is None:
                continue
            s = _source(sample, file)
            k = seen[s]
            seen[s] += 1
            if not masks[s][k]:
                continue
            if s in prompts and isinstance(sample.get("conversations"), list):
                sample = dict(sample, conversations=add_response_prompt(sample["conversations"], prompts[s]))
                prompted += 1
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    report.update(malformed_json=malformed, response_prompted=prompted, output=os.path.abspath(out))
    if report_path:
        with open(report_path, "w") as f:
            json.dump(report, f, indent=1)
    if verbose:
        print(format_report(report), file=sys.stderr)
    return report


def format_report(report: dict) -> str:
    lines = [f"input {report['input']} → kept {report['kept']} (cap {report['cap']}, seed {report['seed']})",
             f"{'category':<12}{'after cap':>12}{'kept':>12}{'%':>8}{'target %':>10}"]
    for c, v in report["categories"].items():
        lines.append(f"{c:<12}{v['after_cap']:>12}{v['kept']:>12}{v['percent']:>8.2f}{v['target_percent']:>10.2f}")
    lines.append(f"{'source':<40}{'category':<12}{'input':>10}{'capped':>10}{'kept':>10}")
    for s, v in report["sources"].items():
        lines.append(f"{s[:39]:<40}{v['category']:<12}{v['input']:>10}{v['after_cap']:>10}{v['kept']:>10}")
    if report["missing_categories"]:
        lines.append(f"no data for categories {report['missing_categories']}: the other ratios were renormalised")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m cambrian_jax.data.curate", description=__doc__.split("\n\n")[0])
    p.add_argument("--jsonl", action="append", required=True)
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--categories", required=True, help="JSON file {source: category}")
    p.add_argument("--cap", type=int, default=DEFAULT_CAP)
    p.add_argument("--ratios", help="JSON file {category: percent} (default: Cambrian-7M's)")
    p.add_argument("--response-prompts", help="JSON file {source: instruction or a RESPONSE_PROMPTS key}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", help="where to write the JSON report (default: OUT.report.json)")
    a = p.parse_args(argv)

    def load(path):
        if not path:
            return None
        with open(path) as f:
            return json.load(f)

    return curate(a.jsonl, a.out, load(a.categories), a.cap, load(a.ratios), load(a.response_prompts), a.seed,
                  a.report or a.out + ".report.json")


if __name__ == "__main__":
    main()
