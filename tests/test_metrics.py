"""The figures the trainer logs (metrics.jsonl, cambrian_jax/trainer.py Trainer._loop), recomputed from
what the run was fed: conftest's micro run, its data rebuilt from its recorded config.

Per logged record, over the steps since the previous record of the same stage (the logging window):
  supervised_tokens   labels ≠ IGNORE_INDEX at the positions the loss reads (labels[:, 1:], the
                      next-token targets), summed over the window's batches;
  tokens_per_sec      batch tokens (global batch × max_len, padding included) per second of the
                      window: times step_time (the window's seconds per step) it is the batch size;
  mfu, tflops_per_device
                      cambrian_jax/flops.py's FLOPs per step for the stage's trainable parameters
                      over step_time, per peak of all devices (flops.peak_flops) / per device.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from cambrian_jax import flops, optim, workdir
from cambrian_jax.config import IGNORE_INDEX, from_dict
from cambrian_jax.data import pipeline
from cambrian_jax.model import Cambrian


@pytest.fixture(scope="module")
def run(micro_workdir, tmp_path_factory):
    """(records, recorded config, model config, [per stage: supervised tokens of each batch fed])."""
    wd = Path(micro_workdir[0])
    records = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    config = workdir.config(wd)
    model_cfg = from_dict(config.model)
    # The run's own tokenizer, in a copy (the shared workdir is not written to).
    local = tmp_path_factory.mktemp("metrics")
    shutil.copytree(wd / "tokenizer", local / "tokenizer")
    fed = {}
    for n in config.stages:
        steps = int(config[f"stage{n}"].num_steps)
        data, _ = pipeline.stage_dataset(config, config[f"stage{n}"], model_cfg, local, 0, 1)
        # An uninterrupted stage: step s trained on the stage iterator's batch s - 1.
        fed[n] = [int((next(data)["labels"][:, 1:] != IGNORE_INDEX).sum()) for _ in range(steps)]
        data.close()
    return records, config, model_cfg, fed


def _windows(records):
    """(record, steps of its window) for every record, in order."""
    last = {}
    for r in records:
        start = last.get(r["stage"], 0)
        yield r, range(start + 1, r["step"] + 1)
        last[r["stage"]] = r["step"]


def test_supervised_tokens_are_the_shifted_labels_of_the_batches_fed(run):
    records, config, _, fed = run
    assert {r["stage"] for r in records} == set(config.stages)
    for r, window in _windows(records):
        want = sum(fed[r["stage"]][s - 1] for s in window)
        assert r["supervised_tokens"] == want, (r["stage"], r["step"], list(window), fed[r["stage"]])
    # Every window spans more than one batch: the last batch's count alone would be short.
    assert all(len(window) >= 2 and fed[r["stage"]][-1] for r, window in _windows(records)), fed


def test_throughput_and_mfu_agree_with_step_time_and_the_flop_account(run, micro_workdir):
    records, config, model_cfg, _ = run
    account = {}
    model = nnx.eval_shape(lambda: Cambrian(model_cfg, rngs=nnx.Rngs(0)))
    paths = [optim.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.split(model, nnx.Param)[1])]
    for r, window in _windows(records):
        n = r["stage"]
        stage = config[f"stage{n}"]
        gb = int(stage.global_batch_size)
        meta = json.loads((Path(micro_workdir[0]) / f"stage{n}" / str(r["step"]) / "meta" / "metadata").read_text())
        devices = int(np.prod(list(meta["mesh"].values())))
        trainable = optim.check_trainable(paths, list(stage.trainable), f"stage{n}.trainable")
        per_step = account[n] = flops.train_flops_per_step(model_cfg, gb, trainable)
        peak = flops.peak_flops(jax.devices("cpu")[0]) * devices        # the run is on CPU (conftest)
        # Identities of float64 divisions of the same two numbers (tokens, window seconds): 1e-12.
        assert r["tokens_per_sec"] * r["step_time"] == pytest.approx(gb * model_cfg.max_len, rel=1e-12)
        assert r["mfu"] * peak * r["step_time"] == pytest.approx(per_step, rel=1e-12)
        assert r["tflops_per_device"] * 1e12 * devices * r["step_time"] == pytest.approx(per_step, rel=1e-12)
        assert 0 < r["data_time"] < r["step_time"]      # the data wait is part of each step's time
    # The account depends on what trains (stage 1 the connector, stage 2 also the decoder and towers),
    # so a stage logged with the other's trainable set would not pass.
    assert account[2] > 1.2 * account[1], account
