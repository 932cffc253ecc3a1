"""Our decoder's training step against transformers' LlamaForCausalLM in PyTorch: same dims, same weights, fp32.

    python benchmarks/decoder_vs_torch.py [--layers 4] [--hidden 512] [--heads 8] [--kv-heads 2] \
        [--vocab 8192] [--seq 512] [--batch 4] [--steps 5] [--rounds 3] [--compare-layouts] [--profile N]

Both sides take a full training step — forward, backward, AdamW update (same hyperparameters, no
weight decay) — on the same batch, in this process, on the CPU. The JAX decoder is loaded with the
PyTorch model's initial weights (cambrian_jax.convert.hf_llama), so the first step's losses must agree
(printed, as a check that the two compute the same thing). JAX: the decoder alone (no towers),
jitted, parameters and optimizer state donated. PyTorch: eager, SDPA attention, torch's default
thread count.

Timing is interleaved to cancel a shared machine's drift: each of --rounds rounds times --steps
steps of JAX, then --steps of PyTorch, then a plain --matmul-sized fp32 matmul on each; the ratios
are taken per round and their medians reported. The matmul ratio is the baseline: how the two
libraries' CPU GEMMs compare on this machine, which bounds what the step's ratio can be.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

import cambrian_jax  # noqa: E402,F401  (flax flags)
from cambrian_jax import attention  # noqa: E402
from cambrian_jax.config import DecoderConfig  # noqa: E402
from cambrian_jax.convert.assign import assign  # noqa: E402
from cambrian_jax.convert.hf_llama import from_hf  # noqa: E402
from cambrian_jax.decoder import Decoder  # noqa: E402
from cambrian_jax.train_step import token_losses  # noqa: E402

LR, BETAS, EPS = 1e-4, (0.9, 0.999), 1e-8


def torch_model(cfg: DecoderConfig, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    hf = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                                  rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                                  max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
                                  attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(hf).train()


class JaxSide:
    """The decoder holding the PyTorch model's weights, and its jitted AdamW step."""

    def __init__(self, cfg: DecoderConfig, hf_model, ids: np.ndarray):
        sd = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
        dec = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract))
        assign(dec, from_hf(cfg, sd), "PyTorch LlamaForCausalLM")
        graphdef, params = nnx.split(dec)
        tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=0.0)
        # Committed to the device like the step's outputs, so the second call does not compile again.
        device = jax.devices()[0]
        self.params = jax.device_put(params, device)
        self.opt = jax.device_put(tx.init(self.params), device)
        b, t = ids.shape
        self.ids = jnp.asarray(ids)
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = jnp.ones((b, t), bool)

        def loss(p, ids):
            d = nnx.merge(graphdef, p)
            total, count = token_losses(d.logits(d(d.embed(ids), pos, mask)), ids)
            return total / count

        def step(p, o, ids):
            value, grads = jax.value_and_grad(loss)(p, ids)
            updates, o = tx.update(grads, o, p)
            return optax.apply_updates(p, updates), o, value

        self._step = jax.jit(step, donate_argnums=(0, 1))

    def step(self) -> jax.Array:
        self.params, self.opt, value = self._step(self.params, self.opt, self.ids)
        return value

    def timed(self, steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            value = self.step()
        value.block_until_ready()
        return (time.perf_counter() - t) / steps


def matmul_seconds(n: int, repeats: int = 3) -> tuple[float, float]:
    """(JAX, PyTorch) seconds of one n×n @ n×n float32 matmul, each the median of `repeats`."""
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    ja, ta = jnp.asarray(a), torch.from_numpy(a)
    f = jax.jit(jnp.matmul)
    f(ja, ja).block_until_ready()
    ta @ ta

    def median_time(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    return median_time(lambda: f(ja, ja).block_until_ready()), median_time(lambda: ta @ ta)


class TorchSide:
    def __init__(self, hf_model, ids: np.ndarray):
        self.model = hf_model
        self.opt = torch.optim.AdamW(hf_model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
        self.ids = torch.from_numpy(ids.astype(np.int64))

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        out = self.model(input_ids=self.ids, labels=self.ids)
        out.loss.backward()
        self.opt.step()
        return float(out.loss.detach())

    def timed(self, steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - t) / steps


def print_profile(side: JaxSide, top: int, steps: int = 2) -> list[tuple[str, float]]:
    """The XLA:CPU ops of `steps` traced steps by thread time (summed over the pool's threads), each
    with the operation it came from (the op_name XLA keeps in the compiled program's metadata)."""
    import collections  # noqa: PLC0415
    import re  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    hlo = side._step.lower(side.params, side.opt, side.ids).compile().as_text()
    origin = dict(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo, re.M))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                side.step().block_until_ready()
        path = next(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(".xplane.pb"))
        data = jax.profiler.ProfileData.from_file(path)
    ns = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLAEigen"):        # the threads that run the compiled ops
                for ev in line.events:
                    if ev.name in origin:
                        ns[ev.name] += ev.duration_ns
    total = sum(ns.values())
    print(f"profile: {total / steps / 1e9:.3f} thread-s of XLA ops per step; the {top} largest:")
    for name, t in ns.most_common(top):
        where = re.sub(r"jit\(step\)/|while/body/|closed_call/", "", origin[name])
        print(f"  {t / steps / 1e9:7.3f} s {100 * t / total:5.1f} %  {name:32s} {where[:90]}")
    return [(name, t / steps / 1e9) for name, t in ns.most_common(top)]


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="steps per side per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--matmul", type=int, default=1024, help="side of the baseline matmul")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, trace two JAX steps and print the N XLA ops that took the most thread time")
    p.add_argument("--compare-layouts", action="store_true",
                   help="also time the step with the XLA attention in its TPU layout (attention._grouped)")
    a = p.parse_args(argv)
    cfg = DecoderConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3 // 64 * 64 or 64,
                        num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads)
    tokens = a.batch * a.seq
    print(f"decoder: {a.layers} layers, hidden {a.hidden}, MLP {cfg.intermediate_size}, {a.heads}/{a.kv_heads} "
          f"heads, vocab {a.vocab}; batch {a.batch} × {a.seq} tokens; fp32 on {jax.devices()[0].device_kind}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads", flush=True)
    ids = np.random.default_rng(1).integers(0, a.vocab, (a.batch, a.seq)).astype(np.int32)
    hf_model = torch_model(cfg)
    jx = JaxSide(cfg, hf_model, ids)          # copies the weights before PyTorch's first update
    th = TorchSide(hf_model, ids)
    grouped = JaxSide(cfg, hf_model, ids) if a.compare_layouts else None
    t = time.perf_counter()
    loss_jax = float(jx.step())               # compiles
    compile_s = time.perf_counter() - t
    if grouped is not None:
        # Traced (by its first step) with the layout attention.xla uses off the CPU; later steps reuse it.
        with _patched(attention, "_heads_first", attention._grouped):
            loss_grouped = float(grouped.step())
    loss_torch = th.step()
    print(f"first-step loss: jax {loss_jax:.6f}, pytorch {loss_torch:.6f} (relative difference "
          f"{abs(loss_jax - loss_torch) / abs(loss_torch):.1e}); jax compile + first step {compile_s:.1f} s")
    rounds, matmuls, layouts = [], [], []
    for _ in range(a.rounds):
        rounds.append((jx.timed(a.steps), th.timed(a.steps)))
        matmuls.append(matmul_seconds(a.matmul))
        if grouped is not None:
            layouts.append(grouped.timed(a.steps) / rounds[-1][0])
    ratios = [tt / tj for tj, tt in rounds]
    matmul_ratios = [mt / mj for mj, mt in matmuls]
    tj = statistics.median(r[0] for r in rounds)
    tt = statistics.median(r[1] for r in rounds)
    ratio, matmul_ratio = statistics.median(ratios), statistics.median(matmul_ratios)
    mj, mt = statistics.median(m[0] for m in matmuls), statistics.median(m[1] for m in matmuls)
    mm_flop = 2 * a.matmul ** 3
    print(f"{'':8s} {'step (s)':>9s} {'tokens/s':>10s} {'matmul GFLOP/s':>15s}   (medians of {a.rounds} rounds × "
          f"{a.steps} steps; matmul {a.matmul}²)")
    print(f"{'jax':8s} {tj:9.4f} {tokens / tj:10.0f} {mm_flop / mj / 1e9:15.1f}")
    print(f"{'pytorch':8s} {tt:9.4f} {tokens / tt:10.0f} {mm_flop / mt / 1e9:15.1f}")
    compiles = jx._step._cache_size()
    print(f"throughput ratio jax/pytorch: training step {ratio:.2f}× (per round: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}); plain matmul {matmul_ratio:.2f}× (per round: "
          f"{', '.join(f'{r:.2f}' for r in matmul_ratios)}); jax step compiled {compiles}×")
    profile = print_profile(jx, a.profile) if a.profile else None
    if layouts:
        print(f"xla attention, heads-first layout (the CPU's) against the grouped one (TPU's; first-step loss "
              f"{loss_grouped:.6f}): step throughput "
              f"{statistics.median(layouts):.2f}× (per round: {', '.join(f'{r:.2f}' for r in layouts)})")
    return dict(profile=profile, layout_ratio=statistics.median(layouts) if layouts else None,
                loss_grouped=loss_grouped if layouts else None, tokens_per_step=tokens, loss_jax=loss_jax,
                loss_torch=loss_torch, compile_s=compile_s,
                jax_compiles=compiles, rounds=rounds, ratios=ratios, ratio=ratio, jax_step=tj, torch_step=tt,
                jax_tokens_per_sec=tokens / tj, torch_tokens_per_sec=tokens / tt,
                matmuls=matmuls, matmul_ratios=matmul_ratios, matmul_ratio=matmul_ratio)


if __name__ == "__main__":
    main()
