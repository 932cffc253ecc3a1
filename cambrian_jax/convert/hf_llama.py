"""Hugging Face Llama-family checkpoints (Llama-3, Vicuna, Yi, Phi-3) <-> cambrian_jax.decoder.Decoder.

The HF key names of the decoder live here and nowhere else (spec §5.3). PyTorch Linear weights are
[out, in]; ours are [in, out], with the head axes split out for attention:

    model.embed_tokens.weight                     [V, H]        -> embedding                 [V, H]
    model.layers.{i}.input_layernorm.weight       [H]           -> layers/attn_norm/scale    [L, H]
    model.layers.{i}.self_attn.q_proj.weight      [NH·D, H]     -> layers/attn/q/kernel      [L, H, NH, D]
    model.layers.{i}.self_attn.k_proj.weight      [KV·D, H]     -> layers/attn/k/kernel      [L, H, KV, D]
    model.layers.{i}.self_attn.v_proj.weight      [KV·D, H]     -> layers/attn/v/kernel      [L, H, KV, D]
    model.layers.{i}.self_attn.o_proj.weight      [H, NH·D]     -> layers/attn/o/kernel      [L, NH, D, H]
    model.layers.{i}.post_attention_layernorm.weight [H]        -> layers/mlp_norm/scale     [L, H]
    model.layers.{i}.mlp.gate_proj.weight         [F, H]        -> layers/mlp/gate/kernel    [L, H, F]
    model.layers.{i}.mlp.up_proj.weight           [F, H]        -> layers/mlp/up/kernel      [L, H, F]
    model.layers.{i}.mlp.down_proj.weight         [H, F]        -> layers/mlp/down/kernel    [L, F, H]
    model.norm.weight                             [H]           -> final_norm/scale          [H]
    lm_head.weight                                [V, H]        -> lm_head/kernel            [H, V]

Phi-3 fuses q/k/v into `self_attn.qkv_proj.weight` [(NH+2·KV)·D, H] (rows q, k, v) and gate/up into
`mlp.gate_up_proj.weight` [2F, H] (rows gate, up); they are split on import and fused again on export
with `to_hf(..., fused=True)`.

Usage:  assign(decoder, from_hf(cfg, state_dict), "Llama checkpoint")
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from cambrian_jax.config import DecoderConfig
from cambrian_jax.convert.assign import CheckpointMismatch

_LAYER = "model.layers.{i}."
# our path under layers/  <->  HF key suffix under model.layers.{i}.
_LINEAR = {
    "attn/q/kernel": "self_attn.q_proj.weight",
    "attn/k/kernel": "self_attn.k_proj.weight",
    "attn/v/kernel": "self_attn.v_proj.weight",
    "attn/o/kernel": "self_attn.o_proj.weight",
    "mlp/gate/kernel": "mlp.gate_proj.weight",
    "mlp/up/kernel": "mlp.up_proj.weight",
    "mlp/down/kernel": "mlp.down_proj.weight",
}
_NORM = {"attn_norm/scale": "input_layernorm.weight", "mlp_norm/scale": "post_attention_layernorm.weight"}
_FUSED_QKV = "self_attn.qkv_proj.weight"
_FUSED_GATE_UP = "mlp.gate_up_proj.weight"


def _dims(cfg: DecoderConfig):
    return cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size


def _from_torch_linear(path: str, w: np.ndarray, cfg: DecoderConfig) -> np.ndarray:
    """[out, in] -> our kernel layout for `path` (within one layer)."""
    h, nh, kv, d = _dims(cfg)
    w = np.asarray(w).T                                   # [in, out]
    if path == "attn/q/kernel":
        return w.reshape(h, nh, d)
    if path in ("attn/k/kernel", "attn/v/kernel"):
        return w.reshape(h, kv, d)
    if path == "attn/o/kernel":
        return w.reshape(nh, d, h)
    return w


def _to_torch_linear(path: str, k: np.ndarray) -> np.ndarray:
    """Our kernel for `path` (one layer) -> [out, in]."""
    k = np.asarray(k)
    if path == "attn/o/kernel":
        return k.reshape(-1, k.shape[-1]).T
    return k.reshape(k.shape[0], -1).T


def from_hf(cfg: DecoderConfig, state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """HF Llama/Phi-3 tensors -> {decoder param path: array}. Keys outside the decoder are ignored
    (a Cambrian checkpoint also holds the connector); missing decoder keys raise one error."""
    h, nh, kv, d = _dims(cfg)
    missing: list[str] = []

    def get(key: str):
        if key not in state_dict:
            missing.append(key)
            return None
        return np.asarray(state_dict[key])

    extra = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"model\.layers\.(\d+)\.", k))
                    and int(m.group(1)) >= cfg.num_layers})
    if extra:
        raise CheckpointMismatch(f"Llama checkpoint has decoder layers {extra[:5]}… beyond num_layers="
                                 f"{cfg.num_layers}; check the decoder config")

    per_layer: dict[str, list] = {p: [] for p in list(_LINEAR) + list(_NORM)}
    for i in range(cfg.num_layers):
        pre = _LAYER.format(i=i)
        weights: dict[str, Any] = {}
        if pre + _FUSED_QKV in state_dict:
            qkv = get(pre + _FUSED_QKV)
            q_end, k_end = nh * d, nh * d + kv * d
            weights.update({"attn/q/kernel": qkv[:q_end], "attn/k/kernel": qkv[q_end:k_end],
                            "attn/v/kernel": qkv[k_end:]})
        else:
            for p in ("attn/q/kernel", "attn/k/kernel", "attn/v/kernel"):
                weights[p] = get(pre + _LINEAR[p])
        if pre + _FUSED_GATE_UP in state_dict:
            gate_up = get(pre + _FUSED_GATE_UP)
            f = gate_up.shape[0] // 2
            weights.update({"mlp/gate/kernel": gate_up[:f], "mlp/up/kernel": gate_up[f:]})
        else:
            for p in ("mlp/gate/kernel", "mlp/up/kernel"):
                weights[p] = get(pre + _LINEAR[p])
        for p in ("attn/o/kernel", "mlp/down/kernel"):
            weights[p] = get(pre + _LINEAR[p])
        for p, key in _NORM.items():
            weights[p] = get(pre + key)
        for p, w in weights.items():
            if w is None:
                continue
            try:
                per_layer[p].append(_from_torch_linear(p, w, cfg) if p in _LINEAR else w)
            except ValueError as e:
                raise CheckpointMismatch(f"Llama checkpoint: {pre}{_LINEAR.get(p, p)} has shape "
                                         f"{tuple(w.shape)}, which does not fit the decoder config ({e})")

    out = {"embedding": get("model.embed_tokens.weight"), "final_norm/scale": get("model.norm.weight")}
    head = get("lm_head.weight")
    if missing:
        raise CheckpointMismatch(f"Llama checkpoint lacks {len(missing)} decoder tensor(s): "
                                 + ", ".join(missing[:20]) + (" …" if len(missing) > 20 else ""))
    out["lm_head/kernel"] = head.T
    for p, ws in per_layer.items():
        out["layers/" + p] = np.stack(ws)
    return out


def to_hf(cfg: DecoderConfig, params: Mapping[str, Any], *, fused: bool = False) -> dict[str, np.ndarray]:
    """{decoder param path: array} -> HF tensors; fused=True writes Phi-3's qkv_proj / gate_up_proj."""
    out = {"model.embed_tokens.weight": np.asarray(params["embedding"]),
           "model.norm.weight": np.asarray(params["final_norm/scale"]),
           "lm_head.weight": np.asarray(params["lm_head/kernel"]).T}
    for i in range(cfg.num_layers):
        pre = _LAYER.format(i=i)
        w = {p: _to_torch_linear(p, np.asarray(params["layers/" + p])[i]) for p in _LINEAR}
        if fused:
            out[pre + _FUSED_QKV] = np.concatenate([w.pop("attn/q/kernel"), w.pop("attn/k/kernel"),
                                                    w.pop("attn/v/kernel")], axis=0)
            out[pre + _FUSED_GATE_UP] = np.concatenate([w.pop("mlp/gate/kernel"), w.pop("mlp/up/kernel")], axis=0)
        for p, a in w.items():
            out[pre + _LINEAR[p]] = a
        for p, key in _NORM.items():
            out[pre + key] = np.asarray(params["layers/" + p])[i]
    return out


# ---------------------------------------------------------------------------------------- config.json

def _rope(hf: Mapping[str, Any]) -> tuple[float, tuple | None]:
    """(rope_theta, rope_scaling items) from 4.x (`rope_theta`, `rope_scaling`) or 5.x
    (`rope_parameters`) config fields."""
    params = dict(hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta") or params.get("rope_theta") or 10000.0
    scaling = dict(hf.get("rope_scaling") or {}) or {k: v for k, v in params.items()
                                                     if k not in ("rope_theta", "partial_rotary_factor")}
    partial = hf.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise ValueError(f"decoder config: partial_rotary_factor={partial} is not supported (only 1.0)")
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ValueError(f"decoder config: rope scaling {kind!r} is not supported (only 'llama3', as "
                         "Llama-3.1); Phi-3 long-context 'longrope'/'su' variants are not either")
    keys = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise ValueError(f"decoder config: llama3 rope scaling lacks {missing}")
    return float(theta), tuple(sorted((k, scaling[k]) for k in keys))


def decoder_config_from_hf(hf_config: Mapping[str, Any]) -> DecoderConfig:
    """DecoderConfig from a Llama/Vicuna/Yi/Phi-3 (or Cambrian) config.json dict."""
    hf = dict(hf_config)
    if hf.get("tie_word_embeddings"):
        raise ValueError("decoder config: tie_word_embeddings=true is not supported (the decoder has an "
                         "untied lm_head, as every Cambrian base LLM)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"decoder config: hidden_act={hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("decoder config: attention_bias/mlp_bias are not supported (Llama has no biases)")
    theta, scaling = _rope(hf)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or 0
    if head_dim == hf["hidden_size"] // heads:
        head_dim = 0
    return DecoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 4096))


def decoder_config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    """The LLM fields of a Llama config.json (4.x style: rope_theta and rope_scaling at top level)."""
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_size, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "max_position_embeddings": cfg.max_position_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    }
