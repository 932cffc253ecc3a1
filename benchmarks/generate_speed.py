"""Generation speed: prefill time and decode tokens/s with the KV cache, per batch size.

    python benchmarks/generate_speed.py [--config configs/cambrian_tiny.py] [--batch 1,4,8] \
        [--text-tokens 64] [--new-tokens 128] [--decoder num_layers=8,hidden_size=512] [--dtype bfloat16]

Random weights (cambrian_jax.model.init_model) of any config; prompts of `image_position` random
tokens, the image (640×480, so the padding masks are used), `--text-tokens` more; no stop ids, so
every row generates exactly --new-tokens. For each batch size: one warm-up call (compiles), then
--repeats timed calls. Prints prefill seconds (towers, connector, decoder and in-LLM aggregators over
the whole prompt), decode seconds and tokens/s (new tokens of all rows / decode time), and how many
programs were compiled — one prefill and one decode loop per (batch, cache length) bucket, whatever
the number of tokens or calls.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from cambrian_jax import config as config_lib  # noqa: E402
from cambrian_jax import generate  # noqa: E402
from cambrian_jax.config import IMAGE_TOKEN_INDEX  # noqa: E402
from cambrian_jax.generate import Generator, Sampling  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/cambrian_tiny.py", help="configs/x.py[:arg]")
    p.add_argument("--batch", default="1,4,8")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decoder", default="", help="overrides of model.decoder, e.g. num_layers=8,hidden_size=512")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    jax.config.update("jax_default_prng_impl", "unsafe_rbg")

    from cambrian_jax.export_hf import load_config_file
    from cambrian_jax.model import init_model

    run = load_config_file(a.config)
    model_dict = run.model.to_dict() if hasattr(run.model, "to_dict") else dict(run.model)
    for item in filter(None, a.decoder.split(",")):
        k, _, v = item.partition("=")
        old = model_dict["decoder"].get(k)
        model_dict["decoder"][k] = type(old)(v) if old is not None else float(v)
    if a.dtype:
        model_dict["dtype"] = a.dtype
    cfg = config_lib.from_dict(model_dict)
    cfg = dataclasses.replace(cfg, max_len=max(cfg.max_len, cfg.image_position + cfg.connector.block_len
                                                + a.text_tokens + a.new_tokens + 1))
    t = time.perf_counter()
    model = init_model(cfg, a.seed)
    jax.block_until_ready(jax.tree.leaves(model))
    print(f"model: {a.config} decoder {cfg.decoder.num_layers}×{cfg.decoder.hidden_size} "
          f"vocab {cfg.decoder.vocab_size}, image block {cfg.connector.block_len} at {cfg.image_position}, "
          f"dtype {cfg.dtype}; init {time.perf_counter() - t:.1f}s on {jax.devices()[0].device_kind} "
          f"×{jax.device_count()}")
    gen = Generator(model, cfg=cfg, stop_ids=())
    rng = np.random.default_rng(a.seed)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), np.uint8))
    sampling = Sampling(max_new_tokens=a.new_tokens)
    print(f"{'batch':>5s} {'prompt':>6s} {'cache':>6s} {'prefill s':>10s} {'decode s':>9s} {'tokens/s':>10s} "
          f"{'ms/step':>8s}")
    rows = []
    for b in [int(x) for x in a.batch.split(",")]:
        ids = [[int(i) for i in rng.integers(1, cfg.decoder.vocab_size, cfg.image_position)] + [IMAGE_TOKEN_INDEX]
               + [int(i) for i in rng.integers(1, cfg.decoder.vocab_size, a.text_tokens)] for _ in range(b)]
        images = [image] * b
        gen.generate_ids(ids, images, sampling)                    # compile
        pre, dec, new = [], [], 0
        for _ in range(a.repeats):
            out = gen.generate_ids(ids, images, sampling)
            pre.append(out.prefill_seconds)
            dec.append(out.decode_seconds)
            new = out.new_tokens
        pf, dc = float(np.median(pre)), float(np.median(dec))
        print(f"{b:5d} {out.prompt_len:6d} {out.cache_len:6d} {pf:10.4f} {dc:9.4f} {new / dc:10.1f} "
              f"{1000 * dc / a.new_tokens:8.2f}")
        rows.append(dict(batch=b, prompt=out.prompt_len, cache=out.cache_len, prefill_s=pf, decode_s=dc,
                         new_tokens=new, tokens_per_sec=new / dc, ms_per_step=1000 * dc / a.new_tokens))
    compiled = dict(prefill=generate._prefill._cache_size(), decode=generate._decode_fn()._cache_size())
    print(f"compiled programs: prefill {compiled['prefill']}, decode {compiled['decode']} (one each per batch size)")
    return dict(rows=rows, compiled=compiled)


if __name__ == "__main__":
    main()
