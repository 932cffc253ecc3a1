"""One FLOP account for every model and stage, shared by the trainer's MFU and the planner.

Forward FLOPs are counted analytically per sample (2 per multiply-add, matmuls and attention only).
A training step costs, per part:
  trainable part                    3 × forward (forward, input grads, weight grads)
  frozen part that gradients cross  2 × forward (forward, input grads): the LLM in stage 1
  frozen towers                     1 × forward (no gradient flows into them)
Causal self-attention is halved; the aggregators' windowed attention is counted in full.
"""
from __future__ import annotations

from cambrian_jax.config import CambrianConfig, TowerConfig


def vit_forward(t: TowerConfig) -> float:
    n = (t.image_size // t.patch_size) ** 2 + (0 if t.kind == "siglip" else 1)
    d, m = t.hidden_size, t.intermediate_size
    layers = t.num_layers + (t.select_layer + 1 if t.kind == "clip" and t.select_layer < -1 else 0)
    mlp = 3 * d * m if t.use_swiglu else 2 * d * m
    per_layer = 2 * n * (4 * d * d + mlp) + 4 * n * n * d
    return 2 * n * 3 * t.patch_size ** 2 * d + layers * per_layer


def convnext_forward(t: TowerConfig) -> float:
    side = t.image_size // 4
    total = 2 * side * side * 48 * t.dims[0]
    for i, (depth, dim) in enumerate(zip(t.depths, t.dims)):
        if i:
            side //= 2
            total += 2 * side * side * 4 * t.dims[i - 1] * dim
        total += depth * 2 * side * side * (49 * dim + 8 * dim * dim)
    return total


def tower_forward(t: TowerConfig) -> float:
    return convnext_forward(t) if t.kind == "convnext" else vit_forward(t)


def sampler_layer(cells: int, q_dim: int, v: int, windows: list[int]) -> float:
    """One VisionCrossAttentionLayer over `cells` queries with Σ r_k² keys each."""
    keys = sum(r * r for r in windows)
    per_cell = (v * v + (q_dim + v) * v + v * v + 2 * keys * v * v + 2 * keys * v + v * v + v * v + v * q_dim)
    return 2 * cells * per_cell


def connector_forward(cfg: CambrianConfig) -> tuple[float, float]:
    """(connector before the LLM, all in-LLM aggregators) forward FLOPs per sample."""
    con, h, v = cfg.connector, cfg.decoder.hidden_size, cfg.connector.vision_hidden_size
    aux = sum(2 * t.token_len * (t.width * v + v * v) for t in cfg.towers)
    samplers = 0.0
    for q in con.query_num_list:
        side = int(round(q ** 0.5))
        samplers += con.connector_depth * sampler_layer(q, v, v, [t.side // side for t in cfg.towers])
    n2 = con.image_token_len
    out = 2 * n2 * (v * con.num_query_group * h + h * h)
    agg = len(con.aggregator_layers) * sampler_layer(n2, h, v, [t.side // con.grid for t in cfg.towers])
    return aux + samplers + out, agg


def decoder_forward(cfg: CambrianConfig, seq_len: int) -> float:
    d = cfg.decoder
    hd = d.head_size
    proj = d.hidden_size * d.num_heads * hd * 2 + 2 * d.hidden_size * d.num_kv_heads * hd
    per_layer = 2 * seq_len * (proj + 3 * d.hidden_size * d.intermediate_size)
    attn = 2 * 2 * seq_len * seq_len * d.num_heads * hd / 2  # causal: half the score matrix
    return d.num_layers * (per_layer + attn) + 2 * seq_len * d.hidden_size * d.vocab_size


def train_flops_per_sample(cfg: CambrianConfig, seq_len: int, *, train_decoder: bool,
                           train_towers: bool = False) -> float:
    towers = sum(tower_forward(t) for t in cfg.towers)
    connector, aggregators = connector_forward(cfg)
    decoder = decoder_forward(cfg, seq_len)
    return ((3 if train_towers else 1) * towers + 3 * (connector + aggregators)
            + (3 if train_decoder else 2) * decoder)


PEAK_FLOPS = {  # bf16 dense peak per device, FLOP/s
    "cpu": 1e12, "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12, "h100": 989e12, "h200": 989e12, "a100": 312e12,
}


def peak_flops(device) -> float:
    kind = getattr(device, "device_kind", str(device)).lower()
    for name, value in PEAK_FLOPS.items():
        if name in kind:
            return value
    return PEAK_FLOPS["cpu"]
