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
Lines that are not JSON objects are skipped, counted and reported with file:line examples.
Mistakes in the arguments (a missing or malformed --jsonl/--categories/--ratios/--response-prompts
file, a source without a category, a category without a ratio, --out over an input) end in one
line and exit 2 (cambrian_jax/cli.py) before anything is written.
"""
from __future__ import annotations

import json
import os
import sys
import zlib
from typing import Mapping

import numpy as np

from cambrian_jax import cli
from cambrian_jax.cli import InputError
from cambrian_jax.data.templates import IMAGE_PLACEHOLDER

# Cambrian-7M category ratios in percent (spec §7.3).
CAMBRIAN_7M_RATIOS = {"Language": 21.00, "General": 34.52, "OCR": 27.22, "Counting": 8.71, "Math": 7.20,
                      "Code": 0.87, "Science": 0.88}
DEFAULT_CAP = 350_000
_EXAMPLES = 5

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
    """(file, line number, sample or None, reason) of every non-blank line; reason is why a line is
    not a sample ("malformed_json", "not_an_object"), else None."""
    for file in files:
        with open(file, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    sample = json.loads(line)
                except ValueError:
                    yield file, lineno, None, "malformed_json"
                    continue
                if not isinstance(sample, dict):
                    yield file, lineno, None, "not_an_object"
                    continue
                yield file, lineno, sample, None


def _seed(seed: int, source: str) -> list[int]:
    return [seed, zlib.crc32(source.encode())]


def check_mapping(counts: Mapping[str, int], categories: Mapping[str, str], ratios: Mapping[str, float],
                  where: Mapping[str, str] | None = None) -> None:
    """InputError unless every source has a category and every category a ratio; `where` gives a
    source's first file:line for the message."""
    where = where or {}
    unmapped = sorted(s for s in counts if s not in categories)
    if unmapped:
        first = unmapped[0]
        at = f" (first at {where[first]})" if first in where else ""
        rest = ", ".join(map(repr, unmapped[1:4])) + (" …" if len(unmapped) > 4 else "")
        more = f" and {len(unmapped) - 1} more ({rest})" if len(unmapped) > 1 else ""
        has, it = ("have", "them") if more else ("has", "it")
        raise InputError(f"source {first!r}{at}{more} {has} no category; map {it} in the --categories file, e.g. "
                         f'"{first}": "General" (categories: {", ".join(sorted(ratios))})')
    unknown = sorted({categories[s] for s in counts} - set(ratios))
    if unknown:
        users = sorted(s for s in counts if categories[s] == unknown[0])
        raise InputError(f"category {unknown[0]!r} (of source {users[0]!r}{' …' if len(users) > 1 else ''}) has no "
                         f"target ratio; map its sources to one of {', '.join(sorted(ratios))} in --categories, or "
                         "give it a ratio in --ratios")


def select(counts: Mapping[str, int], categories: Mapping[str, str], cap: int = DEFAULT_CAP,
           ratios: Mapping[str, float] | None = None, seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Per source, a bool mask over its samples (in input order) of those kept; plus the report."""
    ratios = dict(CAMBRIAN_7M_RATIOS if ratios is None else ratios)
    check_mapping(counts, categories, ratios)
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
    where: dict[str, str] = {}
    skipped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for file, lineno, sample, reason in _iter(jsonl):
        if sample is None:
            skipped[reason] = skipped.get(reason, 0) + 1
            ex = examples.setdefault(reason, [])
            if len(ex) < _EXAMPLES:
                ex.append(f"{os.path.basename(file)}:{lineno}")
            continue
        s = _source(sample, file)
        counts[s] = counts.get(s, 0) + 1
        where.setdefault(s, f"{os.path.basename(file)}:{lineno}")
    check_mapping(counts, categories, CAMBRIAN_7M_RATIOS if ratios is None else ratios, where)
    masks, report = select(counts, categories, cap, ratios, seed)
    prompts = {s: RESPONSE_PROMPTS.get(v, v) for s, v in (response_prompts or {}).items()}
    seen = dict.fromkeys(counts, 0)
    prompted = 0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
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
    os.replace(tmp, out)
    malformed = skipped.get("malformed_json", 0)
    report.update(malformed_json=malformed, not_an_object=skipped.get("not_an_object", 0), skipped_examples=examples,
                  response_prompted=prompted, output=os.path.abspath(out))
    if report_path:
        os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
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
    for reason in ("malformed_json", "not_an_object"):
        if report.get(reason):
            ex = ", ".join(report.get("skipped_examples", {}).get(reason, []))
            lines.append(f"skipped {report[reason]} line(s): {reason.replace('_', ' ')} (e.g. {ex})")
    if report["missing_categories"]:
        lines.append(f"no data for categories {report['missing_categories']}: the other ratios were renormalised")
    return "\n".join(lines)


def _load_json(path: str | None, flag: str, values: tuple[type, ...], what: str) -> dict | None:
    """A JSON object {str: value} from `path` (None if not given); InputError naming the file and key."""
    if not path:
        return None
    shape = "{category: percent}" if flag == "--ratios" else f"{{source: {what}}}"
    if not os.path.isfile(path):
        state = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise InputError(f"{flag} {path} {state}; give a JSON file {shape}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:
        raise InputError(f"{flag} {path} is not valid JSON ({e}); fix the file") from None
    if not isinstance(data, dict):
        raise InputError(f"{flag} {path} holds a JSON {type(data).__name__}, not an object {shape}")
    for key, value in data.items():
        if not isinstance(value, values) or isinstance(value, bool):
            raise InputError(f"{flag} {path}: the value of {key!r} is {value!r}; the file is {shape}")
        if flag == "--ratios" and (value < 0 or value != value):
            raise InputError(f"{flag} {path}: the ratio of {key!r} is {value}; give a percentage of at least 0")
    if flag == "--ratios" and not any(v > 0 for v in data.values()):
        raise InputError(f"{flag} {path}: every ratio is 0; give at least one category a positive percentage")
    return data


@cli.guarded
def main(argv: list[str] | None = None) -> dict:
    p = cli.ArgumentParser(prog="python -m cambrian_jax.data.curate", description=__doc__.split("\n\n")[0])
    p.add_argument("--jsonl", action="append", required=True)
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--categories", required=True, help="JSON file {source: category}")
    p.add_argument("--cap", type=int, default=DEFAULT_CAP)
    p.add_argument("--ratios", help="JSON file {category: percent} (default: Cambrian-7M's)")
    p.add_argument("--response-prompts", help="JSON file {source: instruction or a RESPONSE_PROMPTS key}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", help="where to write the JSON report (default: OUT.report.json)")
    a = p.parse_args(argv)
    for f in a.jsonl:
        if not os.path.isfile(f):
            state = "is a folder, not a file" if os.path.isdir(f) else "does not exist"
            raise InputError(f"--jsonl {f} {state}; give a LLaVA-format JSONL file (one sample per line)")
    if a.cap < 1:
        raise InputError(f"--cap {a.cap}: give the most samples a source keeps, at least 1")
    report = a.report or a.out + ".report.json"
    inputs = {os.path.realpath(f) for f in a.jsonl}
    for flag, path in (("--out", a.out), ("--report", report)):
        if os.path.isdir(path):
            raise InputError(f"{flag} {path} is a folder; give a file name")
        if os.path.realpath(path) in inputs:
            raise InputError(f"{flag} {path} is one of the --jsonl inputs; give another file name (it would be "
                             "overwritten while being read)")
    categories = _load_json(a.categories, "--categories", (str,), "category")
    ratios = _load_json(a.ratios, "--ratios", (int, float), "a number")
    prompts = _load_json(a.response_prompts, "--response-prompts", (str,), "an instruction or a RESPONSE_PROMPTS key")
    return curate(a.jsonl, a.out, categories, a.cap, ratios, prompts, a.seed, report)


if __name__ == "__main__":
    main()
