"""Generation: prefill with the image, then incremental decoding with a KV cache (spec §3.4, §9).

    prefill   towers → connector → decoder over the whole prompt in the static layout (the image block
              at `image_position`, padding cells masked, positions from the cumulative mask), with the
              in-LLM aggregators — they run on prefill only, as in the reference's generate() — and
              the keys/values of every layer written to a KV cache
    decode    one token per step through the decoder alone, reading and extending the cache, inside
              one compiled `lax.while_loop` (greedy, or temperature + top-p sampling with a seed),
              until every row has emitted a stop id or `max_new_tokens` are out

Shapes are bucketed so that nothing compiles per token or per prompt: the batch is padded to a
bucket, the prompt to a multiple of `prompt_multiple`, and the cache to a power of two holding the
prompt plus the new tokens; the decode loop is compiled once per (batch, cache length) and the
prefill once per (batch, prompt bucket, cache length). Rows are right-padded: every row's new tokens
are written at the same cache slots (one write index for the batch), and padded slots stay masked,
so a row's result does not depend on the other rows of its batch.

Library:

    gen = Generator.from_checkpoint("path/to/cambrian-8b", towers={...})   # or an orbax workdir
    gen.generate(["What is in the image?"], images=[Image.open("cat.jpg")])[0].text

Command line (checkpoint = an HF-layout directory or the trainer's orbax workdir):

    python -m cambrian_jax.generate --checkpoint DIR [--towers NAME=DIR ...] [--config configs/x.py]
        --image PATH --prompt "What is in the image?" [--max-new-tokens 512] [--temperature 0]
        [--top-p 1.0] [--seed 42]

Without --prompt it is an interactive chat: the conversation is kept in the model's template with the
image at the start of the first user turn (`/image PATH` starts over with another image — a path
that is missing or not an image is reported and the conversation goes on —, `/reset` clears the
conversation, `/quit` or end of input stops).

When the prompt leaves fewer free positions than max_new_tokens, generation stops there; this is
said (a warning) only when --max-new-tokens was given. A checkpoint, image or flag that cannot be
used ends the command with one line on stderr and exit 2 (cambrian_jax.cli).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from cambrian_jax import cli, preprocess
from cambrian_jax.config import IMAGE_TOKEN_INDEX, CambrianConfig, ConfigError
from cambrian_jax.connector import aggregate

log = logging.getLogger(__name__)

# Sampling keys are threefry whatever jax_default_prng_impl says: a batch of threefry keys under vmap
# draws what each key draws alone, while rbg / unsafe_rbg keys (the tiny configs' prng_impl) draw bits
# that depend on the whole batch, so a row's sample would change with the other rows.
KEY_IMPL = "threefry2x32"
MAX_STOP_IDS = 8          # stop ids are passed as a fixed-size array (padded with -1): no recompiles
DEFAULT_MAX_NEW_TOKENS = 512


# ------------------------------------------------------------------------------------------ settings

@dataclasses.dataclass(frozen=True)
class Sampling:
    """Decoding settings. temperature 0 = greedy (the reference's evaluation, spec §8.1); otherwise
    logits / temperature, then top-p (nucleus) filtering as Hugging Face's TopPLogitsWarper, then a
    draw. The draw for row r at step t uses fold_in(fold_in(key(seed), row_seed_r), t), so a row's
    sample does not depend on the batch it is in."""
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 42

    def __post_init__(self):
        # InputError is a ValueError: the command lines report it in one line (exit 2).
        if self.max_new_tokens < 1:
            raise cli.InputError(f"--max-new-tokens must be ≥ 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise cli.InputError(f"--temperature must be ≥ 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise cli.InputError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class Completion:
    """One row's result: the new token ids (without the stop id), the decoded text
    (skip_special_tokens, stripped, as the reference) and why it ended ('stop' or 'length')."""
    tokens: list[int]
    text: str
    finish_reason: str


@dataclasses.dataclass
class GenerationOutput:
    tokens: list[list[int]]           # per row, without the stop id
    finish_reasons: list[str]         # 'stop' | 'length'
    prefill_seconds: float
    decode_seconds: float
    new_tokens: int                   # tokens generated over all real rows (stop ids included)
    batch: int                        # padded batch size
    prompt_len: int                   # padded prompt length
    cache_len: int
    scores: np.ndarray | None = None  # [B, max_new, vocab] float32 logits per step (output_scores)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


# ---------------------------------------------------------------------------------------- sampling

def nucleus_logits(logits: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """float32 logits [B, V] / temperature with every token outside the top-p nucleus at -inf: what
    Hugging Face's TemperatureLogitsWarper then TopPLogitsWarper (transformers
    generation/logits_process.py) give, the warpers the reference's generate(do_sample=True) applies.

    As TopPLogitsWarper: tokens sorted by ascending probability, a token is removed when the
    cumulative probability up to and including it is <= 1 - top_p, and the most likely token always
    stays (min_tokens_to_keep=1). top_p = 1 keeps every token (generate() adds no top-p warper then).
    """
    x = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(x, axis=-1)                  # ascending, ties in index order
    cum = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(x, order, axis=-1), axis=-1), axis=-1)
    drop_sorted = (cum <= 1 - top_p) & (top_p < 1.0)
    drop_sorted = drop_sorted.at[:, -1].set(False)   # the most likely token
    rows = jnp.arange(x.shape[0])[:, None]
    drop = jnp.zeros_like(drop_sorted).at[rows, order].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, x)


def row_keys(seed: int, row_seeds) -> jax.Array:
    """The sampling key of each row: fold_in(key(seed), row_seed), threefry (KEY_IMPL)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed, impl=KEY_IMPL),
                                                         jnp.asarray(row_seeds, jnp.uint32))


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Next token per row from float32 logits [B, V]: argmax when temperature <= 0, else a draw from
    softmax(nucleus_logits(logits, temperature, top_p)) with the row's key."""

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        x = nucleus_logits(logits, temperature, top_p)
        return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)

    return jax.lax.cond(temperature <= 0, greedy, draw, None)


# ----------------------------------------------------------------------------------- compiled parts

@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _prefill(graphdef, cache_len: int, with_vision: bool, state, ids, pixels, tower_masks, mask, positions,
             last_index):
    """Prompt forward with a fresh KV cache of `cache_len` slots; returns (logits [B, V] at each row's
    last real token, cache). With vision: connector + in-LLM aggregators as Cambrian.hidden_states."""
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    dec = model.decoder
    x = dec.embed(ids)
    kwargs = {}
    if with_vision:
        p = cfg.image_position
        image_block, vision = model.connector(model.encode_images(pixels), list(tower_masks))
        x = jax.lax.dynamic_update_slice_in_dim(x, image_block.astype(x.dtype), p, axis=1)
        stack = model.connector.vision_sampler_layers
        if stack is not None:
            kwargs = dict(aggregators=stack.layer, agg_layers=cfg.connector.aggregator_layers,
                          aggregate=lambda layer, h: aggregate(layer, h, vision, p, cfg.connector.grid))
    cache = dec.init_cache(ids.shape[0], cache_len)
    hidden, cache = dec(x, positions, mask, cache=cache, **kwargs)
    last = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)
    return dec.logits(last)[:, 0], cache


def _decode(graphdef, output_scores: bool, state, cache, logits, positions, done, key_data, max_new, temperature,
            top_p, stop_ids, pad_id):
    """The decode loop: sample from `logits`, feed the token back through the decoder (cache
    extended by one slot per step), until max_new tokens or every row is done. Compiled once per
    (batch, cache length): max_new, temperature, top_p, stop ids and pad id are traced values."""
    dec = nnx.merge(graphdef, state).decoder
    keys = jax.random.wrap_key_data(key_data, impl=KEY_IMPL)
    b, s = cache.mask.shape
    out = jnp.full((b, s), pad_id, jnp.int32)
    count = jnp.zeros((b,), jnp.int32)
    scores = jnp.zeros((b, s, logits.shape[-1]), jnp.float32) if output_scores else jnp.zeros((), jnp.float32)

    def cond(carry):
        n, _, _, _, done, *_ = carry
        return (n < max_new) & ~jnp.all(done)

    def body(carry):
        n, cache, logits, positions, done, out, count, scores = carry
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, n)
        tok = sample_tokens(logits, step_keys, temperature, top_p)
        tok = jnp.where(done, pad_id, tok)
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], n, axis=1)
        if output_scores:
            scores = jax.lax.dynamic_update_slice_in_dim(scores, logits[:, None], n, axis=1)
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)

        def step(args):
            cache, tok, positions = args
            h, cache = dec(dec.embed(tok[:, None]), positions[:, None], jnp.ones((b, 1), bool), cache=cache)
            return cache, dec.logits(h)[:, 0]

        go = (n + 1 < max_new) & ~jnp.all(done)
        cache, logits = jax.lax.cond(go, step, lambda args: (args[0], logits), (cache, tok, positions))
        return n + 1, cache, logits, positions + 1, done, out, count, scores

    carry = (jnp.int32(0), cache, logits, positions, done, out, count, scores)
    _, _, _, _, _, out, count, scores = jax.lax.while_loop(cond, body, carry)
    return out, count, scores


@functools.cache
def _decode_fn():
    """The jitted decode loop; the cache is donated (updated in place) where the backend supports it."""
    donate = (3,) if jax.default_backend() != "cpu" else ()
    return jax.jit(_decode, static_argnums=(0, 1), donate_argnums=donate)


# ------------------------------------------------------------------------------------------ batches

@dataclasses.dataclass
class _Batch:
    ids: np.ndarray            # [B, T] int32 (image block filler 0)
    mask: np.ndarray           # [B, T] bool
    positions: np.ndarray      # [B, T] int32
    last_index: np.ndarray     # [B] int32: index of each row's last real token
    next_position: np.ndarray  # [B] int32: RoPE position of the first new token
    pixels: list[np.ndarray] | None
    tower_masks: list[np.ndarray] | None

    @property
    def with_vision(self) -> bool:
        return self.pixels is not None


def _image_size(image: Image.Image, mode: str) -> tuple[int, int]:
    """The (W, H) the padding masks are computed from (the size after the image mode's resize)."""
    return preprocess.effective_size(preprocess.to_rgb(image).size, mode)


def layout_rows(cfg: CambrianConfig, ids_list: Sequence[Sequence[int]], images: Sequence[Image.Image | None],
                image_mode: str = "pad", pad_id: int = 0) -> _Batch:
    """The prompts in the static layout, right-padded to the longest (not yet to a bucket).

    Rows with an image hold one −200 at cfg.image_position. Without any image in the batch the rows
    are plain text (no image block, no towers); in a mixed batch the text-only rows get the masked
    dummy block of the static layout (their logits equal the LLM alone's).
    """
    from cambrian_jax.model import static_layout

    if any(im is not None for im in images):
        sizes = [None if im is None else _image_size(im, image_mode) for im in images]
        lay = static_layout(cfg, [list(r) for r in ids_list], sizes, pad_id=pad_id)
        ids, mask, tower_masks = lay["input_ids"], lay["attention_mask"], list(lay["tower_masks"])
        per_image = [None if im is None else preprocess.preprocess_towers(im, cfg.towers, image_mode) for im in images]
        pixels = [np.stack([preprocess.blank_pixels(t) if p is None else p[k] for p in per_image])
                  for k, t in enumerate(cfg.towers)]
    else:
        width = max(len(r) for r in ids_list)
        ids = np.full((len(ids_list), width), pad_id, np.int32)
        mask = np.zeros((len(ids_list), width), bool)
        for i, r in enumerate(ids_list):
            ids[i, :len(r)], mask[i, :len(r)] = r, True
        pixels = tower_masks = None
    return _Batch(ids, mask, None, None, None, pixels, tower_masks)


def pad_batch(batch: _Batch, length: int, rows: int, pad_id: int = 0) -> _Batch:
    """Right-pad to `length` tokens and `rows` rows (extra rows copy row 0); positions from the mask."""
    n, t = batch.ids.shape
    if t > length or n > rows:
        raise ValueError(f"internal: a batch of {n}×{t} does not fit {rows}×{length}")
    ids = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), bool)
    ids[:n, :t], mask[:n, :t] = batch.ids, batch.mask
    ids[n:], mask[n:] = ids[0], mask[0]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    last = (length - 1 - np.argmax(mask[:, ::-1], axis=1)).astype(np.int32)

    def extend(a):
        return np.concatenate([a, np.repeat(a[:1], rows - n, axis=0)])

    pixels = None if batch.pixels is None else [extend(p) for p in batch.pixels]
    tmasks = None if batch.tower_masks is None else [extend(m) for m in batch.tower_masks]
    return _Batch(ids, mask, positions, last, mask.sum(axis=1).astype(np.int32), pixels, tmasks)


# ------------------------------------------------------------------------------------------- loading

def _mesh_of(state) -> jax.sharding.Mesh | None:
    for leaf in jax.tree.leaves(state):
        sh = getattr(leaf, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding):
            return sh.mesh
    return None


def guess_template(tokenizer, image_position: int | None = None) -> str:
    """The conversation template of a checkpoint, from its tokenizer's special tokens (spec §6.1),
    confirmed by where it puts the image when image_position is given."""
    from cambrian_jax.data import templates

    def has(tok):
        return tokenizer.token_to_id(tok) is not None

    order = (["llama_3"] if has("<|eot_id|>") else []) + (["chatml_direct"] if has("<|im_end|>") else []) + \
            (["phi3"] if has("<|end|>") and has("<|assistant|>") else []) + ["vicuna_v1"]
    order += [t for t in templates.TEMPLATES if t not in order]
    if image_position is None:
        return order[0]
    found = {}
    for name in order:
        try:
            found[name] = templates.image_position(name, tokenizer)
        except Exception as e:  # noqa: BLE001 - a template the tokenizer cannot render
            found[name] = repr(e)
        if found[name] == image_position:
            return name
    raise ConfigError(f"no conversation template puts the image at the model's image_position {image_position} "
                      f"with this tokenizer ({found}); pass --template and check the tokenizer")


@dataclasses.dataclass
class LoadedCheckpoint:
    model: Any
    cfg: CambrianConfig
    tokenizer: Any
    template: str | None
    stop_ids: tuple[int, ...] | None
    source: str
    image_mode: str = "pad"
    stage: int | None = None          # a training workdir's: the stage and step restored
    step: int | None = None


def check_checkpoint(path: str | os.PathLike) -> str:
    """`path` if it is a directory (or remote), else an InputError saying it does not exist."""
    try:
        return cli.existing_dir(path, "--checkpoint")
    except cli.InputError as e:
        raise cli.InputError(f"{e}: give a training workdir (written by `python -m cambrian_jax.train`) or an "
                             "HF-layout Cambrian directory (config.json + safetensors)") from None


def _mtime(path) -> int | None:
    try:
        return int(os.stat(path).st_mtime)
    except (OSError, TypeError, ValueError):
        return None


def checkpoint_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What `path` holds, without reading the weights, so that an output can say what made it:

    * a training workdir: {kind: "workdir", stage, step, written} — the stage and step load_checkpoint
      restores by default (the latest finished stage's params) and when that step was written;
    * an HF-layout directory: {kind: "hf", files: {name: [size, mtime]}} of its config, index, weights
      and tokenizer files.

    `path` is recorded absolute (a remote gs:// path as it is)."""
    from cambrian_jax import export_hf
    from cambrian_jax import workdir as workdir_lib

    text = os.fspath(check_checkpoint(path))
    where = text if "://" in text else os.path.abspath(text)
    if workdir_lib.is_run(text):
        from etils import epath

        root = epath.Path(text)
        for stage in (2, 1):
            steps = export_hf.stage_steps(root, stage)
            if steps:
                return dict(path=where, kind="workdir", stage=stage, step=steps[-1],
                            written=_mtime(os.path.join(text, f"stage{stage}", str(steps[-1]))))
        return dict(path=where, kind="workdir", stage=None, step=None, written=None)
    files = {}
    if "://" not in text:
        for name in sorted(os.listdir(text)):
            full = os.path.join(text, name)
            if name.endswith((".safetensors", ".json", ".bin", ".model")) and os.path.isfile(full):
                st = os.stat(full)
                files[name] = [st.st_size, int(st.st_mtime)]
    return dict(path=where, kind="hf", files=files)


def default_rules():
    from cambrian_jax import sharding
    return list(sharding.DEFAULT_RULES)


def restore_workdir(workdir: str | os.PathLike, cfg: CambrianConfig, *, mesh=None, rules=None,
                    stage: int | None = None, step: int | None = None):
    """(model, stage, step) from the trainer's orbax checkpoints (export_hf.restore_params)."""
    from cambrian_jax import export_hf
    from cambrian_jax.model import Cambrian

    params, stage, step = export_hf.restore_params(workdir, cfg, stage, step, mesh=mesh,
                                                   rules=rules or default_rules())
    graphdef, _, rest = nnx.split(nnx.eval_shape(lambda: Cambrian(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    return nnx.merge(graphdef, params, rest), stage, step


def load_checkpoint(path: str | os.PathLike, *, towers: Mapping[str, str] | None = None, config: str | None = None,
                    tokenizer: str | None = None, template: str | None = None, dtype: str | None = None,
                    stage: int | None = None, step: int | None = None, mesh=None, rules=None) -> LoadedCheckpoint:
    """A model to generate with, from

    * an HF-layout directory (config.json + safetensors, cambrian_jax.pretrained.load_pretrained):
      towers from `towers` {name in config.json: dir}, stop ids from generation_config.json's
      eos_token_id, the tokenizer from the directory, the template detected from the tokenizer and
      checked against image_position; or
    * the trainer's orbax workdir (W/stage{1,2}/<step>/params): the model config from `config`
      (configs/x.py[:arg]) or W/config.json, the tokenizer from `tokenizer`, config.data.tokenizer_dir
      or W/tokenizer, the template from config.data.template, stop ids from the template.
    """
    from cambrian_jax import workdir as workdir_lib
    from cambrian_jax.data import templates
    from cambrian_jax.data.tokenizer import load_tokenizer

    path = Path(check_checkpoint(path))

    is_workdir = workdir_lib.is_run(path)
    if (path / "config.json").is_file() and not is_workdir:
        from cambrian_jax import pretrained
        loaded = pretrained.load_pretrained(path, towers=towers, dtype=dtype or "float32", mesh=mesh, rules=rules)
        tok = load_tokenizer(tokenizer) if tokenizer else loaded.tokenizer
        if tok is None:
            raise ConfigError(f"{path} has no tokenizer.json; pass --tokenizer DIR")
        stop = None
        gen = loaded.generation_config or {}
        eos = gen.get("eos_token_id", loaded.hf_config.get("eos_token_id"))
        if eos is not None:
            stop = tuple(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))
        template = template or guess_template(tok, loaded.config.image_position)
        return LoadedCheckpoint(loaded.model, loaded.config, tok, template, stop, f"HF checkpoint {path}",
                                loaded.image_mode)
    if not is_workdir:
        raise ConfigError(f"--checkpoint {path}: neither an HF-layout directory (config.json + safetensors) nor a "
                          "training workdir (stage1/ or stage2/ orbax checkpoints)")
    from cambrian_jax import config as config_lib
    from cambrian_jax import export_hf

    run = export_hf.run_config(path, config)
    model_dict = run.model.to_dict() if hasattr(run.model, "to_dict") else dict(run.model)
    if dtype:
        model_dict["dtype"] = dtype
    cfg = config_lib.from_dict(model_dict)
    model, stage, step = restore_workdir(path, cfg, mesh=mesh, rules=rules, stage=stage, step=step)
    data = dict(run.get("data", {}) or {})
    tok_dir = tokenizer or data.get("tokenizer_dir") or None
    if not tok_dir and (path / "tokenizer").is_dir():
        tok_dir = str(path / "tokenizer")
    if not tok_dir:
        raise ConfigError("no tokenizer: pass --tokenizer DIR or set config.data.tokenizer_dir")
    tok = load_tokenizer(tok_dir)
    template = template or data.get("template") or guess_template(tok, cfg.image_position)
    templates.get_template(template)
    return LoadedCheckpoint(model, cfg, tok, template, None, f"{path} stage {stage} step {step}",
                            data.get("image_mode", "pad"), stage, step)


# ------------------------------------------------------------------------------------------ generator

class Generator:
    """Batched generation with a model, its tokenizer and conversation template.

    mesh: place the parameters with `rules` (logical axis → mesh axes, default the configs' table)
    and split each batch over the data-parallel axes ('data', 'fsdp'). Without a mesh, a model whose
    parameters already live on a mesh (the trainer's) is used where it is; otherwise one device.
    Multi-host: every process calls generate_ids with its own rows (the same count on every
    process); the results of all processes' rows come back on every process, in process order.
    """

    def __init__(self, model, tokenizer=None, template: str | None = None, *, cfg: CambrianConfig | None = None,
                 stop_ids: Sequence[int] | None = None, pad_id: int | None = None, mesh=None, rules=None,
                 image_mode: str = "pad", prompt_multiple: int = 128, min_cache: int = 64, warn_cut: bool = True):
        """warn_cut: warn (once) when max_new_tokens does not fit after a prompt and is cut; the
        command lines pass False unless --max-new-tokens was given (a default that does not fit is
        simply the most that fits)."""
        self.cfg = cfg or model.cfg
        self.warn_cut = warn_cut
        self.tokenizer = tokenizer
        self.template = template
        self.image_mode = image_mode
        self.prompt_multiple = prompt_multiple
        self.min_cache = min_cache
        if stop_ids is None:
            stop_ids = ()
            if tokenizer is not None and template is not None:
                from cambrian_jax.data import templates
                stop_ids = templates.stop_ids(template, tokenizer)
        if len(stop_ids) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop ids, got {list(stop_ids)}")
        self.stop_ids = tuple(int(i) for i in stop_ids)
        tok_pad = getattr(tokenizer, "pad_id", None) if tokenizer is not None else None
        self.pad_id = int(pad_id if pad_id is not None else (tok_pad if tok_pad is not None else 0))
        graphdef, state = nnx.split(model)
        if mesh is not None:
            from cambrian_jax import sharding
            shardings = sharding.state_shardings(state, [tuple(r) for r in (rules or default_rules())], mesh)
            state = jax.device_put(state, shardings)
        self.mesh = mesh if mesh is not None else _mesh_of(state)
        if jax.process_count() > 1 and (self.mesh is None or self._data_parallel() % jax.process_count()):
            raise ConfigError(f"multi-host generation splits every batch over the data-parallel mesh axes (data × "
                              f"fsdp = {self._data_parallel()}), which must be a multiple of the "
                              f"{jax.process_count()} processes; use e.g. --mesh data=1,fsdp=-1,tensor=1")
        self.graphdef, self.state = graphdef, state
        self.limit = max(self.cfg.max_len, self.cfg.decoder.max_position_embeddings or 0)
        self._warned_cut = False

    @classmethod
    def from_checkpoint(cls, path, *, towers=None, config=None, tokenizer=None, template=None, dtype=None,
                        mesh=None, **kwargs) -> "Generator":
        ck = load_checkpoint(path, towers=towers, config=config, tokenizer=tokenizer, template=template, dtype=dtype,
                             mesh=mesh, rules=kwargs.get("rules"))
        kwargs.setdefault("image_mode", ck.image_mode)
        return cls(ck.model, ck.tokenizer, ck.template, cfg=ck.cfg, stop_ids=ck.stop_ids, mesh=mesh, **kwargs)

    # -- prompts
    def encode(self, conversation: str | Sequence[Any], has_image: bool) -> list[int]:
        """Token ids of an inference prompt: a question (the image, if any, is put before it as
        "<image>\\n", spec §4) or a conversation [(role, text), …] ending with a user turn."""
        from cambrian_jax.data import templates

        if self.tokenizer is None or self.template is None:
            raise ValueError("this Generator has no tokenizer/template: pass token ids to generate_ids")
        turns = [("human", conversation)] if isinstance(conversation, str) else list(conversation)
        turns = templates.normalize_turns(turns, has_image=has_image)
        prompt = templates.render(self.template, turns, open_assistant=True)[0]
        ids = templates.tokenize_prompt(prompt, self.tokenizer)
        if has_image and ids.index(IMAGE_TOKEN_INDEX) != self.cfg.image_position:
            raise templates.ImagePositionError(
                f"template {self.template!r} puts the image at token {ids.index(IMAGE_TOKEN_INDEX)} but the model "
                f"reads it at image_position {self.cfg.image_position} (spec §3.4); use the template and "
                "tokenizer the model was trained with")
        return ids

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True).strip()

    # -- shapes
    def _data_parallel(self) -> int:
        if self.mesh is None:
            return 1
        return math.prod(self.mesh.shape.get(a, 1) for a in ("data", "fsdp"))

    def batch_bucket(self, rows: int) -> int:
        """Padded batch size (per process): a power of two, a multiple of the data-parallel devices
        of this process."""
        per_process = max(1, self._data_parallel() // jax.process_count())
        return round_up(next_pow2(rows), per_process)

    def shapes(self, prompt_len: int, max_new: int) -> tuple[int, int, int]:
        """(padded prompt length, cache length, usable new tokens) for a prompt of `prompt_len` positions."""
        if prompt_len >= self.limit:
            raise ValueError(f"the prompt takes {prompt_len} positions; the model allows {self.limit} "
                             "(max(model.max_len, decoder.max_position_embeddings))")
        length = min(round_up(prompt_len, self.prompt_multiple), self.limit - 1)
        cache = min(max(next_pow2(length + max_new), self.min_cache), max(self.limit, length + 1))
        return length, cache, min(max_new, cache - length)

    def _put(self, x, batch_sharded: bool):
        if self.mesh is None:
            return jnp.asarray(x)
        from jax.sharding import NamedSharding, PartitionSpec
        axes = tuple(a for a in ("data", "fsdp") if a in self.mesh.shape)
        spec = PartitionSpec(axes) if batch_sharded else PartitionSpec()
        sh = NamedSharding(self.mesh, spec)
        if jax.process_count() > 1:
            return jax.make_array_from_process_local_data(sh, np.asarray(x))
        return jax.device_put(np.asarray(x), sh)

    def _gather(self, x) -> np.ndarray:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    # -- generation
    def generate_ids(self, ids_list: Sequence[Sequence[int]], images: Sequence[Image.Image | None] | None = None,
                     sampling: Sampling = Sampling(), *, active: Sequence[bool] | None = None,
                     row_seeds: Sequence[int] | None = None, output_scores: bool = False) -> GenerationOutput:
        """New tokens for prompts given as token ids (a −200 at image_position in rows with an image).

        active: rows marked False are computed but stop at once (padding rows of a fixed-size batch).
        row_seeds: the per-row seeds of sampling (default: the row's index in the call).
        """
        n = len(ids_list)
        if n == 0:
            raise ValueError("no prompts")
        images = list(images) if images is not None else [None] * n
        if len(images) != n:
            raise ValueError(f"{len(images)} images for {n} prompts (use None for a text-only prompt)")
        for i, (ids, im) in enumerate(zip(ids_list, images)):
            has = IMAGE_TOKEN_INDEX in list(ids)
            if has != (im is not None):
                what = "an image sentinel but no image" if has else "an image but no sentinel"
                raise ValueError(f"prompt {i}: {what}"
                                 f" (the prompt needs exactly one {IMAGE_TOKEN_INDEX} at image_position "
                                 f"{self.cfg.image_position} when an image is given)")
        lay = layout_rows(self.cfg, ids_list, images, self.image_mode, self.pad_id)
        longest = lay.ids.shape[1]
        if jax.process_count() > 1:   # every process must compile the same shapes
            from jax.experimental import multihost_utils
            longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
        length, cache_len, max_new = self.shapes(longest, sampling.max_new_tokens)
        if max_new < sampling.max_new_tokens and not self._warned_cut:
            self._warned_cut = True
            (log.warning if self.warn_cut else log.debug)(
                "max_new_tokens %d cut to %d: the prompt (%d positions) and the new tokens must fit the model's %d "
                "positions", sampling.max_new_tokens, max_new, longest, self.limit)
        rows = self.batch_bucket(n)
        batch = pad_batch(lay, length, rows, self.pad_id)
        sharded = rows * jax.process_count() % self._data_parallel() == 0
        put = functools.partial(self._put, batch_sharded=sharded)

        inactive = np.ones(rows, bool)
        inactive[:n] = False if active is None else ~np.asarray(active, bool)
        seeds = np.zeros(rows, np.uint32)
        seeds[:n] = np.arange(n) if row_seeds is None else np.asarray(row_seeds)
        key_data = np.asarray(jax.random.key_data(row_keys(sampling.seed, seeds)))
        stop = np.full(MAX_STOP_IDS, -1, np.int32)
        stop[:len(self.stop_ids)] = self.stop_ids

        with (jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()):
            t0 = time.perf_counter()
            vision = batch.with_vision
            pixels = [put(p) for p in batch.pixels] if vision else None
            tmasks = [put(m) for m in batch.tower_masks] if vision else None
            logits, cache = _prefill(self.graphdef, cache_len, vision, self.state, put(batch.ids), pixels, tmasks,
                                     put(batch.mask), put(batch.positions), put(batch.last_index))
            jax.block_until_ready(logits)
            t1 = time.perf_counter()
            out, count, scores = _decode_fn()(
                self.graphdef, output_scores, self.state, cache, logits, put(batch.next_position), put(inactive),
                put(key_data), jnp.int32(max_new), jnp.float32(sampling.temperature), jnp.float32(sampling.top_p),
                jnp.asarray(stop), jnp.int32(self.pad_id))
            out, count = self._gather(out), self._gather(count)
            scores = self._gather(scores)[:, :max_new] if output_scores else None
            t2 = time.perf_counter()
        tokens, reasons, new = [], [], 0
        for p in range(jax.process_count()):
            for i in range(n):
                r = p * rows + i
                row = out[r, :count[r]].tolist()
                stopped = bool(row) and row[-1] in self.stop_ids
                tokens.append(row[:-1] if stopped else row)
                reasons.append("stop" if stopped else "length")
                new += int(count[r])
        return GenerationOutput(tokens, reasons, t1 - t0, t2 - t1, new, rows, length, cache_len, scores)

    def generate(self, prompts: Sequence[str | Sequence[Any]], images: Sequence[Image.Image | None] | None = None,
                 sampling: Sampling = Sampling(), **kwargs) -> list[Completion]:
        """Completions of questions (or conversations) in the model's template, one image (or None) each."""
        images = list(images) if images is not None else [None] * len(prompts)
        ids = [self.encode(p, im is not None) for p, im in zip(prompts, images)]
        out = self.generate_ids(ids, images, sampling, **kwargs)
        return [Completion(t, self.decode(t), r) for t, r in zip(out.tokens, out.finish_reasons)]


# ---------------------------------------------------------------------------------------------- CLI

def parse_towers(items: Sequence[str] | None) -> dict[str, str]:
    """['name=dir', …] → {name: dir} (the name may itself contain '/', never '=')."""
    out = {}
    for item in items or ():
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise cli.InputError(f"--towers {item!r}: expected NAME=DIR (e.g. "
                                 "siglip/CLIP-ViT-SO400M-14-384=/data/siglip)")
        out[name] = directory
    return out


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="an HF-layout Cambrian directory (config.json + safetensors) or a training workdir (orbax)")
    p.add_argument("--towers", nargs="*", default=None, metavar="NAME=DIR",
                   help="vision tower directories by the names in config.json (HF checkpoints)")
    p.add_argument("--config", default=None, help="the training run's config file, configs/x.py[:arg] (workdirs)")
    p.add_argument("--tokenizer", default=None, help="a folder with tokenizer.json (default: the checkpoint's)")
    p.add_argument("--template", default=None, help="llama_3 | vicuna_v1 | chatml_direct | phi3 (default: detected)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="parameter/compute dtype (default: float32 for HF checkpoints, the run's for workdirs)")
    p.add_argument("--mesh", default=None, help="data=1,fsdp=-1,tensor=1 style degrees (default: all devices, fsdp)")


def parse_mesh(text: str | None) -> dict[str, int]:
    degrees = dict(data=1, fsdp=-1, tensor=1)
    for item in filter(None, (text or "").split(",")):
        k, _, v = item.partition("=")
        if k not in degrees or not v.lstrip("-").isdigit():
            raise cli.InputError(f"--mesh {text!r}: expected data=N,fsdp=N,tensor=N (-1: the remaining devices)")
        degrees[k] = int(v)
    return degrees


def make_generator(args, *, stage: int | None = None, step: int | None = None, **kwargs) -> Generator:
    """The Generator of the command-line flags (add_checkpoint_args); stage/step pick a workdir's
    checkpoint (default: the latest finished stage)."""
    from cambrian_jax import sharding
    mesh = sharding.make_mesh(parse_mesh(args.mesh))
    ck = load_checkpoint(args.checkpoint, towers=parse_towers(args.towers), config=args.config,
                         tokenizer=args.tokenizer, template=args.template, dtype=args.dtype, mesh=mesh,
                         stage=stage, step=step)
    kwargs.setdefault("image_mode", ck.image_mode)
    kwargs.setdefault("warn_cut", getattr(args, "max_new_tokens", None) is not None)
    gen = Generator(ck.model, ck.tokenizer, ck.template, cfg=ck.cfg, stop_ids=ck.stop_ids, mesh=mesh, **kwargs)
    log.info("loaded %s: template %s, stop ids %s, %d device(s)", ck.source, ck.template, gen.stop_ids,
             mesh.devices.size)
    return gen


def setup_logging() -> None:
    """Our progress at INFO, everything else (orbax, absl) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("cambrian_jax").setLevel(logging.INFO)


def chat(gen: Generator, image: Image.Image | None, sampling: Sampling, stdin=None, stdout=None) -> list:
    """Interactive loop: the conversation stays in the template, the image in the first user turn."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    turns: list[tuple[str, str]] = []
    stdout.write("Cambrian chat — /image PATH to change the image, /reset to start over, /quit to stop.\n")
    while True:
        stdout.write("USER: ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/quit", "/exit"):
            break
        if text.strip() == "/reset":
            turns = []
            continue
        if text.startswith("/image"):
            path = text[len("/image"):].strip()
            try:
                new = cli.open_image(path, "image") if path else None
            except cli.InputError as e:      # a typo must not cost the conversation
                stdout.write(f"(error: {e}; the conversation and its image stay)\n")
                stdout.flush()
                continue
            image = new
            turns = []
            stdout.write(f"(image {'cleared' if image is None else path}; new conversation)\n")
            continue
        turns.append(("human", text))
        reply = gen.generate([turns], [image], sampling)[0]
        turns.append(("gpt", reply.text))
        stdout.write(f"ASSISTANT: {reply.text}\n")
        stdout.flush()
    return turns


@cli.guarded
def main(argv=None) -> str | None:
    p = cli.ArgumentParser(prog="python -m cambrian_jax.generate", description=__doc__.split("\n\n")[0])
    add_checkpoint_args(p)
    p.add_argument("--image", default=None, help="image file (omit for text-only)")
    p.add_argument("--prompt", default=None, help="the question; without it an interactive chat starts")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default {DEFAULT_MAX_NEW_TOKENS}, or what fits after the prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    setup_logging()
    # Every input is checked before the model is loaded.
    max_new = DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    sampling = Sampling(max_new, args.temperature, args.top_p, args.seed)
    check_checkpoint(args.checkpoint)
    parse_towers(args.towers)
    parse_mesh(args.mesh)
    image = cli.open_image(args.image, "--image") if args.image else None
    gen = make_generator(args)
    if args.prompt is None:
        chat(gen, image, sampling)
        return None
    out = gen.generate([args.prompt], [image], sampling)[0]
    print(out.text)
    return out.text


if __name__ == "__main__":
    main()
