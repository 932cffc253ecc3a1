"""Checkpoint files in and out, one tensor at a time.

Reading
  `open_checkpoint(path)`  a lazy {key: np.ndarray} over a safetensors file, a sharded safetensors
                           checkpoint (`*.safetensors.index.json` + shards), or a weights-only torch
                           pickle (`mm_projector.bin`, `open_clip_pytorch_model.bin`). Keys, shapes and
                           dtypes come from the headers; a tensor is read only when it is indexed.
  `load_torch_weights`     the torch pickle reader: `torch.load(weights_only=True)` when torch is
                           importable, otherwise a restricted unpickler that rebuilds tensors as numpy
                           arrays and refuses every other global. torch is never needed at run time.

Filling parameters
  A *plan* says where every target parameter comes from: {our parameter path: [Source, ...]}, each
  Source naming a checkpoint key, a conversion (transpose, reshape, split, …) and, for parameters
  stacked over layers, the slot along the leading axis. `fill(state, plan, reader)` first checks the
  whole plan against the checkpoint headers — missing keys, unexpected keys, shapes (by pushing a
  zero-stride stand-in through each conversion, so nothing is read) and non-float dtypes — and raises
  one CheckpointMismatch listing all of them. Then it builds each target array from its sources, one
  source tensor at a time, directly into the target's (possibly sharded) layout: host memory beyond
  the target itself is one parameter (all layers of one stacked weight) plus one source tensor.

Writing
  `write_safetensors(path, tensors)`  streams (key, shape, dtype, producer) entries to one file; the
  header is computed from the shapes first, so a shard never has to be held in memory.

Errors are for people: a truncated file, a shard named in the index but absent, an unreadable header
or a refused pickle global each raise CheckpointError naming the file and what to do.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from cambrian_jax.convert.assign import CheckpointMismatch, param_path


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as it is (truncated, missing shard, bad header, unsafe pickle)."""


# safetensors dtype codes ↔ numpy dtypes
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
CODES = {v: k for k, v in DTYPES.items()}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")


def dtype_code(dtype) -> str:
    d = np.dtype(dtype)
    if d not in CODES:
        raise ValueError(f"dtype {d} has no safetensors code")
    return CODES[d]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: str                  # safetensors code: F32, BF16, …
    shape: tuple[int, ...]
    file: str                   # where it lives (for messages)


# ------------------------------------------------------------------------------------------ readers

class TensorReader(Mapping[str, np.ndarray]):
    """A lazy, read-only {key: np.ndarray}: `info(key)` from the headers, `reader[key]` reads one tensor."""

    description: str = "checkpoint"

    def __init__(self, infos: Mapping[str, TensorInfo], description: str):
        self.infos = dict(infos)
        self.description = description

    def info(self, key: str) -> TensorInfo:
        return self.infos[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.infos[key].shape

    def __contains__(self, key) -> bool:
        return key in self.infos

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.infos:
            raise CheckpointMismatch(f"{self.description} has no tensor {key!r}")
        return self.read(key)

    def read(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(int(np.prod(i.shape, dtype=np.int64)) * DTYPES[i.dtype].itemsize for i in self.infos.values())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}: {len(self)} tensors>"


class SafetensorsReader(TensorReader):
    """One or more safetensors files. Each read opens the file, copies one tensor out and closes it,
    so no memory map (and no resident page of one) outlives the read."""

    def read(self, key: str) -> np.ndarray:
        from safetensors import safe_open

        file = self.infos[key].file
        try:
            with safe_open(file, framework="np") as f:
                return f.get_tensor(key)
        except Exception as e:  # noqa: BLE001 — re-raised with the file and key named
            raise CheckpointError(f"{file}: reading tensor {key!r} failed: {e}") from e


class DictReader(TensorReader):
    """Tensors already in memory (a weights-only torch pickle, a dict)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], description: str):
        self.tensors = {k: np.asarray(v) for k, v in tensors.items()}
        infos = {}
        for k, v in self.tensors.items():
            code = CODES.get(v.dtype)
            infos[k] = TensorInfo(code or str(v.dtype), tuple(v.shape), description)
        super().__init__(infos, description)

    def read(self, key: str) -> np.ndarray:
        return self.tensors[key]

    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.tensors.values())


class RenamedReader(TensorReader):
    """A view of another reader under new key names ({new: old}); reads go to the original."""

    def __init__(self, base: TensorReader, names: Mapping[str, str]):
        self.base, self.names = base, dict(names)
        super().__init__({new: base.info(old) for new, old in self.names.items()}, base.description)

    def read(self, key: str) -> np.ndarray:
        return self.base.read(self.names[key])


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """({key: TensorInfo}, metadata) of one safetensors file, checking it is complete."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    if size < 8:
        raise CheckpointError(f"{path} is not a safetensors file ({size} bytes; truncated or empty)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise CheckpointError(f"{path} is truncated: its header alone needs {8 + n} bytes but the file has "
                                  f"{size}; the file was cut short (interrupted copy or download?) — fetch it again")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}); the file is damaged "
                              "or not a safetensors file") from e
    metadata = header.pop("__metadata__", None) or {}
    data = size - 8 - n
    infos, end = {}, 0
    problems = []
    for key, entry in header.items():
        try:
            code, shape, (begin, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for {key!r}: {entry!r}") from None
        if code not in DTYPES:
            problems.append(f"{key}: unknown dtype {code!r}")
            continue
        want = int(np.prod(shape, dtype=np.int64)) * DTYPES[code].itemsize
        if stop - begin != want:
            problems.append(f"{key}: {stop - begin} bytes stored for shape {shape} {code} ({want} needed)")
        end = max(end, stop)
        infos[key] = TensorInfo(code, shape, path)
    if end > data:
        raise CheckpointError(f"{path} is truncated: its header describes {end} bytes of tensor data but only "
                              f"{data} are present (the file was cut short — interrupted copy or download?); "
                              "fetch it again")
    if problems:
        raise CheckpointError(f"{path} has a damaged header:\n  " + "\n  ".join(problems))
    return infos, metadata


def open_safetensors(files: Sequence[str], description: str | None = None) -> SafetensorsReader:
    infos: dict[str, TensorInfo] = {}
    for file in files:
        file_infos, _ = read_header(file)
        dup = set(infos) & set(file_infos)
        if dup:
            raise CheckpointError(f"tensors {sorted(dup)[:5]} appear in more than one file ({file})")
        infos.update(file_infos)
    return SafetensorsReader(infos, description or (files[0] if len(files) == 1 else os.path.dirname(files[0])))


def open_index(index_path: str) -> SafetensorsReader:
    """A sharded checkpoint: the index's weight_map names the shard of every tensor."""
    try:
        with open(index_path) as f:
            index = json.load(f)
        weight_map = dict(index["weight_map"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a readable safetensors index ({e}); it needs a "
                              "'weight_map' of {{tensor name: shard file}}") from e
    folder = os.path.dirname(index_path)
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if absent:
        n = collections.Counter(weight_map.values())
        raise CheckpointError(f"{index_path} names {len(absent)} shard file(s) that are not in {folder}: "
                              + ", ".join(f"{s} ({n[s]} tensors)" for s in absent)
                              + "; copy the complete checkpoint (every shard listed in the index)")
    infos: dict[str, TensorInfo] = {}
    problems = []
    for shard in shards:
        file_infos, _ = read_header(os.path.join(folder, shard))
        for key, file in weight_map.items():
            if file != shard:
                continue
            if key not in file_infos:
                problems.append(f"{key} (index says {shard})")
            else:
                infos[key] = file_infos[key]
    if problems:
        raise CheckpointError(f"{index_path}: {len(problems)} tensor(s) named in the index are not in their "
                              "shard: " + ", ".join(problems[:10]) + (" …" if len(problems) > 10 else ""))
    return SafetensorsReader(infos, folder)


# Files looked for in a directory, in order.
_INDEXES = ("model.safetensors.index.json",)
_SINGLE = ("model.safetensors", "open_clip_model.safetensors", "mm_projector.safetensors")
_PICKLES = ("open_clip_pytorch_model.bin", "mm_projector.bin", "pytorch_model.bin")


def find_weights(folder: str) -> str | None:
    """The weights file (or index) of a checkpoint directory, or None."""
    for name in _INDEXES + _SINGLE:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(index) == 1:
        return os.path.join(folder, index[0])
    single = [n for n in names if n.endswith(".safetensors")]
    if len(single) == 1:
        return os.path.join(folder, single[0])
    for name in _PICKLES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def open_checkpoint(path: str | os.PathLike) -> TensorReader:
    """A lazy reader over a checkpoint file or directory (see the module docstring for formats)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = find_weights(path)
        if found is None:
            raise CheckpointError(
                f"{path} holds no weights: expected model.safetensors, a sharded checkpoint "
                "(model.safetensors.index.json + model-0000k-of-0000n.safetensors), open_clip_model.safetensors "
                f"or mm_projector.bin; found {sorted(os.listdir(path))[:12]}")
        path = found
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.endswith(".index.json"):
        return open_index(path)
    if path.endswith(".safetensors"):
        return open_safetensors([path])
    if path.endswith((".bin", ".pt", ".pth")):
        return DictReader(load_torch_weights(path), path)
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors, .safetensors.index.json "
                          "or a weights-only torch .bin/.pt/.pth)")


# ------------------------------------------------------------------------------ torch pickles, safely

_STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(_STORAGES[name])


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor_v2 for numpy: a strided view of the flat storage, copied out."""
    item = storage.dtype.itemsize
    if not size:
        return storage[offset:offset + 1].reshape(()).copy()
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view)


def _rebuild_parameter(data, *_ignored):
    return data


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGES},
}


def _unpickle_weights(path: str) -> Any:
    """Read a torch zip checkpoint with a restricted unpickler (tensors, dicts, lists, numbers only)."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise CheckpointError(f"{path} is not a zip-format torch checkpoint (legacy torch<1.6 pickles are not "
                              "supported without torch; re-save it with a current torch, or install torch)") from None
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the torch archive, found {pkl}")
        prefix = pkl[0][:-len("data.pkl")]
        storages: dict[str, np.ndarray] = {}

        class Restricted(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) in _SAFE_GLOBALS:
                    return _SAFE_GLOBALS[(module, name)]
                raise CheckpointError(f"{path}: refusing to unpickle {module}.{name}; only tensors and plain "
                                      "containers are read (weights-only loading)")

            def persistent_load(self, pid):
                if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
                    raise CheckpointError(f"{path}: unexpected persistent id {pid!r}")
                storage_type, key = pid[1], str(pid[2])
                if not isinstance(storage_type, _StorageType):
                    raise CheckpointError(f"{path}: unsupported storage type {storage_type!r}")
                if key not in storages:
                    try:
                        raw = zf.read(f"{prefix}data/{key}")
                    except KeyError:
                        raise CheckpointError(f"{path}: storage {key} is missing from the archive "
                                              "(truncated file?)") from None
                    storages[key] = np.frombuffer(raw, dtype=storage_type.dtype)
                return storages[key]

        try:
            return Restricted(zf.open(pkl[0])).load()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: cannot read the torch pickle ({type(e).__name__}: {e})") from e


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def _flatten(obj: Any, path: str) -> dict[str, np.ndarray]:
    """A flat {name: array} from a (possibly nested under 'state_dict'/'model') dict of tensors."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, np.ndarray) for v in obj.values()):
            return dict(obj)
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), Mapping):
                return _flatten(obj[key], path)
    raise CheckpointError(f"{path}: expected a dict of tensors (optionally under 'state_dict' or 'model'), "
                          f"got {type(obj).__name__} with keys {list(obj)[:5] if isinstance(obj, Mapping) else ''}")


def load_torch_weights(path: str | os.PathLike, use_torch: bool | None = None) -> dict[str, np.ndarray]:
    """{name: np.ndarray} from a torch checkpoint of tensors, never running arbitrary pickled code.

    use_torch None: torch.load(weights_only=True) when torch is importable, else the restricted
    unpickler; True/False force one of them.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist")
    if use_torch is None:
        try:
            import torch  # noqa: F401
            use_torch = True
        except ImportError:
            use_torch = False
    if use_torch:
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: torch.load(weights_only=True) refused or failed: {e}") from e

        def convert(o):
            if isinstance(o, torch.Tensor):
                return _torch_to_numpy(o)
            if isinstance(o, Mapping):
                return {k: convert(v) for k, v in o.items()}
            return o

        obj = convert(obj)
    else:
        obj = _unpickle_weights(path)
    return _flatten(obj, path)


# ----------------------------------------------------------------------------------------- plans

def _identity(x):
    return x


@dataclasses.dataclass(frozen=True)
class Source:
    """One checkpoint tensor feeding (a slot of) one target parameter."""
    key: str
    convert: Callable[[np.ndarray], np.ndarray] = _identity
    index: int | None = None            # slot along the target's leading (stacked) axis; None = whole
    expect: tuple[int, ...] | None = None   # the checkpoint shape the target implies, for messages


Plan = Mapping[str, Sequence[Source]]


def stand_in(shape: Sequence[int], dtype=np.float32) -> np.ndarray:
    """A zero-stride array of `shape`: conversions run on it for their output shape, reading nothing."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=tuple(shape), strides=(0,) * len(shape))


class Problems:
    """Everything wrong with a checkpoint against a model, collected and raised as one error."""

    def __init__(self, source: str):
        self.source = source
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.shapes: list[str] = []
        self.dtypes: list[str] = []
        self.other: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes or self.dtypes or self.other)

    def raise_if_any(self, limit: int = 25) -> None:
        if not self:
            return
        lines = [f"{self.source} does not match the model:"]
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("with the wrong shape", self.shapes), ("with an unusable dtype", self.dtypes),
                             ("other problems", self.other)):
            if items:
                lines.append(f" {len(items)} {title}:")
                lines.extend(f"  {x}" for x in items[:limit])
                if len(items) > limit:
                    lines.append(f"  … and {len(items) - limit} more")
        raise CheckpointMismatch("\n".join(lines))


def target_leaves(state: nnx.State, prefixes: Sequence[str] = ("",)) -> dict[str, nnx.Variable]:
    """{"a/b/c": Variable} of the state's leaves under any of `prefixes`."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        key = param_path(path)
        if key.startswith(tuple(prefixes)):
            out[key] = var
    return out


def check_plan(targets: Mapping[str, Any], plan: Plan, reader: TensorReader, problems: Problems,
               ignore: Callable[[str], bool] = lambda k: False) -> None:
    """Compare the plan with the target shapes and the checkpoint headers, adding to `problems`."""
    used: set[str] = set()
    for path, var in targets.items():
        shape = tuple(var.shape)
        sources = plan.get(path, ())
        if not sources:
            problems.missing.append(f"{path} {shape} (no checkpoint tensor maps to it)")
            continue
        slots = {s.index for s in sources}
        if None not in slots:
            absent = sorted(set(range(shape[0])) - slots)
            extra = sorted(slots - set(range(shape[0])))
            if absent:
                problems.missing.append(f"{path}: no tensor for layers {absent} of {shape[0]} (expected {shape[1:]} each)")
            if extra:
                problems.unexpected.append(f"{path}: tensors for layers {extra} beyond the model's {shape[0]}: "
                                           + ", ".join(s.key for s in sources if s.index in extra)[:300])
    for path, sources in plan.items():
        if path not in targets:
            problems.unexpected.extend(f"{s.key} (would be {path}, which the model does not have)" for s in sources)
            used.update(s.key for s in sources)
            continue
        shape = tuple(targets[path].shape)
        for s in sources:
            want = shape if s.index is None else shape[1:]
            used.add(s.key)
            if s.key not in reader:
                problems.missing.append(f"{s.key} {s.expect if s.expect is not None else want}")
                continue
            info = reader.info(s.key)
            if info.dtype not in FLOAT_CODES:
                problems.dtypes.append(f"{s.key}: dtype {info.dtype}, expected a float type (F32, BF16, F16, F64)")
                continue
            try:
                got = tuple(s.convert(stand_in(info.shape)).shape)
            except (ValueError, IndexError) as e:
                got = f"not convertible ({e})"
            if got != want:
                expected = s.expect if s.expect is not None else f"{want} after conversion to {path}"
                problems.shapes.append(f"{s.key}: expected shape {expected}, got {info.shape}")
    for key in reader:
        if key not in used and not ignore(key):
            problems.unexpected.append(f"{key} {reader.shape(key)}")


def _region(index: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    out = []
    for sl, n in zip(index, shape):
        start, stop, step = sl.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {index}")
        out.append((start, stop))
    return tuple(out)


def build_array(shape: tuple[int, ...], dtype, sharding, sources: Sequence[Source], reader: TensorReader):
    """The target array from its sources, assembled shard by shard on the host.

    Host buffers cover only the distinct regions this process's devices hold; each source tensor is
    read once, converted, copied into every region that needs it and dropped.
    """
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    dtype = np.dtype(dtype)
    placement = {d: _region(idx, shape) for d, idx in sharding.addressable_devices_indices_map(shape).items()}
    buffers = {r: np.empty(tuple(b - a for a, b in r), dtype) for r in set(placement.values())}
    for s in sorted(sources, key=lambda s: -1 if s.index is None else s.index):
        arr = np.asarray(s.convert(reader[s.key]))
        for region, buf in buffers.items():
            if s.index is None:
                buf[...] = arr[tuple(slice(a, b) for a, b in region)]
            else:
                (a0, b0), rest = region[0], region[1:]
                if a0 <= s.index < b0:
                    buf[s.index - a0] = arr[tuple(slice(a, b) for a, b in rest)]
        del arr
    arrays = [jax.device_put(buffers[r], d) for d, r in placement.items()]
    del buffers
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def fill(state: nnx.State, plan: Plan, reader: TensorReader, *, prefixes: Sequence[str], source: str,
         ignore: Callable[[str], bool] = lambda k: False, dtype=None, problems: Problems | None = None) -> None:
    """Check `plan` against the checkpoint, then set every target leaf under `prefixes` in place.

    The state's leaves may hold concrete (sharded) arrays or abstract jax.ShapeDtypeStruct values;
    each new array takes the old one's sharding (one device if it had none) and dtype (or `dtype`).
    """
    targets = target_leaves(state, prefixes)
    problems = problems or Problems(source)
    check_plan(targets, plan, reader, problems, ignore)
    problems.raise_if_any()
    for path, sources in plan.items():
        var = targets[path]
        old = var.get_value()
        new = build_array(tuple(var.shape), dtype or old.dtype, getattr(old, "sharding", None), sources, reader)
        var.set_value(new)
        del old


# ---------------------------------------------------------------------------------------- writing

def write_safetensors(path: str, entries: Iterable[tuple[str, tuple[int, ...], Any, Callable[[], np.ndarray]]],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write (key, shape, dtype, producer) entries to one safetensors file, one tensor in memory at a
    time. Returns the number of tensor bytes written."""
    entries = list(entries)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for key, shape, dtype, _ in entries:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dtype, produce in entries:
            arr = np.ascontiguousarray(np.asarray(produce()), dtype=np.dtype(dtype))
            if tuple(arr.shape) != tuple(shape):
                raise ValueError(f"{key}: produced shape {arr.shape}, header says {tuple(shape)}")
            f.write(arr.reshape(-1).view(np.uint8))
            del arr
    os.replace(tmp, path)
    return offset
