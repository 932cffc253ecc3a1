"""The grain pipeline: records → fixed-shape numpy batches (spec §2.2, §3.5, §4, §7.1).

Order of operations, all as grain `MapDataset`s so every row is a pure function of its index:

1. global order: global row i (over all epochs) → record index, from a per-epoch permutation of a
   seed (grain's index_shuffle, as `MapDataset.shuffle` does it) or, with `group_by_modality`,
   from megabatches of one global batch each holding only image or only text samples (spec §7.1);
2. host rows: global batch g is rows [g·GB, (g+1)·GB); process p of P takes rows
   g·GB + p·B … g·GB + (p+1)·B − 1 with B = GB/P. The global order never depends on P, so P
   processes together see exactly the batches one process would, split by rows;
3. per-record transform (decode, tokenise, per-tower preprocessing) in grain workers;
4. `batch(B)`, then `to_iter_dataset` (+ `mp_prefetch` when worker_count > 0).

The iterator's state is one number, the next global row (a multiple of GB), so a restore continues
with exactly the next batch, with any number of processes and any worker count.

Batch contract (T = max_len, B = per-host batch size, one entry per tower k in model order):

    input_ids       int32   [B, T]    image block slots hold filler 0, padding 0
    labels          int32   [B, T]    IGNORE_INDEX (−100) where not supervised; NOT shifted
    attention_mask  bool    [B, T]
    positions       int32   [B, T]    layout.positions(attention_mask)
    has_image       bool    [B]
    pixels_{k}      float32 [B, R_k, R_k, 3]  normalised (data.pixel_format = "uint8": uint8 RGB, to
                                      normalise on device with preprocess.normalize_device)
    tower_mask_{k}  bool    [B, s_k²]  True where the tower's grid cell shows the image
    index           int64   [B]       record index in the source, only with data.with_index (debugging, tests)

The n×(n+1) image block is always at [image_position, image_position + n(n+1)). Text-only samples
get a dummy block (attention fully masked, labels ignored), zero pixels, all-True tower masks.

Entries: make_dataset (config.data section), make_memory_dataset (in-memory samples), stage_dataset
(the trainer's: config.data overlaid with stageN.data).
"""
from __future__ import annotations

import collections
import functools
import glob
import io
import json
import os
import sys
from typing import Any, Iterable, Mapping, Sequence

import grain
import ml_collections
import numpy as np
from PIL import Image

from cambrian_jax import layout, preprocess
from cambrian_jax.config import IGNORE_INDEX, CambrianConfig, ConfigError, from_dict
from cambrian_jax.data import records, templates
from cambrian_jax.data.tokenizer import TextTokenizer, as_tokenizer

# Row outcomes the iterator counts (DataIterator.stats); rows other than "ok"/"truncated" carry no labels.
STATUS = ("ok", "truncated", "no_supervised_tokens", "unreadable_image")
_MAX_ROWS = 1 << 62       # "forever": as many epochs as fit in an index grain can slice


def data_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Defaults of `config.data`, the fields make_dataset reads."""
    c = ml_collections.ConfigDict()
    c.source = "array_record"        # "array_record" (paths) or "synthetic" (generated in memory)
    c.paths = []                     # prepare output folders, shard files or globs (in this order)
    c.tokenizer_dir = ""             # folder with tokenizer.json (make_dataset's tokenizer_dir wins)
    c.synthetic_tokenizer = False    # no tokenizer_dir: stage_dataset builds the synthetic dataset's byte-level
                                     # tokenizer (any text) under workdir/tokenizer; source "synthetic" always does
    c.template = "phi3"              # llama_3 | vicuna_v1 | chatml_direct | phi3
    c.seed = 0
    c.global_batch_size = 8          # rows per step over all processes; a multiple of process_count
    c.max_len = 0                    # T; 0 = model.max_len
    c.shuffle = True
    c.num_epochs = 1                 # None repeats forever
    c.group_by_modality = False      # megabatches of image-only / text-only samples (stage 2, spec §7.1)
    c.image_mode = "pad"             # pad | resize | resize_crop (preprocess.MODES)
    c.pixel_format = "float32"       # float32 (normalised) | uint8 (4× less to transfer; normalise on device)
    c.worker_count = 0               # grain worker processes (0: in the main process)
    c.worker_buffer_size = 2         # batches prefetched per worker
    c.read_threads = 4               # threads per process computing rows
    c.with_index = False             # add `index` (record index in the source) to batches
    c.cache_rows = False             # keep each record's row after its first epoch (small in-memory datasets)
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.num_samples = 2000   # source == "synthetic": samples generated in memory
    c.synthetic.split = "train"
    c.synthetic.tasks = ("count", "relation", "depth")
    c.synthetic.seed = 0
    c.update(overrides)
    return c


def batch_spec(model_cfg, data_cfg, rows: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """{field: (shape, dtype)} of a batch of `rows` as this pipeline yields it (the batch contract), for
    lowering a step without data (the planner, benchmarks)."""
    t = int(data_cfg.get("max_len") or 0) or model_cfg.max_len
    pixels = "uint8" if data_cfg.get("pixel_format", "float32") == "uint8" else "float32"
    spec = dict(input_ids=((rows, t), "int32"), labels=((rows, t), "int32"), attention_mask=((rows, t), "bool"),
                positions=((rows, t), "int32"), has_image=((rows,), "bool"))
    for k, tower in enumerate(model_cfg.towers):
        spec[f"pixels_{k}"] = ((rows, tower.image_size, tower.image_size, 3), pixels)
        spec[f"tower_mask_{k}"] = ((rows, tower.token_len), "bool")
    return spec


# ------------------------------------------------------------------------------------------- order

class GlobalOrder:
    """Global row → record index over `num_epochs` epochs. Independent of process count."""

    def __init__(self, num_records: int, global_batch: int, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = 1, modality: np.ndarray | None = None, lengths: np.ndarray | None = None):
        if num_records <= 0:
            raise ValueError("the dataset is empty")
        self.n, self.gb, self.seed, self.shuffle = num_records, global_batch, int(seed), shuffle
        self.grouped = modality is not None
        self.modality = None if modality is None else np.asarray(modality, bool)
        self.lengths = None if lengths is None else np.asarray(lengths, np.int64)
        # Grouped epochs end on a global-batch boundary so megabatches stay aligned with batches.
        self.epoch_len = (self.n // self.gb) * self.gb if self.grouped else self.n
        if self.epoch_len == 0:
            raise ValueError(f"{self.n} records do not fill one global batch of {self.gb} with group_by_modality")
        self.num_epochs = num_epochs

    def __len__(self) -> int:
        epochs = max(1, _MAX_ROWS // self.epoch_len) if self.num_epochs is None else self.num_epochs
        return self.epoch_len * epochs

    @property
    def num_batches(self) -> int:
        return len(self) // self.gb

    def __call__(self, row: int) -> int:
        epoch, k = divmod(int(row), self.epoch_len)
        if self.grouped:
            return int(self._grouped_epoch(epoch)[k])
        if not self.shuffle or self.n == 1:
            return k
        return grain.experimental.index_shuffle(k, max_index=self.n - 1, seed=(self.seed + epoch) % 2**32, rounds=4)

    @functools.lru_cache(maxsize=2)
    def _grouped_epoch(self, epoch: int) -> np.ndarray:
        """LLaVA's modality-grouped order, with megabatch = one global batch (spec §7.1)."""
        rng = np.random.default_rng([self.seed, epoch])
        lengths = self.lengths if self.lengths is not None else np.zeros(self.n, np.int64)
        chunks = []
        for group in (np.flatnonzero(self.modality), np.flatnonzero(~self.modality)):
            group = rng.permutation(group) if self.shuffle else group
            chunks += [group[i:i + self.gb] for i in range(0, len(group), self.gb)]
        full = [c for c in chunks if len(c) == self.gb]
        tail = np.concatenate([c for c in chunks if len(c) < self.gb] + [np.zeros(0, np.int64)])
        if self.shuffle:
            full = [full[i] for i in rng.permutation(len(full))]
        mega = [c[np.argsort(-lengths[c], kind="stable")] for c in full]
        order = np.concatenate(mega + [tail]) if mega else tail
        return order[:self.epoch_len]


class HostRows:
    """Random-access rows of one process: j → (global row, record index, record)."""

    def __init__(self, source: Sequence, order: GlobalOrder, process_index: int, process_count: int):
        self.source, self.order = source, order
        self.p, self.gb = process_index, order.gb
        self.b = order.gb // process_count

    def __len__(self) -> int:
        return self.order.num_batches * self.b

    def __getitem__(self, j: int):
        g, r = divmod(int(j), self.b)
        row = g * self.gb + self.p * self.b + r
        k = self.order(row)
        return row, k, self.source[k]


# --------------------------------------------------------------------------------------- transform

class RecordTransform:
    """One record → one row of the batch contract. Shared by the ArrayRecord and in-memory sources."""

    def __init__(self, cfg: CambrianConfig, tokenizer: TextTokenizer, template: str, max_len: int,
                 image_mode: str = "pad", with_index: bool = False, pixel_format: str = "float32"):
        self.towers = cfg.towers
        self.n = cfg.connector.grid
        self.block = cfg.connector.block_len
        self.p = cfg.image_position
        self.max_len = max_len
        self.tokenizer = tokenizer
        self.template = templates.get_template(template)
        self.mode = image_mode
        self.with_index = with_index
        self.normalized = pixel_format == "float32"
        self.pad_id = 0

    def _image(self, image) -> Image.Image | None:
        if image is None or isinstance(image, Image.Image):
            return image
        img = Image.open(io.BytesIO(image))
        img.load()
        return img

    def __call__(self, item) -> dict[str, np.ndarray]:
        _, record_index, record = item
        if isinstance(record, (bytes, bytearray)):
            record = records.decode_record(record)
        status = "ok"
        try:
            image = self._image(record.get("image"))
        except Exception:  # noqa: BLE001 — a record whose image no longer decodes is masked, not fatal
            image, status = None, "unreadable_image"
        has_image = record.get("image") is not None
        enc = templates.encode(self.template, self.tokenizer, record["conversations"], has_image=has_image,
                               image_position=self.p)
        ids, mask, labels = layout.expand_image_block(enc.ids, self.p, self.n, None, enc.labels, has_image)
        size = image.size if image is not None else None
        tower_masks, block_mask = preprocess.image_masks(size, self.towers, self.n, self.mode)
        if image is not None:
            mask[self.p:self.p + self.block] = block_mask
            pixels = preprocess.preprocess_towers(image, self.towers, self.mode, self.normalized)
        else:
            mask[self.p:self.p + self.block] = False
            pixels = [preprocess.blank_pixels(t, self.normalized) for t in self.towers]
            tower_masks = [np.ones(t.token_len, bool) for t in self.towers]
        if status == "unreadable_image":
            labels[:] = IGNORE_INDEX       # a question about an image the model cannot see: not trained on
        t = self.max_len
        if len(ids) > t:                   # never inside the block: make_dataset checks p + n(n+1) <= max_len
            ids, mask, labels = ids[:t], mask[:t], labels[:t]
            status = "truncated" if status == "ok" else status
        if status != "unreadable_image" and not (labels != IGNORE_INDEX).any():
            status = "no_supervised_tokens"
        pad = t - len(ids)
        ids = np.pad(ids, (0, pad), constant_values=self.pad_id).astype(np.int32)
        labels = np.pad(labels, (0, pad), constant_values=IGNORE_INDEX).astype(np.int32)
        mask = np.pad(mask, (0, pad), constant_values=False)
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask, "positions": layout.positions(mask),
               "has_image": np.asarray(image is not None)}
        for k, (px, tm) in enumerate(zip(pixels, tower_masks)):
            out[f"pixels_{k}"] = px
            out[f"tower_mask_{k}"] = tm
        out["_status"] = np.asarray(STATUS.index(status), np.int8)
        if self.with_index:
            out["index"] = np.asarray(record_index, np.int64)
        return out


class RowCache:
    """A RecordTransform that computes each record's row once: later epochs reuse it. Rows are a
    function of the record alone, so the batches are the same as without the cache. Memory grows to
    one row per record (≈80 KiB each at the tiny config's tower sizes)."""

    def __init__(self, transform: RecordTransform):
        self.transform = transform
        self.rows: dict[int, dict[str, np.ndarray]] = {}

    def __call__(self, item) -> dict[str, np.ndarray]:
        index = item[1]
        row = self.rows.get(index)
        if row is None:
            row = self.rows[index] = self.transform(item)
        return row


# ---------------------------------------------------------------------------------------- iterator

class _Plan:
    """Everything needed to (re)start the per-host batch stream at a global batch."""

    def __init__(self, source, order: GlobalOrder, transform: RecordTransform, process_index: int,
                 process_count: int, worker_count: int, worker_buffer_size: int, read_threads: int):
        self.rows = HostRows(source, order, process_index, process_count)
        self.order, self.transform = order, transform
        self.worker_count, self.worker_buffer_size, self.read_threads = worker_count, worker_buffer_size, read_threads

    def batches(self, start_batch: int):
        b = self.rows.b
        ds = grain.MapDataset.source(self.rows)[start_batch * b:].map(self.transform).batch(b, drop_remainder=True)
        # Elements are whole batches here (≈17 MiB per row at the released tower sizes): buffer few.
        threads = max(1, self.read_threads)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
        if self.worker_count > 0:
            from absl import flags  # noqa: PLC0415 — grain workers read absl flags
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count,
                                                            per_worker_buffer_size=self.worker_buffer_size))
        return iter(it)


class DataIterator(grain.DatasetIterator):
    """Per-host batches; `get_state()` / `set_state()` checkpoint the position (the next global row).

    `stats` counts row outcomes (STATUS) seen by this iterator since it was created.
    """

    def __init__(self, plan: _Plan):
        super().__init__()
        self._plan = plan
        self._next_batch = 0
        self._it = None
        self.stats: collections.Counter = collections.Counter()

    @property
    def global_batch_size(self) -> int:
        return self._plan.order.gb

    @property
    def num_batches(self) -> int:
        return self._plan.order.num_batches

    @property
    def num_records(self) -> int:
        return self._plan.order.n

    def __next__(self) -> dict[str, np.ndarray]:
        if self._next_batch >= self.num_batches:
            raise StopIteration
        if self._it is None:
            self._it = self._plan.batches(self._next_batch)
        batch = next(self._it)
        self._next_batch += 1
        for code, count in zip(*np.unique(batch.pop("_status"), return_counts=True)):
            self.stats[STATUS[code]] += int(count)
        return batch

    def _identity(self) -> dict:
        o = self._plan.order
        return {"num_records": o.n, "seed": o.seed, "shuffle": o.shuffle, "group_by_modality": o.grouped,
                "num_epochs": o.num_epochs}

    def get_state(self) -> dict:
        return dict(self._identity(), next_row=self._next_batch * self.global_batch_size,
                    global_batch_size=self.global_batch_size)

    def set_state(self, state: Mapping[str, Any]) -> None:
        mine = self._identity()
        for key, value in mine.items():
            if state.get(key, value) != value:
                raise ValueError(f"data iterator state was saved with {key}={state[key]!r} but this pipeline has "
                                 f"{key}={value!r}; restore with the same data settings")
        row, gb = int(state["next_row"]), self.global_batch_size
        if row % gb or (self._plan.order.grouped and state.get("global_batch_size", gb) != gb):
            raise ValueError(f"data iterator state is at global row {row}, which is not a batch boundary of "
                             f"global_batch_size={gb}; resume with the global batch size it was saved with "
                             f"({state.get('global_batch_size')})")
        self.close()
        self._next_batch = row // gb

    def start_prefetch(self) -> None:
        if self._it is None and self._next_batch < self.num_batches:
            self._it = self._plan.batches(self._next_batch)

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None

    def __str__(self) -> str:
        return f"DataIterator(next_row={self._next_batch * self.global_batch_size})"


# ----------------------------------------------------------------------------------------- sources

_PREPARE = "python -m cambrian_jax.data.prepare"


def shard_paths(paths: Iterable[str], field: str = "data.paths", switch: str = "") -> list[str]:
    """ArrayRecord files of prepare output folders, files or globs; refuses unfinished prepare shards.

    A path that cannot be used is a ConfigError naming `field` (and the config `switch` that sets it,
    e.g. "data2="), the path, and what to do. Remote (gs://…) paths are passed through unchecked."""
    out: list[str] = []
    via = f" (the config switch {switch}…)" if switch else ""
    give = f"give a folder written by {_PREPARE}{via}"
    for p in paths:
        p = os.fspath(p)
        if "://" in p:
            out.append(p)
            continue
        if os.path.isdir(p):
            files = sorted(glob.glob(os.path.join(p, "*.array_record")))
            run_file = os.path.join(p, "prepare.json")
            if os.path.exists(run_file):
                try:
                    with open(run_file) as f:
                        expected = int(json.load(f)["num_shards"])
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise ConfigError(f"config field {field}: {run_file} is not a prepare record "
                                      f"({type(e).__name__}: {e}); re-run {_PREPARE} into a fresh --out") from None
                done = [f for f in files if os.path.exists(f[:-len(".array_record")] + ".done.json")]
                if len(done) != expected:
                    raise ConfigError(f"config field {field}: {p} holds {len(done)} of the {expected} shards prepare "
                                      f"was asked for (an interrupted run); re-run {_PREPARE} with the same "
                                      "arguments to finish it")
            summary = os.path.join(p, "summary.json")
            if files and os.path.exists(summary):
                try:
                    with open(summary) as f:
                        written = json.load(f).get("written")
                except (OSError, ValueError, AttributeError):
                    written = None
                if written == 0:
                    raise ConfigError(f"config field {field}: {p} holds no records (prepare skipped every sample; "
                                      f"its summary.json says why); fix the inputs and re-run {_PREPARE}")
        elif any(c in p for c in "*?["):
            files = sorted(glob.glob(p))
        elif os.path.isfile(p):
            if p.endswith((".jsonl", ".json")):
                raise ConfigError(f"config field {field}: {p} is a JSON file, not prepared data; convert it with "
                                  f"{_PREPARE} --jsonl {p} --image-root DIR --out OUT and give OUT{via}")
            files = [p]
        else:
            raise ConfigError(f"config field {field}: {p} does not exist; {give}")
        if not files:
            raise ConfigError(f"config field {field}: {p} holds no .array_record files; {give}")
        out += files
    return out


def shard_meta(files: Sequence[str], field: str = "data.group_by_modality") -> tuple[np.ndarray, np.ndarray]:
    """(has_image, word length) per record, from prepare's .meta.npz files (for group_by_modality)."""
    has_image, lengths = [], []
    for f in files:
        meta = f[:-len(".array_record")] + ".meta.npz"
        if not os.path.exists(meta):
            raise ConfigError(f"config field {field}: modality grouping needs {meta} (written by prepare) beside "
                              f"{f}; re-run {_PREPARE} for it, or set {field} = False")
        with np.load(meta) as m:
            has_image.append(m["has_image"])
            lengths.append(m["length"])
    return np.concatenate(has_image), np.concatenate(lengths)


def memory_records(samples: Iterable[Mapping]) -> tuple[list[dict], dict[str, int]]:
    """Clean in-memory samples ({"conversations", "image": PIL image | bytes | file path | None});
    returns (records, {reason: skipped count})."""
    out, skipped = [], collections.Counter()
    for i, s in enumerate(samples):
        image = s.get("image")
        if isinstance(image, str) and image.strip() not in records.TEXT_ONLY_IMAGE_VALUES:
            with open(image, "rb") as f:
                image = f.read()
        elif not isinstance(image, (Image.Image, bytes, bytearray)):
            image = None
        try:
            conv = records.clean_conversations(s.get("conversations"), image is not None)
        except records.Skip as e:
            skipped[e.reason] += 1
            continue
        out.append({"id": str(s.get("id", i)), "conversations": conv, "image": image})
    return out, dict(skipped)


# ------------------------------------------------------------------------------------------- entry

def _model_config(model_cfg) -> CambrianConfig:
    return model_cfg if isinstance(model_cfg, CambrianConfig) else from_dict(model_cfg)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # noqa: PLC0415
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def _load_tokenizer(tokenizer, field: str = "data.tokenizer_dir") -> TextTokenizer:
    """as_tokenizer, with a missing or unreadable tokenizer.json a ConfigError naming the field."""
    if isinstance(tokenizer, TextTokenizer):
        return tokenizer
    path = os.fspath(tokenizer)
    file = path if path.endswith(".json") and os.path.isfile(path) else os.path.join(path, "tokenizer.json")
    if "://" not in path and not os.path.isfile(file):
        state = "does not exist" if not os.path.exists(path) else "holds no tokenizer.json"
        raise ConfigError(f"config field {field}: {path} {state}; give a folder holding the LLM's tokenizer.json "
                          "(the config switch tokenizer=DIR)")
    try:
        return as_tokenizer(path)
    except Exception as e:  # noqa: BLE001 — tokenizers raises its own Exception type for a bad file
        raise ConfigError(f"config field {field}: {file} is not a readable tokenizer ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); give a folder with a valid tokenizer.json") \
            from None


def _build(source: Sequence, modality, lengths, config_data, cfg: CambrianConfig, tokenizer, process_index,
           process_count) -> DataIterator:
    c = data_config()
    c.update(dict(config_data))
    p, count = _process(process_index, process_count)
    gb = int(c.global_batch_size)
    if gb <= 0 or gb % count:
        raise ConfigError(f"config field data.global_batch_size: {gb} is not a positive multiple of the "
                          f"{count} processes; use e.g. {count * max(1, round(gb / count))}")
    if not 0 <= p < count:
        raise ConfigError(f"process_index {p} is not in [0, {count})")
    max_len = int(c.max_len or cfg.max_len)
    if cfg.image_position + cfg.connector.block_len > max_len:
        raise ConfigError(f"config field data.max_len: the image block [{cfg.image_position}, "
                          f"{cfg.image_position + cfg.connector.block_len}) does not fit in max_len={max_len}")
    if c.image_mode not in preprocess.MODES:
        raise ConfigError(f"config field data.image_mode: {c.image_mode!r} is not one of {preprocess.MODES}")
    if c.pixel_format not in ("float32", "uint8"):
        raise ConfigError(f"config field data.pixel_format: {c.pixel_format!r} is not 'float32' or 'uint8'")
    tok = _load_tokenizer(tokenizer)
    found = templates.image_position(c.template, tok)
    if found != cfg.image_position:
        raise templates.ImagePositionError(
            f"template {c.template!r} with tokenizer {tokenizer if isinstance(tokenizer, str) else '(given)'} puts "
            f"the image at token {found}, but model.image_position is {cfg.image_position}; set "
            f"model.image_position = {found}")
    order = GlobalOrder(len(source), gb, c.seed, c.shuffle, c.num_epochs,
                        modality if c.group_by_modality else None, lengths)
    transform = RecordTransform(cfg, tok, c.template, max_len, c.image_mode, c.with_index, c.pixel_format)
    if c.cache_rows:
        transform = RowCache(transform)
    plan = _Plan(source, order, transform, p, count, int(c.worker_count), int(c.worker_buffer_size),
                 int(c.read_threads))
    return DataIterator(plan)


def make_dataset(config_data, model_cfg, tokenizer_dir=None, process_index: int | None = None,
                 process_count: int | None = None) -> DataIterator:
    """Per-host batch iterator for `config.data` (see data_config for the fields).

    `model_cfg`: a CambrianConfig or the config.model section; `tokenizer_dir`: a folder with
    tokenizer.json (or a TextTokenizer), default config_data.tokenizer_dir; process_index/count
    default to JAX's.
    """
    tokenizer = tokenizer_dir or config_data.get("tokenizer_dir")
    if not tokenizer:
        raise ConfigError("config field data.tokenizer_dir: no tokenizer given; point it at a folder with tokenizer.json")
    cfg = _model_config(model_cfg)
    source_kind = config_data.get("source", "array_record")
    if source_kind == "synthetic":
        from cambrian_jax.data import synthetic  # noqa: PLC0415
        s = config_data.get("synthetic") or data_config().synthetic
        samples = synthetic.generate(int(s.get("num_samples", 2000)), split=s.get("split", "train"),
                                     tasks=tuple(s.get("tasks", synthetic.VQA_TASKS)), seed=int(s.get("seed", 0)))
        return make_memory_dataset(samples, config_data, cfg, tokenizer, process_index, process_count)
    if source_kind != "array_record":
        raise ConfigError(f"config field data.source: {source_kind!r} is not 'array_record' or 'synthetic'")
    files = shard_paths(list(config_data.get("paths") or []))
    if not files:
        raise ConfigError("config field data.paths: no training data; give the prepared ArrayRecord folders "
                          f"({_PREPARE})")
    source = grain.sources.ArrayRecordDataSource(files)
    modality = lengths = None
    if config_data.get("group_by_modality"):
        modality, lengths = shard_meta(files)
    return _build(source, modality, lengths, config_data, cfg, tokenizer, process_index, process_count)


def make_memory_dataset(samples: Iterable[Mapping], config_data, model_cfg, tokenizer_dir=None,
                        process_index: int | None = None, process_count: int | None = None) -> DataIterator:
    """The same pipeline over in-memory samples (LLaVA dicts whose "image" is a PIL image, encoded
    bytes, a file path or None). Invalid samples are skipped; counts in `iterator.skipped`."""
    recs, skipped = memory_records(samples)
    if skipped:
        print(f"[data] skipped in-memory samples: {skipped}", file=sys.stderr)
    modality = np.asarray([r["image"] is not None for r in recs], bool)
    lengths = np.asarray([records.word_length(r["conversations"]) for r in recs], np.int64)
    tokenizer = tokenizer_dir or config_data.get("tokenizer_dir")
    it = _build(recs, modality, lengths, config_data, _model_config(model_cfg), tokenizer, process_index,
                process_count)
    it.skipped = skipped
    return it


def stage_data_config(config, stage) -> ml_collections.ConfigDict:
    """One stage's data section: the data_config defaults, then config.data, then stage.data."""
    c = data_config()
    c.update(dict(config.get("data") or {}))
    c.update(dict(stage.get("data") or {}))
    return c


def stage_dataset(config, stage, model_cfg, workdir, process_index: int | None = None,
                  process_count: int | None = None) -> tuple[DataIterator, int]:
    """The trainer's entry: (iterator, number of records) for one training stage.

    `config.data` overlaid with `stage.data` (e.g. stage1.data.synthetic.tasks = ("caption",)); the
    global batch size is the stage's, and the data repeats forever (the trainer counts the steps from
    stage.epochs). With source = "synthetic" (or data.synthetic_tokenizer) and no tokenizer_dir, the
    synthetic dataset's tiny tokenizer for data.template is built once under workdir/tokenizer.
    """
    c = stage_data_config(config, stage)
    c.global_batch_size = int(stage.global_batch_size)
    c.num_epochs = None
    if not c.tokenizer_dir and (c.source == "synthetic" or c.synthetic_tokenizer):
        c.tokenizer_dir = synthetic_tokenizer(os.path.join(os.fspath(workdir), "tokenizer"), c.template)
    it = make_dataset(c, model_cfg, None, process_index, process_count)
    return it, it.num_records


def check_stage_data(config, n: int, model_cfg) -> None:
    """Check stage n's data before anything is created or compiled (the trainer calls this with the
    other config checks): data.source and data.template; for ArrayRecord data every path (exists,
    finished prepare shards with records, the .meta.npz files group_by_modality reads); the
    tokenizer (a tokenizer.json whose tokens fit model.decoder.vocab_size and that puts the image at
    model.image_position with data.template). Raises a ConfigError naming the field, the path and
    the config switch (dataN=, tokenizer=) that sets it. Reads only file names, the prepare records
    and the tokenizer; gs:// paths are not checked."""
    stage = config.get(f"stage{n}") or ml_collections.ConfigDict()
    c = stage_data_config(config, stage)
    cfg = _model_config(model_cfg)
    if c.source not in ("array_record", "synthetic"):
        raise ConfigError(f"config field data.source: {c.source!r} is not 'array_record' or 'synthetic'")
    try:
        templates.get_template(c.template)
    except ValueError as e:
        raise ConfigError(f"config field data.template: {e}") from None
    if c.source == "array_record":
        in_stage = "paths" in dict(stage.get("data") or {})
        paths = list(c.paths or [])
        if not paths:
            raise ConfigError(f"config field stage{n}.data.paths: no training data; give the prepared ArrayRecord "
                              f"folders ({_PREPARE}), e.g. with the config switch data{n}=/path/to/prepared")
        field = f"stage{n}.data.paths" if in_stage else "data.paths"
        files = shard_paths(paths, field, f"data{n}=" if in_stage else "")
        if c.group_by_modality:
            shard_meta([f for f in files if "://" not in f], f"stage{n}.data.group_by_modality")
    if not c.tokenizer_dir:
        if c.source == "synthetic" or c.synthetic_tokenizer:
            return                     # stage_dataset builds the synthetic tokenizer, made for the tiny models
        raise ConfigError("config field data.tokenizer_dir: no tokenizer given; give the folder holding the LLM's "
                          "tokenizer.json (the config switch tokenizer=DIR)")
    if "://" in str(c.tokenizer_dir):
        return
    tok = _load_tokenizer(c.tokenizer_dir)
    vocab = cfg.decoder.vocab_size
    if len(tok) > vocab:
        raise ConfigError(f"config field data.tokenizer_dir: the tokenizer in {c.tokenizer_dir} has {len(tok)} tokens, "
                          f"more than model.decoder.vocab_size = {vocab}; give the tokenizer this model was made for "
                          "(configs/cambrian_tiny.py: leave tokenizer= out, and the synthetic byte-level tokenizer, "
                          "which encodes any text, is used)")
    found = templates.image_position(c.template, tok)
    if found != cfg.image_position:
        raise ConfigError(f"config field model.image_position: template {c.template!r} with the tokenizer in "
                          f"{c.tokenizer_dir} puts the image at token {found}, but model.image_position is "
                          f"{cfg.image_position}; set --config.model.image_position={found}")


def synthetic_tokenizer(path: str, template: str) -> str:
    """Build the synthetic dataset's tokenizer at `path` unless it is there (safe with several processes)."""
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        from cambrian_jax.data import synthetic  # noqa: PLC0415
        tmp = f"{path}.tmp{os.getpid()}"
        synthetic.build_tiny_tokenizer(tmp, template)
        try:
            os.rename(tmp, path)
        except OSError:          # another process got there first; theirs is identical
            import shutil  # noqa: PLC0415
            shutil.rmtree(tmp, ignore_errors=True)
    return path
