"""Generation over a benchmark: batched, sharded, written item by item, resumable, with a blind pass.

Every process reads the same item list and takes its share of each global batch (`batch_size`
rows over all processes, split over the data-parallel devices by the Generator); the generated
tokens of all rows come back on every process. Process 0 appends one JSON line per item to
`predictions.jsonl` (`predictions_blind.jsonl` for the blind pass) and flushes after every batch.
A re-run with the same output folder skips the items already in the file (a torn last line from an
interruption is dropped), so an interrupted evaluation resumes where it stopped and ends with the
same report. Items are matched by id only: `python -m cambrian_jax.evaluate` first checks that the
folder's settings.json (checkpoint, benchmark, data, generation settings) is this run's. Greedy
decoding is deterministic per row, and sampling draws with the item's index as its row seed, so
neither depends on how items fell into batches.

The blind pass (paper Fig. 3) replaces every image with a uniform grey image of the same size: the
question, the choices and the image's shape stay, what it shows is gone. A benchmark that needs
vision drops to about chance there.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from PIL import Image

from cambrian_jax import cli
from cambrian_jax.evaluation import answers, scoring
from cambrian_jax.evaluation.benchmarks import BenchmarkSpec, Item

log = logging.getLogger(__name__)

BLANK = (128, 128, 128)


def blank_like(image: Image.Image) -> Image.Image:
    """A uniform grey image of the same size (so the padding masks stay the same)."""
    return Image.new("RGB", image.size, BLANK)


def _prediction_file(out_dir: str | os.PathLike, blind: bool) -> Path:
    return Path(out_dir) / ("predictions_blind.jsonl" if blind else "predictions.jsonl")


def read_predictions(path: Path, ids: set[str]) -> dict[str, dict]:
    """Records already written (for ids of this item list); a torn last line is dropped from the file."""
    if not path.is_file():
        return {}
    done: dict[str, dict] = {}
    lines = path.read_text().splitlines(keepends=True)
    good = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:       # interrupted mid-write
                log.warning("%s: dropping a torn last line", path)
                break
            raise cli.InputError(f"{path}: line {i + 1} is not JSON; remove the file (or pass --overwrite) to start "
                                 "over") from None
        if not line.endswith("\n"):
            line += "\n"
        good.append(line)
        if rec.get("id") in ids:
            done[rec["id"]] = rec
    if len(good) != len(lines):
        path.write_text("".join(good))
    return done


def _broadcast_done(mask: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return mask
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.broadcast_one_to_all(mask))


def record_for(item: Item, index: int, prediction: str, blind: bool) -> dict:
    correct = answers.is_correct(prediction, item.answer, item.choices, item.rule)
    rec = dict(id=item.id, index=index, task=item.task, source=item.source, type=item.type, blind=blind,
               prompt=item.prompt, choices=item.choices, answer=item.answer, prediction=prediction,
               extracted=answers.extract_choice(prediction, answers.RULES[item.rule][0]) if item.choices else None,
               correct=bool(correct), chance=item.chance)
    return rec


def run_pass(gen, items: Sequence[Item], spec: BenchmarkSpec, *, sampling, out_dir=None, blind: bool = False,
             batch_size: int = 8, on_batch: Callable[[int, int], None] | None = None) -> list[dict] | None:
    """Generate for every item not yet in the predictions file; return all records (on process 0,
    or on every process when out_dir is None), in item order."""
    processes, me = jax.process_count(), jax.process_index()
    if batch_size < 1 or batch_size % processes:
        raise cli.InputError(f"--batch-size {batch_size} is not a positive multiple of the {processes} processes")
    per_process = batch_size // processes
    ids = [it.id for it in items]
    path = _prediction_file(out_dir, blind) if out_dir is not None else None
    done: dict[str, dict] = {}
    if path is not None and me == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        done = read_predictions(path, set(ids))
    todo_mask = _broadcast_done(np.asarray([i not in done for i in ids], bool))
    todo = [i for i in range(len(items)) if todo_mask[i]]
    if done:
        log.info("%s: %d of %d items already done, %d to go", path, len(done), len(items), len(todo))
    records = dict(done)
    writer = open(path, "a") if path is not None and me == 0 else None
    start = time.time()
    try:
        for b, first in enumerate(range(0, len(todo), batch_size)):
            chunk = todo[first:first + batch_size]
            mine = chunk[me * per_process:(me + 1) * per_process]
            rows = mine + [chunk[0]] * (per_process - len(mine))
            active = [True] * len(mine) + [False] * (per_process - len(mine))
            ids_list, images = [], []
            for i in rows:
                item = items[i]
                image = item.load_image() if item.has_image else None
                if blind and image is not None:
                    image = blank_like(image)
                images.append(image)
                ids_list.append(gen.encode(item.question(spec.instruction), image is not None))
            out = gen.generate_ids(ids_list, images, sampling, active=active, row_seeds=rows)
            for p in range(processes):
                for j in range(per_process):
                    k = p * per_process + j
                    if k >= len(chunk):
                        continue
                    i = chunk[k]
                    text = gen.decode(out.tokens[p * per_process + j])
                    rec = record_for(items[i], i, text, blind)
                    records[items[i].id] = rec
                    if writer is not None:
                        writer.write(json.dumps(rec) + "\n")
            if writer is not None:
                writer.flush()
            n_done = min(first + batch_size, len(todo))
            log.info("%s%d/%d items (%.1f items/s)", "blind: " if blind else "", n_done, len(todo),
                     n_done / max(time.time() - start, 1e-9))
            if on_batch is not None:
                on_batch(b, n_done)
    finally:
        if writer is not None:
            writer.close()
    if path is not None and me != 0:
        return None
    return [records[i] for i in ids]


def evaluate(gen, items: Sequence[Item], spec: BenchmarkSpec, *, sampling=None, out_dir=None, blind: bool = False,
             batch_size: int = 8, on_batch=None) -> dict | None:
    """Run the benchmark (and with `blind` the blank-image pass too); returns the combined results
    (scoring.score / scoring.combine) and writes them to out_dir/results.json. Other processes than
    0 return None when out_dir is given (the records live on process 0)."""
    from cambrian_jax.generate import Sampling

    sampling = sampling or Sampling(max_new_tokens=spec.max_new_tokens, temperature=0.0)
    vision = run_pass(gen, items, spec, sampling=sampling, out_dir=out_dir, blind=False, batch_size=batch_size,
                      on_batch=on_batch)
    nothing_blind = blind and not any(it.has_image for it in items)
    blind_records = run_pass(gen, items, spec, sampling=sampling, out_dir=out_dir, blind=True,
                             batch_size=batch_size, on_batch=on_batch) if blind and not nothing_blind else None
    if vision is None:
        return None
    results = scoring.combine(scoring.score(vision), scoring.score(blind_records) if blind_records else None)
    results["benchmark"] = spec.name
    results["settings"] = dict(instruction=spec.instruction, max_new_tokens=sampling.max_new_tokens,
                               temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)
    if out_dir is not None:
        Path(out_dir, "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
