"""Released Cambrian-1 checkpoints (the nyu-visionx/cambrian-* layout, spec §5): the connector's key
table, config.json ↔ CambrianConfig, and the LLM part through hf_llama's tables.

Connector (spec §5.4), all keys under `model.`; our parameter tree mirrors the reference's module
tree, so the table is a rule rather than a list:

    connector/<a>/<b>/…/kernel  [in, out]   ↔  model.<a>.<b>.….weight  [out, in]   (transposed)
    connector/<a>/…/scale                   ↔  model.<a>.….weight                  (LayerNorm γ)
    connector/<a>/…/bias | pos_embed_k | vision_query | image_newline  ↔  same name, same shape
    connector/vision_sampler_layers/layer/<rest>  [N, …]
                                            ↔  model.vision_sampler_layers.{j}.layers.0.<rest>  (j < N)

e.g. connector/mm_projector_aux_3/0/kernel [5760, 1024] ↔ model.mm_projector_aux_3.0.weight [1024, 5760],
connector/vision_sampler_0/layers/2/cross_attn/k_proj_3/0/scale ↔
model.vision_sampler_0.layers.2.cross_attn.k_proj_3.0.weight.

LLM (spec §5.3): hf_llama's table (Llama, Vicuna, Yi; Phi-3's fused qkv_proj / gate_up_proj split on
import and fused again on export), streamed layer by layer.

config.json (spec §5.2, §3.7): `config_to_hf` writes every Cambrian field plus the LLM's own fields
(taken from the base LLM's config.json when given, so a round trip keeps them); `config_from_hf`
reads them back. One field is ours: `vision_sampler_num_heads`, written only when the SVA does not
use the reference's hard-coded 16 heads (tiny test models), and read with default 16.

Connector types (model.connector.type) with a released layout: `sva` (mm_projector_type "sva") and
the reference's non-SVA path, `mm_projector_type: "mlp2x_gelu"` — LLaVA-1.5's projector on the
channel-concatenated towers, keys `model.mm_projector.{0,2}.{weight,bias}` and `model.image_newline`
— which is our `mlp2x_gelu` with one tower and `concat` with several. `interleave` and `resampler`
have no reference layout and are not exported.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from cambrian_jax.config import CambrianConfig, ConfigError, ConnectorConfig, DecoderConfig, TowerConfig
from cambrian_jax.convert.hf_llama import (_FUSED_GATE_UP, _FUSED_QKV, _LAYER, _LINEAR, _NORM, _from_torch_linear,
                                           _to_torch_linear, decoder_config_from_hf, decoder_config_to_hf)
from cambrian_jax.convert.safetensors_io import Source

HF_PREFIX = "model."
CONNECTOR = "connector/"
DECODER = "decoder/"
STACKED = "vision_sampler_layers/layer/"
SVA_HEADS_FIELD = "vision_sampler_num_heads"   # ours; absent = the reference's 16

Entry = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]   # (checkpoint key, shape, producer)


def _t(w):
    return np.asarray(w).T


def _same(w):
    return w


# ------------------------------------------------------------------------------------------ connector

def connector_key(path: str) -> tuple[str, bool]:
    """(checkpoint key without `model.`, transposed?) of one unstacked connector path (no 'connector/')."""
    parts = path.split("/")
    last = parts[-1]
    transpose = last == "kernel"
    if last in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts), transpose


def connector_sources(path: str, shape: Sequence[int], hf_prefix: str = HF_PREFIX) -> list[Source]:
    """The checkpoint tensors of one connector parameter (full path 'connector/…')."""
    rel = path[len(CONNECTOR):]
    if rel.startswith(STACKED):
        key, transpose = connector_key(rel[len(STACKED):])
        inner = tuple(shape[1:])
        expect = inner[::-1] if transpose else inner
        return [Source(f"{hf_prefix}vision_sampler_layers.{j}.layers.0.{key}", _t if transpose else _same, j, expect)
                for j in range(shape[0])]
    key, transpose = connector_key(rel)
    return [Source(hf_prefix + key, _t if transpose else _same, None, tuple(shape)[::-1] if transpose else tuple(shape))]


def connector_plan(shapes: Mapping[str, Sequence[int]], hf_prefix: str = HF_PREFIX) -> dict[str, list[Source]]:
    """{connector path: sources} for every 'connector/…' path in `shapes`."""
    return {p: connector_sources(p, s, hf_prefix) for p, s in shapes.items() if p.startswith(CONNECTOR)}


def connector_entries(params: Mapping[str, Any], get: Callable[[str], np.ndarray],
                      hf_prefix: str = HF_PREFIX) -> list[Entry]:
    """Export: (key, [out, in] shape, producer) for every connector parameter in `params` ({path: array})."""
    entries = []
    for path in sorted(p for p in params if p.startswith(CONNECTOR)):
        shape = tuple(np.shape(params[path]))
        for s in connector_sources(path, shape, hf_prefix):
            if s.index is None:
                entries.append((s.key, s.expect, lambda p=path, t=s.convert: t(get(p))))
            else:
                entries.append((s.key, s.expect, lambda p=path, t=s.convert, j=s.index: t(get(p)[j])))
    return sorted(entries, key=lambda e: _natural(e[0]))


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


# ------------------------------------------------------------------------------------------------ LLM

# Checkpoint tensors of a Llama-family LLM that the decoder does not use (old non-persistent buffers).
LLM_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _torch_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    h, nh, kv, d, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.intermediate_size
    return {"attn/q/kernel": (nh * d, h), "attn/k/kernel": (kv * d, h), "attn/v/kernel": (kv * d, h),
            "attn/o/kernel": (h, nh * d), "mlp/gate/kernel": (f, h), "mlp/up/kernel": (f, h),
            "mlp/down/kernel": (h, f), "attn_norm/scale": (h,), "mlp_norm/scale": (h,)}


def llm_plan(cfg: DecoderConfig, keys: Sequence[str] | set, prefix: str = DECODER) -> dict[str, list[Source]]:
    """{decoder path: sources} for a Llama-family checkpoint with these keys (fused Phi-3 layers are
    detected per layer by their qkv_proj / gate_up_proj keys)."""
    keys = set(keys)
    nh, kv, d, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.intermediate_size
    torch_shapes = _torch_shapes(cfg)
    plan: dict[str, list[Source]] = {}

    def add(path, key, convert, index=None, expect=None):
        plan.setdefault(prefix + path, []).append(Source(key, convert, index, expect))

    add("embedding", "model.embed_tokens.weight", _same, expect=(cfg.vocab_size, cfg.hidden_size))
    add("final_norm/scale", "model.norm.weight", _same, expect=(cfg.hidden_size,))
    add("lm_head/kernel", "lm_head.weight", _t, expect=(cfg.vocab_size, cfg.hidden_size))
    fused_rows = {"attn/q/kernel": (0, nh * d), "attn/k/kernel": (nh * d, (nh + kv) * d),
                  "attn/v/kernel": ((nh + kv) * d, (nh + 2 * kv) * d),
                  "mlp/gate/kernel": (0, f), "mlp/up/kernel": (f, 2 * f)}
    for i in range(cfg.num_layers):
        pre = _LAYER.format(i=i)
        for p in _LINEAR:
            fused = (_FUSED_QKV if p.startswith("attn/") and p != "attn/o/kernel" else
                     _FUSED_GATE_UP if p in ("mlp/gate/kernel", "mlp/up/kernel") else None)
            if fused and pre + fused in keys:
                a, b = fused_rows[p]
                full = ((nh + 2 * kv) * d if fused == _FUSED_QKV else 2 * f, cfg.hidden_size)
                add("layers/" + p, pre + fused,
                    lambda w, p=p, a=a, b=b: _from_torch_linear(p, np.asarray(w)[a:b], cfg), i, full)
            else:
                add("layers/" + p, pre + _LINEAR[p], lambda w, p=p: _from_torch_linear(p, w, cfg), i, torch_shapes[p])
        for p, key in _NORM.items():
            add("layers/" + p, pre + key, _same, i, torch_shapes[p])
    return plan


def llm_entries(cfg: DecoderConfig, get: Callable[[str], np.ndarray], *, fused: bool = False,
                vocab_size: int | None = None, prefix: str = DECODER) -> list[Entry]:
    """Export: (key, torch shape, producer) of every LLM tensor, in the order save_pretrained writes
    them; `vocab_size` below the model's keeps only the first rows of the embeddings and lm_head."""
    v = vocab_size or cfg.vocab_size
    if v > cfg.vocab_size:
        raise ValueError(f"cannot export a vocabulary of {v} rows from a model with {cfg.vocab_size}")
    h = cfg.hidden_size
    shapes = _torch_shapes(cfg)
    nh, kv, d, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.intermediate_size
    entries: list[Entry] = [("model.embed_tokens.weight", (v, h), lambda: get(prefix + "embedding")[:v])]
    for i in range(cfg.num_layers):
        pre = _LAYER.format(i=i)

        def lin(p, i=i):
            return _to_torch_linear(p, get(prefix + "layers/" + p)[i])

        if fused:
            entries.append((pre + _FUSED_QKV, ((nh + 2 * kv) * d, h), lambda lin=lin: np.concatenate(
                [lin("attn/q/kernel"), lin("attn/k/kernel"), lin("attn/v/kernel")], axis=0)))
            entries.append((pre + _LINEAR["attn/o/kernel"], shapes["attn/o/kernel"], lambda lin=lin: lin("attn/o/kernel")))
            entries.append((pre + _FUSED_GATE_UP, (2 * f, h), lambda lin=lin: np.concatenate(
                [lin("mlp/gate/kernel"), lin("mlp/up/kernel")], axis=0)))
            entries.append((pre + _LINEAR["mlp/down/kernel"], shapes["mlp/down/kernel"],
                            lambda lin=lin: lin("mlp/down/kernel")))
        else:
            for p in _LINEAR:
                entries.append((pre + _LINEAR[p], shapes[p], lambda p=p, lin=lin: lin(p)))
        for p, key in _NORM.items():
            entries.append((pre + key, (h,), lambda p=p, i=i: get(prefix + "layers/" + p)[i]))
    entries.append(("model.norm.weight", (h,), lambda: get(prefix + "final_norm/scale")))
    entries.append(("lm_head.weight", (v, h), lambda: get(prefix + "lm_head/kernel")[:, :v].T))
    return entries


# --------------------------------------------------------------------------------------------- config

# spec §5.2 fields that our configuration does not vary: the released values.
FIXED_FIELDS: dict[str, Any] = {
    "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat",
    "mm_projector_lr": None, "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False, "mm_vision_sampler_lr": None, "mm_vision_select_feature": "patch",
    "mm_vision_tower_lr": None, "spmd_debug": None, "spmd_fsdp_sharding": None, "spmd_mesh": None,
    "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False, "unfreeze_mm_vision_tower": False,
    "use_mm_proj": True,
}
# What the reference's loader needs (spec §5.6, "Export recipe"); an import without them fails.
REQUIRED_FIELDS = (
    "mm_vision_tower_aux_list", "mm_vision_tower_aux_token_len_list", "mm_projector_type", "vision_hidden_size",
    "num_query_group", "query_num_list", "connector_only", "connector_depth", "image_token_len",
    "num_of_vision_sampler_layers", "start_of_vision_sampler_layers", "stride_of_vision_sampler_layers",
    "image_position",
)
# The reference's non-SVA path does not write the in-LLM aggregator schedule.
SVA_ONLY_FIELDS = ("num_of_vision_sampler_layers", "start_of_vision_sampler_layers", "stride_of_vision_sampler_layers")
# model.connector.type → mm_projector_type, for the types the reference can load.
HF_PROJECTOR_TYPE = {"sva": "sva", "mlp2x_gelu": "mlp2x_gelu", "concat": "mlp2x_gelu"}
_NOT_LLM = ("architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version")


def family(hf_config: Mapping[str, Any] | None) -> str:
    """'phi3' (fused qkv/gate_up weights, CambrianPhi3ForCausalLM) or 'llama' (everything else)."""
    model_type = str((hf_config or {}).get("model_type", ""))
    return "phi3" if "phi3" in model_type else "llama"


def projector_type(cfg: CambrianConfig) -> str:
    """config.json's mm_projector_type; a ConfigError for a connector the reference cannot load."""
    con = cfg.connector
    if con.type not in HF_PROJECTOR_TYPE:
        raise ConfigError(f"config field model.connector.type: {con.type!r} has no released Hugging Face layout "
                          f"(the reference loads {sorted(HF_PROJECTOR_TYPE)}); its runs are read from the "
                          "trainer's orbax checkpoints (generate / evaluate --checkpoint WORKDIR --config …)")
    if con.type != "sva":
        for k, t in enumerate(cfg.towers):
            if t.token_len != con.image_token_len:
                raise ConfigError(
                    f"config field model.towers[{k}] ({t.name}).token_len: the reference's mlp2x_gelu path "
                    f"concatenates the towers' tokens without resizing them, so every tower needs "
                    f"image_token_len={con.image_token_len} tokens, not {t.token_len}; set tower_token_lens so "
                    "(the tower then interpolates its own grid, as the reference's -interp<N> does)")
    return HF_PROJECTOR_TYPE[con.type]


def cambrian_fields(cfg: CambrianConfig) -> dict[str, Any]:
    """Every Cambrian field of a released config.json (spec §5.2), from our config."""
    con = cfg.connector
    clip = [t.select_layer for t in cfg.towers if t.kind == "clip"]
    lens = [t.token_len for t in cfg.towers]
    out = dict(FIXED_FIELDS)
    out.update(
        mm_projector_type=projector_type(cfg), connector_depth=con.connector_depth,
        connector_only=con.connector_only, image_position=cfg.image_position,
        image_token_len=con.image_token_len, mm_vision_select_layer=clip[0] if clip else -2,
        mm_vision_tower_aux_list=[t.name for t in cfg.towers], mm_vision_tower_aux_token_len_list=lens,
        vision_tower_aux_token_len_list=list(lens), num_of_vision_sampler_layers=con.num_of_vision_sampler_layers,
        num_query_group=con.num_query_group, query_num_list=list(con.query_num_list),
        start_of_vision_sampler_layers=con.start_of_vision_sampler_layers,
        stride_of_vision_sampler_layers=con.stride_of_vision_sampler_layers, tokenizer_model_max_length=cfg.max_len,
        vision_hidden_size=con.vision_hidden_size)
    if con.num_heads != 16:
        out[SVA_HEADS_FIELD] = con.num_heads
    return out


def _same_decoder(a: DecoderConfig, b: DecoderConfig) -> bool:
    import dataclasses
    ignore = {"vocab_size", "max_position_embeddings"}
    return all(getattr(a, f.name) == getattr(b, f.name) for f in dataclasses.fields(a) if f.name not in ignore)


def config_to_hf(cfg: CambrianConfig, llm_config: Mapping[str, Any] | None = None, *, torch_dtype: str = "float32",
                 vocab_size: int | None = None, fused: bool | None = None,
                 token_ids: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A released-layout config.json: the LLM's own fields (from `llm_config`, the base LLM's or a
    released config.json, where it agrees with `cfg.decoder`), then every Cambrian field.

    fused: a Phi-3 LLM (CambrianPhi3ForCausalLM, model_type cambrian_phi3); default from llm_config.
    token_ids: bos_token_id / eos_token_id / pad_token_id to set when llm_config has none.
    """
    llm = {k: v for k, v in dict(llm_config or {}).items() if k not in _NOT_LLM}
    cambrian = cambrian_fields(cfg)
    for k in list(llm):
        if k in cambrian or k in FIXED_FIELDS or k in REQUIRED_FIELDS or k == SVA_HEADS_FIELD:
            llm.pop(k)
    keep_llm = False
    if llm:
        try:
            keep_llm = _same_decoder(decoder_config_from_hf({**llm, "vocab_size": cfg.decoder.vocab_size}), cfg.decoder)
        except (KeyError, ValueError):
            keep_llm = False
    ours = decoder_config_to_hf(cfg.decoder)
    if not keep_llm:
        llm.update(ours)
        llm.setdefault("attention_dropout", 0.0)
        llm.setdefault("initializer_range", 0.02)
        llm.setdefault("pretraining_tp", 1)
    # RoPE as transformers 4.x (which the reference pins) reads it: rope_theta / rope_scaling at the
    # top level, not 5.x's rope_parameters (which 4.x would ignore, falling back to theta 10000).
    if "rope_parameters" in llm or "rope_theta" not in llm:
        llm.pop("rope_parameters", None)
        llm.update(rope_theta=ours["rope_theta"], rope_scaling=ours["rope_scaling"])
    llm["vocab_size"] = int(vocab_size or cfg.decoder.vocab_size)
    for k, v in dict(token_ids or {}).items():
        if v is not None and llm.get(k) is None:
            llm[k] = v
    llm.setdefault("use_cache", True)
    is_phi3 = family(llm_config) == "phi3" if fused is None else fused
    out = {**llm, **cambrian}
    out["architectures"] = ["CambrianPhi3ForCausalLM" if is_phi3 else "CambrianLlamaForCausalLM"]
    out["model_type"] = "cambrian_phi3" if is_phi3 else "cambrian_llama"
    out["torch_dtype"] = torch_dtype
    out["transformers_version"] = str((llm_config or {}).get("transformers_version") or "4.40.1")
    out.setdefault("_name_or_path", "")
    return dict(sorted(out.items()))


def check_fields(hf: Mapping[str, Any], where: str = "config.json") -> None:
    """Cambrian fields the reference requires, and values only the SVA path supports."""
    optional = SVA_ONLY_FIELDS if hf.get("mm_projector_type") not in (None, "sva") else ()
    missing = [k for k in REQUIRED_FIELDS if k not in hf and k not in optional]
    if missing:
        raise ConfigError(f"{where} lacks the Cambrian field(s) {missing}; a released Cambrian config.json has "
                          "them all (spec §5.2) — is this a Cambrian checkpoint, or a base LLM?")
    problems = []
    if hf["mm_projector_type"] not in set(HF_PROJECTOR_TYPE.values()):
        problems.append(f"mm_projector_type={hf['mm_projector_type']!r} (implemented: "
                        f"{sorted(set(HF_PROJECTOR_TYPE.values()))})")
    if hf.get("image_aspect_ratio", "pad") != "pad":
        problems.append(f"image_aspect_ratio={hf['image_aspect_ratio']!r} (only 'pad')")
    if hf.get("mm_vision_select_feature", "patch") != "patch":
        problems.append(f"mm_vision_select_feature={hf['mm_vision_select_feature']!r} (only 'patch')")
    if hf.get("mm_use_im_start_end") or hf.get("mm_use_im_patch_token"):
        problems.append("mm_use_im_start_end / mm_use_im_patch_token must be false")
    if problems:
        raise ConfigError(f"{where}: unsupported setting(s): " + "; ".join(problems))


def connector_config_from_hf(hf: Mapping[str, Any]) -> ConnectorConfig:
    check_fields(hf)
    if hf["mm_projector_type"] != "sva":
        # The reference's non-SVA path: channel concat of the towers, no in-LLM aggregators.
        default = ConnectorConfig()
        return ConnectorConfig(
            type="mlp2x_gelu" if len(hf["mm_vision_tower_aux_list"]) == 1 else "concat",
            vision_hidden_size=int(hf["vision_hidden_size"]), num_heads=int(hf.get(SVA_HEADS_FIELD, 16)),
            num_query_group=int(hf["num_query_group"]), query_num_list=tuple(int(q) for q in hf["query_num_list"]),
            connector_depth=int(hf["connector_depth"]), image_token_len=int(hf["image_token_len"]),
            connector_only=True,
            **{k: int(hf.get(k, getattr(default, k))) for k in SVA_ONLY_FIELDS})
    return ConnectorConfig(
        vision_hidden_size=int(hf["vision_hidden_size"]), num_heads=int(hf.get(SVA_HEADS_FIELD, 16)),
        num_query_group=int(hf["num_query_group"]), query_num_list=tuple(int(q) for q in hf["query_num_list"]),
        connector_depth=int(hf["connector_depth"]), image_token_len=int(hf["image_token_len"]),
        connector_only=bool(hf["connector_only"]),
        num_of_vision_sampler_layers=int(hf["num_of_vision_sampler_layers"]),
        start_of_vision_sampler_layers=int(hf["start_of_vision_sampler_layers"]),
        stride_of_vision_sampler_layers=int(hf["stride_of_vision_sampler_layers"]))


def tower_names(hf: Mapping[str, Any]) -> list[tuple[str, int]]:
    """[(tower name, token count)] in config order."""
    check_fields(hf)
    names = list(hf["mm_vision_tower_aux_list"])
    lens = list(hf.get("mm_vision_tower_aux_token_len_list") or hf.get("vision_tower_aux_token_len_list") or [])
    if len(names) != len(lens):
        raise ConfigError(f"config.json: {len(names)} towers in mm_vision_tower_aux_list but {len(lens)} entries "
                          "in mm_vision_tower_aux_token_len_list")
    return list(zip(names, (int(n) for n in lens)))


def config_from_hf(hf: Mapping[str, Any], towers: Sequence[TowerConfig], *, dtype: str = "float32",
                   remat: str = "none") -> CambrianConfig:
    """CambrianConfig of a released config.json, with the towers' architectures given (they are not
    in config.json: they come from the towers' own checkpoints)."""
    expected = tower_names(hf)
    got = [(t.name, t.token_len) for t in towers]
    if got != expected:
        raise ConfigError(f"config.json names towers {expected} (name, tokens) but {got} were given")
    cfg = CambrianConfig(towers=tuple(towers), connector=connector_config_from_hf(hf),
                         decoder=decoder_config_from_hf(hf), image_position=int(hf["image_position"]),
                         max_len=int(hf.get("tokenizer_model_max_length") or 2048), dtype=dtype, remat=remat)
    return cfg.validate()


def config_differences(hf: Mapping[str, Any], cfg: CambrianConfig) -> list[str]:
    """Fields where a released config.json disagrees with a model config (empty: compatible)."""
    import dataclasses

    out = []
    names = [n for n, _ in tower_names(hf)]
    if names != [t.name for t in cfg.towers]:
        out.append(f"mm_vision_tower_aux_list: checkpoint {names}, model {[t.name for t in cfg.towers]}")
    con = connector_config_from_hf(hf)
    for f in dataclasses.fields(con):
        a, b = getattr(con, f.name), getattr(cfg.connector, f.name)
        if a != b:
            out.append(f"connector.{f.name}: checkpoint {a!r}, model {b!r}")
    dec = decoder_config_from_hf(hf)
    for f in dataclasses.fields(dec):
        if f.name == "max_position_embeddings":
            continue
        a, b = getattr(dec, f.name), getattr(cfg.decoder, f.name)
        if a != b:
            out.append(f"decoder.{f.name}: checkpoint {a!r}, model {b!r}")
    if int(hf["image_position"]) != cfg.image_position:
        out.append(f"image_position: checkpoint {hf['image_position']}, model {cfg.image_position}")
    return out


def iter_connector_keys(keys: Iterator[str] | Sequence[str]) -> list[str]:
    """Checkpoint keys that belong to the connector (spec §5.6's stage-1 adapter filter)."""
    words = ("mm_projector", "pos_emb", "vision_sampler", "vision_query", "image_newline")
    return [k for k in keys if any(w in k for w in words)]
