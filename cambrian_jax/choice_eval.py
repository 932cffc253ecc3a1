"""Held-out multiple-choice accuracy, with images and with images blanked (paper Fig. 3).

Greedy decoding of a few tokens per question, then CV-Bench's answer extraction (spec §8.1). The
blind run replaces every image with a uniform grey one of the same size, so only the question and
the image's shape are left: a model that reads the image drops to about chance there.
"""
from __future__ import annotations

import collections
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from cambrian_jax import preprocess
from cambrian_jax.config import CambrianConfig
from cambrian_jax.data import synthetic, templates
from cambrian_jax.data.tokenizer import load_tokenizer
from cambrian_jax.model import Cambrian, static_layout


def blank_like(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, (128, 128, 128))


def greedy_answers(model: Cambrian, cfg: CambrianConfig, tokenizer, template: str, samples: Sequence[dict],
                   blind: bool = False, max_new_tokens: int = 4, batch_size: int = 32) -> list[str]:
    """Greedy continuations of each sample's first user turn (full forward per new token)."""
    graphdef, state = nnx.split(model)
    towers = cfg.towers

    @jax.jit
    def next_tokens(state, ids, pixels, tower_masks, mask, last):
        logits = nnx.merge(graphdef, state)(ids, pixels, tower_masks, mask, jnp.maximum(jnp.cumsum(mask, -1) - 1, 0))
        return jnp.argmax(jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], axis=-1)

    answers = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        images = [blank_like(s["image"]) if blind else s["image"] for s in chunk]
        prompts = [templates.build_prompt(template, [s["conversations"][0]]) for s in chunk]
        ids = [templates.tokenize_prompt(p, tokenizer) for p in prompts]
        lay = static_layout(cfg, ids, [im.size for im in images], pad_id=0)
        width = lay["input_ids"].shape[1] + max_new_tokens
        if width > cfg.max_len:
            raise ValueError(f"evaluation prompts need {width} positions, more than model.max_len={cfg.max_len}")
        rows = len(chunk)
        pad = batch_size - rows  # fixed shapes: one compile for every chunk
        buf = np.zeros((batch_size, cfg.max_len), np.int32)
        mask = np.zeros((batch_size, cfg.max_len), bool)
        buf[:rows, :lay["input_ids"].shape[1]] = lay["input_ids"]
        mask[:rows, :lay["attention_mask"].shape[1]] = lay["attention_mask"]
        lengths = np.zeros(batch_size, np.int64)
        lengths[:rows] = [len(i) - 1 + cfg.connector.block_len for i in ids]
        lengths[rows:] = 1
        pixels = [np.stack([preprocess.preprocess(im, t) for im in images] +
                           [np.zeros((t.image_size, t.image_size, 3), np.float32)] * pad) for t in towers]
        tmasks = [np.concatenate([m, np.ones((pad, m.shape[1]), bool)]) for m in lay["tower_masks"]]
        out = np.zeros((batch_size, max_new_tokens), np.int64)
        for j in range(max_new_tokens):
            tok = np.asarray(next_tokens(state, buf, pixels, tmasks, mask, jnp.asarray(lengths - 1)))
            out[:, j] = tok
            buf[np.arange(batch_size), lengths] = tok
            mask[np.arange(batch_size), lengths] = True
            lengths += 1
        answers += [tokenizer.decode(o).strip() for o in out[:rows]]
    return answers


def score(samples: Sequence[dict], answers: Sequence[str], blind: Sequence[str]) -> dict:
    per = collections.defaultdict(lambda: [0, 0, 0])
    for s, a, b in zip(samples, answers, blind):
        task = s["meta"]["task"]
        per[task][0] += synthetic.is_correct(a, s["meta"]["answer"])
        per[task][1] += synthetic.is_correct(b, s["meta"]["answer"])
        per[task][2] += 1
    per_task = {t: dict(accuracy=c / n, accuracy_blind=cb / n, chance=synthetic.CHANCE[t], count=n)
                for t, (c, cb, n) in sorted(per.items())}
    total = sum(v["count"] for v in per_task.values())

    def mean(key):
        return sum(v[key] * v["count"] for v in per_task.values()) / total

    return dict(accuracy=mean("accuracy"), accuracy_blind=mean("accuracy_blind"), chance=mean("chance"),
                num_questions=total, per_task=per_task)


def evaluate_synthetic(config, cfg: CambrianConfig, model: Cambrian, workdir) -> dict:
    """The tiny run's held-out evaluation on the synthetic test split."""
    ev = config.eval
    tokenizer = load_tokenizer(config.data.get("tokenizer_dir") or f"{workdir}/tokenizer")
    samples = synthetic.generate(ev.num_samples, "test", tuple(ev.tasks), seed=config.data.synthetic.seed)
    template = config.data.template
    answers = greedy_answers(model, cfg, tokenizer, template, samples)
    blind = greedy_answers(model, cfg, tokenizer, template, samples, blind=True)
    return score(samples, answers, blind)


def format_results(r: dict) -> str:
    lines = [f"{'task':10s} {'accuracy':>9s} {'blind':>7s} {'chance':>7s} {'n':>5s}"]
    for t, v in r["per_task"].items():
        lines.append(f"{t:10s} {v['accuracy']:9.3f} {v['accuracy_blind']:7.3f} {v['chance']:7.3f} {v['count']:5d}")
    lines.append(f"{'all':10s} {r['accuracy']:9.3f} {r['accuracy_blind']:7.3f} {r['chance']:7.3f} "
                 f"{r['num_questions']:5d}")
    return "\n".join(lines)
