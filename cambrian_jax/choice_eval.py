"""The trainer's held-out evaluation: the synthetic test split, with images and with images blanked.

It is the evaluation harness (cambrian_jax.evaluation) on the synthetic dataset's test split: the
prompts as the dataset writes them (question, lettered choices, CV-Bench's instruction), greedy
decoding of a few tokens with the KV cache (cambrian_jax.generate), the reference's answer
extraction, and a blind pass with every image replaced by a uniform grey one of the same size
(paper Fig. 3): a model that reads the image drops to about chance there.
"""
from __future__ import annotations

from cambrian_jax.config import CambrianConfig
from cambrian_jax.data import synthetic
from cambrian_jax.data.tokenizer import load_tokenizer
from cambrian_jax.evaluation import benchmarks, harness
from cambrian_jax.evaluation.benchmarks import BenchmarkSpec
from cambrian_jax.evaluation.harness import blank_like  # noqa: F401  (kept for callers of the old module)


def synthetic_items(num: int, tasks, seed: int = 0) -> list[benchmarks.Item]:
    """The first `num` samples of the synthetic test split as evaluation items (images in memory)."""
    return [benchmarks.item_from_record(s, ".", i) for i, s in enumerate(synthetic.generate(num, "test", tuple(tasks),
                                                                                           seed=seed))]


def evaluate_synthetic(config, cfg: CambrianConfig, model, workdir) -> dict:
    """The tiny run's held-out evaluation on the synthetic test split:
    {accuracy, accuracy_blind, chance, num_questions, per_task: {task: {accuracy, accuracy_blind, chance, count}}}."""
    from cambrian_jax.generate import Generator, Sampling

    ev = config.eval
    tokenizer = load_tokenizer(config.data.get("tokenizer_dir") or f"{workdir}/tokenizer")
    items = synthetic_items(ev.num_samples, ev.tasks, config.data.synthetic.seed)
    gen = Generator(model, tokenizer, config.data.template, cfg=cfg, image_mode=config.data.get("image_mode", "pad"))
    spec = BenchmarkSpec("synthetic", None, int(ev.get("max_new_tokens", 4)))
    return harness.evaluate(gen, items, spec, sampling=Sampling(max_new_tokens=spec.max_new_tokens),
                            blind=True, batch_size=int(ev.get("batch_size", 32)))


def format_results(r: dict) -> str:
    lines = [f"{'task':10s} {'accuracy':>9s} {'blind':>7s} {'chance':>7s} {'n':>5s}"]
    for t, v in r["per_task"].items():
        lines.append(f"{t:10s} {v['accuracy']:9.3f} {v['accuracy_blind']:7.3f} {v['chance']:7.3f} {v['count']:5d}")
    lines.append(f"{'all':10s} {r['accuracy']:9.3f} {r['accuracy_blind']:7.3f} {r['chance']:7.3f} "
                 f"{r['num_questions']:5d}")
    return "\n".join(lines)
