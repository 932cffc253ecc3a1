"""Benchmark presets and readers (spec §8.1, §8.2).

A benchmark is a list of `Item`s (one image, a prompt, an answer, optional choices) plus a preset:
the instruction appended to every prompt ("question_extension") and max_new_tokens, as the
reference's `<bench>_eval.py` scripts use them. The prompt the model sees is

    "<image>\\n" + prompt + "\\n" + instruction        wrapped in the model's template

(the instruction is not repeated when the prompt already ends with it, as the synthetic set's do).

Readers, chosen by what the folder or file holds:

  CV-Bench        the public release (`nyu-visionx/CV-Bench`): test_2d.parquet / test_3d.parquet
                  (images inside), or jsonl (test_2d.jsonl / test_3d.jsonl / test.jsonl) + img/ with
                  `filename` relative to the folder. Fields idx, type, task, prompt, choices,
                  answer "(A)", source (ADE20K / COCO / Omni3D), filename, image.
  LLaVA           conversations [{"from": "human", "value": "<image>\\n…"}, {"from": "gpt", …}] with
                  "image" relative to the file's folder, optional "meta" {task, choices, answer} —
                  the synthetic dataset's test split (cambrian_jax.data.synthetic).
  LLaVA-eval      question files: question_id, image, text (+ answer / gt_answer, choices / options,
                  category).
  generic         question (+ choices) + answer (+ task, source, image).

Parquet needs pyarrow; the jsonl + img/ form needs nothing beyond the standard library and PIL.
"""
from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
from typing import Any, Mapping, Sequence

from PIL import Image

from cambrian_jax import cli
from cambrian_jax.data.templates import IMAGE_PLACEHOLDER

CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTER_ONLY = "Please answer directly with only the letter of the correct option and nothing else."
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """instruction: appended after a newline (None: prompts are used as they are)."""
    name: str
    instruction: str | None
    max_new_tokens: int


# The reference's settings (spec §8.1); "local" keeps the data's own prompts (e.g. the synthetic set).
BENCHMARKS: dict[str, BenchmarkSpec] = {b.name: b for b in (
    BenchmarkSpec("cv_bench", CHOICE_INSTRUCTION, 512),
    BenchmarkSpec("mmbench_en", CHOICE_INSTRUCTION, 512),
    BenchmarkSpec("seed", CHOICE_INSTRUCTION, 512),
    BenchmarkSpec("mmmu", CHOICE_INSTRUCTION, 512),
    BenchmarkSpec("mmvp", CHOICE_INSTRUCTION, 512),
    BenchmarkSpec("ai2d", CHOICE_INSTRUCTION, 512),
    BenchmarkSpec("vstar", CHOICE_INSTRUCTION, 32),
    BenchmarkSpec("scienceqa", LETTER_ONLY, 512),
    BenchmarkSpec("mmstar", LETTER_ONLY, 128),
    BenchmarkSpec("blink", LETTER_ONLY, 32),
    BenchmarkSpec("qbench", LETTER_ONLY, 32),
    BenchmarkSpec("gqa", SHORT_INSTRUCTION, 128),
    BenchmarkSpec("pope", SHORT_INSTRUCTION, 128),
    BenchmarkSpec("mme", SHORT_INSTRUCTION, 32),
    BenchmarkSpec("textvqa", SHORT_INSTRUCTION, 512),
    BenchmarkSpec("realworldqa", SHORT_INSTRUCTION, 512),
    BenchmarkSpec("local", None, 128),
)}


def get_benchmark(name: str) -> BenchmarkSpec:
    if name not in BENCHMARKS:
        raise cli.InputError(f"unknown benchmark {name!r}: use one of {', '.join(sorted(BENCHMARKS))} "
                             "('local' uses the data's own prompts)")
    return BENCHMARKS[name]


@dataclasses.dataclass
class Item:
    """One question. `image` is a PIL image, a loader returning one, or None (text-only)."""
    id: str
    prompt: str                               # question (+ lettered choices), without "<image>"
    answer: Any                               # "(A)" for multiple choice, text (or list) otherwise
    choices: list[str] | None = None
    task: str = "all"
    source: str | None = None
    type: str | None = None
    image: Any = None
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def load_image(self) -> Image.Image | None:
        image = self.image() if callable(self.image) else self.image
        return image

    @property
    def rule(self) -> str:
        """Answer rule: CV-Bench's 2D sources use the ADE/COCO scorer's, everything else OMNI's."""
        return "ade_coco" if self.source in ("ADE20K", "COCO") else "omni"

    @property
    def chance(self) -> float | None:
        return 1.0 / len(self.choices) if self.choices else None

    def question(self, instruction: str | None) -> str:
        """The user turn without the image placeholder."""
        prompt = self.prompt.strip()
        if instruction and not prompt.endswith(instruction):
            prompt = prompt + "\n" + instruction
        return prompt


def format_choices(question: str, choices: Sequence[str]) -> str:
    """CV-Bench's `prompt` layout: the question, then "(A) …" per line."""
    return question + "".join(f"\n({LETTERS[i]}) {c}" for i, c in enumerate(choices))


# ------------------------------------------------------------------------------------------ images

class _FileImage:
    """An image file, decoded when the item is generated (or checked, `check_images`)."""

    def __init__(self, path: str):
        self.path = self.where = path

    def __call__(self) -> Image.Image:
        return cli.open_image(self.path, "image")


class _BytesImage:
    """Encoded image bytes held by the record (HF datasets' {"bytes", "path"})."""

    def __init__(self, data: bytes, where: str):
        self.data, self.where = data, where

    def __call__(self) -> Image.Image:
        return _decode(self.data, self.where)


def _decode(data: bytes, where: str) -> Image.Image:
    from PIL import UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError) as e:
        raise cli.InputError(f"the image in {where} is not a readable image ({type(e).__name__}: {e})") from None


def _image_ref(value, root: str):
    """A loader for an image field: a path (relative to root), {"bytes", "path"} (HF datasets), a PIL image."""
    if value is None:
        return None
    if isinstance(value, Image.Image) or callable(value):
        return value
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return _BytesImage(value["bytes"], f"{root} ({value.get('path') or 'embedded bytes'})")
        value = value.get("path")
        if not value:
            return None
    path = value if os.path.isabs(value) else os.path.join(root, value)
    return _FileImage(path)


# ----------------------------------------------------------------------------------------- records

def _strip_image(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


def item_from_record(rec: Mapping[str, Any], root: str = ".", index: int = 0) -> Item:
    """An Item from a CV-Bench, LLaVA-conversation, LLaVA-eval or generic record."""
    meta = dict(rec.get("meta") or {})
    choices = rec.get("choices", rec.get("options", meta.get("choices")))
    choices = [str(c) for c in choices] if choices is not None and len(choices) else None
    if "conversations" in rec:
        turns = list(rec["conversations"])
        prompt = _strip_image(turns[0]["value"])
        answer = meta.get("answer", turns[1]["value"] if len(turns) > 1 else None)
    elif rec.get("prompt"):
        prompt, answer = str(rec["prompt"]), rec.get("answer", rec.get("gt_answer"))
    elif rec.get("text") is not None:
        prompt, answer = _strip_image(str(rec["text"])), rec.get("answer", rec.get("gt_answer"))
    elif rec.get("question") is not None:
        prompt = _strip_image(str(rec["question"]))
        if choices and "(A)" not in prompt:
            prompt = format_choices(prompt, choices)
        answer = rec.get("answer", rec.get("gt_answer"))
    else:
        raise cli.InputError(f"record {index}: no prompt (expected 'prompt', 'conversations', 'text' or 'question'); "
                         f"keys {sorted(rec)}")
    if answer is None:
        raise cli.InputError(f"record {index}: no answer (expected 'answer', 'gt_answer', meta.answer or a gpt turn)")
    kind = rec.get("type")
    if rec.get("idx") is not None:
        ident = f"{kind}_{rec['idx']}" if kind else str(rec["idx"])
    else:
        ident = str(rec.get("id", rec.get("question_id", index)))
    image = rec.get("image")
    if image is None or (isinstance(image, str) and not image):
        image = rec.get("filename") or rec.get("image_name")
    task = rec.get("task", meta.get("task", rec.get("category", rec.get("sub_task", "all"))))
    extra = {k: rec[k] for k in ("source_dataset", "source_filename", "target_class", "target_size", "bbox")
             if k in rec and rec[k] is not None}
    return Item(id=ident, prompt=prompt, answer=answer, choices=choices, task=str(task),
                source=rec.get("source"), type=kind, image=_image_ref(image, root), extra=extra)


def _read_jsonl(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise cli.InputError(f"--data {path} is not a text file: give the benchmark's .jsonl/.json/.parquet file "
                             "or its folder") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise cli.InputError(f"--data {path} is not valid JSON ({e})") from None
        records = list(data.values()) if isinstance(data, dict) else list(data)
    else:
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise cli.InputError(f"--data {path}: line {n} is not JSON ({e}); one JSON object per line") from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, Mapping)), None)
    if bad is not None:
        raise cli.InputError(f"--data {path}: record {bad} is not a JSON object")
    return records


def _read_parquet(path: str, root: str) -> list[Item]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow); or use the jsonl + img/ copy of "
                          "the benchmark (e.g. CV-Bench's test_2d.jsonl / test_3d.jsonl with img/)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own errors for a file that is not parquet
        raise cli.InputError(f"--data {path} is not a readable parquet file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    columns = [c for c in table.column_names if c != "image"]
    rows = table.select(columns).to_pylist()
    images = table.column("image") if "image" in table.column_names else None
    items = []
    for i, rec in enumerate(rows):
        if images is not None:
            rec["image"] = _ParquetImage(images, i, f"{path} row {i}")
        items.append(item_from_record(rec, root, i))
    return items


class _ParquetImage:
    """Lazily decoded image of row i of a parquet image column ({"bytes", "path"} structs)."""

    def __init__(self, column, row: int, where: str):
        self.column, self.row, self.where = column, row, where

    def __call__(self) -> Image.Image:
        value = self.column[self.row].as_py()
        data = value.get("bytes") if isinstance(value, Mapping) else value
        if not data:
            raise cli.InputError(f"{self.where} has no image bytes")
        return _decode(data, self.where)


def _cv_bench_files(folder: str) -> tuple[str, list[str]]:
    """('jsonl' | 'parquet', files) of a CV-Bench copy; jsonl + img/ preferred (images read lazily from disk)."""
    def existing(names):
        return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]

    jsonl = existing(["test_2d.jsonl", "test_3d.jsonl"]) or existing(["test.jsonl"])
    if jsonl and os.path.isdir(os.path.join(folder, "img")):
        return "jsonl", jsonl
    parquet = existing(["test_2d.parquet", "test_3d.parquet"]) or existing(["test.parquet"])
    if not parquet:
        parquet = sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True))
    if parquet:
        return "parquet", parquet
    if jsonl:
        return "jsonl", jsonl
    raise cli.InputError(f"--data {folder} holds no CV-Bench files (test_2d.parquet / test_3d.parquet, or "
                         "test_2d.jsonl / test_3d.jsonl / test.jsonl with img/): give the folder of a CV-Bench copy")


def load_items(data: str | os.PathLike, benchmark: str = "local", limit: int | None = None) -> list[Item]:
    """The items of a benchmark copy: a folder (CV-Bench layout, or one *.jsonl / *.json / *.parquet
    file in it) or a file. Ids must be unique (they key the predictions file)."""
    data = os.fspath(data)
    if not os.path.exists(data):
        raise cli.InputError(f"--data {data} does not exist: give the benchmark's local copy (a folder or a "
                             ".jsonl/.json/.parquet file)")
    if os.path.isdir(data):
        root = data
        if benchmark == "cv_bench" or any(os.path.isfile(os.path.join(data, f)) for f in
                                          ("test_2d.parquet", "test_3d.parquet", "test_2d.jsonl", "test_3d.jsonl")):
            kind, files = _cv_bench_files(data)
        else:
            files = sorted(f for ext in ("jsonl", "json", "parquet") for f in glob.glob(os.path.join(data, f"*.{ext}")))
            if len(files) != 1:
                raise cli.InputError(f"--data {data}: expected one .jsonl/.json/.parquet file with the questions, "
                                     f"found {[os.path.basename(f) for f in files]}; pass the file itself with --data")
            kind = "parquet" if files[0].endswith(".parquet") else "jsonl"
    else:
        root, files = os.path.dirname(os.path.abspath(data)), [data]
        kind = "parquet" if data.endswith(".parquet") else "jsonl"
    items: list[Item] = []
    for path in files:
        try:
            if kind == "parquet":
                items += _read_parquet(path, root)
            else:
                items += [item_from_record(r, root, i) for i, r in enumerate(_read_jsonl(path), start=len(items))]
        except cli.InputError as e:
            raise (e if str(e).startswith("--data") else cli.InputError(f"--data {path}: {e}")) from None
    seen: dict[str, int] = {}
    for it in items:
        seen[it.id] = seen.get(it.id, 0) + 1
    dupes = [k for k, v in seen.items() if v > 1]
    if dupes:
        raise cli.InputError(f"--data {data}: item ids are not unique ({dupes[:5]}…); predictions are keyed by id")
    if not items:
        raise cli.InputError(f"--data {data} holds no items: give the benchmark's question file (or its folder)")
    return items[:limit] if limit else items


def image_source(item: Item) -> str:
    """Where an item's image comes from (a path, a parquet row), for messages."""
    return str(getattr(item.image, "where", None) or ("in memory" if item.has_image else "none"))


def check_images(items: Sequence[Item], data: str | os.PathLike = "") -> None:
    """Decode every item's image once (and drop it), so that a missing or broken image is reported
    before anything is generated or written: an InputError naming the item and the image."""
    for it in items:
        if not it.has_image:
            continue
        try:
            image = it.load_image()
        except cli.InputError as e:
            where = f"--data {os.fspath(data)}: " if data else ""
            raise cli.InputError(f"{where}item {it.id}: {e}; fix the image or leave the item out of the data") \
                from None
        if not isinstance(image, Image.Image):
            raise cli.InputError(f"item {it.id}: its image ({image_source(it)}) is not an image but "
                                 f"{type(image).__name__}")
