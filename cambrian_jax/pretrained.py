"""Pretrained weights in: vision towers, base LLMs, released Cambrian checkpoints, stage-1 adapters.

Inference:

    model = cambrian_jax.load_pretrained("path/to/cambrian-8b", towers={
        "siglip/CLIP-ViT-SO400M-14-384": "path/to/ViT-SO400M-14-SigLIP-384",      # open_clip dir
        "openai/clip-vit-large-patch14-336": "path/to/clip-vit-large-patch14-336", # HF dir
        "facebook/dinov2-giant-res378": "path/to/dinov2-giant",                    # HF dir
        "clip-convnext-XXL-multi-stage": "path/to/CLIP-convnext_xxlarge-…-soup",   # open_clip dir
    }, dtype="float32")
    out = model(input_ids, images=[pil_image])      # input_ids [1, T] with one -200 at image_position
    out.logits                                      # float32 [1, T - 1 + n·(n+1), vocab]
    model.save_pretrained("path/to/out")            # the released layout again (cambrian_jax.export_hf)

An export whose towers are included (`export_hf --towers`, its towers/ folders listed in config.json's
`cambrian_jax_tower_dirs`) loads with `load_pretrained(path)` alone; `towers=` then overrides per name.

Training (`load_initial_weights`, called by the trainer with config.init):

    init.llm      a Hugging Face Llama-family LLM directory (Llama-3(.1), Vicuna/Llama-2, Yi, Phi-3)
    init.towers   {tower name: directory}, each in Hugging Face or open_clip format
    init.adapter  a stage-1 adapter: the reference's mm_projector.bin, or our mm_projector.safetensors
    init.cambrian a released Cambrian directory (LLM + connector)

Everything is read from local paths; nothing is downloaded. Every load is checked against the
model before any tensor is read (one error lists missing, unexpected, mis-shaped and non-float
tensors by name) and then streamed one tensor at a time into the target arrays, keeping their
sharding (convert.safetensors_io.fill).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cambrian_jax.config import IMAGE_TOKEN_INDEX, CambrianConfig, ConfigError, DecoderConfig, TowerConfig, tower_kind
from cambrian_jax.convert import cambrian_hf, openclip_towers
from cambrian_jax.convert.assign import CheckpointMismatch, param_path
from cambrian_jax.convert.hf_llama import decoder_config_from_hf
from cambrian_jax.convert.hf_towers import hf_tower_config
from cambrian_jax.convert.safetensors_io import (CheckpointError, DictReader, RenamedReader, TensorReader, fill,
                                                 find_weights, load_torch_weights, open_checkpoint, open_safetensors,
                                                 target_leaves)

log = logging.getLogger(__name__)

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

# What a tower directory should hold, per tower kind (for error messages).
TOWER_FORMATS = {
    "siglip": "an open_clip/timm directory with open_clip_model.safetensors (+ open_clip_config.json), as "
              "hf-hub:timm/ViT-SO400M-14-SigLIP-384 (what the reference loads), or a Hugging Face "
              "SiglipVisionModel/SiglipModel directory (config.json + model.safetensors)",
    "clip": "a Hugging Face CLIPVisionModel/CLIPModel directory (config.json + model.safetensors), as "
            "openai/clip-vit-large-patch14-336",
    "dinov2": "a Hugging Face Dinov2Model directory (config.json + model.safetensors), as facebook/dinov2-giant",
    "convnext": "an open_clip/timm directory with open_clip_model.safetensors (+ open_clip_config.json), as "
                "hf-hub:laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup (what the reference loads), "
                "or a Hugging Face ConvNextModel directory (config.json + model.safetensors)",
}

# Tower fields that fix its numerics; a checkpoint whose format implies other values cannot be used
# with a model configured otherwise.
ARCH_FIELDS = ("kind", "image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
               "layer_norm_eps", "hidden_act", "use_swiglu", "pos_grid", "depths", "dims", "multi_stage")


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no {os.path.basename(path)} in {os.path.dirname(path)}: {what}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None


# ----------------------------------------------------------------------------------------- towers

@dataclasses.dataclass
class TowerSource:
    """A tower checkpoint directory, its format ('hf' or 'open_clip'), reader and architecture."""
    name: str
    directory: str
    fmt: str
    reader: TensorReader
    config: TowerConfig

    def plan(self, prefix: str = "") -> openclip_towers.TablePlan:
        return openclip_towers.tower_plan(self.config, self.reader.keys(), self.fmt, prefix)


def tower_source(name: str, directory: str | os.PathLike, token_len: int, *, select_layer: int = -2,
                 overrides: Mapping[str, Any] | None = None) -> TowerSource:
    """Open a tower directory: open_clip (open_clip_model.safetensors) or Hugging Face (config.json +
    safetensors); the architecture comes from its config and tensor shapes, as the reference's."""
    directory = os.fspath(directory)
    kind = tower_kind(name)
    overrides = dict(overrides or {})
    if not os.path.isdir(directory):
        raise CheckpointError(f"tower {name!r}: {directory} is not a directory; expected {TOWER_FORMATS[kind]}")
    oc = [f for f in OPEN_CLIP_FILES if os.path.isfile(os.path.join(directory, f))]
    if oc:
        reader = open_checkpoint(os.path.join(directory, oc[0]))
        oc_config = {}
        if os.path.isfile(os.path.join(directory, "open_clip_config.json")):
            oc_config = _read_json(os.path.join(directory, "open_clip_config.json"), "")
        shapes = {k: reader.shape(k) for k in reader}
        cfg = openclip_towers.openclip_tower_config(name, token_len, shapes, oc_config, **overrides)
        return TowerSource(name, directory, "open_clip", reader, cfg)
    weights = find_weights(directory)
    has_config = os.path.isfile(os.path.join(directory, "config.json"))
    if weights is None or not has_config:
        found = sorted(os.listdir(directory))[:12]
        raise CheckpointError(f"tower {name!r}: {directory} has no {'weights' if weights is None else 'config.json'} "
                              f"(found {found}); expected {TOWER_FORMATS[kind]}")
    reader = open_checkpoint(weights)
    hf = _read_json(os.path.join(directory, "config.json"), "")
    if kind == "clip":
        overrides.setdefault("select_layer", select_layer)
    cfg = hf_tower_config(kind, hf, name, token_len, **overrides)
    return TowerSource(name, directory, "hf", reader, cfg)


def resolve_towers(wanted: Sequence[tuple[str, int]], towers: Mapping[str, str] | None, *, select_layer: int = -2,
                   overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list[TowerSource]:
    """One TowerSource per (name, token_len), from the {name: directory} mapping; every missing or
    unusable tower is reported in one error, with the format each one needs."""
    towers = {k: os.fspath(v) for k, v in dict(towers or {}).items()}
    names = [n for n, _ in wanted]
    problems = []
    for n in names:
        if n not in towers:
            problems.append(f"  {n}: not given; expected {TOWER_FORMATS.get(_kind(n), 'a tower directory')}")
    for n in towers:
        if n not in names:
            problems.append(f"  {n}: not a tower of this model (its towers: {names})")
    sources = []
    for n, token_len in wanted:
        if n not in towers:
            continue
        try:
            sources.append(tower_source(n, towers[n], token_len, select_layer=select_layer,
                                        overrides=(overrides or {}).get(n)))
        except (CheckpointError, CheckpointMismatch, ConfigError) as e:
            problems.append(f"  {n}: {e}")
    if problems:
        raise CheckpointError("vision towers are not loaded from the checkpoint; give a directory for each:\n"
                              + "\n".join(problems))
    return sources


def _kind(name: str) -> str | None:
    try:
        return tower_kind(name)
    except ConfigError:
        return None


def tower_differences(got: TowerConfig, want: TowerConfig) -> list[str]:
    return [f"{f}: checkpoint format implies {getattr(got, f)!r}, model has {getattr(want, f)!r}"
            for f in ARCH_FIELDS if getattr(got, f) != getattr(want, f)]


def load_tower_into(state: nnx.State, src: TowerSource, prefix: str, dtype=None) -> None:
    tp = src.plan(prefix)
    fill(state, tp.plan, src.reader, prefixes=(prefix,), source=f"tower {src.name!r} ({src.directory})",
         ignore=tp.ignored.__contains__, dtype=dtype)


def load_tower(name: str, directory: str | os.PathLike, token_len: int, *, dtype: str = "float32",
               select_layer: int = -2, **overrides: Any) -> tuple[nnx.Module, TowerConfig]:
    """(tower module, its TowerConfig) from a directory in Hugging Face or open_clip format."""
    from cambrian_jax.towers import build_tower

    src = tower_source(name, directory, token_len, select_layer=select_layer, overrides=overrides)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_tower(src.config, dtype=jnp.dtype(dtype),
                                                                   rngs=nnx.Rngs(0))))
    load_tower_into(state, src, "", dtype=jnp.dtype(dtype))
    return nnx.merge(graphdef, state), src.config


# -------------------------------------------------------------------------------------- LLM / connector

def _ignore_llm(key: str) -> bool:
    return bool(cambrian_hf.LLM_IGNORED.fullmatch(key))


def llm_reader(directory: str | os.PathLike) -> tuple[TensorReader, dict]:
    directory = os.fspath(directory)
    hf = _read_json(os.path.join(directory, "config.json"),
                    "a Hugging Face LLM directory needs config.json and safetensors weights")
    return open_checkpoint(directory), hf


def load_llm(directory: str | os.PathLike, dtype: str = "float32"):
    """(Decoder, DecoderConfig) from a Hugging Face Llama-family directory (Llama, Vicuna, Yi, Phi-3)."""
    from cambrian_jax.decoder import Decoder

    reader, hf = llm_reader(directory)
    cfg = decoder_config_from_hf(hf)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))))
    fill(state, cambrian_hf.llm_plan(cfg, reader.keys(), prefix=""), reader, prefixes=("",),
         source=f"LLM checkpoint {os.fspath(directory)}", ignore=_ignore_llm, dtype=jnp.dtype(dtype))
    return nnx.merge(graphdef, state), cfg


def adapter_reader(path: str | os.PathLike) -> TensorReader:
    """A stage-1 adapter (mm_projector.bin or mm_projector.safetensors, or a directory holding one) with
    keys normalised to the released names ('model.' + module path)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("mm_projector.safetensors", "mm_projector.bin"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise CheckpointError(f"{path} holds no stage-1 adapter (mm_projector.safetensors or mm_projector.bin)")
    if path.endswith(".safetensors"):
        reader: TensorReader = open_safetensors([path])
    else:
        reader = DictReader(load_torch_weights(path), path)
    names = {k if k.startswith(cambrian_hf.HF_PREFIX) else cambrian_hf.HF_PREFIX + k: k for k in reader}
    return RenamedReader(reader, names)


def _connector_plan(state: nnx.State):
    shapes = {k: v.shape for k, v in target_leaves(state, (cambrian_hf.CONNECTOR,)).items()}
    return cambrian_hf.connector_plan(shapes)


def load_cambrian_into(state: nnx.State, reader: TensorReader, cfg: CambrianConfig, source: str, dtype=None) -> None:
    """Decoder + connector from a released checkpoint, checked together (one error for both)."""
    plan = {**cambrian_hf.llm_plan(cfg.decoder, reader.keys()), **_connector_plan(state)}
    fill(state, plan, reader, prefixes=(cambrian_hf.DECODER, cambrian_hf.CONNECTOR), source=source,
         ignore=_ignore_llm, dtype=dtype)


# ---------------------------------------------------------------------------------------- training

INIT_FIELDS = ("llm", "towers", "adapter", "cambrian")


def load_initial_weights(init_cfg, model_cfg: CambrianConfig, params: nnx.State) -> nnx.State:
    """Load config.init's checkpoints into `params` (the model's nnx.Param state, possibly sharded),
    in place, and return it. Applied in the order cambrian, llm, adapter, towers (later ones win)."""
    init = {k: v for k, v in dict(init_cfg or {}).items()}
    unknown = sorted(set(init) - set(INIT_FIELDS))
    if unknown:
        raise ConfigError(f"config field init: unknown entr{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                          f"valid: {list(INIT_FIELDS)}")
    if init.get("cambrian"):
        directory = os.fspath(init["cambrian"])
        hf = _read_json(os.path.join(directory, "config.json"), "init.cambrian must be a released Cambrian directory")
        diff = cambrian_hf.config_differences(hf, model_cfg)
        if diff:
            raise ConfigError(f"config field init.cambrian: {directory} does not fit the model config:\n  "
                              + "\n  ".join(diff))
        load_cambrian_into(params, open_checkpoint(directory), model_cfg, f"Cambrian checkpoint {directory}")
        log.info("loaded LLM and connector from %s", directory)
    if init.get("llm"):
        reader, hf = llm_reader(init["llm"])
        got = decoder_config_from_hf(hf)
        diff = [f"{f.name}: checkpoint {getattr(got, f.name)!r}, model {getattr(model_cfg.decoder, f.name)!r}"
                for f in dataclasses.fields(DecoderConfig) if f.name != "max_position_embeddings"
                and getattr(got, f.name) != getattr(model_cfg.decoder, f.name)]
        if diff:
            raise ConfigError(f"config field init.llm: {init['llm']} does not fit model.decoder:\n  " + "\n  ".join(diff))
        fill(params, cambrian_hf.llm_plan(model_cfg.decoder, reader.keys()), reader, prefixes=(cambrian_hf.DECODER,),
             source=f"LLM checkpoint {init['llm']}", ignore=_ignore_llm)
        log.info("loaded the LLM from %s", init["llm"])
    if init.get("adapter"):
        reader = adapter_reader(init["adapter"])
        fill(params, _connector_plan(params), reader, prefixes=(cambrian_hf.CONNECTOR,),
             source=f"stage-1 adapter {init['adapter']}")
        log.info("loaded the connector from %s", init["adapter"])
    if init.get("towers"):
        mapping = {k: os.fspath(v) for k, v in dict(init["towers"]).items()}
        names = [t.name for t in model_cfg.towers]
        unknown = [n for n in mapping if n not in names]
        if unknown:
            raise ConfigError(f"config field init.towers: {unknown} are not towers of the model; its towers: {names}")
        problems = []
        for k, t in enumerate(model_cfg.towers):
            if t.name not in mapping:
                log.warning("tower %d (%s) keeps its random initialisation: not in init.towers", k, t.name)
                continue
            try:
                src = tower_source(t.name, mapping[t.name], t.token_len, select_layer=t.select_layer)
            except (CheckpointError, CheckpointMismatch, ConfigError) as e:
                problems.append(f"  {t.name}: {e}")
                continue
            diff = tower_differences(src.config, t)
            if diff:
                problems.append(f"  {t.name} ({src.directory}, {src.fmt} format): " + "; ".join(diff)
                                + " — set model.tower_overrides for this tower to match its weights")
                continue
            load_tower_into(params, src, f"towers/{k}/")
            log.info("loaded tower %d (%s) from %s", k, t.name, src.directory)
        if problems:
            raise CheckpointError("config field init.towers:\n" + "\n".join(problems))
    return params


# --------------------------------------------------------------------------------------- inference

@dataclasses.dataclass
class CambrianOutput:
    """logits float32 [B, T', vocab]; attention_mask [B, T'] (False at the image block's padding
    cells: their logits mean nothing); positions [B, T'] (the RoPE positions used)."""
    logits: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray


class CambrianForInference:
    """A loaded Cambrian model: `model(input_ids, images=[PIL.Image])` and `save_pretrained(out)`."""

    def __init__(self, model, config: CambrianConfig, hf_config: Mapping[str, Any] | None = None, *,
                 generation_config: Mapping[str, Any] | None = None, tokenizer_dir: str | None = None,
                 image_mode: str = "pad"):
        self.model = model
        self.config = config
        self.hf_config = dict(hf_config or {})
        self.generation_config = dict(generation_config) if generation_config else None
        self.tokenizer_dir = tokenizer_dir
        self.image_mode = image_mode
        self._graphdef, self._state = nnx.split(model)
        graphdef = self._graphdef

        def forward(state, ids, pixels, masks, attn, pos):
            return nnx.merge(graphdef, state)(ids, pixels, masks, attn, pos)

        def text(state, ids, pos, mask):
            dec = nnx.merge(graphdef, state).decoder
            return dec.logits(dec(dec.embed(ids), pos, mask))

        self._forward, self._text = jax.jit(forward), jax.jit(text)
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (cambrian_jax.data.tokenizer.TextTokenizer), if it has one."""
        if self._tokenizer is None and self.tokenizer_dir:
            from cambrian_jax.data.tokenizer import load_tokenizer
            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        return self._tokenizer

    def params(self) -> dict[str, jax.Array]:
        """{parameter path: array} of the whole model."""
        return {param_path(p): v.get_value() for p, v in nnx.to_flat_state(self._state)}

    def __call__(self, input_ids, images=None) -> CambrianOutput:
        """input_ids int [B, T]; with images (one PIL image per row), every row holds one −200 at
        config.image_position and the logits are [B, T − 1 + n·(n+1), vocab] in the masked static
        layout (spec §3.5); without images, text-only logits [B, T, vocab] from the LLM alone."""
        from cambrian_jax import preprocess
        from cambrian_jax.model import static_layout

        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        cfg = self.config
        sentinels = (ids == IMAGE_TOKEN_INDEX).sum(axis=1)
        images = list(images or [])
        if not images:
            if sentinels.any():
                raise ValueError(f"input_ids hold the image sentinel {IMAGE_TOKEN_INDEX} but no images were given")
            b, t = ids.shape
            pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
            mask = np.ones((b, t), bool)
            logits = self._text(self._state, jnp.asarray(ids, jnp.int32), jnp.asarray(pos), jnp.asarray(mask))
            return CambrianOutput(np.asarray(logits, np.float32), mask, np.asarray(pos))
        if len(images) != len(ids) or not (sentinels == 1).all():
            raise ValueError(f"one image per row and exactly one {IMAGE_TOKEN_INDEX} sentinel per row are needed: "
                             f"{len(images)} image(s) for {len(ids)} row(s), sentinels per row {sentinels.tolist()}")
        pixels = [[] for _ in cfg.towers]
        sizes = []
        for image in images:
            for k, px in enumerate(preprocess.preprocess_towers(image, cfg.towers, self.image_mode)):
                pixels[k].append(px)
            sizes.append(preprocess.effective_size(preprocess.to_rgb(image).size, self.image_mode))
        batch = static_layout(cfg, [list(r) for r in ids], sizes)
        logits = self._forward(self._state, jnp.asarray(batch["input_ids"]), [jnp.asarray(np.stack(p)) for p in pixels],
                               [jnp.asarray(m) for m in batch["tower_masks"]], jnp.asarray(batch["attention_mask"]),
                               jnp.asarray(batch["positions"]))
        return CambrianOutput(np.asarray(logits, np.float32), batch["attention_mask"], batch["positions"])

    def save_pretrained(self, out: str | os.PathLike, dtype: str = "float32", max_shard_size: str | int = "5GB",
                        towers: Sequence[str] | str | None = None) -> dict:
        """Write the released Hugging Face layout (cambrian_jax.export_hf.export); towers: 'all', 'none'
        or names of the towers to include (default: those the loaded checkpoint included)."""
        from cambrian_jax import export_hf

        if towers is None:      # the towers the loaded checkpoint included itself stay included
            towers = [n for n in self.hf_config.get(export_hf.TOWER_DIRS_FIELD) or {}]
        return export_hf.export(self.params(), self.config, out, tokenizer_dir=self.tokenizer_dir, dtype=dtype,
                                max_shard_size=max_shard_size, llm_config=self.hf_config or None,
                                generation_config=self.generation_config, towers=towers)


def included_towers(path: str | os.PathLike, hf: Mapping[str, Any]) -> dict[str, str]:
    """{tower name: directory} of the towers an export holds itself (config.json's
    `cambrian_jax_tower_dirs`, written by export_hf: paths relative to the checkpoint)."""
    from cambrian_jax.export_hf import TOWER_DIRS_FIELD

    dirs = hf.get(TOWER_DIRS_FIELD) or {}
    if not isinstance(dirs, Mapping) or not all(isinstance(v, str) for v in dirs.values()):
        raise ConfigError(f"{os.path.join(os.fspath(path), 'config.json')}: {TOWER_DIRS_FIELD} must map tower names "
                          f"to directories, got {dirs!r}")
    return {name: os.path.join(os.fspath(path), rel) for name, rel in dirs.items()}


def load_pretrained(path: str | os.PathLike, towers: Mapping[str, str | os.PathLike] | None = None, *,
                    dtype: str = "float32", tower_overrides: Mapping[str, Mapping[str, Any]] | None = None,
                    image_mode: str = "pad", mesh=None, rules=None) -> CambrianForInference:
    """A released-layout Cambrian checkpoint (spec §5.1–§5.4) with its towers from `towers`
    ({tower name in config.json: local directory}). Towers an export includes (its towers/ folders,
    listed in config.json's `cambrian_jax_tower_dirs`) are read from there unless `towers` names
    them; every other tower must be given. dtype: float32 | bfloat16 | float16, for the
    parameters and the computation. With a `mesh`, every parameter is created sharded by the logical
    `rules` (default: the configs' table) and each host reads only the shards its devices hold."""
    path = os.fspath(path)
    hf = _read_json(os.path.join(path, "config.json"),
                    "load_pretrained expects a released Cambrian directory (config.json + safetensors shards)")
    wanted = cambrian_hf.tower_names(hf)
    mapping = {**included_towers(path, hf), **{k: os.fspath(v) for k, v in dict(towers or {}).items()}}
    sources = resolve_towers(wanted, mapping, select_layer=int(hf.get("mm_vision_select_layer", -2)),
                             overrides=tower_overrides)
    cfg = cambrian_hf.config_from_hf(hf, [s.config for s in sources], dtype=dtype)
    reader = open_checkpoint(path)
    from cambrian_jax.model import Cambrian

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Cambrian(cfg, rngs=nnx.Rngs(0))))
    if mesh is not None:
        from cambrian_jax import sharding
        shardings = sharding.state_shardings(state, rules or sharding.DEFAULT_RULES, mesh)
        state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state, shardings)
    param_dtype = jnp.dtype(dtype)
    load_cambrian_into(state, reader, cfg, f"Cambrian checkpoint {path}", dtype=param_dtype)
    for k, src in enumerate(sources):
        load_tower_into(state, src, f"towers/{k}/", dtype=param_dtype)
    abstract = [p for p, v in target_leaves(state).items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if abstract:
        raise CheckpointMismatch(f"parameters left unloaded: {abstract[:10]}")
    model = nnx.merge(graphdef, state)
    gen = os.path.join(path, "generation_config.json")
    tokenizer_dir = path if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    result = CambrianForInference(model, cfg, hf, generation_config=_read_json(gen, "") if os.path.isfile(gen) else None,
                                  tokenizer_dir=tokenizer_dir, image_mode=image_mode)
    if tokenizer_dir and len(result.tokenizer) != cfg.decoder.vocab_size:
        log.warning("%s: len(tokenizer) = %d but vocab_size = %d; the reference resizes the embeddings to the "
                    "tokenizer on load (spec §14.4)", path, len(result.tokenizer), cfg.decoder.vocab_size)
    return result
