"""Model configuration: towers, connector and decoder, with validation before anything compiles.

The fields mirror the released `config.json` (spec §3.7, §5.2) so a released config maps onto them
one to one. Tower architectures come from the tower names, parsed as the reference parses them
(spec §2.1); any architecture field can be overridden (tiny test towers, other sizes).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A configuration that cannot work, found before anything is compiled."""


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    name: str                      # as in config.json's mm_vision_tower_aux_list
    kind: str                      # clip | siglip | dinov2 | convnext
    image_size: int                # input resolution R
    token_len: int                 # target token count s² after interpolation
    patch_size: int = 14
    hidden_size: int = 0
    intermediate_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    select_layer: int = -1         # CLIP: -2 = hidden_states[-2] (mm_vision_select_layer)
    use_swiglu: bool = False       # DINOv2-giant feed-forward
    pos_grid: int = 0              # DINOv2: side of the learned position grid (518/14 = 37)
    depths: tuple[int, ...] = ()   # ConvNeXt stages
    dims: tuple[int, ...] = ()
    multi_stage: bool = False      # ConvNeXt: concatenate all four stage maps
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    pad_color: tuple[int, int, int] = (122, 116, 104)   # int(mean·255) of the wrapper's image_mean

    @property
    def side(self) -> int:
        """s_k: side of the (interpolated) token grid."""
        return math.isqrt(self.token_len)

    @property
    def raw_side(self) -> int:
        """Side of the tower's own token grid before interpolation."""
        if self.kind == "convnext":
            return self.image_size // 4 if self.multi_stage else self.image_size // 32
        return self.image_size // self.patch_size

    @property
    def width(self) -> int:
        """C_k: channels of the tower's output features."""
        if self.kind == "convnext":
            return sum(self.dims) if self.multi_stage else self.dims[-1]
        return self.hidden_size


# Released architectures by name fragment (spec §2.1, §2.4). Order matters: first match wins.
_KNOWN = [
    ("SO400M-14-384", dict(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, image_size=384)),
    ("SO400M-14", dict(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, image_size=224)),
    ("clip-vit-large-patch14-336", dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336)),
    ("clip-vit-large-patch14", dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=224)),
    ("clip-vit-base-patch16", dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, patch_size=16, image_size=224)),
    ("dinov2-giant", dict(hidden_size=1536, intermediate_size=4096, num_layers=40, num_heads=24, use_swiglu=True, image_size=518)),
    ("dinov2-large", dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=518)),
    ("dinov2-base", dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, image_size=518)),
    ("dinov2-small", dict(hidden_size=384, intermediate_size=1536, num_layers=12, num_heads=6, image_size=518)),
    ("convnext-XXL", dict(depths=(3, 4, 30, 3), dims=(384, 768, 1536, 3072), image_size=1024)),
    ("convnext-L", dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), image_size=1024)),
]

_KIND_DEFAULTS = {
    # The released SigLIP is the open_clip/timm trunk, whose MLP uses exact GELU (HF-format SigLIP
    # checkpoints say gelu_pytorch_tanh in their own config, which hf_tower_config reads).
    "siglip": dict(patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu", image_mean=(0.5, 0.5, 0.5),
                   image_std=(0.5, 0.5, 0.5), pad_color=(122, 116, 104)),
    "clip": dict(patch_size=14, layer_norm_eps=1e-5, hidden_act="quick_gelu", select_layer=-2),
    "dinov2": dict(patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu", image_mean=IMAGENET_MEAN,
                   image_std=IMAGENET_STD, pad_color=(123, 116, 103)),
    # open_clip/timm ConvNeXt uses eps 1e-5 everywhere (spec §14.6); HF-format weights set 1e-6.
    "convnext": dict(layer_norm_eps=1e-5),
}


def tower_kind(name: str) -> str:
    """The reference's builder dispatch, by substring and in its order (spec §2.4)."""
    for fragment, kind in (("openai/clip", "clip"), ("siglip", "siglip"), ("clip-convnext", "convnext"),
                           ("dinov2", "dinov2")):
        if fragment in name:
            return kind
    raise ConfigError(f"tower {name!r}: unsupported tower; names must contain one of "
                      "'openai/clip', 'siglip', 'clip-convnext' or 'dinov2'")


def tower_config(name: str, token_len: int, select_layer: int = -2, **overrides: Any) -> TowerConfig:
    """Parse a released tower name (with -res<N> / -interp<N>) into its architecture."""
    kind = tower_kind(name)
    fields: dict[str, Any] = dict(_KIND_DEFAULTS[kind])
    for fragment, arch in _KNOWN:
        if fragment in name:
            fields.update(arch)
            break
    if kind == "clip":
        fields["select_layer"] = select_layer
    if kind == "dinov2":
        fields["pos_grid"] = fields.get("image_size", 518) // fields["patch_size"]
    if kind == "convnext":
        fields["multi_stage"] = "multi-stage" in name
    # -res<N> is honoured by DINOv2 and ConvNeXt only (spec §14.5).
    res = re.search(r"-res(\d+)", name)
    if res and kind in ("dinov2", "convnext"):
        fields["image_size"] = int(res.group(1))
    interp = re.search(r"-interp(\d+)", name)
    if interp:
        token_len = int(interp.group(1))
    fields.update(overrides)
    if "image_size" not in fields:
        raise ConfigError(f"tower {name!r}: unknown architecture; give its sizes in tower_overrides")
    if kind == "dinov2" and not fields.get("pos_grid"):
        fields["pos_grid"] = fields["image_size"] // fields["patch_size"]
    valid = {f.name for f in dataclasses.fields(TowerConfig)}
    unknown = set(fields) - valid
    if unknown:
        raise ConfigError(f"tower {name!r}: unknown override field(s) {sorted(unknown)}; valid: {sorted(valid)}")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return TowerConfig(name=name, kind=kind, token_len=token_len, **fields)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0              # 0 = hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None   # Llama-3.1 style, as sorted items
    max_position_embeddings: int = 4096

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


# model.connector.type: the SVA (spec §3) and the ablation connectors (cambrian_jax/connector.py).
CONNECTOR_TYPES = ("sva", "mlp2x_gelu", "concat", "interleave", "resampler")


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    type: str = "sva"                       # one of CONNECTOR_TYPES; only the SVA has in-LLM aggregators
    vision_hidden_size: int = 1024          # V
    num_heads: int = 16                     # hard-coded in the reference
    num_query_group: int = 1                # G
    query_num_list: tuple[int, ...] = (576,)
    connector_depth: int = 3                # D
    image_token_len: int = 576              # n²
    connector_only: bool = False
    num_of_vision_sampler_layers: int = 10  # N
    start_of_vision_sampler_layers: int = 0
    stride_of_vision_sampler_layers: int = 3

    @property
    def grid(self) -> int:
        """n: side of the LLM image grid."""
        return math.isqrt(self.image_token_len)

    @property
    def block_len(self) -> int:
        """LLM positions of one image block: n rows of n image tokens + 1 newline."""
        return self.grid * (self.grid + 1)

    @property
    def aggregator_layers(self) -> tuple[int, ...]:
        """Decoder layers after which an in-LLM aggregator runs (spec §3.4)."""
        if self.connector_only:
            return ()
        return tuple(self.start_of_vision_sampler_layers + j * self.stride_of_vision_sampler_layers
                     for j in range(self.num_of_vision_sampler_layers))


# Attention implementations (cambrian_jax/attention.py; auto = splash on TPU, cudnn on GPU, xla elsewhere).
ATTENTION = ("auto", "xla", "splash", "cudnn")

# Names of the decoder's remat policies (decoder.REMAT_POLICIES holds what each saves).
REMAT_POLICIES = ("none", "full", "dots", "dots_all", "qkv_proj", "qkv_and_outputs", "save_dot_except_mlp",
                  "qkv_proj_offloaded", "minimal_offloaded", "minimal", "save_qkv_proj")


@dataclasses.dataclass(frozen=True)
class CambrianConfig:
    towers: tuple[TowerConfig, ...]
    connector: ConnectorConfig
    decoder: DecoderConfig
    image_position: int = 91
    max_len: int = 2048
    dtype: str = "float32"          # compute dtype; parameters are always float32
    remat: str = "none"             # remat policy name for decoder layers (see decoder.REMAT_POLICIES)
    attention: str = "auto"         # decoder attention: auto | xla | splash | cudnn (cambrian_jax/attention.py)

    def validate(self) -> "CambrianConfig":
        validate(self)
        return self


def _err(field: str, msg: str) -> ConfigError:
    return ConfigError(f"config field {field}: {msg}")


def _validate_connector_type(cfg: CambrianConfig) -> None:
    """What each connector type needs of the towers and the grid (the SVA's own checks follow in validate)."""
    con, kind, k = cfg.connector, cfg.connector.type, len(cfg.towers)
    if kind not in CONNECTOR_TYPES:
        raise _err("model.connector.type", f"{kind!r} is not one of {', '.join(CONNECTOR_TYPES)}")
    if kind != "sva" and not con.connector_only:
        raise _err("model.connector.connector_only", f"type {kind!r} has no in-LLM aggregators (they re-read the "
                   "SVA's windowed tower features); set connector_only=True (from_dict does so for non-SVA types)")
    if kind == "mlp2x_gelu" and k != 1:
        raise _err("model.towers", f"connector type 'mlp2x_gelu' (LLaVA-1.5's projector) takes exactly one tower, "
                   f"got {k}; use type 'concat' to concatenate several towers' tokens")
    if kind == "concat" and k < 2:
        raise _err("model.towers", "connector type 'concat' concatenates the tokens of two or more towers, got one; "
                   "use type 'mlp2x_gelu' for a single tower")
    if kind == "interleave":
        if k != 2:
            raise _err("model.towers", f"connector type 'interleave' interleaves exactly two towers, got {k}")
        if con.grid % 2:
            raise _err("model.connector.image_token_len", f"connector type 'interleave' puts pairs of tokens (one "
                       f"per tower) in each row, so the grid side must be even; {con.grid}×{con.grid} is not "
                       f"(e.g. image_token_len={(con.grid + 1) ** 2})")
    if kind == "resampler" and con.connector_depth < 1:
        raise _err("model.connector.connector_depth", "the resampler needs at least one layer")


def validate(cfg: CambrianConfig) -> None:
    """One-sentence errors naming the field, before anything is traced or compiled."""
    con, dec = cfg.connector, cfg.decoder
    if not cfg.towers:
        raise _err("model.towers", "at least one vision tower is needed")
    if math.isqrt(con.image_token_len) ** 2 != con.image_token_len:
        raise _err("model.image_token_len", f"{con.image_token_len} is not a square number")
    _validate_connector_type(cfg)
    sva = con.type == "sva"
    if sva and len(con.query_num_list) != con.num_query_group:
        raise _err("model.query_num_list", f"has {len(con.query_num_list)} entries but num_query_group "
                   f"is {con.num_query_group}")
    if con.type in ("sva", "resampler") and con.vision_hidden_size % con.num_heads:
        raise _err("model.vision_hidden_size", f"{con.vision_hidden_size} is not divisible by the "
                   f"aggregator's {con.num_heads} heads")
    for k, t in enumerate(cfg.towers):
        where = f"model.towers[{k}] ({t.name})"
        if math.isqrt(t.token_len) ** 2 != t.token_len:
            raise _err(f"{where}.token_len", f"{t.token_len} is not a square number")
        if t.kind == "convnext" and t.image_size < 32:
            raise _err(f"{where}.image_size", f"{t.image_size} px is below ConvNeXt's total stride of 32 "
                       "(its last stage would have no cells); use at least 32")
        if t.kind != "convnext" and t.hidden_size % max(t.num_heads, 1):
            raise _err(f"{where}.hidden_size", f"{t.hidden_size} is not divisible by num_heads={t.num_heads}")
        if t.kind == "convnext" and (len(t.depths) != 4 or len(t.dims) != 4):
            raise _err(f"{where}.depths", "ConvNeXt needs four stage depths and four dims")
        if t.kind != "convnext" and t.image_size < t.patch_size:
            raise _err(f"{where}.image_size", f"{t.image_size} is smaller than the patch size {t.patch_size}")
        for g, q in enumerate(con.query_num_list if sva else ()):
            side = math.isqrt(q)
            if side * side != q:
                raise _err(f"model.query_num_list[{g}]", f"{q} is not a square number")
            if t.side % side:
                raise _err(f"{where}.token_len", f"the tower's grid side {t.side} is not a multiple of query "
                           f"group {g}'s side {side} (s_k % L must be 0 for the SVA windows)")
        if not con.connector_only and t.side % con.grid:
            raise _err(f"{where}.token_len", f"the tower's grid side {t.side} is not a multiple of the LLM "
                       f"image grid side {con.grid} (needed by the in-LLM aggregators)")
    if dec.hidden_size % dec.num_heads and not dec.head_dim:
        raise _err("model.decoder.hidden_size", f"{dec.hidden_size} is not divisible by num_heads={dec.num_heads}")
    if dec.num_heads % dec.num_kv_heads:
        raise _err("model.decoder.num_kv_heads", f"num_heads={dec.num_heads} is not a multiple of "
                   f"num_kv_heads={dec.num_kv_heads}")
    if dec.head_size % 2:
        raise _err("model.decoder.head_dim", f"head size {dec.head_size} must be even for RoPE")
    if cfg.image_position < 0 or cfg.image_position + con.block_len > cfg.max_len:
        raise _err("model.image_position", f"an image block of {con.block_len} positions at index "
                   f"{cfg.image_position} does not fit in max_len={cfg.max_len}")
    layers = con.aggregator_layers
    if layers and (con.stride_of_vision_sampler_layers < 1 or layers[-1] >= dec.num_layers):
        raise _err("model.num_of_vision_sampler_layers", f"aggregators after decoder layers {list(layers)} "
                   f"do not fit a decoder of {dec.num_layers} layers")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise _err("model.dtype", f"{cfg.dtype!r} is not one of float32, bfloat16, float16")
    if cfg.remat not in REMAT_POLICIES:
        raise _err("model.remat", f"{cfg.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
    if cfg.attention not in ATTENTION:
        raise _err("model.attention", f"{cfg.attention!r} is not one of {', '.join(ATTENTION)}")


def from_dict(d: Mapping[str, Any]) -> CambrianConfig:
    """Build from a config.model ConfigDict (or plain dict); see configs/common.py for the fields."""
    d = dict(d)
    overrides = dict(d.get("tower_overrides") or {})
    token_lens = list(d["tower_token_lens"])
    names = list(d["towers"])
    if len(token_lens) != len(names):
        raise _err("model.tower_token_lens", f"has {len(token_lens)} entries for {len(names)} towers")
    towers = tuple(tower_config(n, t, d.get("select_layer", -2), **dict(overrides.get(n, {})))
                   for n, t in zip(names, token_lens))
    con = dict(d["connector"])
    if con.get("type", "sva") != "sva":
        # Only the SVA has in-LLM aggregators: `--config.model.connector.type=concat` alone must work.
        con["connector_only"] = True
    con = ConnectorConfig(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in con.items()})
    dec = dict(d["decoder"])
    if dec.get("rope_scaling"):
        dec["rope_scaling"] = tuple(sorted(dict(dec["rope_scaling"]).items()))
    cfg = CambrianConfig(towers=towers, connector=con, decoder=DecoderConfig(**dec),
                         image_position=d["image_position"], max_len=d.get("max_len", 2048),
                         dtype=d.get("dtype", "float32"), remat=d.get("remat", "none"),
                         attention=d.get("attention", "auto"))
    return cfg.validate()
