"""Our decoder's training step, compiled by the real TPU compiler at the shapes of published MaxText
runs: how far the compiler's predicted step time is from the step time those runs measured.

    python benchmarks/calibrate_tpu.py [--runs 22b,52b,32b,llama3.1-8b,llama2-70b|tiny]
        [--out docs/results/calibration.json] [--max-minutes 10] [--max-rss-gib 8] [--in-process]
        [--report-from docs/results/calibration.json]

For each run: a text-only training step built from our own pieces — `decoder.Decoder` (token
embedding → causal layers at positions 0..T-1 → final norm → untied lm_head), the trainer's one step
function (`train_step.make_step`: token-mean cross-entropy, gradient, global-norm clipping, AdamW from
`optim.make_optimizer`), float32 parameters and optimizer state with bfloat16 compute, the decoder's
named remat policies, and the trainer's sharding (`sharding.DEFAULT_RULES` resolved by
`state_shardings` / `Constrainer` on a data × fsdp × tensor mesh, the step jitted with explicit
shardings and the state donated, traced inside `rules_context`). Nothing is allocated: parameters,
optimizer state and batch are ShapeDtypeStructs carrying NamedShardings, and the step is lowered and
compiled for libtpu's compile-only devices of the run's slice (`topology.compile_only_devices`,
arranged by `topology.mesh_devices`). A run whose published setting the compiler refuses (over HBM)
is compiled at the first setting of `fit_ladder` that it accepts: more accumulation steps (the same
tokens per step), then 'full' remat.

Per run it reports XLA's memory per chip (argument + output − alias + temp), the compile time, the
host's peak RSS, the predicted step time (`compiled_cost.program_cost(...).seconds`: the roofline of
every loop body counted by its trip count, in the scale of the compiler's optimal_seconds, or the
roofline alone where libtpu's optimal_seconds is negative), the published step time, and
calibration = published ÷ predicted; per chip generation the geometric mean of the calibrations.

Published step times:
  MaxText's 2023 v4/v5p runs published TFLOP/s per chip computed from 6 · N · tokens (N: all the
  model's parameters, tied embedding counted once; no attention term — at these shapes MaxText's
  later attention term would add 0.5–1.6 %), so
      published s = 6 · N · per_device_batch · seq / (TFLOP/s per chip)
  The v6e Llama recipes (AI-Hypercomputer/tpu-recipes) publish the step time itself; their TFLOP/s
  (MaxText's per-step count, attention included, not halved for causality) times it gives MaxText's
  TFLOP per chip per step.
"MFU (our count)" is the trainer's count (`flops.decoder_forward` × 3: every matmul forward, input
gradient and weight gradient; causal attention halved; `flops.train_flops_per_sample` with no towers
or connector) per chip over the published step time and the chip's peak.

Each run compiles in a child process of its own (its peak RSS is its own), stopped when it passes
--max-minutes or --max-rss-gib; `--in-process` runs them in this process instead. `--report-from`
re-derives the table from the compiled rows an --out JSON keeps, without compiling.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GiB = 2 ** 30
SCHEDULE_STEPS = 1000     # the learning-rate schedule's length: cost-neutral


# ------------------------------------------------------------------------------------------ the runs

@dataclasses.dataclass(frozen=True)
class Anchor:
    """A published MaxText run, at its own shapes, and what we compile for it."""
    key: str
    title: str
    topology: str                 # slice name as topology.parse reads it
    hidden: int
    layers: int
    heads: int
    head_dim: int
    kv_heads: int
    mlp: int                      # published MLP width
    mlp_kind: str                 # "relu1": MaxText 2023, one wi matrix [E, M]; "swiglu": gate, up, down
    vocab: int
    tied: bool                    # published model ties embedding and output layer (ours never does)
    seq: int
    per_device_batch: int
    mesh: tuple[tuple[str, int], ...]
    maxtext_remat: str
    remat: str                    # our policy name (decoder.REMAT_POLICIES)
    published_tflops: float | None    # per chip, as published
    published_mfu: float | None
    published_step_s: float | None = None   # when the recipe gives it (v6e)
    published_params: float | None = None   # the size the run is named by
    attention: str = ""           # the attention kernel the published run used
    source: str = ""
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    notes: tuple[str, ...] = ()


LLAMA31_ROPE = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))

RUNS: dict[str, Anchor] = {a.key: a for a in (
    Anchor("22b", "MaxText 22B", "v4-128", 6144, 48, 24, 256, 24, 24576, "relu1", 32768, True, 1024, 16,
           (("fsdp", 64),), "full", "full", 156.0, 0.567, published_params=22e9, attention="MaxText default",
           source="AI-Hypercomputer/maxtext MaxText/configs/v4/22b.sh (2023 form: per_device_batch_size=16) "
                  "and MaxText/configs/v4/README.md (1x v4-128: 156 TFLOP/s/chip, 56.7 %)",
           notes=("the issue quotes '13 rows per chip, 2048 tokens'; 22b.sh as first published sets "
                  "per_device_batch_size=16 at base.yml's 1024 tokens (later versions set 13): 16 × 1024 "
                  "is used",)),
    Anchor("52b", "MaxText 52B", "v4-384", 12288, 32, 32, 256, 32, 49152, "relu1", 32768, True, 1024, 10,
           (("fsdp", 192),), "full", "full", 154.0, 0.560, published_params=52e9, attention="MaxText default",
           source="AI-Hypercomputer/maxtext MaxText/configs/v4/52b.sh (2023 form: per_device_batch_size=10) "
                  "and MaxText/configs/v4/README.md (1x v4-384: 154 TFLOP/s/chip, 56.0 %)",
           notes=("vocabulary not stated by 52b.sh: base.yml's 32768 (tied) as for 22B; later 52b.sh "
                  "versions set per_device_batch_size=7",)),
    Anchor("32b", "MaxText 32B", "v5p-128", 10240, 32, 32, 256, 32, 32768, "relu1", 32768, True, 2048, 8,
           (("fsdp", 16), ("tensor", 4)), "minimal", "dots", 328.0, 0.7147, published_params=32e9,
           attention="flash", source="AI-Hypercomputer/maxtext MaxText/configs/v5p/32b.sh "
           "(global_parameter_scale=32, ici_tensor_parallelism=4, remat_policy=minimal, attention=flash) and "
           "MaxText/configs/v5p/README.md (1x v5p-128: 328 TFLOP/s/chip, 71.47 %)",
           notes=("2·M/3 = 21845.3 is rounded to 21888 (a multiple of 128; MLP parameters +0.2 %); "
                  "per_device_batch 8 as briefed (the 32b.sh versions read set 7)",)),
    Anchor("llama3.1-8b", "Llama-3.1-8B", "v6e-256", 4096, 32, 32, 128, 8, 14336, "swiglu", 128256, False,
           8192, 4, (("fsdp", 256),), "custom (offload layer input, q/k/v/out projections)", "qkv_and_outputs",
           417.4, 0.4546, published_step_s=4.546, published_params=8.03e9, attention="splash",
           source="AI-Hypercomputer/tpu-recipes, Llama-3.1-8B on trillium v6e-256 (MaxText): 4.546 s/step, "
                  "417.4 TFLOP/s/chip, ~7,207 tokens/s/chip, 45.46 % MFU",
           rope_theta=500000.0, rope_scaling=LLAMA31_ROPE),
    Anchor("llama2-70b", "Llama-2-70B", "v6e-256", 8192, 80, 64, 128, 8, 28672, "swiglu", 32000, False,
           4096, 2, (("fsdp", 256),), "qkv_proj_offloaded", "qkv_proj", 402.3, 0.438,
           published_step_s=9.052, published_params=69e9, attention="flash",
           source="AI-Hypercomputer/tpu-recipes, Llama-2-70B on trillium v6e-256 (MaxText): 9.052 s/step, "
                  "402.3 TFLOP/s/chip, ~905 tokens/s/chip, 43.8 % MFU",
           notes=("per_device_batch 2, the run log's (905 tokens/s/chip × 9.052 s = 8,192 = 2 × 4096); the "
                  "recipe's README says 3",)),
    # Not a published run: a few-second compile to check the script on (v5p-8 = 4 chips).
    Anchor("tiny", "tiny (no published run)", "v5p-8", 512, 2, 4, 128, 4, 1536, "relu1", 1024, True, 256, 2,
           (("fsdp", 4),), "full", "full", None, None),
)}
ANCHORS = ("22b", "52b", "32b", "llama3.1-8b", "llama2-70b")

# Why each MaxText policy maps to ours (printed with the table).
REMAT_MAPPING = {
    "full": "full: nothing saved but the layer input (jax nothing_saveable), as MaxText's 'full'",
    "minimal": "dots: every dot without batch dimensions saved (the q/k/v/o and MLP projections; not the "
               "attention einsums), as MaxText 2023's 'minimal' (checkpoint_dots_with_no_batch_dims)",
    "custom (offload layer input, q/k/v/out projections)":
        "qkv_and_outputs: q, k, v, the attention output projection and the MLP output saved in HBM (we have "
        "no host offload), the layer input saved by the scan; recomputes what MaxText's policy recomputes",
    "qkv_proj_offloaded": "qkv_proj: q, k, v saved in HBM (no host offload); recomputes what MaxText's policy "
                          "recomputes",
}


# What small probes found behind libtpu 0.0.42.1's negative optimal_seconds (each op it cannot time
# appears to count -1 s): on v4 a scan over stacked weights, jnp.tanh(c @ w[i]), is -1 s where the
# same loop on v5p or v6e is costed; on v6e the ops responsible were not found.
NEGATIVE_OPTIMAL = {"v4": "on v4, a matmul fused with the dynamic-slice of a scanned, stacked weight is one"}


def intermediate_size(a: Anchor) -> int:
    """Our SwiGLU width: MaxText 2023's ReLU MLP has one wi [E, M] and wo [M, E] (2·E·M parameters and
    FLOPs per token), SwiGLU has three E×F matrices, so F = 2·M/3 (rounded to a multiple of 128 when
    not whole)."""
    if a.mlp_kind == "swiglu":
        return a.mlp
    f = 2 * a.mlp / 3
    return int(f) if f == int(f) else 128 * round(f / 128)


def decoder_config(a: Anchor):
    from cambrian_jax.config import DecoderConfig  # noqa: PLC0415

    return DecoderConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=intermediate_size(a),
                         num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads, head_dim=a.head_dim,
                         rope_theta=a.rope_theta, rope_scaling=a.rope_scaling,
                         max_position_embeddings=max(a.seq, 4096))


def maxtext_params(a: Anchor) -> int:
    """The published model's parameter count as MaxText counts it (every array of the tree: embedding,
    once if tied, and the output layer otherwise; q, k, v, o; the MLP; the norms)."""
    attn = a.hidden * a.head_dim * (2 * a.heads + 2 * a.kv_heads)
    mlp = (2 if a.mlp_kind == "relu1" else 3) * a.hidden * a.mlp
    return a.vocab * a.hidden * (1 if a.tied else 2) + a.layers * (attn + mlp + 2 * a.hidden) + a.hidden


def published_seconds(a: Anchor) -> tuple[float | None, str]:
    """(published step time, how it was obtained)."""
    if a.published_step_s is not None:
        return a.published_step_s, "published step time"
    if a.published_tflops is None:
        return None, "no published run"
    n = maxtext_params(a)
    return (6 * n * a.per_device_batch * a.seq / (a.published_tflops * 1e12),
            f"6 · N · tokens / TFLOP/s = 6 · {n / 1e9:.3f} B · {a.per_device_batch} · {a.seq} / "
            f"{a.published_tflops:g} T")


def text_config(a: Anchor, remat: str):
    """A CambrianConfig with no towers around the run's decoder: what flops.py's formulas read."""
    from cambrian_jax.config import CambrianConfig, ConnectorConfig  # noqa: PLC0415

    return CambrianConfig(towers=(), connector=ConnectorConfig(connector_only=True), decoder=decoder_config(a),
                          max_len=a.seq, dtype="bfloat16", remat=remat)


# ------------------------------------------------------------------------------------------ the step

def text_lm_class():
    """Defined on first use so that importing this file does not import flax."""
    from flax import nnx  # noqa: PLC0415

    from cambrian_jax.decoder import Decoder  # noqa: PLC0415

    class TextLM(nnx.Module):
        """The decoder alone, called as train_step.make_step calls a model (no towers: no pixels)."""

        def __init__(self, cfg, *, dtype, remat: str, rngs):
            # The einsum attention the recorded calibration was made with (Splash is model.attention's
            # default on TPU now; re-calibrating with it is future work, docs/planning.md).
            self.decoder = Decoder(cfg, dtype=dtype, remat=remat, attention="xla", rngs=rngs)

        def __call__(self, input_ids, pixels, tower_masks, attention_mask, positions):
            if pixels or tower_masks:
                raise ValueError("TextLM has no vision towers: the batch must have no pixels_k / tower_mask_k")
            hidden = self.decoder(self.decoder.embed(input_ids), positions, attention_mask)
            return self.decoder.logits(hidden)

    return TextLM


def optimizer_stage():
    """AdamW as the trainer builds it, one learning-rate group (its values do not change the cost)."""
    from ml_collections import ConfigDict  # noqa: PLC0415

    return ConfigDict(dict(lr_groups=[dict(name="all", pattern=".*", lr=3e-4)], warmup_ratio=0.01, adam_b1=0.9,
                           adam_b2=0.95, adam_eps=1e-8, weight_decay=0.1, grad_clip=1.0))


def mesh_for(a: Anchor, topo, devices):
    from cambrian_jax import sharding, topology  # noqa: PLC0415

    shape = sharding.mesh_shape(dict(a.mesh), topo.chips)
    arranged = topology.mesh_devices(topo, shape, devices)
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), list(arranged.reshape(-1)))


def compile_run(a: Anchor, remat: str, accum: int, devices) -> dict[str, Any]:
    """Compile the run's step for its slice with `remat` and `accum` micro-batches; the row's figures."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from cambrian_jax import compiled_cost, optim, sharding, topology  # noqa: PLC0415
    from cambrian_jax.train_step import make_step  # noqa: PLC0415
    from cambrian_jax.trainer import abstract  # noqa: PLC0415
    from benchmarks.train_step import memory_gib  # noqa: PLC0415

    topo = topology.parse(a.topology)
    cfg = decoder_config(a)
    t0 = time.perf_counter()
    mesh = mesh_for(a, topo, devices)
    rules = [tuple(r) for r in sharding.DEFAULT_RULES]
    rows = a.per_device_batch * topo.chips
    sharding.check_batch(rows, accum, mesh, 1, f"--runs {a.key}: per_device_batch × chips")
    TextLM = text_lm_class()
    model = nnx.eval_shape(lambda: TextLM(cfg, dtype=jnp.bfloat16, remat=remat, rngs=nnx.Rngs(0)))
    graphdef, abs_params = nnx.split(model, nnx.Param)
    sh_params = sharding.state_shardings(abs_params, rules, mesh)
    keep = optim.trainable_filter([".*"])
    abs_train, abs_frozen = nnx.split_state(abs_params, keep, ...)
    sh_train, sh_frozen = nnx.split_state(sh_params, keep, ...)
    tx, _ = optim.make_optimizer(optimizer_stage(), abs_train, SCHEDULE_STEPS)
    abs_opt = jax.eval_shape(tx.init, abs_train)
    sh_opt = sharding.state_shardings(abs_opt, rules, mesh)
    replicated = sharding.replicated(mesh)
    sh_state = dict(params=sh_train, opt=sh_opt, step=replicated)
    abs_state = dict(params=abstract(abs_train, sh_train), opt=abstract(abs_opt, sh_opt),
                     step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
    batch_sh = sharding.batch_sharding(mesh)
    abs_batch = {k: jax.ShapeDtypeStruct((rows, a.seq), np.dtype(d), sharding=batch_sh)
                 for k, d in (("input_ids", "int32"), ("labels", "int32"), ("attention_mask", "bool"),
                              ("positions", "int32"))}
    fns = make_step(graphdef, tx, (), accum, sharding.Constrainer(rules, mesh))
    step = jax.jit(fns.train, in_shardings=(sh_state, sh_frozen, batch_sh), out_shardings=(sh_state, replicated),
                   donate_argnums=(0,))
    with sharding.rules_context(rules, mesh):
        lowered = step.lower(abs_state, abstract(abs_frozen, sh_frozen), abs_batch)
    t1 = time.perf_counter()
    row: dict[str, Any] = dict(remat=remat, accum_steps=accum, lower_s=t1 - t0, mesh=dict(mesh.shape),
                               params=sum(math.prod(x.shape) for x in jax.tree.leaves(abs_params)))
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 — the compiler's refusal (e.g. over HBM) is a result to report
        row.update(compile_s=time.perf_counter() - t1, error=f"{type(e).__name__}: {str(e)[:1500]}")
        need = re.search(r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
        if need:        # GiB: v5p shows 95.74G of its 96 GiB, v6e 31.25G of its 32 GiB
            row.update(temp_gib_required=float(need.group(1)), hbm_gib_available=float(need.group(2)))
        return row
    row["compile_s"] = time.perf_counter() - t1
    mem = memory_gib(compiled)
    cost = compiled_cost.program_cost(compiled, topo.chip.peak_flops, topo.chip.hbm_bandwidth)
    row.update(memory_gib=mem, gib_per_chip=mem.get("total"), predicted_s=cost.seconds,
               roofline_s=cost.roofline_seconds, time_source=cost.time_source, compiler_flops=cost.flops,
               compiler_bytes=cost.bytes_accessed, optimal_seconds_once=cost.optimal_seconds,
               reported_flops=cost.reported_flops,
               loops=[dict(op_name=lp.op_name[-120:], body=lp.body, trips=lp.trips, runs=lp.runs,
                          flops_per_trip=lp.flops_per_trip) for lp in cost.loops])
    return row


def fit_ladder(a: Anchor, rows_per_shard: int) -> list[tuple[str, int]]:
    """(remat, accumulation) to try in order until the step fits: the published run's own setting
    first, then more accumulation (the same tokens per step in smaller micro-batches), then 'full'
    remat — the planner's knobs, least departure from the published run first."""
    accums = [k for k in (1, 2, 4, 8, 16, 32) if rows_per_shard % k == 0]
    ladder = [(a.remat, k) for k in accums]
    return ladder + ([("full", k) for k in accums] if a.remat != "full" else [])


def compile_anchor(a: Anchor) -> dict[str, Any]:
    """The first setting of fit_ladder that compiles (the attempts that did not fit listed with it)."""
    from cambrian_jax import sharding, topology  # noqa: PLC0415

    topo = topology.parse(a.topology)
    devices = topology.compile_only_devices(topo)
    shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(dict(a.mesh), topo.chips)))
    rows_per_shard = a.per_device_batch * topo.chips // (shape["data"] * shape["fsdp"])
    attempts = []
    for remat, accum in fit_ladder(a, rows_per_shard):
        row = compile_run(a, remat, accum, devices)
        if "error" not in row or "temp_gib_required" not in row:   # compiled, or failed for another reason
            break
        attempts.append({k: row[k] for k in ("remat", "accum_steps", "temp_gib_required", "hbm_gib_available",
                                             "compile_s")})
    row["did_not_fit"] = attempts
    row["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return row


# ------------------------------------------------------------------------------------------ figures

def figures(a: Anchor, row: dict[str, Any]) -> dict[str, Any]:
    """The compiled row with the published figures and what follows from both."""
    from cambrian_jax import flops, topology  # noqa: PLC0415

    topo = topology.parse(a.topology)
    pub_s, how = published_seconds(a)
    row = dict(row)
    row.setdefault("remat", a.remat)
    row.setdefault("accum_steps", 1)
    row.setdefault("params", param_count(a))
    text = text_config(a, row["remat"])
    out = dict(run=a.key, title=a.title, topology=a.topology, chip=topo.chip.name, chips=topo.chips,
               hbm_gib=topo.chip.hbm_bytes / GiB, hidden=a.hidden, layers=a.layers, heads=a.heads,
               head_dim=a.head_dim, kv_heads=a.kv_heads, mlp_published=a.mlp, mlp_kind=a.mlp_kind,
               intermediate=intermediate_size(a), vocab=a.vocab, tied_published=a.tied, seq=a.seq,
               per_device_batch=a.per_device_batch, maxtext_remat=a.maxtext_remat, remat_mapped=a.remat,
               published_attention=a.attention, maxtext_params=maxtext_params(a),
               published_params=a.published_params, published_tflops=a.published_tflops,
               published_mfu=a.published_mfu, published_s=pub_s, published_s_from=how, source=a.source,
               notes=list(a.notes),
               model_flops_per_chip=3 * flops.decoder_forward(text, a.seq) * a.per_device_batch,
               recompute_flops_per_chip=flops.recompute_flops_per_sample(text, a.seq) * a.per_device_batch, **row)
    out["attention_flops_per_chip"] = (3 * a.layers * flops.decoder_layer_forward(text, a.seq)["attention"]
                                       * a.per_device_batch)
    # Parameters and both Adam moments in float32, sharded over every chip: what the arguments should hold.
    out["state_gib_expected"] = 12 * row["params"] / topo.chips / GiB
    if a.published_tflops is not None and pub_s is not None:
        out["maxtext_tflop_per_chip_step"] = a.published_tflops * pub_s
    if pub_s is not None:
        out["mfu_our_count"] = out["model_flops_per_chip"] / pub_s / topo.chip.peak_flops
    if "predicted_s" in row:
        out["compute_s"] = row["compiler_flops"] / topo.chip.peak_flops
        out["hbm_traffic_s"] = row["compiler_bytes"] / topo.chip.hbm_bandwidth
        out["fits"] = row["gib_per_chip"] <= out["hbm_gib"]
        out["compiler_flops_over_ours"] = row["compiler_flops"] / (out["model_flops_per_chip"]
                                                                   + out["recompute_flops_per_chip"])
        if pub_s is not None:
            out["calibration"] = pub_s / row["predicted_s"]
            out["calibration_roofline"] = pub_s / row["roofline_s"]
    return out


def per_chip(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per chip generation: the geometric means of its runs' calibration factors (of the predicted
    seconds, and of the roofline alone)."""
    def gmean(xs):
        return math.exp(sum(math.log(x) for x in xs) / len(xs))

    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("calibration"):
            v = out.setdefault(r["chip"], dict(runs=[], factors=[], factors_roofline=[], time_sources=[]))
            v["runs"].append(r["run"])
            v["factors"].append(r["calibration"])
            v["factors_roofline"].append(r["calibration_roofline"])
            v["time_sources"].append(r["time_source"])
    for v in out.values():
        v["calibration"] = gmean(v["factors"])
        v["calibration_roofline"] = gmean(v["factors_roofline"])
    return out


def _f(x, fmt: str, none: str = "—") -> str:
    return none if x is None else format(x, fmt)


def report(rows: list[dict[str, Any]], chips: dict[str, dict[str, Any]]) -> str:
    head = ("| run | slice (chips) | mesh | remat MaxText → ours | accum | params ours / MaxText | GiB/chip (HBM) | "
            "compile s | host RSS GiB | predicted s | published s | calibration | MFU published / our count |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mesh = " × ".join(f"{k} {v}" for k, v in r.get("mesh", {}).items() if v > 1) or "1"
        mem = (f"{r['gib_per_chip']:.1f} ({r['hbm_gib']:.0f})" if r.get("gib_per_chip") is not None
               else f"over: temp {r['temp_gib_required']:.1f} > {r['hbm_gib_available']:.2f}"
               if r.get("temp_gib_required") else "stopped" if r.get("error", "").startswith("stopped")
               else "did not compile")
        remat = r["remat_mapped"] if r["remat"] == r["remat_mapped"] else f"~~{r['remat_mapped']}~~ {r['remat']}"
        predicted = _f(r.get("predicted_s"), ".4g") + (" (roofline)" if r.get("time_source") == "roofline" else "")
        mfu = (f"{_f(r['published_mfu'] and 100 * r['published_mfu'], '.1f')} / "
               f"{_f(r.get('mfu_our_count') and 100 * r['mfu_our_count'], '.1f')} %")
        lines.append(
            f"| {r['run']} | {r['topology']} ({r['chips']}) | {mesh} | {r['maxtext_remat'].split(' (')[0]} → "
            f"{remat} | {r['accum_steps']} | {r['params'] / 1e9:.2f} B / {r['maxtext_params'] / 1e9:.2f} B | {mem} | "
            f"{_f(r.get('compile_s'), '.0f')} | {_f(r.get('host_peak_rss_gib'), '.1f')} | {predicted} | "
            f"{_f(r.get('published_s'), '.4g')} | {_f(r.get('calibration'), '.3f')} | {mfu} |")
    lines.append("")
    for chip, v in chips.items():
        each = ", ".join(f"{r} {f:.3f} ({src})" for r, f, src in zip(v["runs"], v["factors"], v["time_sources"]))
        lines.append(f"calibration {chip}: {v['calibration']:.3f} (geometric mean of {each}); of the roofline "
                     f"alone {v['calibration_roofline']:.3f}")
    lines.append("")
    lines.append("remat policies, MaxText → ours:")
    for name in dict.fromkeys(r["maxtext_remat"] for r in rows):
        lines.append(f"  {name} → {REMAT_MAPPING.get(name, '?')}")
    lines.append("")
    lines.append("per run:")
    for r in rows:
        mlp = "ReLU, one wi" if r["mlp_kind"] == "relu1" else "SwiGLU"
        tied = "tied" if r["tied_published"] else "untied"
        size = f"{r['published_params'] / 1e9:g} B" if r.get("published_params") else "—"
        lines.append(f"  {r['run']} ({r['title']}, named {size}): E {r['hidden']}, {r['layers']} layers, "
                     f"{r['heads']}/{r['kv_heads']} heads × {r['head_dim']}, MLP {r['mlp_published']} ({mlp}) → "
                     f"SwiGLU {r['intermediate']}, vocab {r['vocab']} ({tied} published; ours untied), "
                     f"{r['per_device_batch']} × {r['seq']} tokens per chip; published attention "
                     f"{r['published_attention'] or '—'}")
        lines.append(f"     published s: {r['published_s_from']}")
        if r.get("maxtext_tflop_per_chip_step"):
            lines.append(f"     TFLOP per chip per step: MaxText {r['maxtext_tflop_per_chip_step']:.1f}; ours "
                         f"{r['model_flops_per_chip'] / 1e12:.1f} model (of which causal attention "
                         f"{r['attention_flops_per_chip'] / 1e12:.1f}; MaxText − ours = "
                         f"{(r['maxtext_tflop_per_chip_step'] * 1e12 - r['model_flops_per_chip']) / 1e12:+.1f}) + "
                         f"{r['recompute_flops_per_chip'] / 1e12:.1f} recomputed ({r['remat']})")
        for t in r.get("did_not_fit", ()):
            lines.append(f"     did not fit: remat {t['remat']}, accum {t['accum_steps']}: the compiler needs "
                         f"{t['temp_gib_required']:.1f} GiB of temporaries, {t['hbm_gib_available']:.2f} available")
        if r.get("compiler_flops_over_ours"):
            lines.append(f"     compiler: {r['compiler_flops'] / 1e12:.1f} TFLOP per chip = "
                         f"{r['compiler_flops_over_ours']:.3f} × ours (model + recompute); roofline "
                         f"{r['roofline_s']:.4g} s, optimal_seconds (loop bodies once) {r['optimal_seconds_once']:.4g}"
                         f", time from {r['time_source']}; FLOPs alone {r['compute_s']:.4g} s, HBM traffic "
                         f"alone {r['hbm_traffic_s']:.4g} s")
            lines.append("     memory per chip: " + ", ".join(f"{k} {v:.2f}" for k, v in r["memory_gib"].items())
                         + f" GiB; parameters + Adam moments (float32, sharded) expected "
                         f"{r['state_gib_expected']:.2f} GiB of the arguments")
        if r.get("time_source") == "roofline":
            lines.append(f"     the compiler's optimal_seconds is negative: libtpu's {r['chip']} cost model seems to "
                         f"count -1 s per op it cannot time ({NEGATIVE_OPTIMAL.get(r['chip'], 'which op: not found')}),"
                         f" so the prediction is the roofline alone")
        if r.get("gib_per_chip") and not r["fits"]:
            lines.append(f"     memory_analysis totals {r['gib_per_chip']:.2f} GiB, over the {r['hbm_gib']:.0f} GiB of "
                         f"HBM, yet the compiler accepted the program (it refused the settings listed as not "
                         f"fitting)")
        if r.get("error"):
            lines.append(f"     compile failed: {r['error'].splitlines()[0][:400]}")
        for n in r["notes"]:
            lines.append(f"     note: {n}")
    lines.append("")
    lines.append("notes: our decoder runs einsum attention (decoder.attend: materialised float32 [B, heads, T, T] "
                 "scores under an explicit mask; no flash/splash kernel), where the published runs used MaxText's "
                 "kernels; our lm_head is untied (the 2023 MaxText models tie it: we hold V·E more parameters, "
                 "the FLOPs are the same); remat policies save in HBM where MaxText offloads to the host; a run "
                 "whose published setting does not fit is compiled at the first setting of the fit ladder that "
                 "does (more accumulation, then 'full' remat: same tokens per step), and its remat and accum "
                 "columns say so.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ running

def _rss_gib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return 0.0


def run_child(key: str, max_minutes: float, max_rss_gib: float) -> dict[str, Any]:
    """Compile one run in a child process, stopped past the time or memory limit."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "row.json")
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--runs", key, "--child-out", path],
                                 start_new_session=True)
        t0, peak, stopped = time.monotonic(), 0.0, None
        while child.poll() is None:
            peak = max(peak, _rss_gib(child.pid))
            if time.monotonic() - t0 > 60 * max_minutes:
                stopped = f"stopped after {max_minutes:g} min (limit --max-minutes)"
            elif peak > max_rss_gib:
                stopped = f"stopped at {peak:.1f} GiB RSS (limit --max-rss-gib {max_rss_gib:g})"
            if stopped:
                child.kill()
                child.wait()
                break
            time.sleep(1.0)
        if stopped or child.returncode or not os.path.exists(path):
            return dict(error=stopped or f"child exited with {child.returncode}", host_peak_rss_gib=peak,
                        compile_s=time.monotonic() - t0)
        with open(path) as f:
            return json.load(f)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=",".join(ANCHORS), help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--out", default="", help="write the rows as JSON here (e.g. docs/results/calibration.json)")
    p.add_argument("--max-minutes", type=float, default=10.0, help="stop a run's compile after this long")
    p.add_argument("--max-rss-gib", type=float, default=8.0, help="stop a run whose process passes this RSS")
    p.add_argument("--in-process", action="store_true", help="compile in this process (no limits)")
    p.add_argument("--report-from", default="", help="re-derive the figures and table from an --out JSON's "
                   "compiled rows instead of compiling (after a change to the published figures or formulas)")
    p.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    keys = [k.strip() for k in a.runs.split(",") if k.strip()]
    unknown = [k for k in keys if k not in RUNS]
    if unknown or not keys:
        p.error(f"--runs: {', '.join(unknown) or 'none given'} not known; choose from {', '.join(RUNS)}")
    if a.child_out:
        row = compile_anchor(RUNS[keys[0]])
        with open(a.child_out, "w") as f:
            json.dump(row, f)
        return row
    compiled: dict[str, dict[str, Any]] = {}
    if a.report_from:
        with open(a.report_from) as f:
            compiled = json.load(f)["compiled"]
        keys = [k for k in keys if k in compiled]
    for k in keys:
        if k not in compiled:
            print(f"compiling {k} ({RUNS[k].topology}) …", file=sys.stderr, flush=True)
            compiled[k] = compile_anchor(RUNS[k]) if a.in_process else run_child(k, a.max_minutes, a.max_rss_gib)
    rows = [figures(RUNS[k], compiled[k]) for k in keys]
    chips = per_chip(rows)
    print(report(rows, chips), flush=True)
    result = dict(rows=rows, per_chip=chips, remat_mapping=REMAT_MAPPING, compiled=compiled,
                  formulas=dict(published_s="6 · N · per_device_batch · seq / published TFLOP/s per chip (2023 "
                                            "MaxText runs); the recipe's step time (v6e)",
                                calibration="published s / program_cost(compiled).seconds",
                                mfu_our_count="3 · flops.decoder_forward(cfg, seq) · per_device_batch / "
                                              "published s / peak"))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def param_count(a: Anchor) -> int:
    """Our decoder's parameters at the run's shapes (untied: embedding and lm_head apart)."""
    f = intermediate_size(a)
    attn = a.hidden * a.head_dim * (2 * a.heads + 2 * a.kv_heads)
    return 2 * a.vocab * a.hidden + a.layers * (attn + 3 * a.hidden * f + 2 * a.hidden) + a.hidden


if __name__ == "__main__":
    main()
