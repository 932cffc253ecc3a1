"""Our decoder's training step against transformers' LlamaForCausalLM in PyTorch, same dims, fp32, CPU.

    python benchmarks/decoder_vs_torch.py [--layers 4] [--hidden 512] [--seq 512] [--batch 4] [--steps 10]

Prints step time and tokens/s of each and the ratio (JAX / PyTorch). Both take a full AdamW step
(forward, backward, update) on the same batch shape; both run in this process, one after the other.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from flax import nnx

import cambrian_jax  # noqa: F401  (flax flags)
from cambrian_jax.config import DecoderConfig
from cambrian_jax.decoder import Decoder
from cambrian_jax.train_step import token_losses


def jax_step_time(cfg: DecoderConfig, batch: int, seq: int, steps: int) -> float:
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    params = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(0).normal(0, 0.02, a.shape), a.dtype),
                          abstract)
    tx = optax.adamw(1e-4)
    opt = tx.init(params)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    mask = jnp.ones((batch, seq), bool)

    def loss(p):
        dec = nnx.merge(graphdef, p)
        logits = dec.logits(dec(dec.embed(ids), pos, mask))
        total, count = token_losses(logits, ids)
        return total / count

    @jax.jit
    def step(p, o):
        l, g = jax.value_and_grad(loss)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, l

    params, opt, l = step(params, opt)
    l.block_until_ready()
    t = time.perf_counter()
    for _ in range(steps):
        params, opt, l = step(params, opt)
    l.block_until_ready()
    return (time.perf_counter() - t) / steps


def torch_step_time(cfg: DecoderConfig, batch: int, seq: int, steps: int) -> float:
    hf = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                                  rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                                  max_position_embeddings=cfg.max_position_embeddings, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    cfg = DecoderConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3 // 64 * 64,
                        num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads)
    tokens = a.batch * a.seq
    print(f"decoder: {a.layers} layers, hidden {a.hidden}, {a.heads}/{a.kv_heads} heads, vocab {a.vocab}; "
          f"batch {a.batch} × {a.seq} tokens; fp32 on {jax.devices()[0].platform}, torch threads "
          f"{torch.get_num_threads()}")
    tj = jax_step_time(cfg, a.batch, a.seq, a.steps)
    tt = torch_step_time(cfg, a.batch, a.seq, a.steps)
    print(f"{'':8s} {'step (s)':>9s} {'tokens/s':>10s}")
    print(f"{'jax':8s} {tj:9.3f} {tokens / tj:10.0f}")
    print(f"{'pytorch':8s} {tt:9.3f} {tokens / tt:10.0f}")
    print(f"ratio jax/pytorch throughput: {tt / tj:.2f}×")


if __name__ == "__main__":
    main()
