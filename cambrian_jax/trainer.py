"""The two-stage trainer: sharded state, one compiled step per stage, orbax checkpoints, metrics.

A stage is: a trainable filter and learning-rate groups from the config (optim.py), the stage's
data (data.pipeline.stage_dataset), the one step function (train_step.py) compiled once with
explicit shardings and a donated state, and a loop that logs, checkpoints and stops cleanly.

On disk, under WORKDIR:

  stage{n}/<step>/state    trainable parameters, their optimizer state, the step (orbax, sharded)
  stage{n}/<step>/data     the data iterator's position (JSON; the same on every host)
  stage{n}/<step>/meta     stage, step, total steps, whether the stage finished (JSON)
  stage{n}/<step>/params   all parameters (only in a stage's final checkpoint: the next stage's start)
  stage{n}_frozen/         the stage's frozen parameters, saved once before its first step
  metrics.jsonl, tensorboard/   one record per logged step (process 0)

Checkpoints are written asynchronously, and orbax makes each one visible only once complete (a
temporary directory renamed at the end), so a save cut short by a kill is never restored. A
resumed stage restores the latest complete checkpoint, onto whatever mesh the config now
describes, and continues with exactly the batches and updates an uninterrupted run would make.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from cambrian_jax import config as config_lib
from cambrian_jax import flops, optim, sharding
from cambrian_jax import workdir as workdir_lib
from cambrian_jax.config import ConfigError
from cambrian_jax.model import Cambrian
from cambrian_jax.train_step import make_step


class TrainingStopped(RuntimeError):
    """A non-finite loss: the run stops, the last good checkpoint stays."""


class StageNotFinished(RuntimeError):
    """Stage 2 was asked to start from a stage 1 that has not finished in this workdir."""


class Preemption:
    """SIGTERM (TPU maintenance, a scheduler) asks for a checkpoint and a clean exit.

    One process: a SIGTERM handler sets a flag, read after each step. Several processes: JAX's
    preemption sync point (jax.distributed's service watches SIGTERM on every host), so all hosts
    agree on the step at which they save and stop.
    """

    def __init__(self):
        self.requested = False
        self.multihost = jax.process_count() > 1
        self._previous = None
        if not self.multihost:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:        # not the main thread: no handler, no preemption checkpoint
                self._previous = None

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
        self.requested = True

    def reached(self, step: int) -> bool:
        if self.multihost:
            from jax.experimental import multihost_utils  # noqa: PLC0415
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class MetricsWriter:
    """metrics.jsonl (one object per logged step) and TensorBoard event files, on process 0."""

    def __init__(self, log_dir: Path):
        self.active = jax.process_index() == 0
        self.file = self.tb = None
        if not self.active:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(log_dir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter  # noqa: PLC0415
            self.tb = SummaryWriter(str(log_dir / "tensorboard"))
        except ImportError:  # optional: metrics.jsonl stays the record
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in _flat(record).items():
                if isinstance(v, (int, float)) and k not in ("step", "stage"):
                    self.tb.add_scalar(f"stage{record['stage']}/{k}", v, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        self.file = self.tb = None


def _flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Progress:
    """A progress bar with ETA on an interactive terminal (process 0); plain log lines otherwise."""

    def __init__(self, stage: int, start: int, total: int):
        self.stage, self.start, self.total = stage, start, total
        self.t0 = time.perf_counter()
        self.bar = None
        if jax.process_index() == 0 and sys.stderr.isatty():
            try:
                from tqdm import tqdm  # noqa: PLC0415
                self.bar = tqdm(total=total, initial=start, desc=f"stage {stage}", unit="step", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, rec: dict[str, Any]) -> None:
        lr = " ".join(f"{k}={v:.2e}" for k, v in rec["lr"].items())
        summary = (f"loss {rec['loss']:.4f} grad_norm {rec['grad_norm']:.3f} lr {lr} "
                   f"{rec['tokens_per_sec']:.0f} tok/s {rec['step_time']:.3f} s/step "
                   f"{rec['tflops_per_device']:.2f} TFLOP/s/device MFU {100 * rec['mfu']:.1f}%")
        if self.bar is not None:
            # The bar keeps the few figures that fit beside it at any width; the whole line goes above it.
            self.bar.set_postfix_str(f"loss {rec['loss']:.4f}", refresh=True)
            self.bar.write(f"stage {self.stage} step {step}/{self.total}: {summary}", file=sys.stderr)
            return
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        eta = (self.total - step) * elapsed / done if done else float("nan")
        logging.info("stage %d step %d/%d (ETA %s) %s", self.stage, step, self.total, _duration(eta), summary)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclasses.dataclass
class StagePlan:
    """What a stage trains, worked out (and checked) before anything is compiled."""
    n: int
    stage: Any                       # the config section stage{n}
    keep: Any                        # nnx filter of the trainable parameters
    trainable_paths: list[str]
    groups: dict[str, int]           # learning-rate group → number of parameters
    abs_train: nnx.State
    abs_frozen: nnx.State
    sh_train: Any
    sh_frozen: Any

    @property
    def has_frozen(self) -> bool:
        return bool(jax.tree.leaves(self.abs_frozen))


def abstract(shapes, shardings):
    """ShapeDtypeStructs carrying their shardings: what a step is lowered with, and restored into."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


@dataclasses.dataclass
class StageProgram:
    """A stage's optimizer, abstract train state and jitted step, built once by TrainSetup.program:
    the trainer compiles and runs it, the planner (cambrian_jax.plan) compiles it for a topology."""
    plan: StagePlan
    tx: Any
    schedules: dict[str, Any]        # learning-rate group → schedule
    sh_opt: Any
    abs_state: dict                  # {'params', 'opt', 'step'} as sharded ShapeDtypeStructs
    abs_frozen: Any
    batch_sharding: Any
    step: Any                        # jax.jit(train_step.train) with explicit shardings, state donated
    rules: list
    mesh: Any

    def lower(self, abs_batch: dict):
        # Traced inside the rules context: model code's activation constraints resolve against it.
        with sharding.rules_context(self.rules, self.mesh):
            return self.step.lower(self.abs_state, self.abs_frozen, abs_batch)


class TrainSetup:
    """What a config describes, abstractly (nothing allocated): the model's parameter tree and
    shardings on a mesh, each stage's plan, and each stage's program. The trainer runs these; the
    planner compiles the very same programs for a topology it only simulates."""

    def __init__(self, config, mesh, process_count: int | None = None):
        self.config = config
        self.model_cfg = config_lib.from_dict(config.model)
        self.mesh = mesh
        self.process_count = jax.process_count() if process_count is None else process_count
        self.rules = [tuple(r) for r in config.sharding_rules]
        self.loss_chunk = int(config.get("loss_chunk", 0) or 0)
        if self.loss_chunk < 0:
            raise ConfigError(f"config field loss_chunk: {self.loss_chunk} must be 0 (the whole logits at once) or "
                              "a positive number of positions per chunk")
        self.stages = tuple(int(s) for s in config.get("stages", (1, 2)))
        if not self.stages or set(self.stages) - {1, 2} or list(self.stages) != sorted(set(self.stages)):
            raise ConfigError(f"config field stages: {self.stages} must be (1, 2), (1,) or (2,)")
        model = nnx.eval_shape(lambda: Cambrian(self.model_cfg, rngs=nnx.Rngs(config.seed)))
        self.graphdef, self.abstract_params = nnx.split(model, nnx.Param)
        self.param_shardings = sharding.state_shardings(self.abstract_params, self.rules, self.mesh)
        self.param_paths = [optim.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(self.abstract_params)]

    def plan(self, n: int) -> StagePlan:
        """Stage n's trainable split, checked (batch over the mesh, trainable patterns, LR groups)."""
        field = f"stage{n}"
        stage = self.config.get(field)
        if stage is None:
            raise ConfigError(f"config field {field}: missing, but config.stages = {self.stages} runs it")
        sharding.check_batch(int(stage.global_batch_size), int(stage.accum_steps), self.mesh, self.process_count,
                             f"{field}.global_batch_size")
        trainable = optim.check_trainable(self.param_paths, list(stage.trainable), f"{field}.trainable")
        groups = optim.check_lr_groups(trainable, list(stage.lr_groups), f"{field}.lr_groups")
        sharding.check_trained_towers([t.kind for t in self.model_cfg.towers], trainable, self.mesh,
                                      f"{field}.trainable")
        keep = optim.trainable_filter(list(stage.trainable))
        abs_train, abs_frozen = nnx.split_state(self.abstract_params, keep, ...)
        sh_train, sh_frozen = nnx.split_state(self.param_shardings, keep, ...)
        return StagePlan(n, stage, keep, trainable, groups, abs_train, abs_frozen, sh_train, sh_frozen)

    def program(self, plan: StagePlan, total_steps: int) -> StageProgram:
        """The optimizer (its schedules need the step count), the sharded abstract state and the step."""
        tx, schedules = optim.make_optimizer(plan.stage, plan.abs_train, total_steps)
        abs_opt = jax.eval_shape(tx.init, plan.abs_train)
        sh_opt = sharding.state_shardings(abs_opt, self.rules, self.mesh)
        replicated = sharding.replicated(self.mesh)
        sh_state = dict(params=plan.sh_train, opt=sh_opt, step=replicated)
        abs_state = dict(params=abstract(plan.abs_train, plan.sh_train), opt=abstract(abs_opt, sh_opt),
                         step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
        batch_sh = sharding.batch_sharding(self.mesh)
        fns = make_step(self.graphdef, tx, self.model_cfg.towers, int(plan.stage.accum_steps),
                        sharding.Constrainer(self.rules, self.mesh), loss_chunk=self.loss_chunk)
        step = jax.jit(fns.train, in_shardings=(sh_state, plan.sh_frozen, batch_sh),
                       out_shardings=(sh_state, replicated), donate_argnums=(0,))
        return StageProgram(plan, tx, schedules, sh_opt, abs_state, abstract(plan.abs_frozen, plan.sh_frozen),
                            batch_sh, step, self.rules, self.mesh)


def check_stage(setup: TrainSetup, n: int) -> StagePlan:
    """Stage n's plan, with every check that needs no data or compile: the model, mesh, batch,
    trainable patterns and LR groups (TrainSetup.plan), the enumerated data and stage fields, the data paths."""
    from cambrian_jax import preprocess  # noqa: PLC0415
    from cambrian_jax.data import pipeline  # noqa: PLC0415

    plan = setup.plan(n)
    data = pipeline.stage_data_config(setup.config, plan.stage)
    # Every enumerated field, here with the rest, rather than where it is first read (after compiling).
    choices = {"data.image_mode": (data.image_mode, preprocess.MODES),
               "data.pixel_format": (data.pixel_format, ("float32", "uint8")),
               f"stage{n}.schedule": (plan.stage.get("schedule", "cosine"), ("cosine",))}
    for field, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"config field {field}: {value!r} is not one of {', '.join(valid)}")
    pipeline.check_stage_data(setup.config, n, setup.model_cfg)    # source, template, paths, tokenizer
    return plan


class Trainer:
    """`Trainer(config, workdir).run()` trains config.stages (default (1, 2)) and returns True, or
    False when a SIGTERM stopped it after a checkpoint (re-running resumes)."""

    def __init__(self, config, workdir, *, log_dir=None, command=None):
        self.config = config
        self.workdir = str(workdir)
        self.remote = "://" in self.workdir
        self.log_dir = Path(log_dir or (self.workdir if not self.remote else
                                        os.path.join("logs", self.workdir.rstrip("/").rsplit("/", 1)[-1])))
        if config.get("prng_impl"):
            jax.config.update("jax_default_prng_impl", config.prng_impl)
        if config.get("compilation_cache_dir"):
            jax.config.update("jax_compilation_cache_dir", str(config.compilation_cache_dir))
        self.setup = TrainSetup(config, sharding.make_mesh(dict(config.mesh)))
        self.model_cfg, self.mesh, self.rules, self.stages = (self.setup.model_cfg, self.setup.mesh, self.setup.rules,
                                                              self.setup.stages)
        self.graphdef, self.abstract_params = self.setup.graphdef, self.setup.abstract_params
        self.param_shardings, self.param_paths = self.setup.param_shardings, self.setup.param_paths
        self.plans = {n: self._plan(n) for n in self.stages}   # every config error before any compile
        # Only now, with the config checked, is anything written: the run's record first (or, on a
        # workdir that has one, the check that this config is the one that made it).
        self.resumed = workdir_lib.check_or_write(self.workdir, config, command, write=jax.process_index() == 0)
        self.metrics = MetricsWriter(self.log_dir)
        self.preemption = Preemption()
        self._params: nnx.State | None = None      # all parameters after the last finished stage
        self._params_from: int | None = None        # … or the stage whose final checkpoint holds them
        self.last_state: dict | None = None         # the train state at the end of the last stage run
        self.compiled: dict[tuple, Any] = {}        # (stage, mesh, batch shapes) → compiled step

    def close(self) -> None:
        self.metrics.close()
        self.preemption.close()

    # ---------------------------------------------------------------- set-up checks
    def _plan(self, n: int) -> StagePlan:
        return check_stage(self.setup, n)

    # ---------------------------------------------------------------- parameters
    def init_params(self) -> nnx.State:
        """Fresh parameters created directly in their shards (spec §3.6 init for the connector),
        then whatever config.init loads (cambrian_jax.pretrained)."""
        cfg, seed = self.model_cfg, self.config.seed

        def create():
            return nnx.state(Cambrian(cfg, rngs=nnx.Rngs(seed)), nnx.Param)

        with jax.set_mesh(self.mesh):
            params = jax.jit(create, out_shardings=self.param_shardings)()
        init = self.config.get("init")
        if init and any(_truthy(v) for v in dict(init).values()):
            from cambrian_jax import pretrained  # noqa: PLC0415
            params = pretrained.load_initial_weights(init, self.model_cfg, params)
        else:
            logging.info("config.init is empty: every parameter starts from its random initialisation")
        return params

    @property
    def params(self) -> nnx.State:
        """All parameters after the last stage run (loaded from its final checkpoint if need be)."""
        if self._params is None and self._params_from is not None:
            self._params = self._final_params(self._params_from, required=True)
        if self._params is None:
            raise RuntimeError("no stage has finished yet")
        return self._params

    def _initial_params(self, n: int) -> nnx.State:
        if n == 2 and 1 in self.stages:
            if self._params_from == 1:           # stage 1 ran (or was found finished) in this process
                params = self.params
            else:
                params = self._final_params(1, required=True)
            self._params, self._params_from = None, None   # stage 2 donates these buffers
            logging.info("stage 2 starts from stage 1's final parameters")
            return params
        return self.init_params()

    def _final_params(self, n: int, required: bool = False) -> nnx.State | None:
        """All parameters saved with stage n's final checkpoint."""
        mgr = self._manager(n)
        try:
            step = mgr.latest_step()
            meta = self._restore_meta(mgr, step) if step is not None else {}
            if not meta.get("final"):
                if not required:
                    return None
                where = os.path.join(self.workdir, f"stage{n}")
                state = f"its latest checkpoint is step {step}" if step is not None else "it has no checkpoint"
                raise StageNotFinished(
                    f"stage {n + 1} starts from stage {n}'s final parameters, but stage {n} has not finished in "
                    f"{where} ({state}); run --stage {n} (or --stage all) first, or train one stage only with "
                    f"the config switch one_stage (config.stages = (2,)).")
            target = abstract(self.abstract_params, self.param_shardings)
            return mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
        finally:
            mgr.close()

    # ---------------------------------------------------------------- checkpoints
    def _manager(self, n: int) -> ocp.CheckpointManager:
        ck = self.config.checkpoint
        interval = int(self.config[f"stage{n}"].get("save_interval_steps") or ck.save_interval_steps)
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=ck.get("async_save", True),
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(interval),
            preservation_policy=ocp.checkpoint_managers.LatestN(ck.keep),
            cleanup_tmp_directories=True,    # a save cut short by a kill leaves only a temporary directory
            create=True)
        return ocp.CheckpointManager(self._path(f"stage{n}"), options=options)

    def _path(self, name: str) -> str:
        return os.path.join(self.workdir if self.remote else os.path.abspath(self.workdir), name)

    @staticmethod
    def _restore_meta(mgr, step) -> dict:
        return dict(mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def _save(self, mgr, step, state, data, meta, final_params=None, force=False) -> None:
        items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data.get_state()),
                     meta=ocp.args.JsonSave(meta))
        if final_params is not None:  # the next stage starts from all parameters, whatever this one trained
            items["params"] = ocp.args.StandardSave(final_params)
        mgr.save(step, args=ocp.args.Composite(**items), force=force)

    def _save_frozen(self, plan: StagePlan, frozen) -> ocp.StandardCheckpointer | None:
        """Frozen parameters once per stage (not in every checkpoint: the 34B LLM alone is 136 GB)."""
        if not plan.has_frozen:
            return None
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(self._path(f"stage{plan.n}_frozen"), frozen, force=True)
        return ckptr

    def _restore_frozen(self, plan: StagePlan):
        if not plan.has_frozen:
            return plan.abs_frozen
        path = self._path(f"stage{plan.n}_frozen")
        ckptr = ocp.StandardCheckpointer()
        try:
            return ckptr.restore(path, abstract(plan.abs_frozen, plan.sh_frozen))
        except (FileNotFoundError, ValueError) as e:
            logging.warning("stage %d: no saved frozen parameters at %s (%s); rebuilding them as the stage "
                            "started them", plan.n, path, e)
            return nnx.split_state(self._initial_params(plan.n), plan.keep, ...)[1]
        finally:
            ckptr.close()

    # ---------------------------------------------------------------- stages
    def run(self, stages=None) -> bool:
        """Train `stages` (default config.stages) in order; False if a SIGTERM stopped the run."""
        for n in stages or self.stages:
            if not self.run_stage(n):
                return False
        return True

    def run_stage(self, n: int) -> bool:
        """Train (or resume, or skip if finished) stage n; False if a SIGTERM stopped it."""
        from cambrian_jax.data import pipeline  # noqa: PLC0415  (heavy: grain, tokenizers)

        if n not in self.plans:
            raise ConfigError(f"config field stages: stage {n} is not one of this config's stages {self.stages}")
        plan = self.plans[n]
        stage = plan.stage
        workdir_local = self.workdir if not self.remote else str(self.log_dir)
        data, num_examples = pipeline.stage_dataset(self.config, stage, self.model_cfg, workdir_local,
                                                    jax.process_index(), jax.process_count())
        gb = int(stage.global_batch_size)
        total = int(stage.get("num_steps") or math.ceil(stage.epochs * num_examples / gb))
        program = self.setup.program(plan, total)
        tx, schedules, abs_state = program.tx, program.schedules, program.abs_state

        mgr = self._manager(n)
        frozen_ckptr = None
        try:
            latest = mgr.latest_step()
            if latest is not None and latest >= total:
                logging.info("stage %d already finished (checkpoint at step %d of %d)", n, latest, total)
                self._params, self._params_from = None, n
                return True
            if latest is not None:
                restored = mgr.restore(latest, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abs_state), data=ocp.args.JsonRestore()))
                state = restored["state"]
                data.set_state(restored["data"])
                frozen = self._restore_frozen(plan)
                logging.info("stage %d: resumed from the checkpoint at step %d", n, latest)
            else:
                params = self._initial_params(n)
                train_p, frozen = nnx.split_state(params, plan.keep, ...)
                del params
                with jax.set_mesh(self.mesh):
                    opt = jax.jit(tx.init, out_shardings=program.sh_opt)(train_p)
                state = dict(params=train_p, opt=opt,
                             step=jax.device_put(jnp.int32(0), sharding.replicated(self.mesh)))
                frozen_ckptr = self._save_frozen(plan, frozen)

            first = next(data)
            compiled = self._compile(program, first)
            finished = self._loop(plan, mgr, state, frozen, data, first, compiled, total, schedules, frozen_ckptr)
        finally:
            if frozen_ckptr is not None:
                frozen_ckptr.wait_until_finished()
                frozen_ckptr.close()
            mgr.wait_until_finished()
            mgr.close()
            data.close()
        if finished:
            self._params_from = n
        return finished

    def _compile(self, program: StageProgram, first_batch):
        """Lower and compile the stage's step once, ahead of the loop; log time and memory."""
        plan = program.plan
        n = plan.n
        key = (n, self.mesh.devices.shape, tuple(sorted((k, v.shape) for k, v in first_batch.items())))
        if key in self.compiled:
            return self.compiled[key]
        procs = jax.process_count()
        abs_batch = {k: jax.ShapeDtypeStruct((v.shape[0] * procs,) + v.shape[1:], v.dtype,
                                             sharding=program.batch_sharding)
                     for k, v in first_batch.items()}
        t0 = time.perf_counter()
        compiled = program.lower(abs_batch).compile()
        seconds = time.perf_counter() - t0
        mem = _memory(compiled)
        n_train = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(plan.abs_train))
        n_frozen = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(plan.abs_frozen))
        logging.info("stage %d: step compiled in %.1f s on mesh %s; trainable %s parameters in groups %s, frozen %s; "
                     "per device: %s", n, seconds, dict(self.mesh.shape), f"{n_train:,}", plan.groups,
                     f"{n_frozen:,}", ", ".join(f"{k} {v:.3f} GiB" for k, v in mem.items()) or "n/a")
        self.compiled[key] = compiled
        self._compile_info = dict(compile_time=seconds, memory_gib=mem)
        return compiled

    def _loop(self, plan, mgr, state, frozen, data, first, step_fn, total, schedules, frozen_ckptr) -> bool:
        n, stage = plan.n, plan.stage
        batch_sh = sharding.batch_sharding(self.mesh)
        step = int(jax.device_get(state["step"]))
        flops_per_step = flops.train_flops_per_step(self.model_cfg, int(stage.global_batch_size),
                                                    plan.trainable_paths)
        peak = flops.peak_flops(jax.devices()[0]) * jax.device_count()
        log_every = int(self.config.log_every)
        progress = Progress(n, step, total)
        pending: list[tuple[int, Any]] = []
        compile_info = getattr(self, "_compile_info", {})
        self._compile_info = {}
        t_last, data_time, local = time.perf_counter(), 0.0, first
        try:
            while step < total:
                t0 = time.perf_counter()
                if local is None:
                    local = next(data)
                batch = sharding.to_global(local, batch_sh)
                tokens = int(np.prod(local["input_ids"].shape)) * jax.process_count()
                local = None
                data_time += time.perf_counter() - t0
                state, metrics = step_fn(state, frozen, batch)
                step += 1
                pending.append((step, metrics))
                progress.step()
                preempted = self.preemption.reached(step)
                last = step == total
                save = last or preempted or mgr.should_save(step)
                if save or step % log_every == 0:
                    values = jax.device_get([m for _, m in pending])
                    for (s, _), m in zip(pending, values):   # the first non-finite step, not the latest
                        if not np.isfinite(m["loss"]):
                            self._stop(n, s, float(m["loss"]), mgr, frozen_ckptr)
                    dt = time.perf_counter() - t_last
                    steps = len(pending)
                    step_time = dt / steps
                    m = values[-1]
                    rec = dict(stage=n, step=step, loss=float(m["loss"]), grad_norm=float(m["grad_norm"]),
                               lr={k: float(s(step - 1)) for k, s in schedules.items()},
                               tokens_per_sec=tokens * steps / dt,
                               supervised_tokens=int(sum(int(v["tokens"]) for v in values)),
                               step_time=step_time, data_time=data_time / steps,
                               tflops_per_device=flops_per_step / step_time / 1e12 / jax.device_count(),
                               mfu=flops_per_step / step_time / peak)
                    rec.update(compile_info)
                    compile_info = {}
                    self.metrics.write(rec)
                    progress.log(step, rec)
                    pending.clear()
                    t_last, data_time = time.perf_counter(), 0.0
                if save:
                    if frozen_ckptr is not None:   # a checkpoint is only usable with its stage's frozen part
                        frozen_ckptr.wait_until_finished()
                    meta = dict(stage=n, step=step, total_steps=total, final=last, global_batch_size=
                                int(stage.global_batch_size), process_count=jax.process_count(),
                                mesh=dict(self.mesh.shape), time=time.time())
                    final = nnx.merge_state(state["params"], frozen) if last else None
                    self._save(mgr, step, state, data, meta, final, force=last or preempted)
                if preempted:
                    mgr.wait_until_finished()
                    logging.warning("stage %d: checkpoint saved at step %d after SIGTERM; exiting", n, step)
                    return False
        finally:
            progress.close()
        self.last_state = state
        if step >= total:
            self._params = nnx.merge_state(state["params"], frozen)
        return True

    def _stop(self, n, step, loss, mgr, frozen_ckptr):
        mgr.wait_until_finished()
        if frozen_ckptr is not None:
            frozen_ckptr.wait_until_finished()
        good = mgr.latest_step()
        where = (f"step {good} in {self._path(f'stage{n}')}" if good is not None
                 else "none (no checkpoint was saved yet)")
        raise TrainingStopped(
            f"stage {n}: the loss became {loss} at step {step}; stopping. The last good checkpoint is {where}; "
            f"lower the learning rate or check the data, then re-run to resume from it.")

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        from cambrian_jax import choice_eval  # noqa: PLC0415
        model = nnx.merge(self.graphdef, self.params)
        results = choice_eval.evaluate_synthetic(self.config, self.model_cfg, model, self.workdir)
        if jax.process_index() == 0:
            (self.log_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
            print(choice_eval.format_results(results))
        return results


def _truthy(v) -> bool:
    if hasattr(v, "items"):
        return any(_truthy(x) for x in dict(v).values())
    return bool(v)


def _memory(compiled) -> dict[str, float]:
    """Per-device bytes of the compiled step (arguments, outputs, temporaries), in GiB."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 — not every backend reports it
        return {}
    if m is None:
        return {}
    out = {}
    for name in ("argument", "output", "temp", "alias", "generated_code"):
        v = getattr(m, f"{name}_size_in_bytes", None)
        if v is not None:
            out[name] = v / 2**30
    return out
