"""The training loop: build everything from a RunConfig, resume or initialise, step, evaluate, save.

Runs unchanged on one CPU, fake CPU devices, one GPU, several GPUs and several hosts: the mesh comes
from `cfg.mesh`, the step is one `jax.jit` with explicit in/out shardings and donated state.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from sparsetrain.config import RunConfig
from sparsetrain.configbase import ConfigError, to_dict
from sparsetrain.data import build_data
from sparsetrain.checkpoint import load_params, merge_init_params, save_params
from sparsetrain.checkpoint.params_io import locate_checkpoint
from sparsetrain.errors import InputError
from sparsetrain.train import checkpoint as ckpt_lib
from sparsetrain.train import resume_config
from sparsetrain.train.interrupt import StopRequests
from sparsetrain.train.memory import check_fits, is_out_of_memory, out_of_memory
from sparsetrain.train.metrics import MetricsWriter, Throughput, flops_per_token
from sparsetrain.checkpoint.model_def import ModelDef, flatten, path_str
from sparsetrain.train.optimizer import frozen_paths, learning_rate_schedule, make_optimizer
from sparsetrain.train.sharding import (batch_sharding, global_batch, make_mesh, on_mesh, param_shardings,
                                        placed_like, replicated)
from sparsetrain.train.step import make_eval_step, make_train_step


# Reported by sparse layers (means over layers) and the phase schedule, shown on the progress bar.
CONSOLE_METRICS = ("phase", "density", "recall", "kl")


class NonFiniteError(RuntimeError):
    """Training stopped because the loss or gradient was not finite (see trainer.nonfinite)."""


def maybe_initialize_distributed() -> None:
    """Join a multi-host job when the launcher's environment says there is one."""
    markers = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
    multi = any(os.environ.get(m) for m in markers) or int(os.environ.get("SLURM_NTASKS", "1")) > 1 \
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def state_shardings(optimizer_state, params_shardings, abstract_params, mesh) -> dict:
    """Shardings of the whole train state. An optimizer-state leaf whose trailing dict keys name a
    parameter of the same shape (Adam's mu/nu inside any optax wrapper) is placed like that
    parameter; everything else (step counters) is replicated."""
    by_path = {path_str(path): (shard, a.shape) for (path, shard), a in zip(
        jax.tree_util.tree_flatten_with_path(params_shardings)[0], jax.tree.leaves(abstract_params))}

    def place(path, leaf):
        keys = []
        for entry in reversed(path):
            if not isinstance(entry, jax.tree_util.DictKey):
                break
            keys.insert(0, entry)
        shard, shape = by_path.get(path_str(tuple(keys)), (None, None))
        return shard if shard is not None and shape == leaf.shape else replicated(mesh)

    opt = jax.tree_util.tree_map_with_path(place, optimizer_state)
    return {"params": params_shardings, "opt_state": opt, "step": replicated(mesh)}


class Phase(NamedTuple):
    start: int          # first step (phase_at's convention)
    cfg: RunConfig      # the run config with this phase's overrides (and all earlier ones)
    model: ModelDef


def run_phases(cfg: RunConfig, abstract_params) -> list[Phase]:
    """The run's phases: phase 0 is the run's own config, each later one adds its overrides to the
    previous one's. A phase may change how layers attend and the data's length and batch, not the
    parameters. (Models are built here, outside any mesh: NNX would shard abstract parameters under one.)"""
    phases = []
    for i, (start, current) in enumerate(cfg.phase_configs()):
        model = ModelDef.create(current.model)
        if i:
            shapes = {k: v.shape for k, v in flatten(model.abstract_params()).items()}
            if shapes != {k: v.shape for k, v in flatten(abstract_params).items()}:
                raise ConfigError(f"trainer.phases.{i - 1}: its overrides change the model's parameters; "
                                  f"a phase may only change how layers attend and the data's length")
        phases.append(Phase(start, current, model))
    return phases


class Trainer:
    """Owns the compiled steps, the state and the run directory of one run."""

    def __init__(self, cfg: RunConfig, devices=None, *, allow_config_change: bool = False):
        """`allow_config_change`: resume even if the config differs from the saved one in more than
        resume_config.RESUMABLE_FIELDS (train.py --allow_config_change)."""
        maybe_initialize_distributed()
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir) / cfg.name
        self.is_main = jax.process_index() == 0
        if cfg.checkpoint.init_from:   # a wrong path fails now, not after the model compiles
            locate_checkpoint(cfg.checkpoint.init_from)
        self.model = ModelDef.create(cfg.model)
        abstract_params = self.model.abstract_params()
        self.phases = run_phases(cfg, abstract_params)
        self._data: dict = {}   # DataConfig -> Data, one per length of a curriculum
        self.data = self.data_for(0)   # bad data inputs fail here, before anything is written
        if cfg.model.vocab_size < self.data.tokenizer.vocab_size:
            raise InputError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                             f"vocabulary ({self.data.tokenizer.vocab_size})")
        self.mesh = make_mesh(cfg.mesh, devices)
        p_shard = param_shardings(self.model.logical_axes(), abstract_params, self.mesh)
        self.schedule = learning_rate_schedule(cfg.optimizer, cfg.trainer.steps)
        frozen = [frozen_paths(cfg.optimizer, phase.model.cfg, abstract_params) for phase in self.phases]
        # Optimizer state for every parameter some phase trains; each phase's step updates only
        # its own trainable ones.
        self.optimizer = make_optimizer(cfg.optimizer, abstract_params, cfg.trainer.steps,
                                        frozenset.intersection(*frozen))
        self.trainable = [frozenset(flatten(abstract_params)) - f for f in frozen]
        self.abstract_state = jax.eval_shape(self._init_state)
        self.shardings = state_shardings(self.abstract_state["opt_state"], p_shard, abstract_params,
                                         self.mesh)
        self._compiled: dict[int, tuple] = {}
        self.checkpointer = ckpt_lib.Checkpointer(self.run_dir, cfg.checkpoint)
        latest = self.checkpointer.latest_step()
        # Checked before anything is restored or compiled: a refused change fails in seconds.
        self.config_changes = resume_config.check_resume(self.run_dir, cfg, latest, allow_config_change) \
            if latest is not None else {}
        self.state = self._resume_or_init()

    def phase_at(self, step: int) -> int:
        """The phase of the step that starts after `step` completed steps."""
        return max(i for i, phase in enumerate(self.phases) if step >= phase.start)

    def data_for(self, phase: int):
        """The data pipeline of a phase's length and batch (built once per distinct data config)."""
        data_cfg = self.phases[phase].cfg.data
        if data_cfg not in self._data:
            self._data[data_cfg] = build_data(data_cfg, process_index=jax.process_index(),
                                              process_count=jax.process_count())
        return self._data[data_cfg]

    def steps_for(self, phase: int):
        """(train_step, eval_step) of a phase, compiled on first use. The train step is compiled ahead
        of its first batch, and refused (memory.OutOfMemory) if XLA's estimate exceeds device memory."""
        if phase not in self._compiled:
            model = self.phases[phase].model
            batch_shard = batch_sharding(self.mesh)
            train_step = jax.jit(make_train_step(model, self.optimizer, self.cfg.trainer, self.schedule,
                                                 self.trainable[phase], phase),
                                 in_shardings=(self.shardings, batch_shard),
                                 out_shardings=(self.shardings, replicated(self.mesh)), donate_argnums=0)
            batch = {key: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_shard)
                     for key, (shape, dtype) in self.data_for(phase).batch_spec().items()}
            train_step = train_step.lower(placed_like(self.abstract_state, self.shardings), batch).compile()
            check_fits(train_step, self.cfg.trainer.memory_limit_bytes)
            eval_step = jax.jit(make_eval_step(model, self.cfg.trainer, phase),
                                in_shardings=(self.shardings["params"], batch_shard),
                                out_shardings=replicated(self.mesh))
            self._compiled[phase] = (train_step, eval_step)
        return self._compiled[phase]

    def _init_state(self) -> dict:
        params = self.model.init(self.cfg.trainer.seed)
        return {"params": params, "opt_state": self.optimizer.init(params), "step": jnp.int32(0)}

    def _resume_or_init(self) -> dict:
        """The newest checkpoint that restores intact (checkpoint.on_corrupt=fallback moves bad ones
        aside, "fail" stops at the first), else a fresh or --init_from state."""
        steps = self.checkpointer.all_steps()
        for step in steps:
            # The iterator to restore is the one of the phase that ran the saved step.
            self.data = self.data_for(self.phase_at(max(step - 1, 0)))
            self.train_iter = self.data.train_iter()
            try:
                state, meta = self.checkpointer.restore(step, self.abstract_state, self.shardings, self.train_iter)
            except ckpt_lib.CorruptCheckpoint as e:
                if self.cfg.checkpoint.on_corrupt == "fail":
                    raise InputError(f"{e} (checkpoint.on_corrupt=fail; 'fallback' moves it aside and "
                                     f"resumes from the newest good step)") from None
                self.log(f"warning: {e}")
                self.log(f"warning: moved it to {self.checkpointer.move_aside(step)}; trying the previous one")
                continue
            self.log(f"resumed from {self.checkpointer.directory}/{step} (step {meta['step']})")
            return state
        if steps:   # starting over silently would discard the whole run
            raise InputError(f"no intact checkpoint left in {self.checkpointer.directory} (the corrupt ones "
                             f"were renamed to <step>.corrupt); remove or rename the run directory to start over")
        self.data = self.data_for(0)
        self.train_iter = self.data.train_iter()
        state = jax.jit(self._init_state, out_shardings=self.shardings)()
        if not self.cfg.checkpoint.init_from and any(s.param_policy == "own_only" for s in self.cfg.model.layer_specs):
            self.log("warning: a method trains only its own parameters (e.g. seer mode=distill) but the "
                     "base model is freshly initialised; pass --init_from a trained run")
        if self.cfg.checkpoint.init_from:
            source, _ = load_params(self.cfg.checkpoint.init_from)
            params, fresh, unused = merge_init_params(jax.device_get(state["params"]), source)
            # Methods' own parameters (gates) may start fresh; a base weight starting fresh is
            # almost always a wrong source or architecture.
            base = [path for path in fresh if "/attn/attend/" not in path]
            if base and not self.cfg.checkpoint.init_missing_ok:
                raise InputError(f"--init_from {self.cfg.checkpoint.init_from}: the source lacks {base}; "
                                 f"set checkpoint.init_missing_ok=true to initialise them fresh")
            state["params"] = jax.device_put(params, self.shardings["params"])
            self.log(f"initialised from {self.cfg.checkpoint.init_from}; "
                     f"fresh: {fresh or 'none'}; unused from source: {unused or 'none'}")
        return state

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def evaluate(self) -> dict:
        """Validation loss, and the mean over batches of what sparse layers report at evaluation
        (measured density, recall)."""
        sums: dict[str, float] = {}
        batches = 0
        with on_mesh(self.mesh, self.cfg.mesh):
            eval_step = self.steps_for(self.phase_at(int(self.state["step"])))[1]
            for batch in self.data.val_batches(self.cfg.trainer.eval_batches):
                out = eval_step(self.state["params"], global_batch(batch, self.mesh))
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                batches += 1
        loss = sums.pop("loss_sum", 0.0) / max(sums.pop("tokens", 0.0), 1.0)
        reported = {f"val/{key}": value / max(batches, 1) for key, value in sums.items()}
        return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0)), **reported}

    def _meta(self, step: int, **extra) -> dict:
        """Checkpoint metadata: the step and the full config, so a checkpoint rebuilds its model."""
        return {"step": step, "config": to_dict(self.cfg), **extra}

    def save(self, step: int, *, force: bool = False) -> None:
        self.checkpointer.save(step, self.state, self.train_iter, self._meta(step), force=force)

    def _check_finite(self, step: int, metrics: dict) -> None:
        """Apply trainer.nonfinite: the step already left the state untouched; count and maybe stop."""
        tcfg = self.cfg.trainer
        if bool(metrics["finite"]):
            self.bad_in_row = 0
            return
        self.bad_in_row += 1
        self.log(f"step {step}: non-finite loss/gradient (loss={float(metrics['loss'])}, "
                 f"grad_norm={float(metrics['grad_norm'])}); update skipped ({self.bad_in_row} in a row)")
        if tcfg.nonfinite == "stop" or self.bad_in_row >= tcfg.max_nonfinite_in_row:
            raise NonFiniteError(
                f"stopping at step {step}: {self.bad_in_row} non-finite step(s) in a row "
                f"(trainer.nonfinite={tcfg.nonfinite!r}, max_nonfinite_in_row={tcfg.max_nonfinite_in_row}); "
                f"last good checkpoint: {self.checkpointer.latest_step()}")

    def _evaluate_and_keep_best(self, step: int) -> dict:
        val = self.evaluate()
        if self.cfg.checkpoint.keep_best and val["val/loss"] < self.best_val:
            self.best_val = val["val/loss"]
            save_params(self.run_dir / "best", step, self.state["params"],
                                 self._meta(step, **val), keep=1)
        extra = "".join(f", {k[4:]} {val[k]:.3g}" for k in (f"val/{m}" for m in CONSOLE_METRICS) if k in val)
        self.log(f"step {step}: val loss {val['val/loss']:.4f}{extra}")
        return val

    def run_eval_suite(self, step: int) -> None:
        """sparsetrain.eval's suite (trainer.eval_suite) on the current parameters, as the phase that
        ran `step` attends, written to RUN/eval/step_<step>/."""
        # Imported here: matplotlib and the suite load only for runs that ask for them.
        from sparsetrain.eval import report
        from sparsetrain.eval.measure import Subject
        from sparsetrain.eval.suite import evaluate, options_for

        # Every process takes part in gathering the (possibly sharded) parameters; the main one evaluates.
        params = multihost_utils.process_allgather(self.state["params"], tiled=True)
        if not self.is_main:
            return
        cfg = self.phases[self.phase_at(step - 1)].cfg
        subject = Subject(str(self.run_dir), cfg, {k: np.asarray(v) for k, v in flatten(params).items()}, step,
                          self.data.tokenizer)
        options = options_for(cfg.trainer.eval_suite, cfg.data.seq_len)
        out = self.run_dir / "eval" / f"step_{step}"
        # The suite runs on one device, as the eval command does: outside the training mesh, which
        # would shard the models it builds and its batches.
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
            results = evaluate(subject, options, progress=False)
        report.write(results, out)
        self.log(f"step {step}: eval suite -> {out}\n" + report.summary(results))

    def run(self) -> dict:
        """Train to cfg.trainer.steps, or until SIGTERM/SIGINT (then "signal" in the result names it);
        returns the last metrics. A step that runs out of device memory raises memory.OutOfMemory."""
        cfg, tcfg = self.cfg, self.cfg.trainer
        step = int(self.state["step"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            resume_config.record(self.run_dir, cfg, step, self.config_changes, self.log)
        writer = MetricsWriter(self.run_dir, cfg.tensorboard, resumed_step=step) if self.is_main else None
        phase = None
        bar = tqdm(total=tcfg.steps, initial=step, disable=not (self.is_main and tcfg.progress_bar),
                   dynamic_ncols=True)
        self.bad_in_row, self.best_val, summary = 0, math.inf, {}
        try:
            with StopRequests(self.log) as stop, on_mesh(self.mesh, self.cfg.mesh):
                while step < tcfg.steps and stop.signum is None:
                    if self.phase_at(step) != phase:
                        phase, compile_step = self.phase_at(step), step + 1
                        run_cfg = self.phases[phase].cfg
                        if self.data_for(phase) is not self.data:
                            # A new length starts its own pass over the corpus (windows differ by length).
                            self.data = self.data_for(phase)
                            self.train_iter = self.data.train_iter()
                        tokens_per_step = run_cfg.data.batch_size * run_cfg.data.seq_len
                        throughput = Throughput(tokens_per_step, tokens_per_step *
                                                flops_per_token(run_cfg.model, run_cfg.data.seq_len))
                        if cfg.trainer.phases:
                            self.log(f"step {step}: phase {phase} "
                                     f"({', '.join(cfg.trainer.phases[phase - 1].overrides) if phase else 'the run config'})")
                        train_step = self.steps_for(phase)[0]   # before a batch is read: see steps_for
                    batch = global_batch(next(self.train_iter), self.mesh)
                    self.state, metrics = train_step(self.state, batch)
                    step += 1
                    throughput.tick()
                    if step == compile_step:  # a phase's first step compiles: keep it out of tokens/s and MFU
                        jax.block_until_ready(metrics)
                        throughput.restart()
                    self._check_finite(step, metrics)
                    if step % tcfg.log_every == 0 or step == tcfg.steps:
                        jax.block_until_ready(metrics)
                        values = {k: float(v) for k, v in metrics.items() if k != "finite"}
                        if cfg.trainer.phases:
                            values["phase"] = phase
                        values.update(throughput.report())
                        summary.update(values)
                        bar.set_postfix(loss=f"{values['loss']:.3f}",
                                        tok_s=f"{values.get('tokens_per_sec', 0):.0f}",
                                        **{k: f"{values[k]:.3g}" for k in CONSOLE_METRICS if k in values})
                        if writer:
                            writer.write(step, values)
                    if step % tcfg.eval_every == 0 or step == tcfg.steps:
                        val = self._evaluate_and_keep_best(step)
                        summary.update(val)
                        if writer:
                            writer.write(step, val)
                        if tcfg.eval_suite.enabled:
                            self.run_eval_suite(step)
                        throughput.restart()
                    if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                        self.save(step)
                    bar.update(1)
            if stop.signum is not None:
                self.log(f"received signal {stop.signum}: saving step {step} and exiting")
            if self.checkpointer.latest_step() != step:
                self.save(step, force=True)
            self.checkpointer.wait()
        except jax.errors.JaxRuntimeError as e:
            if is_out_of_memory(e):
                raise out_of_memory(e, step + 1) from None
            raise
        finally:
            bar.close()
            self.checkpointer.close()
            if writer:
                writer.close()
        return {**summary, "step": step, "interrupted": stop.signum is not None, "signal": stop.signum}


def train(cfg: RunConfig, *, allow_config_change: bool = False) -> dict:
    return Trainer(cfg, allow_config_change=allow_config_change).run()
