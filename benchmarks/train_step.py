"""Training-step throughput of a config's stage on this machine: step time, tokens/s, TFLOP/s, MFU, memory.

    python benchmarks/train_step.py [--config configs/cambrian_tiny.py[:arg]] [--stage 2] [--steps 10]
        [--warmup 2] [--batch N] [--dtype bfloat16] [--remat full]

The step is the trainer's own (trainer.TrainSetup: the config's mesh and sharding rules, the stage's
trainable split and optimizer, the one step function jitted with explicit in/out shardings and a
donated state, lowered inside the rules context), with parameters created in their shards; it is
lowered and compiled once ahead of the loop (timed separately). The
batch has the data contract's fields, shapes and dtypes (cambrian_jax.data.pipeline) with random
values — a step's cost does not depend on them — and is placed on the devices once.

After --warmup steps, --steps steps are timed one by one (each waits for its results); the figures use
the median. FLOPs come from cambrian_jax.flops (the trainer's formula: MFU counts model work only;
HFU adds what the remat policy recomputes), the peak from flops.peak_flops by device kind; CPUs have
no entry of their own, so the nominal 1 TFLOP/s is used and stated. Because a shared machine's speed
drifts, the step's FLOP rate is also given as a fraction of a plain square matmul in the compute
dtype timed in the same run, on one device.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from cambrian_jax import config as config_lib  # noqa: E402
from cambrian_jax import attention  # noqa: E402
from cambrian_jax import flops, layout, sharding  # noqa: E402
from cambrian_jax.config import IGNORE_INDEX, CambrianConfig  # noqa: E402
from cambrian_jax.data.pipeline import batch_spec  # noqa: E402
from cambrian_jax.model import Cambrian  # noqa: E402
from cambrian_jax.trainer import TrainSetup  # noqa: E402

SCHEDULE_STEPS = 1000     # the learning-rate schedule's length when the stage has no num_steps (cost-neutral)


def load_config(spec: str, *, batch: int | None = None, dtype: str | None = None, remat: str | None = None,
                stage: int = 2):
    """`configs/x.py[:arg]` → the run config, with the benchmark's overrides applied."""
    from cambrian_jax.export_hf import load_config_file  # noqa: PLC0415

    config = load_config_file(spec)
    if dtype:
        config.model.dtype = dtype
    if remat:
        config.model.remat = remat
    if batch:
        config[f"stage{stage}"].global_batch_size = batch
    return config


def contract_batch(cfg: CambrianConfig, batch_size: int, seq_len: int, pixel_format: str = "float32",
                   seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of the data contract (pipeline.batch_spec): every row has an image, prompt before it,
    supervised text after it; random values."""
    rng = np.random.default_rng(seed)
    spec = batch_spec(cfg, dict(max_len=seq_len, pixel_format=pixel_format), batch_size)
    p, block = cfg.image_position, cfg.connector.block_len
    ids = rng.integers(1, cfg.decoder.vocab_size, spec["input_ids"][0]).astype(np.int32)
    ids[:, p:p + block] = 0                                  # the image block's filler id
    labels = ids.copy()
    labels[:, :p + block] = IGNORE_INDEX
    mask = np.ones(spec["attention_mask"][0], bool)
    batch = dict(input_ids=ids, labels=labels, attention_mask=mask, positions=layout.positions(mask),
                 has_image=np.ones(spec["has_image"][0], bool))
    for k in range(len(cfg.towers)):
        shape, dtype = spec[f"pixels_{k}"]
        batch[f"pixels_{k}"] = (rng.integers(0, 256, shape).astype(np.uint8) if dtype == "uint8"
                                else rng.standard_normal(shape, np.float32))
        batch[f"tower_mask_{k}"] = np.ones(spec[f"tower_mask_{k}"][0], bool)
    return batch


def attention_implementation(cfg) -> str:
    """Which attention the decoder's layers run here: model.attention resolved for this backend."""
    impl = attention.resolve(cfg.attention, jax.devices()[0].platform)
    return f"{impl} (model.attention={cfg.attention!r}; cambrian_jax/attention.py)"


def flash_attention_available() -> str:
    """Whether this backend compiles jax.nn.dot_product_attention's fused kernel (cuDNN on GPUs)."""
    platform = jax.devices()[0].platform
    if platform != "gpu":
        return f"cuDNN flash attention: not on {platform}" + (" (Splash is the TPU kernel)"
                                                              if platform == "tpu" else "")
    q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    try:
        fn = jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn"))
        jax.block_until_ready(fn(q))
        return "cuDNN flash attention: available on this GPU"
    except Exception as e:  # noqa: BLE001 — any failure means "not available here"; say why
        return f"cuDNN flash attention: not available ({type(e).__name__}: {str(e).splitlines()[0][:120]})"


def matmul_flops_per_second(dtype: str, n: int | None = None, repeats: int = 5) -> tuple[float, int]:
    """(FLOP/s of an n×n @ n×n matmul in `dtype` on one device, n): the same-run baseline."""
    n = n or (2048 if jax.devices()[0].platform == "cpu" else 8192)
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (n, n), jnp.dtype(dtype)) for k in keys)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times), n


def memory_gib(compiled) -> dict[str, float]:
    """Per-device sizes of the compiled step from XLA's memory analysis, GiB (empty if not reported)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 — not every backend reports it
        return {}
    out = {}
    for name in ("argument", "output", "temp", "alias", "generated_code"):
        v = getattr(m, f"{name}_size_in_bytes", None) if m is not None else None
        if v is not None:
            out[name] = v / 2**30
    if {"argument", "output", "temp", "alias"} <= out.keys():
        out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


@dataclasses.dataclass
class Built:
    """A compiled stage step with its inputs on the devices."""
    compiled: Any
    state: dict
    frozen: Any
    batch: dict
    model_cfg: CambrianConfig
    mesh: Any
    global_batch: int
    seq_len: int
    accum: int
    flops_per_step: float            # model FLOPs (cambrian_jax.flops, the trainer's MFU numerator)
    recompute_flops: float           # what remat re-runs in the backward pass (not model work)
    trainable: int
    frozen_count: int
    lower_s: float
    compile_s: float


def build(config, stage_n: int) -> Built:
    """The stage's step as the trainer builds it: trainer.TrainSetup's plan and program, then the
    parameters initialised on the mesh as Trainer.run_stage does."""
    if config.get("prng_impl"):
        jax.config.update("jax_default_prng_impl", config.prng_impl)
    setup = TrainSetup(config, sharding.make_mesh(dict(config.mesh)))
    model_cfg, mesh = setup.model_cfg, setup.mesh
    if stage_n not in setup.stages:
        raise config_lib.ConfigError(f"config field stages: this config has no stage {stage_n}")
    plan = setup.plan(stage_n)
    gb, accum = int(plan.stage.global_batch_size), int(plan.stage.accum_steps)
    program = setup.program(plan, int(plan.stage.get("num_steps") or SCHEDULE_STEPS))

    def create():
        return nnx.state(Cambrian(model_cfg, rngs=nnx.Rngs(config.seed)), nnx.Param)

    replicated = sharding.replicated(mesh)
    with jax.set_mesh(mesh):
        params = jax.jit(create, out_shardings=setup.param_shardings)()
        train_p, frozen = nnx.split_state(params, plan.keep, ...)
        del params
        opt = jax.jit(program.tx.init, out_shardings=program.sh_opt)(train_p)
    state = dict(params=train_p, opt=opt, step=jax.device_put(jnp.int32(0), replicated))

    data = config.get("data") or {}
    seq_len = int(data.get("max_len") or model_cfg.max_len)
    batch_sh = program.batch_sharding
    host_batch = contract_batch(model_cfg, gb // jax.process_count(), seq_len, data.get("pixel_format", "float32"))
    batch = sharding.to_global(host_batch, batch_sh)
    abs_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in batch.items()}
    t0 = time.perf_counter()
    lowered = program.lower(abs_batch)       # inside the rules context, as the trainer does
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()

    flops_per_step = flops.train_flops_per_step(model_cfg, gb, plan.trainable_paths, seq_len)
    recompute = gb * flops.recompute_flops_per_sample(model_cfg, seq_len)
    count = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree))  # noqa: E731
    return Built(compiled, state, frozen, batch, model_cfg, mesh, gb, seq_len, accum, flops_per_step, recompute,
                 count(plan.abs_train), count(plan.abs_frozen), t1 - t0, t2 - t1)


def time_steps(b: Built, steps: int, warmup: int) -> tuple[list[float], float]:
    """(seconds of each timed step, loss of the last one); the state is carried (it is donated)."""
    state, metrics = b.state, None
    for _ in range(warmup):
        state, metrics = b.compiled(state, b.frozen, b.batch)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = b.compiled(state, b.frozen, b.batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    b.state = state
    return times, float(metrics["loss"])


def measure(config, stage_n: int = 2, steps: int = 10, warmup: int = 2, baseline: bool = True) -> dict[str, Any]:
    """Build, compile and time the stage's step; every figure of the report in one dict."""
    b = build(config, stage_n)
    times, loss = time_steps(b, steps, warmup)
    step_time = statistics.median(times)
    devices = jax.devices()
    n_dev = len(devices)
    peak = flops.peak_flops(devices[0])
    tokens = b.global_batch * b.seq_len
    r = dict(stage=stage_n, platform=devices[0].platform, device_kind=devices[0].device_kind, devices=n_dev,
             mesh=dict(b.mesh.shape), dtype=b.model_cfg.dtype, remat=b.model_cfg.remat, global_batch=b.global_batch,
             seq_len=b.seq_len, accum_steps=b.accum, trainable_params=b.trainable, frozen_params=b.frozen_count,
             lower_s=b.lower_s, compile_s=b.compile_s, step_times=times, step_time=step_time,
             tokens_per_step=tokens, tokens_per_sec=tokens / step_time, samples_per_sec=b.global_batch / step_time,
             flops_per_step=b.flops_per_step, tflops_per_device=b.flops_per_step / step_time / 1e12 / n_dev,
             peak_flops_per_device=peak, peak_is_placeholder=peak == flops.PEAK_FLOPS["cpu"],
             mfu=b.flops_per_step / step_time / (peak * n_dev),
             hfu=(b.flops_per_step + b.recompute_flops) / step_time / (peak * n_dev), loss=loss,
             memory_gib=memory_gib(b.compiled),
             host_peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
             attention=attention_implementation(b.model_cfg), flash=flash_attention_available())
    stats = devices[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        r["device_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    if baseline:
        rate, n = matmul_flops_per_second(b.model_cfg.dtype)
        r.update(matmul_n=n, matmul_tflops=rate / 1e12,
                 fraction_of_matmul=r["tflops_per_device"] * 1e12 / rate)
    return r


def _flop(x: float) -> str:
    return f"{x / 1e12:.3f} TFLOP" if x >= 1e12 else f"{x / 1e9:.3f} GFLOP"


def report(spec: str, r: dict[str, Any]) -> str:
    """The printed table of one measurement."""
    t = r["step_times"]
    mem = r["memory_gib"]
    peak = (f"{r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s bf16 dense ({r['device_kind']})"
            if not r["peak_is_placeholder"] else
            f"{r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s — flops.PEAK_FLOPS['cpu'], a nominal placeholder, "
            f"not this machine's peak")
    lines = [
        f"config {spec}, stage {r['stage']}: {r['trainable_params']:,} trainable + {r['frozen_params']:,} frozen "
        f"parameters; batch {r['global_batch']} × {r['seq_len']} tokens, accum {r['accum_steps']}, "
        f"{r['dtype']}, remat {r['remat']}",
        f"devices: {r['devices']} × {r['device_kind']} ({r['platform']}), mesh {r['mesh']}",
        f"attention: {r['attention']}; {r['flash']}",
        f"compile: lower {r['lower_s']:.1f} s + compile {r['compile_s']:.1f} s",
        "memory per device (XLA): " + (", ".join(f"{k} {v:.3f} GiB" for k, v in mem.items()) or "not reported")
        + f"; host peak RSS {r['host_peak_rss_gib']:.2f} GiB"
        + (f"; device peak {r['device_peak_gib']:.2f} GiB" if "device_peak_gib" in r else ""),
        f"step time: median {r['step_time']:.4f} s over {len(t)} steps (min {min(t):.4f}, max {max(t):.4f}); "
        f"loss {r['loss']:.4f}",
        f"throughput: {r['tokens_per_sec']:,.0f} tokens/s ({r['tokens_per_step']:,} per step), "
        f"{r['samples_per_sec']:.3g} samples/s",
        f"FLOPs: {_flop(r['flops_per_step'])} per step (cambrian_jax.flops) → "
        f"{r['tflops_per_device']:.4f} TFLOP/s per device",
        f"MFU: {100 * r['mfu']:.2f} % of {peak}; with remat's recomputation (HFU) {100 * r['hfu']:.2f} %",
    ]
    if "matmul_tflops" in r:
        lines.append(f"same-run baseline: {r['matmul_n']}² matmul in {r['dtype']} at {r['matmul_tflops']:.3f} "
                     f"TFLOP/s on one device; the step reaches {r['fraction_of_matmul']:.2f}× of it")
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cambrian_tiny.py", help="configs/x.py[:arg]")
    p.add_argument("--stage", type=int, default=2, choices=(1, 2))
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--batch", type=int, default=0, help="global batch (default: the stage's)")
    p.add_argument("--dtype", default="", help="compute dtype (default: the config's)")
    p.add_argument("--remat", default="", help="remat policy (default: the config's)")
    p.add_argument("--no-baseline", action="store_true", help="skip the same-run matmul baseline")
    a = p.parse_args(argv)
    config = load_config(a.config, batch=a.batch or None, dtype=a.dtype or None, remat=a.remat or None,
                         stage=a.stage)
    r = measure(config, a.stage, a.steps, a.warmup, baseline=not a.no_baseline)
    print(report(a.config, r), flush=True)
    return r


if __name__ == "__main__":
    main()
