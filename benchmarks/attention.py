"""The attention implementations side by side: parity on a CPU, memory and time by the TPU compiler.

    python benchmarks/attention.py [--tpu_topology v5p-8] [--batch 8 --seq 2048 --heads 32 --kv_heads 8]

For each implementation (cambrian_jax/attention.py):

  parity    max |Δ| of the output and of the q/k/v gradients against the XLA reference, float32 on the
            CPU (Splash in interpret mode; cuDNN only on an NVIDIA GPU), with masked image cells, a
            right-padded row and a fully padded row (compared where a row has an allowed key)
  TPU       with libtpu (the [tpu] extra): forward + backward of causal attention at the given shape,
            compiled for compile-only devices of the slice (rows split over its chips): the compiler's
            temporaries per chip and the step time predicted by compiled_cost (loops and kernels counted)

Figures are ratios within one run; the whole-model figures (34B and 8B stage 2) come from the planner,
docs/planning.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cambrian_jax import attention, compiled_cost, sharding, topology  # noqa: E402


def parity(impl: str) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    b, t, nh, kv, d = 3, 200, 4, 2, 32
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for h in (nh, kv, kv))
    keys = np.ones((b, t), bool)
    keys[0, 40:90], keys[1, 150:], keys[2, :] = False, False, False
    answered = np.cumsum(keys, axis=1) > 0
    keys = jnp.asarray(keys)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32) * answered[..., None, None]

    def run(name):
        f = jax.jit(lambda q, k, v: attention.attend(q, k, v, keys, implementation=name))
        g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2)))
        return np.asarray(f(q, k, v)), [np.asarray(x) for x in g(q, k, v)]

    (ref, ref_g), (out, out_g) = run("xla"), run(impl)
    return (float(np.abs(out - ref)[answered].max()),
            max(float(np.abs(a - b).max()) for a, b in zip(out_g, ref_g)))


def compile_attention(impl: str, mesh, b: int, t: int, nh: int, kv: int, d: int):
    """Forward + backward of causal attention by `impl` (bf16), rows over the mesh's fsdp axis, compiled."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    rows = NamedSharding(mesh, P(("data", "fsdp")))
    q = jax.ShapeDtypeStruct((b, t, nh, d), jnp.bfloat16, sharding=rows)
    k = jax.ShapeDtypeStruct((b, t, kv, d), jnp.bfloat16, sharding=rows)
    keys = jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=rows)

    def step(q, k, v, keys):
        out = lambda q, k, v: jnp.sum(attention.attend(q, k, v, keys, implementation=impl).astype(jnp.float32))
        return jax.grad(out, argnums=(0, 1, 2))(q, k, v)

    # The default precision (tests set 'highest'), which Mosaic needs for bf16 operands.
    with sharding.rules_context(sharding.DEFAULT_RULES, mesh), jax.default_matmul_precision("default"):
        return jax.jit(step).lower(q, k, k, keys).compile()


def tpu_mesh(topo: topology.Topology):
    devices = topology.compile_only_devices(topo)
    return jax.sharding.Mesh(np.asarray(devices).reshape(1, len(devices), 1), sharding.MESH_AXES)


def on_tpu(impl: str, topo: topology.Topology, *shape: int) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    compiled = compile_attention(impl, tpu_mesh(topo), *shape)
    cost = compiled_cost.program_cost(compiled, topo.chip.peak_flops, topo.chip.hbm_bandwidth)
    return compiled.memory_analysis().temp_size_in_bytes / 2 ** 20, cost.seconds * 1e3, time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tpu_topology", default="v5p-8")
    ap.add_argument("--no-tpu", dest="tpu", action="store_false", help="parity only")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv_heads", type=int, default=8)
    ap.add_argument("--head_dim", type=int, default=128)
    args = ap.parse_args(argv)
    figures: dict = dict(parity={}, tpu={})
    impls = ["xla", "splash"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
    print("parity against xla (float32, CPU; splash in interpret mode), max |Δ|:")
    for impl in impls[1:]:
        with jax.default_matmul_precision("highest"):      # exact fp32 matmuls on the CPU; not for the TPU
            out, grad = parity(impl)
        figures["parity"][impl] = dict(output=out, gradients=grad)
        print(f"  {impl:7s} output {out:.1e}   q/k/v gradients {grad:.1e}")
    if not args.tpu:
        return figures
    if topology.tpu_compiler_version() is None:
        print("TPU compiler: libtpu is not installed (pip install -e '.[tpu]'); skipped")
        return figures
    topo = topology.parse(args.tpu_topology)
    shape = (args.batch, args.seq, args.heads, args.kv_heads, args.head_dim)
    print(f"causal attention forward + backward, bf16, B={shape[0]} S={shape[1]} heads={shape[2]} (kv {shape[3]}) "
          f"head_dim={shape[4]}, rows over the {topo.chips} chips of {topo.name} "
          f"(TPU compiler, libtpu {topology.tpu_compiler_version()}):")
    base = None
    for impl in ("xla", "splash"):
        temp, ms, compile_s = on_tpu(impl, topo, *shape)
        base = base or (temp, ms)
        figures["tpu"][impl] = dict(temp_mib=temp, predicted_ms=ms)
        print(f"  {impl:7s} temporaries {temp:8.1f} MiB/chip ({base[0] / temp:4.1f}x less than xla)   predicted "
              f"{ms:6.2f} ms ({base[1] / ms:4.1f}x faster)   compiled in {compile_s:.0f} s")
    return figures


if __name__ == "__main__":
    main()
