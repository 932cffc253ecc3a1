"""Data-path throughput on one core, and whether it keeps up with the training step it feeds.

    python benchmarks/data_throughput.py [--num 16] [--size 640x480] [--template llama_3] \
        [--feed configs/cambrian_tiny.py] [--feed-stage 2] [--feed-batches 8] [--feed-steps 10]

1. The per-record transform at the released tower sizes: decodes a JPEG, tokenises a LLaVA
   conversation, preprocesses for the four released towers (SigLIP 384, CLIP 336, DINOv2 378,
   ConvNeXt 1024) and builds the row of the batch contract, in the calling thread (as one grain
   worker does).
2. Feeding the step (--feed CONFIG; "none" skips it): the trainer's own pipeline for that config's
   stage (pipeline.stage_dataset, one read thread, no worker processes: one core) against the
   stage's training step on this machine (benchmarks/train_step.py). The pipeline is timed before
   and after the step, in the same process, and the ratio uses their mean: per-core samples/s ÷ the
   step's samples/s (global batch ÷ step time) — below 1, one core cannot keep up and the grain
   worker count must be at least the printed number.

Prints figures only; on another machine a worker count for a target step time is about
(global batch / process count) / (step seconds × samples/s per worker).
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cambrian_jax import config as C, preprocess  # noqa: E402
from cambrian_jax.data import pipeline, records, synthetic, templates  # noqa: E402
from cambrian_jax.data.testing import released_towers  # noqa: E402


def _timeit(fn, n):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def transform_table(num: int, size: str, template: str) -> dict:
    """Stage-by-stage cost of one record at the released tower sizes, on the calling thread."""
    w, h = map(int, size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        tok = synthetic.build_tiny_tokenizer(tmp, template)
    towers = released_towers()
    cfg = C.CambrianConfig(towers=towers, connector=C.ConnectorConfig(),
                           decoder=C.DecoderConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                                   num_layers=32, num_heads=4, num_kv_heads=4),
                           image_position=templates.image_position(template, tok), max_len=2048).validate()
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).filter(ImageFilter.GaussianBlur(2))
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    sample = synthetic.sample(0, tasks=("relation",))
    record = records.encode_record({"id": "x", "conversations": sample["conversations"], "image": "x.jpg"},
                                   jpeg, (w, h))
    transform = pipeline.RecordTransform(cfg, tok, template, cfg.max_len)
    transform_u8 = pipeline.RecordTransform(cfg, tok, template, cfg.max_len, pixel_format="uint8")

    def decode():
        im = Image.open(io.BytesIO(jpeg))
        im.load()
        return im

    img = decode()
    rows = [("JPEG decode", decode)]
    for t in towers:
        rows.append((f"{t.kind} {t.image_size}px (pad+resize+normalise)", lambda t=t: preprocess.preprocess(img, t)))
    rows.append(("4 towers, shared resizes", lambda: preprocess.preprocess_towers(img, towers)))
    rows.append(("tokenise + labels", lambda: templates.encode(template, tok, sample["conversations"],
                                                              image_position=cfg.image_position)))
    rows.append(("full record → batch row", lambda: transform((0, 0, record))))
    rows.append(("full record → batch row, uint8 pixels", lambda: transform_u8((0, 0, record))))
    print(f"one core, source image {w}×{h} JPEG ({len(jpeg) / 1024:.0f} KiB), template {template}, "
          f"max_len {cfg.max_len}")
    print(f"{'stage':<44}{'ms':>9}{'samples/s':>11}")
    table = {}
    for name, fn in rows:
        s = _timeit(fn, num)
        table[name] = 1 / s
        print(f"{name:<44}{1e3 * s:>9.2f}{1 / s:>11.1f}")
    row, row_u8 = transform((0, 0, record)), transform_u8((0, 0, record))
    mib = sum(v.nbytes for v in row.values()) / 2**20
    print(f"bytes per row: {mib:.1f} MiB (pixels float32: "
          + ", ".join(f"{t.image_size}px {row[f'pixels_{k}'].nbytes / 2**20:.1f}" for k, t in enumerate(towers))
          + f"); with uint8 pixels {sum(v.nbytes for v in row_u8.values()) / 2**20:.1f} MiB")
    return table


def pipeline_samples_per_second(config, stage_n: int, batches: int, workdir: str) -> tuple[float, dict]:
    """(samples/s, first batch) of the trainer's pipeline for the stage, on one read thread."""
    stage = config[f"stage{stage_n}"]
    model_cfg = C.from_dict(config.model)
    it, _ = pipeline.stage_dataset(config, stage, model_cfg, workdir, 0, 1)
    try:
        first = next(it)                     # starts the read thread; not timed
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - t
    finally:
        it.close()
    return batches * int(stage.global_batch_size) / seconds, first


def feed(spec: str, stage_n: int, batches: int, steps: int, warmup: int, batch: int = 0) -> dict:
    """The pipeline's per-core samples/s against the samples/s the stage's step consumes, same process."""
    from benchmarks import train_step as step_bench  # noqa: PLC0415  (imports JAX: only when feeding)

    config = step_bench.load_config(spec, batch=batch or None, stage=stage_n)
    gb = int(config[f"stage{stage_n}"].global_batch_size)
    config.data.worker_count = 0             # no worker processes …
    config.data.read_threads = 1             # … and one thread computing rows: one core
    config.data.cache_rows = False           # every timed row computed: the first epoch's cost
    if config.data.get("source") == "synthetic":     # generate only what is read (drawing is not timed)
        config.data.synthetic.num_samples = max(gb * (batches + 2), 16)
    with tempfile.TemporaryDirectory(prefix="cambrian_feed_") as workdir:     # the synthetic tokenizer
        before, first = pipeline_samples_per_second(config, stage_n, batches, workdir)
        step = step_bench.measure(config, stage_n, steps, warmup, baseline=False)
        after, _ = pipeline_samples_per_second(config, stage_n, batches, workdir)
    per_core = (before + after) / 2
    r = dict(config=spec, stage=stage_n, global_batch=gb, seq_len=step["seq_len"],
             pipeline_before=before, pipeline_after=after, pipeline_per_core=per_core,
             step_time=step["step_time"], step_samples_per_sec=step["samples_per_sec"],
             ratio=per_core / step["samples_per_sec"],
             cores_needed=math.ceil(step["samples_per_sec"] / per_core),
             batch_keys={k: (v.shape, str(v.dtype)) for k, v in first.items()})
    print(f"feeding {spec} stage {stage_n} (batch {gb} × {step['seq_len']} tokens) on {step['device_kind']}:")
    print(f"  pipeline, one core:  {before:8.1f} samples/s before the step, {after:8.1f} after "
          f"(mean {per_core:.1f})")
    print(f"  training step:       {step['samples_per_sec']:8.1f} samples/s ({step['step_time']:.4f} s per step of "
          f"{gb})")
    print(f"  one core supplies {r['ratio']:.2f}× what the step consumes: at least {r['cores_needed']} "
          f"core(s) (grain worker_count) to keep up")
    return r


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=16, help="repetitions per measurement")
    p.add_argument("--size", default="640x480", help="source image WxH (JPEG, quality 90)")
    p.add_argument("--template", default="llama_3")
    p.add_argument("--feed", default="configs/cambrian_tiny.py",
                   help="config whose stage the pipeline feeds (configs/x.py[:arg]), or 'none'")
    p.add_argument("--feed-stage", type=int, default=2, choices=(1, 2))
    p.add_argument("--feed-batch", type=int, default=0, help="global batch (default: the stage's)")
    p.add_argument("--feed-batches", type=int, default=8, help="pipeline batches timed, each time")
    p.add_argument("--feed-steps", type=int, default=10, help="training steps timed")
    p.add_argument("--feed-warmup", type=int, default=2)
    a = p.parse_args(argv)
    out = dict(table=transform_table(a.num, a.size, a.template))
    if a.feed != "none":
        print()
        out["feed"] = feed(a.feed, a.feed_stage, a.feed_batches, a.feed_steps, a.feed_warmup, a.feed_batch)
    return out


if __name__ == "__main__":
    main()
