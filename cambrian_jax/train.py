"""Train Cambrian in two stages: `python -m cambrian_jax.train --config configs/x.py --workdir W`.

  --stage 1|2|all    which stages to run (default all: stage 1, then stage 2 from its final state)
  --config.a.b=v     override any config field; --config configs/x.py:arg passes get_config(arg)

Re-running the same command resumes from the latest complete checkpoint of the current stage; a
finished stage is not run again. SIGTERM (a TPU maintenance event) saves a checkpoint and exits.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and evaluation results.")
flags.DEFINE_enum("stage", "all", ["1", "2", "all"], "Which training stage(s) to run.")


def main(argv) -> None:
    del argv
    if FLAGS.config is None or FLAGS.workdir is None:
        sys.exit("usage: python -m cambrian_jax.train --config configs/cambrian_tiny.py --workdir DIR")
    from cambrian_jax.trainer import Trainer  # after flag parsing, so --help stays fast

    config = FLAGS.config
    if config.get("distributed", False):
        import jax
        jax.distributed.initialize()
    trainer = Trainer(config, Path(FLAGS.workdir))
    stages = (1, 2) if FLAGS.stage == "all" else (int(FLAGS.stage),)
    for stage in stages:
        trainer.run_stage(stage)
    if FLAGS.stage in ("all", "2") and config.get("eval"):
        trainer.evaluate()


if __name__ == "__main__":
    app.run(main)
