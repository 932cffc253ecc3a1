"""Train Cambrian in two stages: `python -m cambrian_jax.train --config configs/x.py --workdir W`.

  --config configs/x.py:a=1,b   switches of the config's get_config (see each config's docstring)
  --config.a.b=value            override any config field
  --workdir DIR                 checkpoints, metrics.jsonl, tensorboard/ (gs://… for a TPU pod)
  --stage 1|2|all               which stages to run (all = config.stages: stage 1, then stage 2
                                from stage 1's final state; --stage 2 alone needs a finished stage 1)

Re-running the same command resumes from the latest complete checkpoint of the current stage; a
finished stage is not run again. The first run writes WORKDIR/config.json (the resolved config and
the command line); a later run with a different config refuses, naming the fields that differ.

Exit codes (cambrian_jax/cli.py): 0 done; 2 bad input (config, data, workdir of another config), one
line on stderr, checked before anything is created or compiled; 4 a non-finite loss stopped the run
(the last good checkpoint stays); 75 preempted: SIGTERM (a TPU maintenance event) saved a checkpoint
and the same command resumes.

Several processes: on a multi-host TPU slice `jax.distributed.initialize()` finds its peers by
itself (launch_tpu.sh runs this command on every worker); elsewhere pass --coordinator_address,
--num_processes and --process_id (on CPU the processes talk through gloo).
"""
from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and evaluation results.")
flags.DEFINE_enum("stage", "all", ["1", "2", "all"], "Which training stage(s) to run.")
flags.DEFINE_bool("dry_run", False, "Check the config (model, mesh, batch, stages, data fields) and the workdir's "
                  "record, print what would run, and exit: nothing is written or compiled.")
flags.DEFINE_string("metrics_dir", None, "metrics.jsonl and tensorboard/ (default: the workdir, or ./logs/NAME "
                    "when the workdir is on gs://).")
flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                  "Call jax.distributed.initialize(): auto = on a multi-host TPU slice or when "
                  "--num_processes > 1.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs off TPU).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs off TPU).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs off TPU).")


def _multihost_tpu() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def init_distributed() -> None:
    """jax.distributed.initialize() where several processes make one run (before any JAX computation)."""
    import jax  # noqa: PLC0415

    several = (FLAGS.num_processes or 1) > 1
    if FLAGS.distributed == "no" or (FLAGS.distributed == "auto" and not several and not _multihost_tpu()):
        return
    kwargs = {}
    if FLAGS.coordinator_address:
        kwargs = dict(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                      process_id=FLAGS.process_id)
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") and several:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def dry_run(config, workdir: str) -> None:
    """What `train` would do, checked as it checks before compiling; writes nothing."""
    from cambrian_jax import sharding  # noqa: PLC0415
    from cambrian_jax import workdir as workdir_lib  # noqa: PLC0415
    from cambrian_jax.trainer import TrainSetup, check_stage  # noqa: PLC0415

    setup = TrainSetup(config, sharding.make_mesh(dict(config.mesh)))
    stages = setup.stages if FLAGS.stage == "all" else (int(FLAGS.stage),)
    plans = [check_stage(setup, n) for n in stages]
    resumed = workdir_lib.check_or_write(workdir, config, write=False)
    print(f"config OK: stages {list(stages)} on mesh {dict(setup.mesh.shape)}; workdir {workdir} "
          f"{'holds this run (it would resume)' if resumed else 'is new'}")
    for p in plans:
        steps = int(p.stage.get("num_steps") or 0) or f"{p.stage.epochs} epoch(s)"
        print(f"  stage {p.n}: {steps} steps × {int(p.stage.global_batch_size)} rows, trains "
              f"{len(p.trainable_paths)} parameter arrays in groups {p.groups}")


class _QuietLibraries(pylogging.Filter):
    """Keep orbax's per-save INFO lines and JAX's backend probing ("Unable to initialize backend 'tpu'"
    on every machine without one) out of the training log (warnings still show)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return (record.levelno >= pylogging.WARNING
                or ("/orbax/" not in record.pathname and not record.pathname.endswith("xla_bridge.py")))


def main(argv) -> None:
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from cambrian_jax import cli  # noqa: PLC0415  (after flag parsing: --help stays fast)

    if FLAGS.config is None or FLAGS.workdir is None:
        cli.fail("usage: python -m cambrian_jax.train --config configs/cambrian_tiny.py --workdir DIR "
                 "[--stage 1|2|all]")
    from cambrian_jax import topology  # noqa: PLC0415
    topology.use_libtpu_flags()    # before JAX loads libtpu: the flags the planner compiled with
    init_distributed()
    from cambrian_jax import workdir as workdir_lib  # noqa: PLC0415
    from cambrian_jax.trainer import StageNotFinished, Trainer, TrainingStopped  # noqa: PLC0415

    config = FLAGS.config
    command = workdir_lib.command_line(sys.argv, cli.config_arg(sys.argv))
    if FLAGS.dry_run:
        cli.guarded(dry_run)(config, FLAGS.workdir)
        return
    trainer = cli.guarded(Trainer)(config, FLAGS.workdir, log_dir=FLAGS.metrics_dir, command=command)
    stages = trainer.stages if FLAGS.stage == "all" else (int(FLAGS.stage),)
    try:
        finished = cli.guarded(trainer.run)(stages)
    except StageNotFinished as e:
        cli.fail(str(e))
    except TrainingStopped as e:
        cli.fail(str(e), cli.EXIT_NON_FINITE)
    finally:
        trainer.close()
    if not finished:          # SIGTERM: a checkpoint was saved; the same command resumes
        sys.exit(cli.EXIT_PREEMPTED)
    if stages[-1] == trainer.stages[-1] and config.get("eval"):
        trainer.evaluate()


if __name__ == "__main__":
    from cambrian_jax import cli as _cli

    app.run(main, flags_parser=_cli.parse_absl_flags)
