"""LLaVA-format JSONL + images → ArrayRecord shards (spec §7.3).

    python -m cambrian_jax.data.prepare --jsonl a.jsonl [--jsonl b.jsonl …] --image-root DIR --out DIR \\
        [--num-shards N] [--workers N]

One record per kept sample: msgpack of the cleaned sample plus the image file's bytes (records.py).
The inputs are split into `num_shards` byte ranges (a line belongs to the range holding its first
byte) and each shard is written by one worker process, streaming: memory stays bounded by one line
and one image per worker. A finished shard gets `<shard>.done.json` (its counts) and `<shard>.meta.npz`
(has_image and word length per record, for length-grouped batching); a re-run skips finished shards
and redoes unfinished ones, so an interrupted run resumes. Progress (lines/s, ETA) goes to stderr.

Every refused sample is counted under a named reason (records.REASONS) with a few file:line
examples; nothing crashes on bad input and nothing is dropped silently. Images are checked
(path inside --image-root, decodable, not truncated, size limits) and converted: any mode other
than RGB (CMYK, greyscale, palette, RGBA, 16-bit) and any format other than JPEG/PNG is stored as
an RGB PNG (preprocess.to_rgb); RGB JPEG/PNG files are stored byte for byte. The summary goes to
OUT/summary.json as {"written": n, "skipped": {reason: n}, "bytes": n, "text_only": n,
"converted": {what: n}, "examples": {reason: [file:line …]}}.

Mistakes in the arguments (a --jsonl that does not exist or holds a JSON array, an --image-root that
is not a folder or holds none of the first samples' images, an --out that is a file or holds another
run's shards, limits out of range) end in one line and exit 2 (cambrian_jax/cli.py) before anything
is written.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import multiprocessing
import os
import re
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import numpy as np
from PIL import Image

from cambrian_jax import cli
from cambrian_jax.cli import InputError
from cambrian_jax.data import records
from cambrian_jax.data.records import Skip

_EXAMPLES_PER_REASON = 5
_FORMAT = "data-{:05d}-of-{:05d}"


@dataclasses.dataclass(frozen=True)
class Limits:
    min_side: int = 2                      # shorter side below this → image_too_small (1×1 pixels, 1-px lines)
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485   # above → image_too_large (bomb guard)
    max_aspect: float = 20.0               # beyond → extreme_aspect_ratio (an LLM grid of 24 keeps ≥ 1 row)
    max_side: int = 0                      # > 0: downscale longer sides to this (bicubic), counted as converted
    max_file_bytes: int = 256 << 20        # larger files → image_too_large


# ----------------------------------------------------------------------------------------------- images

def resolve_image(path: str, root: str) -> str:
    """Absolute path of `path` under the (real) `root`; refuses escapes and missing files."""
    if os.path.isabs(path) or path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", path):
        raise Skip("image_path_escapes_root", "an absolute path")
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([full, root]) != root:
        raise Skip("image_path_escapes_root", f"resolves to {full}, outside --image-root")
    if not os.path.exists(full):
        raise Skip("missing_image", "no such file under --image-root")
    if not os.path.isfile(full):
        raise Skip("unreadable_image", "not a file")
    return full


def _no_buffer(e: BaseException) -> str:
    """An exception's message without the in-memory buffer PIL names for the file (<_io.BytesIO …>)."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e)).strip() or type(e).__name__


def check_image(data: bytes, limits: Limits) -> tuple[bytes, tuple[int, int], list[str]]:
    """(bytes to store, (W, H), conversions made) for encoded image `data`; raises Skip."""
    if len(data) > limits.max_file_bytes:
        raise Skip("image_too_large", f"{len(data)} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Skip("image_too_large", str(e)) from None
    except Image.UnidentifiedImageError:
        raise Skip("unreadable_image", "not an image PIL can identify (corrupt, or not an image file)") from None
    except Exception as e:  # noqa: BLE001 — PIL raises many types for bad files
        raise Skip("unreadable_image", f"{type(e).__name__}: {_no_buffer(e)}") from None
    w, h = img.size
    if w * h > limits.max_pixels:
        raise Skip("image_too_large", f"{w}×{h}")
    if min(w, h) < limits.min_side:
        raise Skip("image_too_small", f"{w}×{h}")
    if max(w / h, h / w) > limits.max_aspect:
        raise Skip("extreme_aspect_ratio", f"{w}×{h}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Exception as e:  # noqa: BLE001
        reason = "truncated_image" if "truncat" in str(e).lower() else "unreadable_image"
        raise Skip(reason, f"{type(e).__name__}: {_no_buffer(e)}") from None
    conversions = []
    if img.mode != "RGB":
        conversions.append(f"mode_{img.mode}")
    if img.format not in ("JPEG", "PNG"):
        conversions.append(f"format_{img.format}")
    if getattr(img, "n_frames", 1) > 1:
        conversions.append("first_frame")
    if limits.max_side and max(w, h) > limits.max_side:
        conversions.append("downscaled")
    if not conversions:
        return data, (w, h), conversions
    from cambrian_jax.preprocess import to_rgb  # noqa: PLC0415 (keeps the import light for the CLI's --help)
    img = to_rgb(img)
    if limits.max_side and max(w, h) > limits.max_side:
        scale = limits.max_side / max(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=3)
    return out.getvalue(), img.size, conversions


def load_image(path: str, root: str, limits: Limits) -> tuple[bytes, tuple[int, int], list[str]]:
    full = resolve_image(path, root)
    try:
        with open(full, "rb") as f:
            data = f.read(limits.max_file_bytes + 1)
    except OSError as e:
        raise Skip("unreadable_image", f"{type(e).__name__}: {e.strerror or e}") from None
    return check_image(data, limits)


# ---------------------------------------------------------------------------------------------- shards

@dataclasses.dataclass(frozen=True)
class ShardJob:
    index: int
    count: int
    segments: tuple[tuple[str, int, int, int], ...]   # (file, start byte, end byte, line number at start)
    out: str
    image_root: str
    limits: Limits


_CHUNK = 1 << 22


def scan(file: str) -> tuple[int, list[int]]:
    """(number of lines, newlines before every 4 MiB boundary) in one streaming pass."""
    checkpoints, newlines, last = [0], 0, b"\n"
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            newlines += chunk.count(b"\n")
            checkpoints.append(newlines)
            last = chunk[-1:]
    return newlines + (last != b"\n"), checkpoints


def _line_at(file: str, offset: int, checkpoints: list[int]) -> int:
    """Line number (1-based) of the byte at `offset`."""
    k = offset // _CHUNK
    with open(file, "rb") as f:
        f.seek(k * _CHUNK)
        return checkpoints[k] + f.read(offset - k * _CHUNK).count(b"\n") + 1


def plan_shards(files: list[str], num_shards: int, scans: dict | None = None) -> list[list[tuple[str, int, int, int]]]:
    """Split the concatenated files into `num_shards` byte ranges, as per-file segments
    (file, start, end, line number at start); a line belongs to the range holding its first byte."""
    scans = scans or {f: scan(f) for f in files}
    sizes = [os.path.getsize(f) for f in files]
    total = sum(sizes)
    plans: list[list[tuple[str, int, int, int]]] = [[] for _ in range(num_shards)]
    for s in range(num_shards):
        lo, hi = s * total // num_shards, (s + 1) * total // num_shards
        base = 0
        for f, size in zip(files, sizes):
            a, b = max(lo, base), min(hi, base + size)
            if a < b:
                plans[s].append((f, a - base, b - base, _line_at(f, a - base, scans[f][1])))
            base += size
    return plans


def _lines(file: str, start: int, end: int, lineno: int):
    """(line number, bytes) of the lines whose first byte lies in [start, end); `lineno` is the
    line number at byte `start`."""
    with open(file, "rb") as f:
        f.seek(max(start - 1, 0))
        if start > 0 and f.read(1) != b"\n":
            f.readline()          # the rest of a line that began in the previous range
            lineno += 1
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                break
            yield lineno, line
            lineno += 1
            pos += len(line)


def shard_name(index: int, count: int) -> str:
    return _FORMAT.format(index, count)


def _new_stats() -> dict:
    return {"written": 0, "skipped": {}, "bytes": 0, "text_only": 0, "converted": {}, "examples": {}}


def _skip(stats: dict, reason: str, where: str, detail: str = "") -> None:
    stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
    ex = stats["examples"].setdefault(reason, [])
    if len(ex) < _EXAMPLES_PER_REASON:
        ex.append(f"{where}: {detail}" if detail else where)


def process_line(line: bytes, where: str, image_root: str, limits: Limits):
    """(record bytes, has_image, word length, conversions) of one JSONL line; raises Skip."""
    if not line.strip():
        raise Skip("blank_line")
    try:
        raw = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise Skip("malformed_json", str(e)) from None
    sample = records.clean_sample(raw, default_id=where)
    image = size = None
    conversions: list[str] = []
    if sample["image"] is not None:
        try:
            image, size, conversions = load_image(sample["image"], image_root, limits)
        except Skip as e:     # name the record and its image: the example says which file to look at
            raise Skip(e.reason, f"id {sample['id']!r}, image {sample['image']!r}: {e.detail}") from None
    record = records.encode_record(sample, image, size)
    return record, image is not None, records.word_length(sample["conversations"]), conversions


def write_shard(job: ShardJob, progress: Callable[[int], None] | None = None) -> dict:
    """Write one shard (to a temporary name, renamed when complete) and its done marker."""
    from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415

    name = os.path.join(job.out, shard_name(job.index, job.count))
    tmp = name + ".array_record.tmp"
    stats = _new_stats()
    has_image, lengths = [], []
    writer = ArrayRecordWriter(tmp, "group_size:1")
    pending, last = 0, time.monotonic()
    try:
        for file, start, end, first_line in job.segments:
            base = os.path.basename(file)
            for lineno, line in _lines(file, start, end, first_line):
                where = f"{base}:{lineno}"
                try:
                    record, image, length, conversions = process_line(line, where, job.image_root, job.limits)
                except Skip as e:
                    _skip(stats, e.reason, where, e.detail)
                except Exception as e:  # noqa: BLE001 — one odd sample must not end a run of millions
                    _skip(stats, "unexpected_error", where, f"{type(e).__name__}: {e}")
                else:
                    writer.write(record)
                    stats["written"] += 1
                    stats["text_only"] += not image
                    for c in conversions:
                        stats["converted"][c] = stats["converted"].get(c, 0) + 1
                    has_image.append(image)
                    lengths.append(length)
                pending += 1
                if progress and (pending >= 256 or time.monotonic() - last > 0.5):
                    progress(pending)
                    pending, last = 0, time.monotonic()
    finally:
        writer.close()
    if progress and pending:
        progress(pending)
    os.replace(tmp, name + ".array_record")
    stats["bytes"] = os.path.getsize(name + ".array_record")
    np.savez(name + ".meta.npz", has_image=np.asarray(has_image, bool), length=np.asarray(lengths, np.int32))
    with open(name + ".done.json.tmp", "w") as f:
        json.dump(stats, f)
    os.replace(name + ".done.json.tmp", name + ".done.json")
    return stats


_QUEUE = None


def _init_worker(queue) -> None:
    global _QUEUE
    _QUEUE = queue


def _run_job(job: ShardJob) -> dict:
    return write_shard(job, lambda n: _QUEUE.put(n))


# -------------------------------------------------------------------------------------------- driver

def merge_stats(all_stats: list[dict]) -> dict:
    total = _new_stats()
    for s in all_stats:
        total["written"] += s["written"]
        total["bytes"] += s["bytes"]
        total["text_only"] += s["text_only"]
        for key in ("skipped", "converted"):
            for k, v in s[key].items():
                total[key][k] = total[key].get(k, 0) + v
        for k, v in s["examples"].items():
            ex = total["examples"].setdefault(k, [])
            ex.extend(v[:max(0, 2 * _EXAMPLES_PER_REASON - len(ex))])
    total["skipped"] = dict(sorted(total["skipped"].items()))
    return total


class _Progress:
    def __init__(self, total: int, interval: float):
        self.total, self.interval = max(total, 1), interval
        self.done, self.start, self.last = 0, time.monotonic(), 0.0

    def __call__(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        eta_s = "{}:{:02d}:{:02d}".format(int(eta) // 3600, int(eta) // 60 % 60, int(eta) % 60) if math.isfinite(eta) else "?"
        print(f"[prepare] {self.done}/{self.total} lines ({100 * self.done / self.total:.1f}%) · "
              f"{rate:.0f} lines/s · ETA {eta_s}", file=sys.stderr, flush=True)


def _input_file(path: str) -> str:
    if not os.path.isfile(path):
        state = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise InputError(f"--jsonl {path} {state}; give a LLaVA-format JSONL file (one sample per line)")
    return path


def _input_dir(path: str) -> str:
    if not os.path.isdir(path):
        state = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise InputError(f"--image-root {path} {state}; give the folder the samples' image paths are relative to")
    return path


def _check_limits(limits: Limits) -> None:
    for flag, value, low in (("--min-side", limits.min_side, 1), ("--max-pixels", limits.max_pixels, 1),
                             ("--max-aspect", limits.max_aspect, 1), ("--max-side", limits.max_side, 0),
                             ("--max-file-bytes", limits.max_file_bytes, 1)):
        if not value >= low:
            raise InputError(f"{flag} {value}: give a number of at least {low}")


_PROBE = 50     # samples with an image that _check_image_root looks at


def _check_jsonl(file: str) -> None:
    """A JSON array (how LLaVA releases its data) is not JSONL: refuse it rather than count every line bad."""
    with open(file, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        base, ext = os.path.splitext(file)
        target = base + ("_lines.jsonl" if ext == ".jsonl" else ".jsonl")
        raise InputError(f"--jsonl {file} holds one JSON array, not one sample per line; convert it first, e.g. "
                         f"jq -c '.[]' {file} > {target}")


def _image_paths(files: list[str]):
    """(file:line, image path) of the samples with an image, in input order (unparsable lines skipped)."""
    for file in files:
        with open(file, "rb") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    sample = json.loads(line)
                    path = records.image_field(sample) if isinstance(sample, dict) else None
                except (ValueError, Skip):
                    continue
                if path is not None:
                    yield f"{os.path.basename(file)}:{lineno}", path


def _check_image_root(files: list[str], root: str, given: str) -> None:
    """Refuse an --image-root under which none of the first samples' images exist (the wrong folder);
    a few missing images among many are counted per sample instead."""
    seen, first = 0, None
    for where, path in _image_paths(files):
        if seen >= _PROBE:
            break
        seen += 1
        try:
            resolve_image(path, root)
            return                       # one image found: the folder is right
        except Skip as e:
            if e.reason != "missing_image":
                return
            first = first or (where, path)
    if first:
        raise InputError(f"--image-root {given}: none of the first {seen} images exist under it (e.g. {first[1]!r} of "
                         f"{first[0]}); give the folder the samples' image paths are relative to")


def prepare(jsonl: list[str], image_root: str, out: str, num_shards: int | None = None, workers: int | None = None,
            limits: Limits = Limits(), progress_interval: float = 2.0, verbose: bool = True) -> dict:
    """Convert; returns the summary (also written to OUT/summary.json). Resumes an interrupted run.
    Bad arguments raise InputError (one line from the CLI) before anything is written."""
    files = [os.path.abspath(_input_file(f)) for f in jsonl]
    root = os.path.realpath(_input_dir(image_root))
    _check_limits(limits)
    if num_shards is not None and num_shards < 1:
        raise InputError(f"--num-shards {num_shards}: give at least 1 (or leave it out: one shard per 20k lines)")
    if workers is not None and workers < 0:
        raise InputError(f"--workers {workers}: give 0 or more (0 and 1 write the shards in this process)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out} is a file; give a folder (new, or one of an interrupted run to resume)")
    for f in files:
        _check_jsonl(f)
    _check_image_root(files, root, image_root)
    scans = {f: scan(f) for f in files}
    total_lines = sum(n for n, _ in scans.values())
    if num_shards is None:
        num_shards = max(1, math.ceil(total_lines / 20_000))
    run = {"inputs": [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files], "image_root": root,
           "num_shards": num_shards, "limits": dataclasses.asdict(limits)}
    run_file = os.path.join(out, "prepare.json")
    if os.path.exists(run_file):
        try:
            with open(run_file) as f:
                previous = json.load(f)
        except (OSError, ValueError) as e:
            raise InputError(f"{run_file} is not a prepare record ({type(e).__name__}: {e}); give a fresh --out "
                             f"or delete {out}") from None
        if previous != json.loads(json.dumps(run)):
            raise InputError(f"{out!r} holds shards of a different prepare run (other inputs, shard count or "
                             f"limits); give a fresh --out or delete {run_file!r} and the shards")
    else:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise InputError(f"--out {out}: cannot create it ({e.strerror or e}); give a folder you can write") \
                from None
        with open(run_file, "w") as f:
            json.dump(run, f, indent=1)

    plans = plan_shards(files, num_shards, scans)
    jobs, done = [], {}
    for s, segments in enumerate(plans):
        marker = os.path.join(out, shard_name(s, num_shards) + ".done.json")
        if os.path.exists(marker):
            with open(marker) as f:
                done[s] = json.load(f)
        else:
            jobs.append(ShardJob(s, num_shards, tuple(segments), out, root, limits))
    if verbose and done:
        print(f"[prepare] resuming: {len(done)} of {num_shards} shards already complete", file=sys.stderr)
    todo_lines = total_lines - sum(sum(d["skipped"].values()) + d["written"] for d in done.values())
    progress = _Progress(todo_lines, progress_interval if verbose else math.inf)
    workers = min(os.cpu_count() or 1, len(jobs)) if workers is None else min(workers, len(jobs))
    if workers <= 1:
        for job in jobs:
            done[job.index] = write_shard(job, progress)
    else:
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(queue,)) as pool:
            futures = {pool.submit(_run_job, job): job.index for job in jobs}
            pending = set(futures)
            while pending:
                while not queue.empty():
                    progress(queue.get())
                finished = {f for f in pending if f.done()}
                for f in finished:
                    done[futures[f]] = f.result()
                pending -= finished
                time.sleep(0.05)
            while not queue.empty():
                progress(queue.get())
    if verbose:
        progress(0, force=True)
    summary = merge_stats([done[s] for s in sorted(done)])
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if verbose:
        print(format_summary(summary), file=sys.stderr)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"written {summary['written']} records ({summary['text_only']} text-only), "
             f"{summary['bytes'] / 2**20:.1f} MiB"]
    for reason, n in summary["skipped"].items():
        ex = "; ".join(summary["examples"].get(reason, [])[:2])
        lines.append(f"  skipped {n:>8} {reason:<26} e.g. {ex}")
    for what, n in sorted(summary["converted"].items()):
        lines.append(f"  converted {n:>6} {what}")
    return "\n".join(lines)


@cli.guarded
def main(argv: list[str] | None = None) -> dict:
    p = cli.ArgumentParser(prog="python -m cambrian_jax.data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--jsonl", action="append", required=True, help="LLaVA-format JSONL (repeatable)")
    p.add_argument("--image-root", required=True, help="folder the samples' image paths are relative to")
    p.add_argument("--out", required=True, help="output folder for the shards and summary.json")
    p.add_argument("--num-shards", type=int, default=None, help="default: one per 20k input lines")
    p.add_argument("--workers", type=int, default=None, help="parallel shard writers (default: CPU count)")
    d = Limits()
    p.add_argument("--min-side", type=int, default=d.min_side)
    p.add_argument("--max-pixels", type=int, default=d.max_pixels)
    p.add_argument("--max-aspect", type=float, default=d.max_aspect)
    p.add_argument("--max-side", type=int, default=d.max_side, help="downscale longer sides above this (0: never)")
    p.add_argument("--max-file-bytes", type=int, default=d.max_file_bytes)
    a = p.parse_args(argv)
    limits = Limits(a.min_side, a.max_pixels, a.max_aspect, a.max_side, a.max_file_bytes)
    summary = prepare(a.jsonl, a.image_root, a.out, a.num_shards, a.workers, limits)
    print(json.dumps({k: summary[k] for k in ("written", "skipped", "bytes")}))
    return summary


if __name__ == "__main__":
    main()
