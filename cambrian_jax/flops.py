"""One FLOP account for every model and stage, shared by the trainer's MFU and the planner.

Forward FLOPs are counted analytically per sample (2 per multiply-add, matmuls and attention only).
A training step costs, per part:
  trainable part                    3 × forward (forward, input grads, weight grads)
  frozen part that gradients cross  2 × forward (forward, input grads): the LLM in stage 1, except
                                    its self-attention, which has no weights: both its operands
                                    are activations needing gradients, so it costs 3 × forward
  frozen towers                     1 × forward (no gradient flows into them)
Causal self-attention is halved; the aggregators' windowed attention is counted in full. The
bilinear resizes of tower grids and elementwise work (norms, activations, softmax, the optimizer)
are not counted: about 1 % of XLA's count on the small models of tests/test_flops.py.

Recomputation is not model work and is counted apart (`recompute_flops_per_sample`): what the
decoder's remat policy re-runs of each layer's forward in the backward pass, plus the in-LLM
aggregators, which are always checkpointed (decoder.py).
"""
from __future__ import annotations

from typing import Sequence

from cambrian_jax import topology
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
    """One VisionCrossAttentionLayer over `cells` queries with Σ r_k² keys each; proj_context runs once
    per image (its output is shared by the image's cells)."""
    keys = sum(r * r for r in windows)
    per_cell = ((q_dim + v) * v + v * v + 2 * keys * v * v + 2 * keys * v + v * v + v * v + v * q_dim)
    return 2 * (cells * per_cell + v * v)


def resize_flops(side: int, rows: int, cols: int, channels: int) -> float:
    """resize.resize_grid of an s×s grid to rows×cols: two interpolation-matrix einsums (0 if no resize)."""
    if (side, side) == (rows, cols):
        return 0.0
    return 2 * rows * side * side * channels + 2 * rows * cols * side * channels


def mlp2x_gelu(tokens: int, d_in: int, d_out: int) -> float:
    """Linear(d_in→d_out), GELU, Linear(d_out→d_out) over `tokens` tokens."""
    return 2 * tokens * (d_in * d_out + d_out * d_out)


def resampler_layer(queries: int, keys: int, v: int) -> float:
    """One resampler layer (width V): per query proj_in 2V², q 1V², o 1V², proj_out 2V², attention 2·keys·V;
    per image proj_context V² and the k/v projections of every key 2·keys·V²."""
    return 2 * (queries * (6 * v * v + 2 * keys * v) + v * v + 2 * keys * v * v)


def connector_forward(cfg: CambrianConfig) -> tuple[float, float]:
    """(connector before the LLM, all in-LLM aggregators) forward FLOPs per sample, for every
    model.connector.type (only the SVA has in-LLM aggregators)."""
    con, h, v = cfg.connector, cfg.decoder.hidden_size, cfg.connector.vision_hidden_size
    n = con.grid
    if con.type in ("mlp2x_gelu", "concat"):
        resize = sum(resize_flops(t.side, n, n, t.width) for t in cfg.towers)
        return resize + mlp2x_gelu(n * n, sum(t.width for t in cfg.towers), h), 0.0
    if con.type == "interleave":
        return sum(resize_flops(t.side, n, n // 2, t.width) + mlp2x_gelu(n * n // 2, t.width, h)
                   for t in cfg.towers), 0.0
    aux = sum(2 * t.token_len * (t.width * v + v * v) for t in cfg.towers)
    if con.type == "resampler":
        keys = sum(t.token_len for t in cfg.towers)
        return aux + con.connector_depth * resampler_layer(n * n, keys, v) + mlp2x_gelu(n * n, v, h), 0.0
    samplers = 0.0
    for q in con.query_num_list:
        side = int(round(q ** 0.5))
        samplers += con.connector_depth * sampler_layer(q, v, v, [t.side // side for t in cfg.towers])
    n2 = con.image_token_len
    out = 2 * n2 * (v * con.num_query_group * h + h * h)
    agg = len(con.aggregator_layers) * sampler_layer(n2, h, v, [t.side // con.grid for t in cfg.towers])
    return aux + samplers + out, agg


def decoder_layer_forward(cfg: CambrianConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs of one decoder layer per sample, by part (causal attention halved)."""
    d = cfg.decoder
    hd = d.head_size
    return dict(
        qkv=2 * seq_len * d.hidden_size * (d.num_heads + 2 * d.num_kv_heads) * hd,
        attention=2 * 2 * seq_len * seq_len * d.num_heads * hd / 2,   # scores and weighted values
        o=2 * seq_len * d.num_heads * hd * d.hidden_size,
        gate_up=2 * seq_len * 2 * d.hidden_size * d.intermediate_size,
        down=2 * seq_len * d.intermediate_size * d.hidden_size)


def decoder_forward(cfg: CambrianConfig, seq_len: int) -> float:
    d = cfg.decoder
    per_layer = sum(decoder_layer_forward(cfg, seq_len).values())
    return d.num_layers * per_layer + 2 * seq_len * d.hidden_size * d.vocab_size


# The parts of a layer's forward each remat policy (decoder.REMAT_POLICIES) runs again in the backward
# pass: those whose results the backward reads and the policy does not save. No policy recomputes
# `down`: the backward needs its input, never its output.
RECOMPUTED = {
    "none": (),
    "dots_all": (),                                   # every dot saved
    "dots": ("attention",),                           # dots without batch dims saved; attention's have them
    "qkv_and_outputs": ("attention", "gate_up"),
    "qkv_proj": ("attention", "o", "gate_up"),
    "full": ("qkv", "attention", "o", "gate_up"),
    "save_dot_except_mlp": ("attention", "gate_up"),  # q, k, v and the attention output saved; the MLP not
    "qkv_proj_offloaded": ("attention", "o", "gate_up"),
    "minimal_offloaded": ("attention", "gate_up"),
}
RECOMPUTED.update(minimal=RECOMPUTED["dots"], save_qkv_proj=RECOMPUTED["qkv_proj"])   # decoder.REMAT_ALIASES


def recompute_flops_per_sample(cfg: CambrianConfig, seq_len: int) -> float:
    """FLOPs re-run in the backward pass per sample: the decoder layers' parts the remat policy does
    not save, and the in-LLM aggregators (always checkpointed) but for their output projection.
    A training step always backpropagates through the decoder (the connector feeding it trains)."""
    if cfg.remat not in RECOMPUTED:
        raise ValueError(f"remat policy {cfg.remat!r} has no recompute account; known: {sorted(RECOMPUTED)}")
    parts = decoder_layer_forward(cfg, seq_len)
    layers = cfg.decoder.num_layers * sum(parts[k] for k in RECOMPUTED[cfg.remat])
    _, aggregators = connector_forward(cfg)
    n_agg = len(cfg.connector.aggregator_layers)
    out_proj = n_agg * 2 * cfg.connector.image_token_len * cfg.connector.vision_hidden_size * cfg.decoder.hidden_size
    return layers + max(0.0, aggregators - out_proj)


def train_flops_per_sample(cfg: CambrianConfig, seq_len: int, *, train_decoder: bool,
                           train_towers: bool = False) -> float:
    towers = sum(tower_forward(t) for t in cfg.towers)
    connector, aggregators = connector_forward(cfg)
    decoder = decoder_forward(cfg, seq_len)
    attention = cfg.decoder.num_layers * decoder_layer_forward(cfg, seq_len)["attention"]
    return ((3 if train_towers else 1) * towers + 3 * (connector + aggregators)
            + (3 if train_decoder else 2) * (decoder - attention) + 3 * attention)


def train_flops_per_step(cfg: CambrianConfig, global_batch: int, trainable_paths: Sequence[str],
                         seq_len: int | None = None) -> float:
    """Model FLOPs of one optimizer step of a stage whose trainable parameters are `trainable_paths`."""
    return global_batch * train_flops_per_sample(
        cfg, seq_len or cfg.max_len,
        train_decoder=any(p.startswith("decoder/") for p in trainable_paths),
        train_towers=any(p.startswith("towers/") for p in trainable_paths))


# bf16 dense peak per device, FLOP/s, from the one chip table (cambrian_jax/topology.py).
PEAK_FLOPS = {**{c.name: c.peak_flops for c in topology.CHIPS.values()}, "cpu": topology.CPU_PEAK_FLOPS}


def peak_flops(device) -> float:
    chip = topology.chip_for_device_kind(getattr(device, "device_kind", str(device)))
    return chip.peak_flops if chip is not None else topology.CPU_PEAK_FLOPS
