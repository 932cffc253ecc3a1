"""Data-path throughput on one core: samples/s per worker for the full per-record transform.

    python benchmarks/data_throughput.py [--num 16] [--size 640x480] [--template llama_3]

Decodes a JPEG, tokenises a LLaVA conversation, preprocesses for the four released towers
(SigLIP 384, CLIP 336, DINOv2 378, ConvNeXt 1024) and builds the row of the batch contract, in the
calling thread (as one grain worker does). Prints figures only; a grain worker count for a target
step time is about (global batch / process count) / (step seconds × samples/s per worker).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cambrian_jax import config as C, preprocess  # noqa: E402
from cambrian_jax.data import pipeline, records, synthetic, templates  # noqa: E402
from cambrian_jax.data.testing import released_towers  # noqa: E402


def _timeit(fn, n):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=16, help="repetitions per measurement")
    p.add_argument("--size", default="640x480", help="source image WxH (JPEG, quality 90)")
    p.add_argument("--template", default="llama_3")
    a = p.parse_args(argv)
    w, h = map(int, a.size.split("x"))

    tok = synthetic.build_tiny_tokenizer(tempfile.mkdtemp(), a.template)
    towers = released_towers()
    cfg = C.CambrianConfig(towers=towers, connector=C.ConnectorConfig(),
                           decoder=C.DecoderConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                                   num_layers=32, num_heads=4, num_kv_heads=4),
                           image_position=templates.image_position(a.template, tok), max_len=2048).validate()
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).filter(
        __import__("PIL.ImageFilter", fromlist=["GaussianBlur"]).GaussianBlur(2))
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    sample = synthetic.sample(0, tasks=("relation",))
    record = records.encode_record({"id": "x", "conversations": sample["conversations"], "image": "x.jpg"},
                                   jpeg, (w, h))
    transform = pipeline.RecordTransform(cfg, tok, a.template, cfg.max_len)
    transform_u8 = pipeline.RecordTransform(cfg, tok, a.template, cfg.max_len, pixel_format="uint8")

    def decode():
        im = Image.open(io.BytesIO(jpeg))
        im.load()
        return im

    img = decode()
    rows = [("JPEG decode", lambda: decode())]
    for t in towers:
        rows.append((f"{t.kind} {t.image_size}px (pad+resize+normalise)", lambda t=t: preprocess.preprocess(img, t)))
    rows.append(("4 towers, shared resizes", lambda: preprocess.preprocess_towers(img, towers)))
    rows.append(("tokenise + labels", lambda: templates.encode(a.template, tok, sample["conversations"],
                                                              image_position=cfg.image_position)))
    rows.append(("full record → batch row", lambda: transform((0, 0, record))))
    rows.append(("full record → batch row, uint8 pixels", lambda: transform_u8((0, 0, record))))
    print(f"one core, source image {w}×{h} JPEG ({len(jpeg) / 1024:.0f} KiB), template {a.template}, "
          f"max_len {cfg.max_len}")
    print(f"{'stage':<44}{'ms':>9}{'samples/s':>11}")
    for name, fn in rows:
        s = _timeit(fn, a.num)
        print(f"{name:<44}{1e3 * s:>9.2f}{1 / s:>11.1f}")
    row, row_u8 = transform((0, 0, record)), transform_u8((0, 0, record))
    mib = sum(v.nbytes for v in row.values()) / 2**20
    print(f"bytes per row: {mib:.1f} MiB (pixels float32: "
          + ", ".join(f"{t.image_size}px {row[f'pixels_{k}'].nbytes / 2**20:.1f}" for k, t in enumerate(towers))
          + f"); with uint8 pixels {sum(v.nbytes for v in row_u8.values()) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
