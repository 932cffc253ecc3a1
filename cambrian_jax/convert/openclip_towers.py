"""open_clip / timm vision trunks → our towers: the format of the released SigLIP-SO400M and
ConvNeXt-XXL towers (spec §2.1), and the streaming plan shared with the Hugging Face towers.

The reference loads `hf-hub:timm/ViT-SO400M-14-SigLIP-384` and
`hf-hub:laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup` with open_clip and uses
`.visual.trunk`, a timm model. Their `open_clip_model.safetensors` (or `open_clip_pytorch_model.bin`)
hold the whole image-text model; the trunk's tensors are under `visual.trunk.`:

  timm VisionTransformer (SigLIP)              ours (SigLIPTower)
    patch_embed.proj.{weight,bias}               patch_embed/{kernel,bias}       (OIHW → HWIO)
    pos_embed [1, N, C]                          pos_embed [N, C]
    blocks.{i}.norm1 / norm2                     blocks/norm1 / norm2            (stacked over i)
    blocks.{i}.attn.qkv.{weight,bias} [3C, C]    blocks/attn/{q,k,v}             (rows q, k, v)
    blocks.{i}.attn.proj                         blocks/attn/o
    blocks.{i}.mlp.fc1 / fc2                     blocks/mlp/fc1 / fc2
    norm                                         post_norm
    attn_pool.*, fc_norm, head                   unused (the reference takes forward_features)

  timm ConvNeXt                                ours (ConvNeXtTower)
    stem.0 (conv) / stem.1 (LayerNorm2d)         stem/conv / stem/norm
    stages.{s}.downsample.0 / .1                 stages/{s}/downsample/norm / conv
    stages.{s}.blocks.{b}.conv_dw                stages/{s}/blocks/dwconv         (stacked over b)
    stages.{s}.blocks.{b}.norm / mlp.fc1 / mlp.fc2 / gamma   …/norm / fc1 / fc2 / gamma
    head.*, norm_pre                             unused (no final norm, spec §2.1)

Architecture, as the reference gets it: widths, depths and patch size from the tensors; ViT heads
from the timm model name in `open_clip_config.json` (or the tower name's known architecture);
resolution from the open_clip config for SigLIP (the trunk's own image size, spec §14.5) and from
the tower name for ConvNeXt (`-res<N>`, or 1024 for the released XXL). timm ViTs use exact GELU and
LayerNorm eps 1e-6; timm ConvNeXt uses eps 1e-5 in every LayerNorm (spec §14.6).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from cambrian_jax.config import _KIND_DEFAULTS, ConfigError, TowerConfig, tower_config
from cambrian_jax.convert import hf_towers
from cambrian_jax.convert.assign import CheckpointMismatch
from cambrian_jax.convert.safetensors_io import Source, stand_in

Rule = tuple[str, "str | tuple[str, ...]", Callable]


def _qkv(part: int):
    def take(w):
        return hf_towers._linear(np.split(np.asarray(w), 3, axis=0)[part])
    return take


def _qkv_bias(part: int):
    def take(b):
        return np.split(np.asarray(b), 3, axis=0)[part]
    return take


_VIT_BLOCK: list[Rule] = [
    *hf_towers._norm(r"norm1", "norm1"), *hf_towers._norm(r"norm2", "norm2"),
    *[(r"attn\.qkv\.weight", f"attn/{n}/kernel", _qkv(i)) for i, n in enumerate("qkv")],
    *[(r"attn\.qkv\.bias", f"attn/{n}/bias", _qkv_bias(i)) for i, n in enumerate("qkv")],
    *hf_towers._dense(r"attn\.proj", "attn/o"),
    *hf_towers._dense(r"mlp\.fc1", "mlp/fc1"), *hf_towers._dense(r"mlp\.fc2", "mlp/fc2"),
]

SIGLIP_TRUNK: list[Rule] = [
    (r"patch_embed\.proj\.weight", "patch_embed/kernel", hf_towers._conv),
    (r"patch_embed\.proj\.bias", "patch_embed/bias", hf_towers._same),
    (r"pos_embed", "pos_embed", hf_towers._unbatch),
    *hf_towers._under(r"blocks\.(?P<layer>\d+)\.", "blocks/", _VIT_BLOCK),
    *hf_towers._norm(r"norm", "post_norm"),
]

_CONVNEXT_BLOCK: list[Rule] = [
    (r"conv_dw\.weight", "dwconv/kernel", hf_towers._conv), (r"conv_dw\.bias", "dwconv/bias", hf_towers._same),
    *hf_towers._norm(r"norm", "norm"), *hf_towers._dense(r"mlp\.fc1", "fc1"), *hf_towers._dense(r"mlp\.fc2", "fc2"),
    (r"gamma", "gamma", hf_towers._same),
]

CONVNEXT_TRUNK: list[Rule] = [
    (r"stem\.0\.weight", "stem/conv/kernel", hf_towers._conv),
    (r"stem\.0\.bias", "stem/conv/bias", hf_towers._same),
    *hf_towers._norm(r"stem\.1", "stem/norm"),
    *hf_towers._norm(r"stages\.(?P<stage>\d+)\.downsample\.0", "stages/{stage}/downsample/norm"),
    (r"stages\.(?P<stage>\d+)\.downsample\.1\.weight", "stages/{stage}/downsample/conv/kernel", hf_towers._conv),
    (r"stages\.(?P<stage>\d+)\.downsample\.1\.bias", "stages/{stage}/downsample/conv/bias", hf_towers._same),
    *hf_towers._under(r"stages\.(?P<stage>\d+)\.blocks\.(?P<layer>\d+)\.", "stages/{stage}/blocks/", _CONVNEXT_BLOCK),
]

TABLES = {"siglip": SIGLIP_TRUNK, "convnext": CONVNEXT_TRUNK}
TRUNK = "visual.trunk."
# Trunk tensors the tower does not use.
UNUSED = {"siglip": (r"attn_pool\..*", r"fc_norm\..*", r"head\..*"),
          "convnext": (r"head\..*", r"norm_pre\..*")}


def trunk_name(key: str) -> str | None:
    """The timm name of a key of an open_clip file (None: outside the vision trunk: text tower, logit
    scale, open_clip's projection head) or of a bare timm state dict."""
    if key.startswith(TRUNK):
        return key[len(TRUNK):]
    if key.startswith(("visual.", "text.", "transformer.", "token_embedding", "positional_embedding",
                       "ln_final", "text_projection", "logit_")):
        return None
    return key


# ------------------------------------------------------------------------------ plans for any table

@dataclasses.dataclass(frozen=True)
class TablePlan:
    plan: dict[str, list[Source]]
    ignored: frozenset[str]          # checkpoint keys known and deliberately unused


def table_plan(rules: Sequence[Rule], unused: Sequence[str], keys: Iterable[str],
               rename: Callable[[str], str | None], prefix: str = "") -> TablePlan:
    """Match every checkpoint key against (regex, our path(s), hook) rules → a streaming plan.

    `rename` maps a checkpoint key to the name the rules match (None: not part of this tower, ignored).
    A `(?P<layer>…)` group makes the Source a slot of a stacked parameter; other named groups fill
    `{…}` in our path. A hook returning a tuple feeds several parameters (split fused weights), and so
    do several rules matching one key (timm's fused qkv).
    Unmatched keys are left out of the plan, so `fill` reports them as unexpected.
    """
    table = [(re.compile(hf), ours, hook) for hf, ours, hook in rules]
    skip = re.compile("|".join(unused)) if unused else None
    plan: dict[str, list[Source]] = {}
    ignored = set()
    for key in keys:
        name = rename(key)
        if name is None or (skip is not None and skip.fullmatch(name)):
            ignored.add(key)
            continue
        for pattern, ours, hook in table:      # every matching rule (one key may feed several)
            m = pattern.fullmatch(name)
            if not m:
                continue
            groups = m.groupdict()
            layer = groups.pop("layer", None)
            paths = ours if isinstance(ours, tuple) else (ours,)
            for i, path in enumerate(paths):
                convert = hook if len(paths) == 1 else (lambda w, hook=hook, i=i: hook(w)[i])
                plan.setdefault(prefix + path.format(**groups), []).append(
                    Source(key, convert, None if layer is None else int(layer)))
    return TablePlan(plan, frozenset(ignored))


def hf_rename(kind: str) -> Callable[[str], str | None]:
    unused = re.compile("|".join(hf_towers._UNUSED[kind]))
    prefix = hf_towers._PREFIXES[kind]

    def rename(key: str) -> str | None:
        name = key.removeprefix(prefix)
        return None if unused.fullmatch(name) else name
    return rename


def tower_plan(cfg: TowerConfig, keys: Iterable[str], fmt: str, prefix: str = "") -> TablePlan:
    """The streaming plan of one tower from a checkpoint in format 'hf' or 'open_clip'."""
    if fmt == "hf":
        return table_plan(hf_towers._TABLES[cfg.kind], (), keys, hf_rename(cfg.kind), prefix)
    if fmt == "open_clip":
        if cfg.kind not in TABLES:
            raise ConfigError(f"tower {cfg.name!r}: the open_clip format is supported for SigLIP and ConvNeXt "
                              f"trunks, not {cfg.kind}; give a Hugging Face directory instead")
        return table_plan(TABLES[cfg.kind], UNUSED[cfg.kind], keys, trunk_name, prefix)
    raise ValueError(f"unknown tower checkpoint format {fmt!r} (expected 'hf' or 'open_clip')")


def from_open_clip(cfg: TowerConfig, state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{our parameter path: array} (in memory, as hf_towers.from_hf) for `towers.load_tower`."""
    tp = tower_plan(cfg, state_dict.keys(), "open_clip")
    out: dict[str, np.ndarray] = {}
    for path, sources in tp.plan.items():
        if sources[0].index is None:
            out[path] = np.asarray(sources[0].convert(np.asarray(state_dict[sources[0].key])))
            continue
        slots = {s.index: s for s in sources}
        n = max(slots) + 1
        if set(slots) != set(range(n)):
            raise CheckpointMismatch(f"open_clip {cfg.kind} checkpoint: {path} lacks layers "
                                     f"{sorted(set(range(n)) - set(slots))}")
        out[path] = np.stack([slots[i].convert(np.asarray(state_dict[slots[i].key])) for i in range(n)])
    unmatched = set(state_dict) - tp.ignored - {s.key for ss in tp.plan.values() for s in ss}
    for key in sorted(unmatched):
        out[f"open_clip:{key}"] = np.asarray(state_dict[key])       # reported as unexpected when loaded
    return out


# ------------------------------------------------------------------------------------- architecture

# ViT heads of timm models, by timm model name (the rest of the architecture is in the tensors).
TIMM_VIT_HEADS = {
    "vit_so400m_patch14_siglip_384": 16, "vit_so400m_patch14_siglip_224": 16, "vit_so400m_patch14_siglip_378": 16,
    "vit_base_patch16_siglip_224": 12, "vit_base_patch16_siglip_256": 12, "vit_base_patch16_siglip_384": 12,
    "vit_base_patch16_siglip_512": 12, "vit_large_patch16_siglip_256": 16, "vit_large_patch16_siglip_384": 16,
}


def _count(pattern: str, keys: Iterable[str], group: str = "i") -> int:
    rx = re.compile(pattern)
    found = {int(m.group(group)) for k in keys if (m := rx.fullmatch(k))}
    return max(found) + 1 if found else 0


def _known(name: str, token_len: int) -> TowerConfig | None:
    try:
        return tower_config(name, token_len)
    except ConfigError:
        return None


def openclip_tower_config(name: str, token_len: int, shapes: Mapping[str, Sequence[int]],
                          open_clip_config: Mapping[str, Any] | None = None, **overrides: Any) -> TowerConfig:
    """Our TowerConfig for an open_clip/timm trunk, from its tensor shapes ({key: shape} of the file),
    its `open_clip_config.json` (optional) and the Cambrian tower name."""
    from cambrian_jax.config import tower_kind

    kind = tower_kind(name)
    if kind not in TABLES:
        raise ConfigError(f"tower {name!r}: the open_clip format is supported for SigLIP and ConvNeXt trunks, "
                          f"not {kind}")
    trunk = {t: tuple(s) for k, s in shapes.items() if (t := trunk_name(k)) is not None}
    oc = dict(open_clip_config or {})
    vision = dict((oc.get("model_cfg") or oc).get("vision_cfg") or {})
    pre = dict(oc.get("preprocess_cfg") or {})
    known = _known(name, token_len)
    fields: dict[str, Any] = dict(_KIND_DEFAULTS[kind])
    if kind == "siglip":
        need = ["pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"]
        absent = [k for k in need if k not in trunk]
        if absent:
            raise CheckpointMismatch(f"tower {name!r}: the open_clip file has no timm ViT trunk tensors "
                                     f"{[TRUNK + k for k in absent]} (keys under '{TRUNK}' expected)")
        width = trunk["pos_embed"][-1]
        heads = (overrides.pop("num_heads", None) or vision.get("heads")
                 or TIMM_VIT_HEADS.get(vision.get("timm_model_name", ""))
                 or (known.num_heads if known and known.hidden_size == width else None))
        if not heads:
            raise ConfigError(f"tower {name!r}: cannot tell the number of attention heads of this timm ViT "
                              f"(timm_model_name {vision.get('timm_model_name')!r} is not one of "
                              f"{sorted(TIMM_VIT_HEADS)}); pass num_heads in the tower overrides")
        patch = trunk["patch_embed.proj.weight"][-1]
        grid = math.isqrt(trunk["pos_embed"][-2])
        image_size = vision.get("image_size") or (known.image_size if known else grid * patch)
        if isinstance(image_size, (list, tuple)):
            image_size = image_size[0]
        # timm's VisionTransformer: exact GELU, LayerNorm eps 1e-6 (not HF SigLIP's tanh GELU).
        fields.update(hidden_size=width, num_heads=int(heads), patch_size=patch, image_size=int(image_size),
                      num_layers=_count(r"blocks\.(?P<i>\d+)\.norm1\.weight", trunk),
                      intermediate_size=trunk["blocks.0.mlp.fc1.weight"][0], layer_norm_eps=1e-6, hidden_act="gelu")
    else:
        if "stem.0.weight" not in trunk:
            raise CheckpointMismatch(f"tower {name!r}: the open_clip file has no timm ConvNeXt trunk "
                                     f"(no '{TRUNK}stem.0.weight')")
        dims = [trunk["stem.0.weight"][0]] + [trunk.get(f"stages.{s}.downsample.1.weight", (0,))[0] for s in (1, 2, 3)]
        depths = [_count(rf"stages\.{s}\.blocks\.(?P<i>\d+)\.conv_dw\.weight", trunk) for s in range(4)]
        res = re.search(r"-res(\d+)", name)
        image_size = (int(res.group(1)) if res else known.image_size if known else vision.get("image_size"))
        if isinstance(image_size, (list, tuple)):
            image_size = image_size[0]
        if not image_size:
            raise ConfigError(f"tower {name!r}: no input resolution (add -res<N> to the name or give image_size)")
        fields.update(dims=tuple(int(d) for d in dims), depths=tuple(depths), image_size=int(image_size),
                      layer_norm_eps=1e-5, hidden_act="gelu", multi_stage="multi-stage" in name)
    if pre.get("mean") and kind == "siglip":
        fields["image_mean"] = tuple(pre["mean"])
        fields["image_std"] = tuple(pre.get("std", fields["image_std"]))
    fields.update(overrides)
    valid = {f.name for f in dataclasses.fields(TowerConfig)}
    if set(fields) - valid:
        raise ConfigError(f"tower {name!r}: unknown field(s) {sorted(set(fields) - valid)}; valid: {sorted(valid)}")
    return TowerConfig(name=name, kind=kind, token_len=token_len, **fields)


def converted_shapes(tp: TablePlan, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """Our parameter shapes as a plan would produce them (stacked leaves: [layers, ...])."""
    out = {}
    for path, sources in tp.plan.items():
        s = sources[0]
        shape = tuple(s.convert(stand_in(shapes[s.key])).shape)
        out[path] = shape if s.index is None else (max(x.index for x in sources) + 1, *shape)
    return out
