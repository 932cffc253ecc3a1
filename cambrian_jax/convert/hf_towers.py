"""Hugging Face transformers vision models ↔ our towers: parameters (`from_hf`, and back: `to_hf`)
and configs (`hf_tower_config`, and back: `hf_config_for`).

Sources: CLIPVisionModel, SiglipVisionModel, Dinov2Model and ConvNextModel state dicts, as saved by
transformers 5.x or as stored on the Hub by 4.x (CLIP/SigLIP keys under `vision_model.`, DINOv2 with
`attention.attention.query` … and the fused SwiGLU `weights_in`/`weights_out`). Each tower has one
table of (HF key regex, our parameter path, hook); a `(?P<layer>…)` group marks per-layer tensors,
which are stacked on a leading axis in layer order. HF key names appear nowhere else in the project.

The export direction (`to_hf`, `invert`, `hf_config_for`) runs the same tables backwards: each hook
has an inverse (`_INVERSE`), stacked parameters are split per layer, and the first rule of a table
that names a parameter is the one written. The result is what transformers 5.x's own
`save_pretrained` writes (CLIP/SigLIP without the `vision_model.` prefix; DINOv2 with the file names
`attention.attention.query`, `weights_in`, which 5.x still writes), so `CLIPVisionModel.from_pretrained`
etc. and `pretrained.tower_source` both read the directory. Tensors the HF model has but the tower
does not use are written as identity norms / zeros (`_FILLERS`), so that nothing is reported missing.

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


def _unbatch_token(w):
    """DINOv2's class token [1, 1, C] → [C]."""
    return np.asarray(w)[0, 0]


def _chunk_linear(w):
    """Fused [gate; up] weight (HF 4.x Dinov2SwiGLUFFN.weights_in) → gate and up kernels."""
    gate, up = np.split(np.asarray(w), 2, axis=0)
    return _linear(gate), _linear(up)


def _chunk(b):
    return tuple(np.split(np.asarray(b), 2, axis=0))


# Inverses of the hooks, for the export direction (a fused rule's inverse takes its parameters in order).
def _unconv(k):
    """HWIO → torch OIHW (inverse of _conv)."""
    return np.transpose(k, (3, 2, 0, 1))


def _batch(w):
    return np.asarray(w)[None]


def _batch_token(c):
    return np.asarray(c)[None, None]


def _fuse_linear(gate, up):
    return np.concatenate([_linear(gate), _linear(up)], axis=0)


def _fuse(gate, up):
    return np.concatenate([np.asarray(gate), np.asarray(up)], axis=0)


_INVERSE: dict[Callable, Callable] = {_same: _same, _linear: _linear, _conv: _unconv, _unbatch: _batch,
                                      _unbatch_token: _batch_token, _chunk_linear: _fuse_linear, _chunk: _fuse}


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
    # the names in files (the Hub's, and what save_pretrained writes in 4.x and 5.x): listed first,
    # so that the export writes them
    + _dense(r"attention\.attention\.query", "attn/q") + _dense(r"attention\.attention\.key", "attn/k")
    + _dense(r"attention\.attention\.value", "attn/v") + _dense(r"attention\.output\.dense", "attn/o")
    + [(r"mlp\.weights_in\.weight", ("mlp/gate/kernel", "mlp/up/kernel"), _chunk_linear),
       (r"mlp\.weights_in\.bias", ("mlp/gate/bias", "mlp/up/bias"), _chunk)]
    + _dense(r"mlp\.weights_out", "mlp/down")
    # transformers 5.x module names (a 5.x state_dict())
    + _dense(r"attention\.q_proj", "attn/q") + _dense(r"attention\.k_proj", "attn/k")
    + _dense(r"attention\.v_proj", "attn/v") + _dense(r"attention\.o_proj", "attn/o")
    + _dense(r"mlp\.gate_proj", "mlp/gate") + _dense(r"mlp\.up_proj", "mlp/up")
    + _dense(r"mlp\.down_proj", "mlp/down")
    # both: the GELU MLP of the non-SwiGLU sizes
    + _dense(r"mlp\.fc1", "mlp/fc1") + _dense(r"mlp\.fc2", "mlp/fc2"))

_DINOV2 = [
    (r"embeddings\.cls_token", "cls_token", _unbatch_token),
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


# ------------------------------------------------------------------------------ export: ours → HF

def _key_template(regex: str) -> str:
    """A rule's key regex as a format string:
    'encoder\\.layers\\.(?P<layer>\\d+)\\.x' → 'encoder.layers.{layer}.x'."""
    template = re.sub(r"\(\?P<(\w+)>\\d\+\)", r"{\1}", regex).replace(r"\.", ".")
    if re.search(r"[\\()\[\]*+?|^$]", template):
        raise ValueError(f"rule {regex!r} is not a plain key (only escaped dots and (?P<name>\\d+) groups invert)")
    return template


def _path_regex(template: str) -> re.Pattern:
    """Our path template ('stages/{stage}/blocks/norm/scale') as a regex with one group per field."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else rf"(?P<{p}>\d+)" for i, p in enumerate(parts)))


def invert(rules: list[Rule], params: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """{checkpoint key: array} from a tower's {our parameter path: array}, by a rules table read
    backwards (also openclip_towers' tables, with prefix 'visual.trunk.'). Every parameter is written
    once, by the first rule that names it; stacked parameters are split into one key per layer. A
    parameter no rule names is a CheckpointMismatch."""
    left = dict(params)
    out: dict[str, np.ndarray] = {}
    for hf, ours, hook in rules:
        paths = ours if isinstance(ours, tuple) else (ours,)
        first = _path_regex(paths[0])
        key = _key_template(hf)
        for path in sorted(left):
            m = first.fullmatch(path) if path in left else None
            if not m:
                continue
            groups = m.groupdict()
            names = [p.format(**groups) for p in paths]
            if not all(n in left for n in names):
                continue
            if hook not in _INVERSE:
                raise ValueError(f"rule {hf!r}: its hook {hook.__name__} has no inverse in _INVERSE")
            inverse = _INVERSE[hook]
            arrays = [np.asarray(left.pop(n)) for n in names]
            if "{layer}" in key:
                for i in range(arrays[0].shape[0]):
                    out[prefix + key.format(layer=i, **groups)] = inverse(*(a[i] for a in arrays))
            else:
                out[prefix + key.format(**groups)] = inverse(*arrays)
    if left:
        raise CheckpointMismatch(f"no checkpoint key for the tower parameter(s) {sorted(left)[:10]}")
    return out


# Tensors of transformers' model that the tower does not use (dropped on reading, see _UNUSED):
# written as identity norms and zeros, so that from_pretrained finds every weight.
_FILLERS: dict[str, Callable[[TowerConfig], dict[str, np.ndarray]]] = {
    "clip": lambda t: {"post_layernorm.weight": np.ones(t.hidden_size, np.float32),
                       "post_layernorm.bias": np.zeros(t.hidden_size, np.float32)},
    "siglip": lambda t: {},                   # no pooling head: the config says vision_use_head=False
    "dinov2": lambda t: {"embeddings.mask_token": np.zeros((1, t.hidden_size), np.float32)},
    "convnext": lambda t: {"layernorm.weight": np.ones(t.dims[-1], np.float32),
                           "layernorm.bias": np.zeros(t.dims[-1], np.float32)},
}


def to_hf(cfg: TowerConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of `from_hf`: the state dict of transformers' model for a tower's {path: array}
    (keys as transformers 5.x's save_pretrained writes them, with the unused tensors filled in)."""
    return {**invert(_TABLES[cfg.kind], params), **_FILLERS[cfg.kind](cfg)}


_HF_CLASSES = {"clip": ("CLIPVisionModel", "clip_vision_model"), "siglip": ("SiglipVisionModel", "siglip_vision_model"),
               "dinov2": ("Dinov2Model", "dinov2"), "convnext": ("ConvNextModel", "convnext")}
_HF_ACT_NAMES = {"gelu_tanh": "gelu_pytorch_tanh"}       # ours → transformers' ACT2FN name


def _ratio(hidden_size: int, width: int) -> float | int:
    """The mlp_ratio r with int(hidden_size · r) == width (as Dinov2Config computes the MLP width)."""
    if width % hidden_size == 0:
        return width // hidden_size
    r = width / hidden_size
    while int(hidden_size * r) < width:
        r = float(np.nextafter(r, np.inf))
    return r


def _same_act(a: str, b: str) -> bool:
    return _ACTS.get(a, a) == _ACTS.get(b, b)


def hf_config_for(tower: TowerConfig) -> dict[str, Any]:
    """The config.json of transformers' CLIPVisionModel / SiglipVisionModel / Dinov2Model /
    ConvNextModel holding `tower`, such that `hf_tower_config(kind, it, name, token_len)` gives
    `tower` back (for CLIP with select_layer, which comes from the Cambrian config's
    mm_vision_select_layer). A ConfigError names the fields the format cannot hold: image
    statistics other than the kind's, a DINOv2 resolution that is neither its position grid nor
    `-res<N>` in its name, ConvNeXt with LayerNorm eps other than 1e-6 (HF hard-codes it)."""
    t = tower
    if t.kind not in _HF_CLASSES:
        raise ConfigError(f"tower {t.name!r}: kind {t.kind!r} is not one of {sorted(_HF_CLASSES)}")
    arch, model_type = _HF_CLASSES[t.kind]
    d: dict[str, Any] = {"architectures": [arch], "model_type": model_type, "num_channels": 3}
    act = _HF_ACT_NAMES.get(t.hidden_act, t.hidden_act)
    if t.kind in ("clip", "siglip", "dinov2"):
        d.update(hidden_size=t.hidden_size, num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                 patch_size=t.patch_size, hidden_act=act, layer_norm_eps=t.layer_norm_eps)
    if t.kind in ("clip", "siglip"):
        d.update(intermediate_size=t.intermediate_size, image_size=t.image_size)
    if t.kind == "siglip":
        d["vision_use_head"] = False
    if t.kind == "dinov2":
        # HF's MLP width is int(hidden · mlp_ratio); SwiGLU keeps two thirds of it, rounded up to 8s.
        width = t.intermediate_size * 3 // 2 if t.use_swiglu else t.intermediate_size
        d.update(mlp_ratio=_ratio(t.hidden_size, width), use_swiglu_ffn=t.use_swiglu, qkv_bias=True,
                 layerscale_value=1.0, image_size=t.pos_grid * t.patch_size)
    if t.kind == "convnext":
        d.update(hidden_sizes=list(t.dims), depths=list(t.depths), hidden_act=act, patch_size=4, num_stages=4,
                 layer_scale_init_value=1e-6, image_size=t.image_size)
    back = hf_tower_config(t.kind, d, t.name, t.token_len,
                           **({"select_layer": t.select_layer} if t.kind == "clip" else {}))
    diff = [f.name for f in dataclasses.fields(TowerConfig) if getattr(back, f.name) != getattr(t, f.name)
            and not (f.name == "hidden_act" and _same_act(back.hidden_act, t.hidden_act))]
    if diff:
        hints = {"layer_norm_eps": " (HF ConvNextModel hard-codes LayerNorm eps 1e-6)" if t.kind == "convnext" else "",
                 "image_size": " (a DINOv2 input resolution other than pos_grid·patch_size needs -res<N> in the "
                               "tower name)" if t.kind == "dinov2" else ""}
        raise ConfigError(f"tower {t.name!r}: the Hugging Face {arch} format cannot hold this tower exactly: "
                          + "; ".join(f"{f} would read back as {getattr(back, f)!r}, the tower has "
                                      f"{getattr(t, f)!r}{hints.get(f, '')}" for f in diff))
    return d
