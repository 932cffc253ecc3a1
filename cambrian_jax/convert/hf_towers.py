"""Hugging Face transformers vision models → our towers: parameters (`from_hf`) and configs
(`hf_tower_config`).

Sources: CLIPVisionModel, SiglipVisionModel, Dinov2Model and ConvNextModel state dicts, as saved by
transformers 5.x or as stored on the Hub by 4.x (CLIP/SigLIP keys under `vision_model.`, DINOv2 with
`attention.attention.query` … and the fused SwiGLU `weights_in`/`weights_out`). Each tower has one
table of (HF key regex, our parameter path, hook); a `(?P<layer>…)` group marks per-layer tensors,
which are stacked on a leading axis in layer order. HF key names appear nowhere else in the project.

Tensors the tower does not use are dropped by name (CLIP post_layernorm, SigLIP head, the text half
of a full CLIP/SigLIP checkpoint, DINOv2 mask_token, ConvNeXt final layernorm/pooler). Anything else
unrecognised is passed on under an `hf:` path, so `assign` / `towers.load_tower` report it as
unexpected, next to any missing parameters.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import numpy as np

from cambrian_jax.config import _KIND_DEFAULTS, ConfigError, TowerConfig
from cambrian_jax.convert.assign import CheckpointMismatch


def _same(w):
    return w


def _linear(w):
    """torch Linear weight [out, in] → kernel [in, out]."""
    return np.transpose(w)


def _conv(w):
    """torch conv weight OIHW → HWIO (a depthwise [C, 1, k, k] becomes [k, k, 1, C])."""
    return np.transpose(w, (2, 3, 1, 0))


def _unbatch(w):
    """DINOv2 stores its class token [1, 1, C] and position table [1, N, C] with a batch axis."""
    return np.asarray(w)[0]


def _chunk_linear(w):
    """Fused [gate; up] weight (HF 4.x Dinov2SwiGLUFFN.weights_in) → gate and up kernels."""
    gate, up = np.split(np.asarray(w), 2, axis=0)
    return _linear(gate), _linear(up)


def _chunk(b):
    return tuple(np.split(np.asarray(b), 2, axis=0))


Rule = tuple[str, "str | tuple[str, ...]", Callable]


def _norm(hf: str, ours: str) -> list[Rule]:
    return [(hf + r"\.weight", ours + "/scale", _same), (hf + r"\.bias", ours + "/bias", _same)]


def _dense(hf: str, ours: str) -> list[Rule]:
    return [(hf + r"\.weight", ours + "/kernel", _linear), (hf + r"\.bias", ours + "/bias", _same)]


def _under(prefix: str, target: str, rules: list[Rule]) -> list[Rule]:
    def join(p):
        return tuple(target + q for q in p) if isinstance(p, tuple) else target + p
    return [(prefix + hf, join(ours), hook) for hf, ours, hook in rules]


# CLIP and SigLIP encoder layers share one layout.
_CLIP_LAYER = (_norm(r"layer_norm1", "norm1") + _norm(r"layer_norm2", "norm2")
               + _dense(r"self_attn\.q_proj", "attn/q") + _dense(r"self_attn\.k_proj", "attn/k")
               + _dense(r"self_attn\.v_proj", "attn/v") + _dense(r"self_attn\.out_proj", "attn/o")
               + _dense(r"mlp\.fc1", "mlp/fc1") + _dense(r"mlp\.fc2", "mlp/fc2"))

_CLIP = [
    (r"embeddings\.patch_embedding\.weight", "patch_embed/kernel", _conv),
    (r"embeddings\.class_embedding", "cls_token", _same),
    (r"embeddings\.position_embedding\.weight", "pos_embed", _same),
    *_norm(r"pre_layrnorm", "pre_norm"),
    *_under(r"encoder\.layers\.(?P<layer>\d+)\.", "blocks/", _CLIP_LAYER),
]

_SIGLIP = [
    (r"embeddings\.patch_embedding\.weight", "patch_embed/kernel", _conv),
    (r"embeddings\.patch_embedding\.bias", "patch_embed/bias", _same),
    (r"embeddings\.position_embedding\.weight", "pos_embed", _same),
    *_under(r"encoder\.layers\.(?P<layer>\d+)\.", "blocks/", _CLIP_LAYER),
    *_norm(r"post_layernorm", "post_norm"),
]

_DINOV2_LAYER = (
    _norm(r"norm1", "norm1") + _norm(r"norm2", "norm2")
    + [(r"layer_scale1\.lambda1", "ls1", _same), (r"layer_scale2\.lambda1", "ls2", _same)]
    # transformers 5.x names
    + _dense(r"attention\.q_proj", "attn/q") + _dense(r"attention\.k_proj", "attn/k")
    + _dense(r"attention\.v_proj", "attn/v") + _dense(r"attention\.o_proj", "attn/o")
    + _dense(r"mlp\.gate_proj", "mlp/gate") + _dense(r"mlp\.up_proj", "mlp/up")
    + _dense(r"mlp\.down_proj", "mlp/down")
    # transformers 4.x / Hub names
    + _dense(r"attention\.attention\.query", "attn/q") + _dense(r"attention\.attention\.key", "attn/k")
    + _dense(r"attention\.attention\.value", "attn/v") + _dense(r"attention\.output\.dense", "attn/o")
    + [(r"mlp\.weights_in\.weight", ("mlp/gate/kernel", "mlp/up/kernel"), _chunk_linear),
       (r"mlp\.weights_in\.bias", ("mlp/gate/bias", "mlp/up/bias"), _chunk)]
    + _dense(r"mlp\.weights_out", "mlp/down")
    # both: the GELU MLP of the non-SwiGLU sizes
    + _dense(r"mlp\.fc1", "mlp/fc1") + _dense(r"mlp\.fc2", "mlp/fc2"))

_DINOV2 = [
    (r"embeddings\.cls_token", "cls_token", lambda w: _unbatch(w)[0]),
    (r"embeddings\.position_embeddings", "pos_embed", _unbatch),
    (r"embeddings\.patch_embeddings\.projection\.weight", "patch_embed/kernel", _conv),
    (r"embeddings\.patch_embeddings\.projection\.bias", "patch_embed/bias", _same),
    *_under(r"encoder\.layer\.(?P<layer>\d+)\.", "blocks/", _DINOV2_LAYER),
    *_norm(r"layernorm", "norm"),
]

_CONVNEXT_BLOCK = [
    (r"dwconv\.weight", "dwconv/kernel", _conv), (r"dwconv\.bias", "dwconv/bias", _same),
    *_norm(r"layernorm", "norm"), *_dense(r"pwconv1", "fc1"), *_dense(r"pwconv2", "fc2"),
    (r"layer_scale_parameter", "gamma", _same),
]

_CONVNEXT = [
    (r"embeddings\.patch_embeddings\.weight", "stem/conv/kernel", _conv),
    (r"embeddings\.patch_embeddings\.bias", "stem/conv/bias", _same),
    *_norm(r"embeddings\.layernorm", "stem/norm"),
    *_norm(r"encoder\.stages\.(?P<stage>\d+)\.downsampling_layer\.0", "stages/{stage}/downsample/norm"),
    (r"encoder\.stages\.(?P<stage>\d+)\.downsampling_layer\.1\.weight", "stages/{stage}/downsample/conv/kernel", _conv),
    (r"encoder\.stages\.(?P<stage>\d+)\.downsampling_layer\.1\.bias", "stages/{stage}/downsample/conv/bias", _same),
    *_under(r"encoder\.stages\.(?P<stage>\d+)\.layers\.(?P<layer>\d+)\.", "stages/{stage}/blocks/", _CONVNEXT_BLOCK),
]

_TABLES = {"clip": _CLIP, "siglip": _SIGLIP, "dinov2": _DINOV2, "convnext": _CONVNEXT}

# Checkpoint tensors a tower does not use.
# The Hub files of CLIP and SigLIP hold the whole image-text model; its text half is unused too.
_TEXT_HALF = (r"text_model\..*", r"(visual|text)_projection\..*", r"logit_(scale|bias)")
_UNUSED = {
    "clip": (r"post_layernorm\..*", r"embeddings\.position_ids", *_TEXT_HALF),
    "siglip": (r"head\..*", r"embeddings\.position_ids", *_TEXT_HALF),
    "dinov2": (r"embeddings\.mask_token", r"classifier\..*"),
    "convnext": (r"layernorm\..*", r"pooler\..*", r"classifier\..*"),
}

# Key prefixes of the same weights saved inside a larger model (Hub CLIP/SigLIP files, the
# *ForImageClassification checkpoints of DINOv2 and ConvNeXt).
_PREFIXES = {"clip": "vision_model.", "siglip": "vision_model.", "dinov2": "dinov2.", "convnext": "convnext."}


def _layer_count(cfg: TowerConfig, path: str) -> int:
    if cfg.kind == "convnext":
        return cfg.depths[int(path.split("/")[1])]
    return cfg.num_layers


def from_hf(cfg: TowerConfig, state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{our parameter path: array} for `towers.load_tower(cfg, ...)` or `assign(tower, ...)`."""
    table = [(re.compile(hf), ours, hook) for hf, ours, hook in _TABLES[cfg.kind]]
    unused = re.compile("|".join(_UNUSED[cfg.kind]))
    out: dict[str, np.ndarray] = {}
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for key, value in state_dict.items():
        name = key.removeprefix(_PREFIXES[cfg.kind])
        if unused.fullmatch(name):
            continue
        for pattern, ours, hook in table:
            m = pattern.fullmatch(name)
            if m:
                break
        else:
            out[f"hf:{key}"] = np.asarray(value)  # reported as unexpected when loaded
            continue
        groups = m.groupdict()
        layer = groups.pop("layer", None)
        paths = ours if isinstance(ours, tuple) else (ours,)
        arrays = hook(np.asarray(value))
        arrays = arrays if isinstance(arrays, tuple) else (arrays,)
        for path, array in zip(paths, arrays):
            path = path.format(**groups)
            if layer is None:
                out[path] = array
            else:
                stacks.setdefault(path, {})[int(layer)] = array
    gaps = []
    for path, layers in stacks.items():
        n = _layer_count(cfg, path)
        absent = sorted(set(range(n)) - set(layers))
        extra = sorted(set(layers) - set(range(n)))
        if absent or extra:
            gaps.append(f"  {path}: " + "; ".join(
                ([f"layers {absent} absent"] if absent else [])
                + ([f"layers {extra} beyond the configured {n}"] if extra else [])))
            continue
        out[path] = np.stack([layers[i] for i in range(n)])
    if gaps:
        raise CheckpointMismatch(f"{cfg.kind} checkpoint has incomplete layer stacks:\n" + "\n".join(gaps))
    return out


# Values that `save_pretrained` leaves out of config.json because they equal the class defaults
# (those of transformers' CLIPVisionConfig, SiglipVisionConfig, Dinov2Config, ConvNextConfig).
_HF_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                   hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=14, qkv_bias=True,
                   use_swiglu_ffn=False),
    "convnext": dict(patch_size=4, num_stages=4, hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3],
                     hidden_act="gelu", layer_scale_init_value=1e-6, image_size=224),
}

_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def dinov2_ffn_hidden(hidden_size: int, mlp_ratio: float, swiglu: bool) -> int:
    """Width of DINOv2's feed-forward (of each of gate/up for SwiGLU), rounded as HF and the
    original code do: two thirds of the MLP width, up to a multiple of 8 (ViT-g: 1536 → 4096)."""
    hidden = int(hidden_size * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8 if swiglu else hidden


def hf_tower_config(kind: str, hf_config: Mapping[str, Any] | Any, name: str, token_len: int,
                    **overrides: Any) -> TowerConfig:
    """Our TowerConfig for a transformers vision config (dict, config.json contents or config object).

    A full CLIPConfig/SiglipConfig is accepted (its vision_config is used). As in the reference,
    `-res<N>` in the name sets the input resolution of DINOv2 and ConvNeXt (spec §14.5), and
    `multi-stage` in the name selects ConvNeXt's four-stage features.
    """
    if kind not in _HF_DEFAULTS:
        raise ConfigError(f"tower {name!r}: kind {kind!r} is not one of {sorted(_HF_DEFAULTS)}")
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    if isinstance(d.get("vision_config"), Mapping):
        d = dict(d["vision_config"])
    d = {**_HF_DEFAULTS[kind], **{k: v for k, v in d.items() if v is not None}}
    fields: dict[str, Any] = dict(_KIND_DEFAULTS[kind])
    res = re.search(r"-res(\d+)", name)
    image_size = int(res.group(1)) if res and kind in ("dinov2", "convnext") else d["image_size"]
    if kind in ("clip", "siglip", "dinov2"):
        fields.update(hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
                      num_heads=d["num_attention_heads"], patch_size=d["patch_size"],
                      layer_norm_eps=d["layer_norm_eps"], hidden_act=_ACTS.get(d["hidden_act"], d["hidden_act"]))
    if kind in ("clip", "siglip"):
        fields["intermediate_size"] = d["intermediate_size"]
    if kind == "dinov2":
        if not d["qkv_bias"]:
            raise ConfigError(f"tower {name!r}: DINOv2 without q/k/v biases (qkv_bias=False) is not supported")
        swiglu = bool(d["use_swiglu_ffn"])
        fields.update(use_swiglu=swiglu, pos_grid=d["image_size"] // d["patch_size"],
                      intermediate_size=dinov2_ffn_hidden(d["hidden_size"], d["mlp_ratio"], swiglu))
    if kind == "convnext":
        if d["patch_size"] != 4 or d["num_stages"] != 4:
            raise ConfigError(f"tower {name!r}: ConvNeXt needs patch_size 4 and 4 stages, got "
                              f"{d['patch_size']} and {d['num_stages']}")
        if not d["layer_scale_init_value"] > 0:
            raise ConfigError(f"tower {name!r}: ConvNeXt without layer scale (layer_scale_init_value <= 0) "
                              "is not supported")
        # HF ConvNextModel hard-codes eps 1e-6 in every norm the tower uses (spec §14.6).
        fields.update(dims=tuple(d["hidden_sizes"]), depths=tuple(d["depths"]), layer_norm_eps=1e-6,
                      hidden_act=d["hidden_act"], multi_stage="multi-stage" in name)
    fields.update(image_size=image_size)
    fields.update(overrides)
    valid = {f.name for f in dataclasses.fields(TowerConfig)}
    if set(fields) - valid:
        raise ConfigError(f"tower {name!r}: unknown field(s) {sorted(set(fields) - valid)}; valid: {sorted(valid)}")
    return TowerConfig(name=name, kind=kind, token_len=token_len, **fields)
