"""The two-stage trainer: sharded state, one compiled step per stage, orbax checkpoints, metrics."""
from __future__ import annotations

import json
import math
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
from cambrian_jax.config import ConfigError
from cambrian_jax.model import Cambrian
from cambrian_jax.train_step import make_step


class TrainingStopped(RuntimeError):
    """A non-finite loss: the run stops, the last good checkpoint stays."""


class _Preemption:
    """SIGTERM (TPU maintenance, a scheduler) asks for a checkpoint and a clean exit."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
        self.requested = True


class MetricsWriter:
    """metrics.jsonl (one object per logged step) and TensorBoard event files, on process 0."""

    def __init__(self, workdir: Path):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        self.file = open(workdir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:  # optional: metrics.jsonl stays the record
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "stage"):
                    self.tb.add_scalar(f"stage{record['stage']}/{k}", v, record["step"])
            self.tb.flush()


def _progress(stage: int, step: int, total: int, elapsed: float, done_since_start: int) -> str:
    rate = done_since_start / max(elapsed, 1e-9)
    eta = (total - step) / rate if rate > 0 else float("inf")
    return f"stage {stage} step {step}/{total} ({rate:.2f} steps/s, ETA {eta:.0f}s)"


class Trainer:
    def __init__(self, config, workdir: Path):
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if config.get("prng_impl"):
            jax.config.update("jax_default_prng_impl", config.prng_impl)
        self.model_cfg = config_lib.from_dict(config.model)
        self.mesh = sharding.make_mesh(dict(config.mesh))
        self.rules = [tuple(r) for r in config.sharding_rules]
        self._check_batches()
        abstract = nnx.eval_shape(lambda: Cambrian(self.model_cfg, rngs=nnx.Rngs(config.seed)))
        self.graphdef, self.abstract_params = nnx.split(abstract, nnx.Param)
        self.param_shardings = sharding.state_shardings(self.abstract_params, self.rules, self.mesh)
        self.param_paths = [optim.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(self.abstract_params)]
        self.metrics = MetricsWriter(self.workdir)
        self.preemption = _Preemption()
        self.params: nnx.State | None = None   # all parameters after the last finished stage

    # ---------------------------------------------------------------- set-up checks
    def _check_batches(self) -> None:
        dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        for n in (1, 2):
            stage = self.config[f"stage{n}"]
            per_step = stage.global_batch_size
            if per_step % (dp * stage.accum_steps):
                raise ConfigError(f"config field stage{n}.global_batch_size: {per_step} is not divisible by the "
                                  f"data-parallel size {dp} × accum_steps {stage.accum_steps}")
            if per_step % jax.process_count():
                raise ConfigError(f"config field stage{n}.global_batch_size: {per_step} rows cannot be split "
                                  f"over {jax.process_count()} hosts")

    # ---------------------------------------------------------------- parameters
    def init_params(self) -> nnx.State:
        """Fresh parameters, created directly in their shards (spec §3.6 init for the connector)."""
        cfg, seed = self.model_cfg, self.config.seed

        def create():
            return nnx.state(Cambrian(cfg, rngs=nnx.Rngs(seed)), nnx.Param)

        with jax.set_mesh(self.mesh):
            create = jax.jit(create, out_shardings=self.param_shardings)
            params = create()
        if self.config.get("init") and any(self.config.init.values()):
            from cambrian_jax import pretrained
            params = pretrained.load_initial_weights(self.config.init, self.model_cfg, params)
        return params

    def _manager(self, stage: int) -> ocp.CheckpointManager:
        ck = self.config.checkpoint
        policies = [ocp.checkpoint_managers.FixedIntervalPolicy(ck.save_interval_steps),
                    ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=ck.get("async_save", True),
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
            preservation_policy=ocp.checkpoint_managers.LatestN(ck.keep),
            create=True)
        return ocp.CheckpointManager((self.workdir / f"stage{stage}").absolute(), options=options)

    # ---------------------------------------------------------------- one stage
    def run_stage(self, n: int) -> None:
        from cambrian_jax.data import pipeline  # noqa: WPS433  (heavy: grain, tokenizers)

        stage = self.config[f"stage{n}"]
        optim.check_trainable(self.param_paths, list(stage.trainable), f"stage{n}.trainable")
        keep = optim.trainable_filter(list(stage.trainable))
        abs_train, abs_frozen = nnx.split_state(self.abstract_params, keep, ...)
        sh_train, sh_frozen = nnx.split_state(self.param_shardings, keep, ...)

        data, num_examples = pipeline.stage_dataset(self.config, stage, self.model_cfg, self.workdir,
                                                    jax.process_index(), jax.process_count())
        total = int(stage.get("num_steps") or math.ceil(stage.epochs * num_examples / stage.global_batch_size))
        tx, schedules = optim.make_optimizer(stage, abs_train, total)
        abs_opt = jax.eval_shape(tx.init, abs_train)
        sh_opt = sharding.state_shardings(abs_opt, self.rules, self.mesh)
        sh_state = dict(params=sh_train, opt=sh_opt, step=sharding.replicated(self.mesh))

        mgr = self._manager(n)
        latest = mgr.latest_step()
        if latest is not None and latest >= total:
            logging.info("stage %d already finished (checkpoint at step %d)", n, latest)
            restored = self._restore(mgr, latest, abs_train, abs_frozen, abs_opt, sh_train, sh_frozen, sh_opt)
            self.params = nnx.merge_state(restored["state"]["params"], restored["frozen"])
            return

        if latest is not None:
            restored = self._restore(mgr, latest, abs_train, abs_frozen, abs_opt, sh_train, sh_frozen, sh_opt,
                                     data=data)
            state, frozen = restored["state"], restored["frozen"]
            logging.info("stage %d: resumed from step %d", n, latest)
        else:
            params = self.params if self.params is not None else self._initial_params(n)
            train_p, frozen = nnx.split_state(params, keep, ...)
            with jax.set_mesh(self.mesh):
                opt = jax.jit(tx.init, out_shardings=sh_opt)(train_p)
            state = dict(params=train_p, opt=opt, step=jnp.int32(0))

        fns = make_step(self.graphdef, tx, len(self.model_cfg.towers), stage.accum_steps)
        batch_sh = sharding.batch_sharding(self.mesh)
        with jax.set_mesh(self.mesh):
            step_fn = jax.jit(fns.train, in_shardings=(sh_state, sh_frozen, batch_sh),
                              out_shardings=(sh_state, sharding.replicated(self.mesh)), donate_argnums=(0,))
        flops_per_step = stage.global_batch_size * flops.train_flops_per_sample(
            self.model_cfg, self.model_cfg.max_len, train_decoder=any("decoder" in p for p in stage.trainable),
            train_towers=any("towers" in p for p in stage.trainable))
        peak = flops.peak_flops(jax.devices()[0]) * jax.device_count()
        self._loop(n, stage, mgr, state, frozen, data, step_fn, total, schedules, flops_per_step, peak, batch_sh)
        self.params = nnx.merge_state(self._last_state["params"], frozen)

    def _initial_params(self, n: int) -> nnx.State:
        if n == 2 and (self.workdir / "stage1").exists():
            prev = self._manager(1)
            if prev.latest_step() is not None:
                logging.info("stage 2 starts from stage 1's final checkpoint (step %d)", prev.latest_step())
                restored = prev.restore(prev.latest_step(), args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(self._abstract(self.abstract_params, self.param_shardings))))
                return restored["params"]
        return self.init_params()

    @staticmethod
    def _abstract(abstract, shardings):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    def _restore(self, mgr, step, abs_train, abs_frozen, abs_opt, sh_train, sh_frozen, sh_opt, data=None):
        target = dict(params=self._abstract(abs_train, sh_train), opt=self._abstract(abs_opt, sh_opt),
                      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(self.mesh)))
        items = dict(state=ocp.args.StandardRestore(target))
        if jax.tree.leaves(abs_frozen):
            items["frozen"] = ocp.args.StandardRestore(self._abstract(abs_frozen, sh_frozen))
        if data is not None:
            import grain
            items["data"] = grain.checkpoint.CheckpointRestore(data)
        restored = dict(mgr.restore(step, args=ocp.args.Composite(**items)))
        restored.setdefault("frozen", abs_frozen)
        return restored

    def _save(self, mgr, step, state, frozen, data, final=False, force=False) -> bool:
        import grain
        items = dict(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data))
        if jax.tree.leaves(frozen):  # orbax refuses empty items (a stage that trains everything)
            items["frozen"] = ocp.args.StandardSave(frozen)
        if final:  # the next stage starts from all parameters, whatever this stage trained
            items["params"] = ocp.args.StandardSave(nnx.merge_state(state["params"], frozen))
        return mgr.save(step, args=ocp.args.Composite(**items), force=force)

    def _loop(self, n, stage, mgr, state, frozen, data, step_fn, total, schedules, flops_per_step, peak, batch_sh):
        from cambrian_jax.data import pipeline

        step = int(state["step"])
        start_step, t_start = step, time.time()
        log_every = self.config.log_every
        pending: list[tuple[int, Any]] = []
        t_last, tokens_since = time.time(), 0
        while step < total:
            local = next(data)
            batch = sharding.to_global(local, batch_sh)
            state, metrics = step_fn(state, frozen, batch)
            step += 1
            pending.append((step, metrics))
            tokens_since += int(np.prod(local["input_ids"].shape)) * jax.process_count()
            last = step == total
            if step % log_every == 0 or last or self.preemption.requested or mgr.should_save(step):
                for s, m in pending:  # the first non-finite step, not just the latest
                    if not np.isfinite(float(m["loss"])):
                        good = mgr.latest_step()
                        mgr.wait_until_finished()
                        raise TrainingStopped(
                            f"stage {n}: the loss became {float(m['loss'])} at step {s}; stopping. The last good "
                            f"checkpoint is step {good} in {self.workdir / f'stage{n}'}; lower the learning "
                            f"rate or check the data, then re-run to resume from it.")
                m = jax.device_get(pending[-1][1])
                pending.clear()
                dt = time.time() - t_last
                steps_done = log_every if step % log_every == 0 else max(1, step % log_every)
                step_time = dt / steps_done
                rec = dict(stage=n, step=step, loss=float(m["loss"]), grad_norm=float(m["grad_norm"]),
                           lr=float(next(iter(schedules.values()))(step - 1)),
                           tokens_per_sec=tokens_since / max(dt, 1e-9), step_time=step_time,
                           tflops_per_device=flops_per_step / step_time / 1e12 / jax.device_count(),
                           mfu=flops_per_step / step_time / peak)
                rec.update({f"lr/{k}": float(s(step - 1)) for k, s in schedules.items()})
                self.metrics.write(rec)
                logging.info("%s loss %.4f grad_norm %.3f lr %.2e %.0f tok/s MFU %.1f%%",
                             _progress(n, step, total, time.time() - t_start, step - start_step),
                             rec["loss"], rec["grad_norm"], rec["lr"], rec["tokens_per_sec"], 100 * rec["mfu"])
                t_last, tokens_since = time.time(), 0
            if mgr.should_save(step) or last or self.preemption.requested:
                self._save(mgr, step, state, frozen, data, final=last, force=last or self.preemption.requested)
            if self.preemption.requested:
                mgr.wait_until_finished()
                logging.warning("stage %d: checkpoint saved at step %d after SIGTERM; exiting", n, step)
                sys.exit(0)
        mgr.wait_until_finished()
        self._last_state = state

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        from cambrian_jax import choice_eval
        model = nnx.merge(self.graphdef, self.params)
        results = choice_eval.evaluate_synthetic(self.config, self.model_cfg, model, self.workdir)
        if jax.process_index() == 0:
            (self.workdir / "eval_results.json").write_text(json.dumps(results, indent=2))
            print(choice_eval.format_results(results))
        return results
