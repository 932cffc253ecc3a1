"""Peak host memory of importing a Hugging Face LLM checkpoint (cambrian_jax.pretrained.load_llm).

    python benchmarks/import_memory.py [--gb 1.0] [--dir /tmp/cambrian_import_bench] [--keep] \
        [--hidden 1024] [--vocab 32000]

Writes a random Llama-style checkpoint of about --gb gigabytes (float32, sharded safetensors with an
index) and imports it in fresh subprocesses, printing peak RSS against the checkpoint size:

  streamed  load_llm: each target array is built from its source tensors one tensor at a time
  in-memory the whole state dict read into numpy, converted with hf_llama.from_hf, then placed
            (what a loader without streaming does), for comparison

On CPU the device arrays live in host memory too, so the floor is one checkpoint's worth (the
loaded parameters themselves); the figure to watch is the peak above that.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import os, resource, sys, time
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, {root!r})
import jax, numpy as np
import cambrian_jax
from cambrian_jax import pretrained
from cambrian_jax.convert import hf_llama
from cambrian_jax.convert.hf_llama import decoder_config_from_hf

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

base = rss_mb()
t0 = time.time()
if {mode!r} == "streamed":
    dec, cfg = pretrained.load_llm({folder!r})
    leaves = jax.tree.leaves(dec)
else:
    import json
    from cambrian_jax.convert.safetensors_io import open_checkpoint
    reader = open_checkpoint({folder!r})
    cfg = decoder_config_from_hf(json.load(open(os.path.join({folder!r}, "config.json"))))
    sd = {{k: reader[k] for k in reader}}
    params = hf_llama.from_hf(cfg, sd)
    del sd
    leaves = [jax.device_put(v) for v in params.values()]
    del params
jax.block_until_ready(leaves)
elapsed = time.time() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT", base, peak, rss_mb(), elapsed)
"""


def write_checkpoint(folder: str, gb: float, hidden: int = 1024, vocab: int = 32000) -> int:
    """A random Llama checkpoint of about `gb` GB (at least one layer): MLP 4 × hidden, head size 64,
    half as many KV heads, layers to size."""
    sys.path.insert(0, ROOT)
    import numpy as np

    from cambrian_jax.export_hf import write_sharded

    h, f, v = hidden, 4 * hidden, vocab
    heads = max(2, h // 64)
    kv = heads // 2
    d = h // heads
    per_layer = (h * h * 2 + 2 * h * kv * d + 3 * h * f + 2 * h) * 4
    layers = max(1, round((gb * 1e9 - (2 * v * h + h) * 4) / per_layer))
    rng = np.random.default_rng(0)

    def rand(shape):
        return lambda: (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)

    entries = [("model.embed_tokens.weight", (v, h), rand((v, h)))]
    for i in range(layers):
        p = f"model.layers.{i}."
        entries += [(p + "self_attn.q_proj.weight", (h, h), rand((h, h))),
                    (p + "self_attn.k_proj.weight", (kv * d, h), rand((kv * d, h))),
                    (p + "self_attn.v_proj.weight", (kv * d, h), rand((kv * d, h))),
                    (p + "self_attn.o_proj.weight", (h, h), rand((h, h))),
                    (p + "mlp.gate_proj.weight", (f, h), rand((f, h))),
                    (p + "mlp.up_proj.weight", (f, h), rand((f, h))),
                    (p + "mlp.down_proj.weight", (h, f), rand((h, f))),
                    (p + "input_layernorm.weight", (h,), lambda: np.ones(h, np.float32)),
                    (p + "post_attention_layernorm.weight", (h,), lambda: np.ones(h, np.float32))]
    entries += [("model.norm.weight", (h,), lambda: np.ones(h, np.float32)), ("lm_head.weight", (v, h), rand((v, h)))]
    os.makedirs(folder, exist_ok=True)
    summary = write_sharded(entries, __import__("pathlib").Path(folder), np.float32, "400MB")
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=v, hidden_size=h,
                  intermediate_size=f, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                  rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192, hidden_act="silu",
                  tie_word_embeddings=False, torch_dtype="float32")
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    return summary["total_size"]


def measure(folder: str, mode: str) -> dict:
    code = CHILD.format(root=ROOT, folder=folder, mode=mode)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = [x for x in run.stdout.splitlines() if x.startswith("RESULT")]
    if run.returncode or not line:
        raise RuntimeError(f"{mode} import failed:\n{run.stdout}\n{run.stderr[-3000:]}")
    base, peak, end, elapsed = map(float, line[0].split()[1:])
    return dict(mode=mode, base_mb=base, peak_mb=peak, end_mb=end, seconds=elapsed)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--dir", default="/tmp/cambrian_import_bench")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    parser.add_argument("--modes", default="streamed,in-memory")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args(argv)
    t0 = time.time()
    size = write_checkpoint(args.dir, args.gb, args.hidden, args.vocab)
    ckpt_mb = size / 2**20
    print(f"checkpoint: {ckpt_mb:.0f} MiB of float32 tensors in {args.dir} (written in {time.time() - t0:.0f}s)")
    out = dict(checkpoint_mb=ckpt_mb, modes={})
    try:
        for mode in args.modes.split(","):
            r = measure(args.dir, mode)
            extra = r["peak_mb"] - r["base_mb"]
            r["ratio"] = extra / ckpt_mb
            out["modes"][mode] = r
            print(f"{mode:>9}: peak RSS {r['peak_mb']:.0f} MiB = baseline {r['base_mb']:.0f} + {extra:.0f} MiB "
                  f"({r['ratio']:.2f}× the checkpoint; the loaded parameters themselves are 1.00×), "
                  f"{r['seconds']:.1f}s")
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
