"""Export to the released Hugging Face layout of Cambrian-1 (spec §5.1–§5.4, §5.6).

    python -m cambrian_jax.export_hf --workdir W [--step N] [--stage 1|2] --out DIR \
        [--dtype float32|bfloat16] [--max-shard-size 5GB] [--config configs/x.py[:arg]] [--tokenizer DIR] \
        [--towers auto|all|none]

A stage-2 (or finished) run is written as the released checkpoint:

    config.json                         every Cambrian field of spec §5.2 and the LLM's own fields
    generation_config.json
    model-0000k-of-0000n.safetensors    PyTorch names and [out, in] layouts (spec §5.3, §5.4), no towers
    model.safetensors.index.json        {"metadata": {"total_size"}, "weight_map": {key: shard}}
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, …  (the base tokenizer's files)
    README.md                           a model card
    towers/<name>/                      the towers' weights, where included (--towers, below): each in
                                        its transformers format (config.json + model.safetensors), or
                                        open_clip's for a ConvNeXt with eps 1e-5; config.json's
                                        cambrian_jax_tower_dirs lists them, and load_pretrained reads them

--towers auto (default) includes every tower the run trained (a stage's trainable patterns match its
parameters) or did not load from config.init.towers (its random initialisation exists nowhere
else); all includes every tower; none leaves them out, with a warning naming the towers
load_pretrained will then need directories for.

A stage-1 run (only the connector was trained) is written as the reference's stage-1 adapter:
mm_projector.safetensors with the names of `mm_projector.bin` (`model.mm_projector.0.weight`, …),
plus mm_projector.bin itself when torch is installed, and cambrian_adapter.json (the Cambrian fields).
An adapter cannot hold towers: if stage 1 trained some, the export refuses unless --towers none.

The run's configuration comes from --config, or W/config.json when the trainer wrote one; the
tokenizer from --tokenizer, config.data.tokenizer_dir or W/tokenizer. The exported vocabulary equals
len(tokenizer) (spec §14.4): rows beyond it are dropped (the reference would drop them on load).

Python: `export(params, cfg, out, tokenizer_dir=…)` from any {path: array} / nnx.State.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cambrian_jax import cli
from cambrian_jax.config import CambrianConfig, ConfigError, TowerConfig
from cambrian_jax.convert import cambrian_hf
from cambrian_jax.convert.safetensors_io import write_safetensors

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
DTYPES = ("float32", "bfloat16", "float16")


def parse_size(size: str | int) -> int:
    """'5GB' → 5·10⁹ bytes, '500MB', '2GiB', or a plain integer (as transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max shard size {size!r}: expected e.g. 5GB, 500MB, 2GiB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def _np_dtype(dtype: str):
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {DTYPES}")
    import ml_dtypes
    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]


def flat_params(params) -> dict[str, Any]:
    """{"a/b/c": array} from an nnx.State, a nested dict (an orbax restore) or an already flat dict."""
    from flax import nnx

    from cambrian_jax.convert.assign import param_path

    if isinstance(params, nnx.State):
        return {param_path(p): v.get_value() if isinstance(v, nnx.Variable) else v
                for p, v in nnx.to_flat_state(params)}
    out: dict[str, Any] = {}

    def walk(prefix, node):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(node, nnx.Variable):
            out[prefix] = node.get_value()
        else:
            out[prefix.removesuffix("/value")] = node
    walk("", params)
    return out


class _Getter:
    """Host numpy views of parameters, converted once each (zero-copy for CPU jax arrays)."""

    def __init__(self, params: Mapping[str, Any]):
        self.params, self.cache = params, {}

    def __call__(self, path: str) -> np.ndarray:
        if path not in self.cache:
            if path not in self.params:
                raise KeyError(f"parameter {path} is not in the exported state")
            self.cache[path] = np.asarray(self.params[path])
        return self.cache[path]


def plan_shards(entries, max_bytes: int, itemsize: int) -> list[list]:
    """Split (key, shape, producer) entries greedily in order, as save_pretrained does: a new shard
    starts when the next tensor would overflow the current one (a larger tensor gets its own)."""
    shards, current, size = [], [], 0
    for e in entries:
        n = int(np.prod(e[1], dtype=np.int64)) * itemsize
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += n
    if current:
        shards.append(current)
    return shards


def write_sharded(entries, out: Path, dtype, max_shard_size) -> dict:
    """model-0000k-of-0000n.safetensors shards and model.safetensors.index.json."""
    itemsize = np.dtype(dtype).itemsize
    shards = plan_shards(entries, parse_size(max_shard_size), itemsize)
    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        total += write_safetensors(str(out / name), [(k, s, dtype, p) for k, s, p in shard], {"format": "pt"})
        weight_map.update({k: name for k, _, _ in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"shards": [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)], "total_size": total}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _token_ids(tokenizer) -> dict[str, Any]:
    if tokenizer is None:
        return {}
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


TOWER_DIRS_FIELD = "cambrian_jax_tower_dirs"     # config.json: {tower name: its directory, relative}
TOWER_CHOICES = ("auto", "all", "none")


def tower_dir_name(name: str) -> str:
    """A folder name for a tower: 'facebook/dinov2-giant-res378' → 'facebook--dinov2-giant-res378'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace("/", "--")).strip(".-") or "tower"


def tower_params(flat: Mapping[str, Any], k: int) -> dict[str, Any]:
    """Tower k's parameters {path inside the tower: array} from the whole model's flat parameters."""
    prefix = f"towers/{k}/"
    return {p[len(prefix):]: v for p, v in flat.items() if p.startswith(prefix)}


def tower_files(tower: TowerConfig, params: Mapping[str, Any]) -> tuple[str, dict[str, Any], str, dict[str, Any]]:
    """(format, {json file: contents}, weights file, {key: array}) of one tower, in a layout that
    pretrained.tower_source reads back as exactly `tower`: transformers' (config.json +
    model.safetensors of CLIPVisionModel / SiglipVisionModel / Dinov2Model / ConvNextModel), or
    for a ConvNeXt with open_clip's LayerNorm eps (HF hard-codes 1e-6) open_clip's
    (open_clip_config.json + open_clip_model.safetensors, the timm trunk under visual.trunk.).
    A ConfigError says what neither format can hold."""
    from cambrian_jax.convert import hf_towers, openclip_towers

    if tower.kind == "convnext" and tower.layer_norm_eps != 1e-6:
        state = hf_towers.invert(openclip_towers.CONVNEXT_TRUNK, params, prefix=openclip_towers.TRUNK)
        oc_config = {"model_cfg": {"vision_cfg": {"image_size": tower.image_size}}}
        back = openclip_towers.openclip_tower_config(tower.name, tower.token_len,
                                                     {k: np.shape(v) for k, v in state.items()}, oc_config)
        diff = [f.name for f in dataclasses.fields(back) if getattr(back, f.name) != getattr(tower, f.name)]
        if diff:
            raise ConfigError(f"tower {tower.name!r}: the open_clip format cannot hold this tower exactly (it would "
                              f"read back different {', '.join(diff)}); export it with --towers none and keep its "
                              "weights another way")
        return "open_clip", {"open_clip_config.json": oc_config}, "open_clip_model.safetensors", state
    config = hf_towers.hf_config_for(tower)
    return "hf", {"config.json": config}, "model.safetensors", hf_towers.to_hf(tower, params)


def _tower_names(cfg: CambrianConfig, towers) -> list[str]:
    names = [t.name for t in cfg.towers]
    if towers is None or towers == "none":
        return []
    if towers == "all":
        return names
    if isinstance(towers, str):
        towers = [towers]
    unknown = [n for n in towers if n not in names]
    if unknown:
        raise ConfigError(f"towers to export {unknown} are not towers of this model (its towers: {names})")
    return [n for n in names if n in set(towers)]


def export(params, cfg: CambrianConfig, out: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
           dtype: str = "float32", max_shard_size: str | int = "5GB", llm_config: Mapping[str, Any] | None = None,
           generation_config: Mapping[str, Any] | None = None, fused: bool | None = None,
           towers: Sequence[str] | str | None = None) -> dict:
    """Write the released Hugging Face layout of a trained model to `out`.

    params: {path: array} or nnx.State of the whole model.
    towers: the towers whose weights go in too ('all', 'none' or tower names; default none): each in
      out/towers/<name>/ in a format `pretrained.tower_source` reads (transformers' where it holds the
      tower exactly, else open_clip's), listed in config.json's `cambrian_jax_tower_dirs`, so that
      `load_pretrained(out)` needs directories only for the towers left out.
    llm_config: the base LLM's (or the source checkpoint's) config.json, whose LLM fields are kept.
    fused: write Phi-3's fused qkv_proj / gate_up_proj (default: from llm_config's model_type).
    Returns a summary {shards, total_size, vocab_size, files, towers, towers_left_out}.
    Every check (dtype, shard size, tokenizer, towers) runs before anything is written.
    """
    np_dtype = _np_dtype(dtype)
    parse_size(max_shard_size)
    flat = flat_params(params)
    get = _Getter(flat)
    out = Path(out)
    tokenizer = None
    vocab = cfg.decoder.vocab_size
    if tokenizer_dir:
        from cambrian_jax.data.tokenizer import load_tokenizer
        try:
            tokenizer = load_tokenizer(tokenizer_dir)
        except FileNotFoundError as e:
            raise ConfigError(f"tokenizer: {e}") from None
        if len(tokenizer) > vocab:
            raise ConfigError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model only "
                              f"{vocab} embedding rows; export needs len(tokenizer) <= vocab_size")
        if len(tokenizer) < vocab:
            log.warning("exporting %d of %d vocabulary rows so that vocab_size == len(tokenizer) (spec §14.4)",
                        len(tokenizer), vocab)
            vocab = len(tokenizer)
    else:
        log.warning("no tokenizer given: the export has no tokenizer files and vocab_size=%d is not checked "
                    "against one", vocab)
    included = _tower_names(cfg, towers)
    tower_out, used = [], set()
    for k, t in enumerate(cfg.towers):
        if t.name not in included:
            continue
        folder = tower_dir_name(t.name)
        while folder in used:
            folder += f"-{k}"
        used.add(folder)
        tower_out.append((t, f"towers/{folder}", *tower_files(t, tower_params(flat, k))))
    if fused is None:
        fused = cambrian_hf.family(llm_config) == "phi3"
    entries = cambrian_hf.llm_entries(cfg.decoder, get, fused=fused, vocab_size=vocab)
    head = entries.pop()                                  # lm_head last, after the connector, as the reference
    entries += cambrian_hf.connector_entries(flat, get) + [head]
    config = cambrian_hf.config_to_hf(cfg, llm_config, torch_dtype=dtype, vocab_size=vocab, fused=fused,
                                      token_ids=_token_ids(tokenizer))
    config.pop(TOWER_DIRS_FIELD, None)                   # a source export's list, carried in llm_config
    if tower_out:
        config[TOWER_DIRS_FIELD] = {t.name: rel for t, rel, *_ in tower_out}

    out.mkdir(parents=True, exist_ok=True)
    summary = write_sharded(entries, out, np_dtype, max_shard_size)
    tower_bytes = 0
    for t, rel, fmt, jsons, weights, state in tower_out:
        folder = out / rel
        folder.mkdir(parents=True, exist_ok=True)
        for name, contents in jsons.items():
            if name == "config.json":
                contents = {**contents, "torch_dtype": dtype}
            _write_json(folder / name, contents)
        tower_bytes += write_safetensors(str(folder / weights), [(key, np.shape(v), np_dtype, lambda v=v: v)
                                                                 for key, v in sorted(state.items())],
                                         {"format": "pt"})
        log.info("tower %s written to %s (%s format)", t.name, folder, fmt)
    _write_json(out / "config.json", config)
    gen = dict(generation_config) if generation_config else {
        "_from_model_config": True, "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"), "do_sample": True}
    if config.get("pad_token_id") is not None and not generation_config:
        gen["pad_token_id"] = config["pad_token_id"]
    gen.setdefault("transformers_version", config["transformers_version"])
    _write_json(out / "generation_config.json", gen)
    copied = []
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
            if (out / name).is_file():
                copied.append(name)
    summary.update(towers=dict(config.get(TOWER_DIRS_FIELD, {})), tower_bytes=tower_bytes,
                   towers_left_out=[t.name for t in cfg.towers if t.name not in included])
    (out / "README.md").write_text(model_card(cfg, config, summary, dtype))
    summary.update(vocab_size=vocab, files=sorted(os.listdir(out)), tokenizer_files=copied)
    return summary


def export_adapter(params, cfg: CambrianConfig, out: str | os.PathLike, *, dtype: str = "float32") -> dict:
    """The stage-1 adapter: mm_projector.safetensors (+ mm_projector.bin with torch), names as the
    reference's mm_projector.bin (spec §5.6), and cambrian_adapter.json."""
    np_dtype = _np_dtype(dtype)
    flat = flat_params(params)
    get = _Getter(flat)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = cambrian_hf.connector_entries(flat, get)
    total = write_safetensors(str(out / "mm_projector.safetensors"),
                              [(k, s, np_dtype, p) for k, s, p in entries], {"format": "pt"})
    files = ["mm_projector.safetensors"]
    try:
        import torch
    except ImportError:
        log.info("torch is not installed: mm_projector.bin not written (mm_projector.safetensors has the same names)")
    else:
        from safetensors.torch import load_file
        torch.save(load_file(str(out / "mm_projector.safetensors")), out / "mm_projector.bin")
        files.append("mm_projector.bin")
    fields = cambrian_hf.cambrian_fields(cfg)
    fields["tune_mm_mlp_adapter"] = True
    _write_json(out / "cambrian_adapter.json", fields)
    return {"files": files + ["cambrian_adapter.json"], "total_size": total, "tensors": len(entries)}


def model_card(cfg: CambrianConfig, config: Mapping[str, Any], summary: Mapping[str, Any], dtype: str) -> str:
    con, dec = cfg.connector, cfg.decoder
    included = dict(config.get(TOWER_DIRS_FIELD) or {})
    towers = "\n".join(f"| {k} | `{t.name}` | {t.kind} | {t.image_size} | {t.side}×{t.side} | "
                       f"{f'`{included[t.name]}/`' if t.name in included else 'no: its public weights'} |"
                       for k, t in enumerate(cfg.towers))
    n_params = summary["total_size"] // np.dtype(_np_dtype(dtype)).itemsize
    missing = [t for t in cfg.towers if t.name not in included]
    if not included:
        towers_text = ("The vision towers are **not** included; as with the released checkpoints they are loaded "
                       "from their own public weights:")
    elif missing:
        towers_text = (f"{len(included)} of the {len(cfg.towers)} vision towers are included (the weights this model "
                       "was trained with, in `towers/`, listed in config.json's `cambrian_jax_tower_dirs`); the "
                       "others are loaded from their own public weights:")
    else:
        towers_text = ("The vision towers are included (the weights this model was trained with, in `towers/`, "
                       "listed in config.json's `cambrian_jax_tower_dirs`), each in the Hugging Face format of its "
                       "transformers model (or open_clip's where that cannot hold it):")
    if missing:
        mapping = "\n".join(f'    "{t.name}": "path/to/{t.name.split("/")[-1]}",' for t in missing)
        loading = f'model = cambrian_jax.load_pretrained("path/to/this/directory", towers={{\n{mapping}\n}})'
    else:
        loading = 'model = cambrian_jax.load_pretrained("path/to/this/directory")   # towers from towers/'
    return f"""---
tags:
- cambrian_llama
- cambrian_jax
library_name: transformers
---

# Cambrian-1 checkpoint (exported by cambrian_jax)

A Cambrian-1 multimodal LLM in the layout of the released `nyu-visionx/cambrian-*` checkpoints:
LLM and connector ({n_params:,} parameters, {dtype}), `config.json` with every Cambrian field,
`generation_config.json` and the tokenizer. `architectures`: {config["architectures"]}.

{towers_text}

| k | tower | kind | input | token grid | included |
|---|---|---|---|---|---|
{towers}

Connector: SVA width {con.vision_hidden_size}, {con.num_query_group} query group(s) {list(con.query_num_list)},
depth {con.connector_depth}, LLM image grid {con.grid}×{con.grid} (+ a newline per row = {con.block_len}
positions at `image_position` {cfg.image_position}), {len(con.aggregator_layers)} in-LLM aggregators after
decoder layers {list(con.aggregator_layers)}.
LLM: {dec.num_layers} layers, hidden {dec.hidden_size}, {dec.num_heads} heads ({dec.num_kv_heads} KV),
vocabulary {config["vocab_size"]}.

## Loading

With cambrian_jax:

```python
import cambrian_jax
{loading}
```

With the reference code (github.com/cambrian-mllm/cambrian): `load_pretrained_model(path, None,
"cambrian-…")`; the directory name must contain "cambrian". The prompt must put the image at token
{cfg.image_position} (the reference's in-LLM aggregators read a fixed position). The reference loads
every tower from its public name; it does not read `towers/`.
"""


# ------------------------------------------------------------------------------------------ CLI

def load_config_file(spec: str):
    """`path/to/config.py[:arg]` → get_config(arg), as ml_collections' config_flags does; a missing
    file or a bad switch is a ConfigError naming it."""
    path, _, arg = spec.partition(":")
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"--config {spec}: {path} does not exist; give a configs/*.py file")
    root = os.path.dirname(os.path.dirname(path))
    if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location("_export_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as e:     # a bad switch: the config says which
        raise ConfigError(f"--config {spec}: {e}") from None


def run_config(workdir, config_spec: str | None):
    """The run's config: the record the trainer wrote (W/config.json), or --config, which must then
    agree with the record where there is one."""
    from cambrian_jax import workdir as workdir_lib

    if not config_spec:
        return workdir_lib.config(workdir)
    config = load_config_file(config_spec)
    record = workdir_lib.read(workdir)
    if record is not None:
        diff = workdir_lib.differences(record["config"], workdir_lib.plain(config))
        if diff:
            fields = ", ".join(f for f, _, _ in diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise ConfigError(f"--config {config_spec} is not the config of the run in {workdir} (it differs in "
                              f"{fields}); leave --config out: the run's record {workdir}/config.json is enough")
    return config


def stage_steps(workdir, stage: int) -> list[int]:
    """Steps of W/stage{stage} whose checkpoint holds all parameters (a stage's final step)."""
    folder = workdir / f"stage{stage}"
    if not folder.exists():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "params").exists())


def restore_params(workdir: str | os.PathLike, cfg: CambrianConfig, stage: int | None = None,
                   step: int | None = None, *, mesh=None, rules=None):
    """(params nnx.State, stage, step) from the trainer's orbax checkpoints: the `params` item written
    at the final step of each stage (W/stage{n}/<step>/params; default the latest finished stage).
    W may be remote (gs://). With a mesh the parameters are restored straight into their shards
    (every host reads its own); otherwise onto this host's first device."""
    import jax
    import orbax.checkpoint as ocp
    from etils import epath
    from flax import nnx

    from cambrian_jax.model import Cambrian

    workdir = epath.Path(workdir)
    stages = [stage] if stage else [2, 1]
    for s in stages:
        steps = stage_steps(workdir, s)
        if step is not None:
            steps = [x for x in steps if x == step]
        if steps:
            stage, step = s, steps[-1]
            break
    else:
        have = {s: stage_steps(workdir, s) for s in (1, 2)}
        raise ConfigError(f"{workdir}: no finished stage checkpoint with a 'params' item"
                          f"{f' at step {step}' if step is not None else ''} in stage(s) {stages}; "
                          f"steps with params: {have} (the trainer writes it at the final step of a stage)")
    abstract = nnx.state(nnx.eval_shape(lambda: Cambrian(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    if mesh is not None:
        from cambrian_jax import sharding
        shardings = sharding.state_shardings(abstract, rules or sharding.DEFAULT_RULES, mesh)
        target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
    else:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
    folder = workdir / f"stage{stage}"
    mgr = ocp.CheckpointManager(folder if str(folder).startswith(("gs://", "s3://")) else folder.absolute())
    try:
        restored = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    except ValueError as e:       # orbax: the tree or a shape differs from the model's
        raise ConfigError(f"the checkpoint {folder}/{step} does not hold the parameters of this model config "
                          f"(orbax: {str(e).splitlines()[0][:200]}); use the run's own config (its "
                          f"config.json in {workdir})") from None
    return restored["params"], stage, step


def trained_towers(run, cfg: CambrianConfig, params, stages: Sequence[int] | None = None) -> dict[str, int]:
    """{tower name: the first stage that trained it}: a stage of `stages` (default config.stages)
    whose trainable patterns (re.search, as cambrian_jax.optim) match one of the tower's parameter
    paths towers/<k>/…."""
    paths = sorted(flat_params(params))
    out: dict[str, int] = {}
    for n in tuple(stages or run.get("stages", None) or (1, 2)):
        stage = run.get(f"stage{int(n)}", None) or {}
        try:
            patterns = [re.compile(p) for p in list(stage.get("trainable", None) or ())]
        except re.error as e:
            raise ConfigError(f"config field stage{n}.trainable: {e}") from None
        for k, t in enumerate(cfg.towers):
            own = [p for p in paths if p.startswith(f"towers/{k}/")]
            if t.name not in out and any(r.search(p) for r in patterns for p in own):
                out[t.name] = int(n)
    return out


def towers_to_include(run, cfg: CambrianConfig, params, choice: str = "auto") -> dict[str, str]:
    """{tower name: why it is included} for --towers auto|all|none. auto: every tower the run trained
    (a stage in config.stages whose trainable patterns match one of its parameters towers/<k>/…)
    or did not load from public weights (not in config.init.towers: random, obtainable nowhere else)."""
    if choice not in TOWER_CHOICES:
        raise ConfigError(f"--towers {choice!r}: expected one of {list(TOWER_CHOICES)}")
    if choice == "none":
        return {}
    if choice == "all":
        return {t.name: "--towers all" for t in cfg.towers}
    why = {name: f"trained in stage {n}" for name, n in trained_towers(run, cfg, params).items()}
    init_towers = dict((run.get("init", None) or {}).get("towers", None) or {})
    for t in cfg.towers:
        if t.name not in why and not init_towers.get(t.name):
            why[t.name] = "not in config.init.towers (random initialisation)"
    return {t.name: why[t.name] for t in cfg.towers if t.name in why}


@cli.guarded
def main(argv=None) -> dict:
    parser = cli.ArgumentParser(prog="python -m cambrian_jax.export_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the training run's directory")
    parser.add_argument("--out", required=True, help="directory to write the checkpoint to")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the stage's final one)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=None,
                        help="1: the stage-1 adapter; 2: the full model (default: the latest finished stage)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--config", default=None, help="the run's config file, configs/x.py[:arg]")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: from the config)")
    parser.add_argument("--towers", choices=TOWER_CHOICES, default="auto",
                        help="tower weights to include in OUT/towers/: auto (default) = those the run trained or "
                             "did not load from config.init.towers; all; none (load_pretrained then needs a "
                             "directory for each)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    from etils import epath

    from cambrian_jax import config as config_lib

    cli.existing_dir(args.workdir, "--workdir")
    if args.tokenizer:
        cli.existing_dir(args.tokenizer, "--tokenizer")
    if "://" not in args.out:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise cli.InputError(f"--out {args.out} is a file, not a directory")
        if "://" not in args.workdir and os.path.realpath(args.out) == os.path.realpath(args.workdir):
            raise cli.InputError(f"--out {args.out} is the run's workdir; its config.json is the run's record: give "
                                 "another directory")
    try:
        parse_size(args.max_shard_size)
    except ValueError as e:
        raise cli.InputError(f"--max-shard-size: {e}") from None
    workdir = epath.Path(args.workdir)
    run = run_config(workdir, args.config)
    cfg = config_lib.from_dict(run.model)
    params, stage, step = restore_params(workdir, cfg, args.stage, args.step)
    log.info("exporting stage %d step %d of %s to %s", stage, step, workdir, args.out)
    if stage == 1:
        trained = trained_towers(run, cfg, params, stages=(1,))
        if trained and args.towers != "none":
            raise ConfigError(f"stage 1 of this run trained the tower(s) {list(trained)}, which the stage-1 adapter "
                              "(the connector alone) cannot hold: export stage 2 (the full model, towers included), "
                              "or pass --towers none to write the adapter without them")
        summary = export_adapter(params, cfg, args.out, dtype=args.dtype)
    else:
        tokenizer = args.tokenizer or (run.get("data", {}) or {}).get("tokenizer_dir") or None
        if not tokenizer and (workdir / "tokenizer" / "tokenizer.json").exists():
            tokenizer = str(workdir / "tokenizer")
        if not tokenizer:
            raise ConfigError("no tokenizer: pass --tokenizer DIR (a folder with tokenizer.json) or set "
                              "config.data.tokenizer_dir; the released layout includes the tokenizer files")
        init = dict(run.get("init", {}) or {})
        llm_config, generation = None, None
        for key in ("llm", "cambrian"):
            base = init.get(key)
            if base and os.path.isfile(os.path.join(base, "config.json")):
                llm_config = json.loads(Path(base, "config.json").read_text())
                gen = Path(base, "generation_config.json")
                generation = json.loads(gen.read_text()) if gen.is_file() else None
        why = towers_to_include(run, cfg, params, args.towers)
        left_out = [t.name for t in cfg.towers if t.name not in why]
        for name, reason in why.items():
            log.info("including tower %s: %s", name, reason)
        if left_out and args.towers == "none":
            log.warning("--towers none: the export holds no tower weights; load_pretrained needs towers={name: "
                        "directory} for %s", left_out)
        elif left_out:
            log.info("towers left out (loaded from their public weights, as config.init.towers did): %s", left_out)
        summary = export(params, cfg, args.out, tokenizer_dir=tokenizer, dtype=args.dtype,
                         max_shard_size=args.max_shard_size, llm_config=llm_config, generation_config=generation,
                         towers=list(why))
    summary.update(stage=stage, step=step)
    shown = {k: (len(v) if k == "shards" else v) for k, v in summary.items() if k != "files"}
    print(json.dumps(shown))
    return summary


if __name__ == "__main__":
    main()
