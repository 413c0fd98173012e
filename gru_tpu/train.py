"""The training engine shared by every task: sharded state, one jitted train step, eval, checkpoints.

  gru-tpu train --config configs/synthetic.py:size=tiny --workdir /tmp/run [--config.key=value]

A task is chosen by `config.task` and loaded by name from gru_tpu.tasks (this module never
imports one). It hands the engine a model constructor, a pure loss function, per-process batch
iterators, and JSON metadata; see gru_tpu/tasks/__init__.py.

Runs survive being killed: the same command resumes from the latest readable checkpoint (the
state, the data position and the RNG, so the result is bit-identical to an uninterrupted run),
and SIGTERM - a preempted VM's notice - saves at the current step and exits cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import importlib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from gru_tpu import sharding
from gru_tpu.checkpoint import Checkpointer, enclosing_run, is_uri, move, workdir_path
from gru_tpu.errors import CheckpointError, UserError
from gru_tpu.metrics import MetricsWriter
from gru_tpu.models import compiler_options
from gru_tpu.models.gru import IMPLS
from gru_tpu.models.lm import CELLS

log = logging.getLogger("gru_tpu")
T = TypeVar("T")

# Config sections whose change makes an existing checkpoint unusable for this run.
COMPATIBLE_KEYS = ("task", "model", "data")
# model keys that leave the parameters (f32 whatever the compute dtype) and optimizer state
# alone: a run may resume with another value, e.g. remat on after running out of memory.
RUNTIME_MODEL_KEYS = ("impl", "unroll", "remat", "dtype")
# data keys that say where the same data is or what to log, not what it is: a run moved to
# another machine resumes (a changed text is caught by its vocabulary, task.resume_mismatch).
RUNTIME_DATA_KEYS = ("tfds_data_dir", "tfds_manual_dir", "sample_prompt", "sample_length")
# Keys the engine reads without a default (the others it reads with config.get).
REQUIRED_KEYS = ("task", "seed", "mesh", "sharding", "batch_size", "grad_accum", "num_steps",
                 "log_every", "eval_every", "eval_steps", "checkpoint_every", "keep_checkpoints",
                 "model", "data", *(f"optimizer.{k}" for k in (
                     "learning_rate", "warmup_steps", "final_lr_fraction", "weight_decay",
                     "grad_clip", "b1", "b2")))
# Steps the host may dispatch before the device has finished them: enough to ride out host
# hiccups (a log line, garbage collection; on CPU, 1 step ran at 0.65x and 4 at 0.8x the
# speed of no limit), few enough that the queued steps' batches stay small.
RUN_AHEAD = 16


class TrainingDiverged(UserError):
  """The loss became NaN or Inf."""


def load_task(config) -> Any:
  try:
    module = importlib.import_module(f"gru_tpu.tasks.{config.task}")
  except ModuleNotFoundError:
    module = None
  if not hasattr(module, "make_task"):  # forecast_eval, __init__: an AttributeError traceback
    raise UserError(f"config.task={config.task!r} is not a task; the tasks are 'text', "
                    f"'forecast' and 'synthetic' (gru_tpu/tasks/)")
  defaults = getattr(module, "data_defaults", None)
  missing = [k for k in defaults().keys() if k not in config.data] if defaults else []
  if missing:  # --config.task=forecast on a text config was a KeyError traceback
    more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
    raise UserError(f"config.task={config.task!r} reads config.data.{', '.join(missing[:4])}"
                    f"{more}, which this config lacks: is it a config for another task? Start "
                    f"from one of that task's configs (configs/*.py)")
  return module.make_task(config)


def make_optimizer(config) -> optax.GradientTransformation:
  o = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, o.learning_rate, max(1, o.warmup_steps), max(o.warmup_steps + 1, config.num_steps),
      end_value=o.learning_rate * o.final_lr_fraction)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                     optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))


def init_state(task, tx, seed: int) -> dict:
  model = task.build_model(nnx.Rngs(params=seed, dropout=seed + 1))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return {"params": params, "rest": rest, "opt_state": tx.init(params),
          "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(seed + 2))}


def loss_scale(config) -> float:
  """The static loss scale of a float16 run (1 otherwise): a power of two near the rows a
  micro-batch's loss averages over (B·T tokens; B windows for a forecast).

  A mean loss gives each row a cotangent ~1/rows: at B·T = 65536 the f16 cotangents between
  layers fell below f16's normal range (6e-5) and the GRU's gradients were 4 % off f32's. Scaled,
  they are those of a sum, O(1) per row: far from both ends of f16's range (max 65504).
  bfloat16 has f32's exponent range and needs none. A power of two scales exactly.
  """
  if config.model.get("dtype") != "float16":
    return 1.0
  rows = config.batch_size // config.grad_accum * config.get("seq_len", 1)
  return float(2 ** max(0, math.floor(math.log2(max(rows, 1)))))


def value_and_grad(loss_fn: Callable, scale: float = 1.0) -> Callable:
  """jax.value_and_grad(loss_fn, has_aux=True), differentiating scale · loss (see loss_scale)
  and dividing the gradients by scale: the loss, aux and gradients come out unscaled."""
  if scale == 1.0:
    return jax.value_and_grad(loss_fn, has_aux=True)

  def scaled(*args):
    loss, aux = loss_fn(*args)
    return loss * scale, (loss, aux)

  def grad_fn(*args):
    grads, out = jax.grad(scaled, has_aux=True)(*args)
    return out, jax.tree.map(lambda g: g / scale, grads)

  return grad_fn


def train_step(state: dict, batch: dict, *, graphdef, task, tx, grad_accum: int,
               gathered=None, scale: float = 1.0):
  """One optimizer step on a global batch, split into `grad_accum` micro-batches.

  gathered: under fsdp, the parameters' shardings for compute (sharding.gathered); scale: the
  loss scale (loss_scale), the gradients are unscaled before anything else sees them.
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

  def loss_fn(params, micro, key):
    return task.loss_fn(nnx.merge(graphdef, _gather(params, gathered), state["rest"]), micro,
                        key)

  grad_fn = value_and_grad(loss_fn, scale)
  if grad_accum == 1:
    (loss, aux), grads = grad_fn(state["params"], batch, rng)
    aux = _metrics(aux)
  else:
    # Micro-batch i is rows i, i + grad_accum, ...: each device holds its share of every
    # micro-batch, so slicing one needs no all-gather of the data-sharded batch. (Not -1 in
    # the reshape: it divides by zero for a zero-size array, such as no past covariates.)
    micro = jax.tree.map(lambda a: jnp.swapaxes(
        a.reshape(a.shape[0] // grad_accum, grad_accum, *a.shape[1:]), 0, 1), batch)

    def weighted(mb, key):
      # A task whose loss is a mean over a varying number of terms (observed targets) gives
      # that number as aux["weight"]: micro-batch means then combine into the full batch's.
      (l, a), g = grad_fn(state["params"], mb, key)
      w = jnp.asarray(a.get("weight", 1.0), jnp.float32)
      return jax.tree.map(lambda x: x * w, (l, _metrics(a), g)) + (w,)

    def accumulate(carry, inp):
      i, mb = inp
      return jax.tree.map(jnp.add, carry, weighted(mb, jax.random.fold_in(rng, i))), None

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
        weighted, jax.tree.map(lambda a: a[0], micro), rng))
    (loss, aux, grads, total), _ = jax.lax.scan(accumulate, zeros,
                                                (jnp.arange(grad_accum), micro))
    loss, aux, grads = jax.tree.map(lambda a: a / jnp.maximum(total, 1e-9), (loss, aux, grads))
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  # param_norm makes a non-finite update visible in the step that made it, before any save.
  metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params))
  return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), metrics


def eval_step(state: dict, batch: dict, *, graphdef, task, gathered=None):
  model = nnx.merge(graphdef, _gather(state["params"], gathered), state["rest"])
  model.eval()
  loss, aux = task.loss_fn(model, batch, jax.random.key(0))
  return dict(aux, loss=loss)  # "weight" stays: _evaluate weighs the eval batches by it


def _metrics(aux: dict) -> dict:
  """A loss_fn's aux without "weight", which weighs batches and is not a metric."""
  return {k: v for k, v in aux.items() if k != "weight"}


def _gather(params, gathered):
  """fsdp: the parameters gathered whole for compute (sharding.gathered)."""
  return params if gathered is None else jax.lax.with_sharding_constraint(params, gathered)


def _state_shardings(abstract_state: dict, mesh, strategy: str) -> dict:
  shardings = sharding.tree_shardings(abstract_state, mesh, strategy)
  shardings["step"] = shardings["rng"] = sharding.replicated(mesh)
  return shardings


def _dotted(config, key: str):
  """config["a"]["b"] for key "a.b"; None where any part is missing."""
  for part in key.split("."):
    config = config.get(part) if config is not None else None
  return config


def check_engine_config(config) -> None:
  """The engine's own keys: one UserError naming the first bad one, before anything runs."""
  # A config not built on engine_defaults (one's own get_config) was an AttributeError
  # traceback at the first key the engine read.
  missing = [k for k in REQUIRED_KEYS if _dotted(config, k) is None]
  if missing:
    more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
    raise UserError(f"the config lacks {', '.join(missing[:4])}{more}; start it from "
                    f"gru_tpu.config.engine_defaults(...) as configs/*.py do")
  positive = ["batch_size", "seq_len", "num_steps", "grad_accum", "log_every", "eval_every",
              "checkpoint_every", "keep_checkpoints", "eval_steps", "model.hidden",
              "model.embed_dim", "model.num_layers", "model.unroll"]
  nonneg = ["seed", "profile_start", "profile_steps", "optimizer.warmup_steps"]
  for keys, low in ((positive, 1), (nonneg, 0)):
    for key in keys:
      value = _dotted(config, key)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or value < low):
        raise UserError(f"config.{key}={value!r}: expected an integer >= {low}")
  # JAX wraps seeds mod 2**32 (2**32 built seed 0's model), numpy's SeedSequence read the batch
  # order's [2**32, epoch] as [0, 1, epoch] (seed 0's next epoch), and 2**63 overflowed.
  if (config.get("seed") or 0) >= 2**31:
    raise UserError(f"config.seed={config.seed}: expected an integer in [0, 2**31)")
  # Each of these trained without a word: a negative learning rate (or grad_clip, or final
  # fraction) climbs the loss, and its checkpoints rotate the good ones out; b1 or b2 >= 1
  # never forgets a gradient. NaN fails every comparison, so it is refused too.
  o = config.get("optimizer") or {}
  for key, ok, want in (("learning_rate", lambda v: 0 <= v < math.inf, "a number >= 0"),
                        ("final_lr_fraction", lambda v: 0 <= v < math.inf, "a number >= 0"),
                        ("weight_decay", lambda v: 0 <= v < math.inf, "a number >= 0"),
                        ("grad_clip", lambda v: v > 0, "a number > 0"),
                        ("b1", lambda v: 0 <= v < 1, "a value in [0, 1)"),
                        ("b2", lambda v: 0 <= v < 1, "a value in [0, 1)")):
    value = o.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not ok(value)):
      raise UserError(f"config.optimizer.{key}={value!r}: expected {want}")
  m = config.model
  for key in ("dropout", "recurrent_dropout"):
    if not 0 <= m.get(key, 0.0) < 1:
      raise UserError(f"config.model.{key}={m.get(key)!r}: expected a value in [0, 1)")
  for key, allowed in (("cell", tuple(CELLS)), ("impl", IMPLS),
                       ("dtype", ("float32", "bfloat16", "float16"))):
    if key in m and m[key] not in allowed:
      raise UserError(f"config.model.{key}={m[key]!r}: expected one of {', '.join(allowed)}")
  # Every task's model (the forecaster's too) would otherwise ignore impl for the other cells,
  # or fail deep inside model construction with a traceback.
  cell = m.get("cell", "gru")
  if m.get("impl") == "pallas" and cell != "gru":
    raise UserError(f"config.model.impl='pallas' needs config.model.cell='gru' (got {cell!r}); "
                    f"use 'auto' or 'scan'")
  if cell == "mingru" and m.get("recurrent_dropout", 0.0):
    raise UserError(f"config.model.recurrent_dropout={m.recurrent_dropout!r}: minGRU has no "
                    f"recurrent weights to drop; set it to 0 (model.dropout acts between layers)")


def _check_batch(config, mesh) -> None:
  data = mesh.shape.get("data", 1)
  B = config.batch_size
  for what, n in (("the data-parallel size (mesh axis 'data')", data),
                  ("config.grad_accum", config.grad_accum)):
    if n < 1 or B % n:
      raise UserError(f"config.batch_size={B} is not divisible by {what} = {n}; pick a multiple")
  if (B // config.grad_accum) % data:
    raise UserError(f"config.batch_size / config.grad_accum = {B // config.grad_accum} is not "
                    f"divisible by the data-parallel size {data}")
  sharding.data_shard(mesh)  # the processes' devices split 'data' in a way batches can follow


def _task_defaults(name: Any) -> dict:
  """The JSON of a task's default config (`default_config()` of its module, else its
  `data_defaults()` as config.data), or {}."""
  try:
    module = importlib.import_module(f"gru_tpu.tasks.{name}")
  except (ImportError, TypeError, ValueError):  # not a task this version has
    return {}
  make = getattr(module, "default_config", None)
  if make:
    return json.loads(make().to_json_best_effort())
  data = getattr(module, "data_defaults", None)
  return {"data": json.loads(data().to_json_best_effort())} if data else {}


def _with_defaults(saved: Any, default: Any) -> Any:
  """saved, plus the keys of default it lacks (recursively)."""
  if not isinstance(saved, dict) or not isinstance(default, dict):
    return saved
  return {**{k: v for k, v in default.items() if k not in saved},
          **{k: _with_defaults(v, default.get(k)) for k, v in saved.items()}}


def _check_compatible(saved_meta: dict, config, task, step: int, directory: epath.Path) -> None:
  # A key the task added after this checkpoint was written is missing from its config; that run
  # behaved as the key's default does (new keys default to the old behaviour).
  saved = _with_defaults(saved_meta["config"], _task_defaults(saved_meta["config"].get("task")))
  now = json.loads(config.to_json_best_effort())
  saved, now = ({**c, **{part: {k: v for k, v in c.get(part, {}).items() if k not in runtime}
                          for part, runtime in (("model", RUNTIME_MODEL_KEYS),
                                                ("data", RUNTIME_DATA_KEYS))}}
                for c in (saved, now))
  diffs = [d for key in COMPATIBLE_KEYS for d in _differences(saved.get(key), now.get(key),
                                                                f"config.{key}")]
  if diffs:
    raise UserError(
        f"{directory} holds a checkpoint (step {step}) from a run with a different "
        f"{', '.join(diffs[:4])}{', ...' if len(diffs) > 4 else ''}; use a fresh --workdir or "
        f"the original config. Nothing was changed.")
  # Allowed, but then the run is not the one a straight run would have been: say so.
  schedule = ("the learning-rate schedule and optimizer follow the new values from step %d on, "
              "so this run will not equal one trained with them from the start")
  batches = ("the batches from step %d on are not the ones the first run would have seen, so "
             "this run will not equal one trained with it from the start")
  micro = ("the micro-batches from step %d on are not the first run's (their dropout draws "
           "and the gradient's rounding differ), so this run will not equal one trained with it "
           "from the start")
  for key, effect in (("num_steps", schedule), ("optimizer", schedule), ("seed", batches),
                      ("batch_size", batches), ("seq_len", batches),  # batch k: f(these, k)
                      ("grad_accum", micro)):
    if key in saved and saved[key] != now.get(key):
      log.warning("config.%s differs from the checkpoint's (%s vs now %s): " + effect, key,
                  saved[key], now.get(key), step)
  # The same config can build other shapes from other data (a corpus with new characters).
  changed = getattr(task, "resume_mismatch", lambda saved: None)(saved_meta.get("task", {}))
  if changed:
    raise UserError(f"{directory} holds a checkpoint (step {step}) whose {changed}; use a fresh "
                    f"--workdir or the original data. Nothing was changed.")


def _differences(saved: Any, now: Any, name: str) -> list[str]:
  """'name.key (SAVED vs now NOW)' for each leaf of two JSON configs that differs."""
  if isinstance(saved, dict) and isinstance(now, dict):
    return [d for k in sorted(saved.keys() | now.keys())
            for d in _differences(saved.get(k), now.get(k), f"{name}.{k}")]
  return [] if saved == now else [f"{name} ({saved!r} vs now {now!r})"]


def _batches(task, split: str, start: int, mesh):
  """This process's rows of each global batch (see sharding.data_shard)."""
  return task.batches(split, start, *sharding.data_shard(mesh))


def _to_global(batch: dict, mesh) -> dict:
  """Each process passes its shard's rows; the result is one global array sharded on 'data'."""
  spec, count = sharding.batch_sharding(mesh), sharding.data_shard(mesh)[1]
  # The global shape is given, not inferred: processes sharing a shard hold the same rows.
  return {k: jax.make_array_from_process_local_data(
              spec, np.asarray(v), (len(v) * count, *np.shape(v)[1:])) for k, v in batch.items()}


@dataclasses.dataclass
class Setup:
  """Everything a run (or an AOT compile) needs, built from the config and a mesh."""
  task: Any
  graphdef: Any
  init: Any
  abstract_state: Any
  state_shardings: Any
  batch_sharding: Any
  train_step: Any  # jitted (state, batch) -> (state, metrics)
  eval_step: Any   # jitted (state, batch) -> metrics


def _in_mesh(fn, mesh):
  """fn traced with `mesh` as the context mesh: the Pallas GRU kernel, which XLA cannot
  partition, runs in a shard_map over it and reads the target TPU generation from its devices
  (also when compiling ahead of time for a topology)."""

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return traced


def setup(config, mesh) -> Setup:
  check_engine_config(config)
  task = load_task(config)
  _check_batch(config, mesh)
  tx = make_optimizer(config)
  init = functools.partial(init_state, task, tx, config.seed)
  abstract = jax.eval_shape(init)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))))
  state_sh = _state_shardings(abstract, mesh, config.sharding)
  batch_sh = sharding.batch_sharding(mesh)
  options = compiler_options(mesh.devices.flat[0].platform)
  gathered = sharding.gathered(state_sh["params"], config.sharding)
  step_fn = jax.jit(
      _in_mesh(functools.partial(train_step, graphdef=graphdef, task=task, tx=tx,
                                 grad_accum=config.grad_accum, gathered=gathered,
                                 scale=loss_scale(config)), mesh),
      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
      donate_argnums=(0,), compiler_options=options)
  eval_fn = jax.jit(_in_mesh(functools.partial(eval_step, graphdef=graphdef, task=task,
                                                gathered=gathered), mesh),
                    in_shardings=(state_sh, batch_sh), compiler_options=options)
  return Setup(task, graphdef, init, abstract, state_sh, batch_sh, step_fn, eval_fn)


def train_and_evaluate(config, workdir: str | os.PathLike,
                       preemption: Preemption | None = None) -> list[dict]:
  """Trains config.num_steps steps (resuming from workdir), returns the eval metrics rows.

  Stops early, with a checkpoint at the current step, when `preemption` says so (the CLI's
  listens for SIGTERM; several processes always agree through JAX's preemption service).
  """
  check_engine_config(config)  # before make_mesh reads config.mesh
  workdir = workdir_path(workdir)  # local or gs://
  preemption = preemption or Preemption()
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"--workdir {workdir} is a file; give a directory (new or a run's)")
  run = enclosing_run(workdir, under="checkpoints")  # it trained a second run among the steps
  if run is not None:
    raise UserError(f"--workdir {workdir} is inside the run directory {run}; give that to "
                    f"resume it (or a new directory). Nothing was changed.")
  _check_shared(workdir)
  _check_same_config(config)
  mesh = sharding.make_mesh(config.mesh)
  s = _together(lambda: setup(config, mesh))  # e.g. a data file one host lacks
  task, step_fn = s.task, s.train_step
  # Everything opened here is closed on errors too: in-flight saves finish before a rerun (a
  # Ctrl-C in a notebook), and orbax's threads do not outlive an early error (they logged
  # "cannot schedule new futures after interpreter shutdown" under its one line).
  with contextlib.ExitStack() as cleanup:
    try:
      lock = _lock_workdir(workdir)
      if lock is not None:  # released last: after in-flight saves finish (ckpt.close)
        cleanup.callback(os.close, lock)
      ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
      cleanup.callback(ckpt.close)
      restored = _restore(ckpt, config, s)
      config_text = config.to_json_best_effort(indent=2) + "\n"
      if restored is None:
        _on_process_0(lambda: _set_aside_earlier_start(workdir, config_text))

      def write_config() -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config_text)

      _on_process_0(write_config)
    except OSError as e:  # read-only or full filesystem, no permission
      raise UserError(f"--workdir {workdir}: cannot write there ({e.strerror or e}); use a "
                      f"writable directory. Nothing was changed.") from None
    if restored is None:
      # Created inside jit with out_shardings: full parameters never exist on one host.
      state = jax.jit(s.init, out_shardings=s.state_shardings)()
      start = 0
    else:
      state, start = restored
    if start >= config.num_steps:  # a finished run started again (a preemptible VM's restart)
      (log.info if start == config.num_steps else log.warning)(
          "nothing to train: %s is at step %d and config.num_steps=%d; raise it to train on",
          ckpt.directory, start, config.num_steps)

    writer = MetricsWriter(workdir)
    cleanup.callback(writer.close)
    _check_written(writer)
    batches = _batches(task, "train", start, mesh)
    evals = []
    # Metrics stay on the device until a log step, eval, save or the end reads them all in one
    # go: a small step on TPU takes less time than the host's own work for one, so a read each
    # step (a transfer, and a wait for the step) adds straight to every step.
    pending: list[tuple[int, Any]] = []  # (step done, metrics) not yet read
    t_last, step_last, compile_logged = time.perf_counter(), start, False
    # Text and synthetic batches are token sequences; a forecast batch is windows.
    per_step, unit = ((config.batch_size * config.seq_len, "tokens") if "seq_len" in config
                      else (config.batch_size, "windows"))

    def finish() -> None:
      """Reads the pending metrics: stops at the first non-finite step (before anything is
      saved after it), writes and logs the log steps."""
      nonlocal t_last, step_last
      rows = jax.device_get([m for _, m in pending])
      for (step_done, _), m in zip(pending, rows):
        if not all(math.isfinite(float(v)) for v in m.values()):
          ckpt.wait()
          bad = ", ".join(f"{k} = {float(v)}" for k, v in m.items()
                          if not math.isfinite(float(v)))
          last = ckpt.latest_step()
          kept = (f"The last good checkpoint (step {last}) is intact." if last is not None
                  else "No checkpoint had been saved yet.")
          raise TrainingDiverged(
              f"{bad} at step {step_done}; training stopped. {kept} Lower "
              f"config.optimizer.learning_rate or raise config.optimizer.grad_clip.")
        if step_done % config.log_every == 0 or step_done == config.num_steps:
          now = time.perf_counter()
          writer.write(step_done, "train", m)
          rate = (step_done - step_last) / max(now - t_last, 1e-9)
          log.info("step %d/%d loss %.4f | %.2f steps/s, %.0f %s/s | ETA %.0fs", step_done,
                   config.num_steps, m["loss"], rate, rate * per_step, unit,
                   (config.num_steps - step_done) / rate)
          t_last, step_last = now, step_done
      pending.clear()

    first = config.get("profile_start", 0)
    profile = _Profile(range(first, min(first + config.get("profile_steps", 0), config.num_steps)),
                       workdir / "profile")
    cleanup.callback(profile.close)
    for step in range(start, config.num_steps):
      profile.before(step)
      batch = _to_global(next(batches), mesh)
      t0 = time.perf_counter()
      state, metrics = step_fn(state, batch)
      if not compile_logged:
        took = time.perf_counter() - t0
        log.info("first step (compile + run) took %.1fs", took)
        t_last += took  # the rates logged are training's: compiling is not part of them
        compile_logged = True
      done = step + 1
      pending.append((done, metrics))
      if len(pending) > RUN_AHEAD:  # a wait, no transfer: returns at once unless device-bound
        jax.block_until_ready(pending[-1 - RUN_AHEAD][1]["loss"])
      preempted = preemption.reached(done) and done < config.num_steps
      profile.after(done, state, stop=preempted)
      evaluate = done % config.eval_every == 0 or done == config.num_steps
      save = done % config.checkpoint_every == 0 or done == config.num_steps or preempted
      report = done % config.log_every == 0 or evaluate or save
      if report:
        finish()
      t_aside = time.perf_counter()
      if evaluate:
        evals.append(_evaluate(config, s, state, mesh, writer, done,
                               final=done == config.num_steps))
      if save:
        writer.flush()  # gs://: the rows up to a checkpoint are uploaded before it exists
      if report:
        _check_written(writer)  # before the save: a checkpoint never outruns its rows
      if save:
        meta = {"config": json.loads(config.to_json_best_effort()), "data_step": done,
                "task": _task_metadata(s, state)}
        ckpt.save(done, state, meta)
      t_last += time.perf_counter() - t_aside  # nor are evals and saves (finish() waited above)
      if preempted:
        log.warning("%s at step %d: saving a checkpoint and stopping; run the same command to "
                    "resume", preemption.reason, done)
        break
    ckpt.wait()
  return evals


class _Profile:
  """A jax.profiler trace of the steps in `window`: started also when a resumed run begins
  inside it, stopped at its end, at a preemption stop, and on errors (close)."""

  def __init__(self, window: range, directory: epath.Path):
    self.window, self.directory, self.on = window, directory, False

  def before(self, step: int) -> None:
    if step in self.window and not self.on:
      jax.profiler.start_trace(str(self.directory))
      self.on = True

  def after(self, done: int, state, stop: bool = False) -> None:
    if self.on and (done == self.window.stop or stop):
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self.on:
      self.on = False
      jax.profiler.stop_trace()


class Preemption:
  """When to stop for a preemption notice or Ctrl-C: `reached(step)`, asked after every step.

  With several processes all must stop at the same step: JAX's preemption service (started by
  jax.distributed.initialize) catches SIGTERM in each process and agrees on a step through the
  coordinator (multihost_utils.reached_preemption_sync_point, called at every step). A single
  process counts a SIGTERM, or a first Ctrl-C, received inside `on_sigterm()` (the CLI's; a
  library call leaves the process's signal handling alone).
  """

  def __init__(self):
    self.requested = False
    self.reason = "preemption notice (SIGTERM)"  # for the log line of the stopping step
    self.multihost = jax.process_count() > 1 and jax.config.jax_enable_preemption_service

  def reached(self, step: int) -> bool:
    if self.multihost:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def _on_sigint(self, *_) -> None:
    # The first Ctrl-C stops like a preemption (the steps since the last save are kept); a
    # second one is the usual KeyboardInterrupt, for a step or compile that takes too long.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    self.requested, self.reason = True, "Ctrl-C"
    log.warning("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again to "
                "stop without saving)")

  @contextlib.contextmanager
  def on_sigterm(self):
    """SIGTERM, and a first Ctrl-C (single process), stop the run at the next step's end."""
    if self.multihost or threading.current_thread() is not threading.main_thread():
      yield self
      return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))
    if previous[signal.SIGINT] is signal.default_int_handler:  # not when Ctrl-C is ignored
      signal.signal(signal.SIGINT, self._on_sigint)
    try:
      yield self
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)


def _check_shared(workdir: epath.Path) -> None:
  """All processes must see one workdir (gs://, or a filesystem every host mounts): with a
  directory per host the first checkpoint save never commits, and the run hangs there.
  Process 0 writes a token, every process reads it back."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  nonce = str(int(multihost_utils.broadcast_one_to_all(
      np.int32(np.random.default_rng().integers(2**31 - 1)))))
  # A name never looked up before: NFS may cache a "no such file" answer for a reused one.
  token = workdir / f".gru_tpu_shared_check_{nonce}"

  def write_token() -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    token.write_text(nonce)

  _on_process_0(write_token)  # also the barrier: the token is written
  seen = multihost_utils.process_allgather(
      np.asarray(token.exists() and token.read_text() == nonce))
  if jax.process_index() == 0:  # the allgather was a barrier: every process has looked
    token.unlink()
  if not np.all(seen):
    blind = [i for i, ok in enumerate(seen) if not ok]
    raise UserError(f"--workdir {workdir} is not shared: process(es) {blind} of "
                    f"{jax.process_count()} do not see what process 0 writes there; use a gs:// "
                    f"workdir or a filesystem every host mounts")


def _lock_workdir(workdir: epath.Path) -> int | None:
  """One training run per workdir. A second one started on it (by mistake, or a restart while
  the first still runs) deleted the first's in-flight save as a cut-off one, failed its saves
  as "disk full", and both wrote the same steps and metrics rows. Process 0 holds an flock on
  WORKDIR/.gru_tpu.lock until the run ends; the OS drops it when the process dies, so a killed
  run leaves no stale lock. An object store has no such lock: on gs:// it is up to the launcher.
  Returns the lock's file descriptor, to close when the run ends (None: none held here)."""
  if is_uri(workdir):
    return None

  def take() -> int:  # the lock's fd; -1 when another run holds it
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / ".gru_tpu.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      return -1
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
        os.close(fd)
        raise
      log.warning("--workdir %s has no file locks (%s): make sure no other run trains there",
                  workdir, e.strerror)
    return fd

  fd = _on_process_0(take)
  if not _everywhere(fd != -1):
    # The file holds no pid: one the holder wrote could still be a finished run's (and by now
    # an unrelated process's) while the holder starts.
    raise UserError(f"--workdir {workdir} is in use by another training run (`fuser -v "
                    f"{workdir / '.gru_tpu.lock'}` names it on its host); wait for it to end (or "
                    f"stop it), or use another --workdir. Nothing was changed.")
  return fd


def _set_aside_earlier_start(workdir: epath.Path, config_text: str) -> None:
  """A start with no checkpoint to resume, in a workdir holding an earlier start's metrics
  (one killed before its first checkpoint, or whose checkpoints were moved away to start over),
  appended its rows to that start's: read_metrics then showed the earlier run's later steps as
  this one's, TensorBoard drew both, and a config.json there was overwritten. They are moved
  to WORKDIR/earlier_start_TIME/ (a config.json alone that equals this run's stays)."""
  found = [workdir / n for n in ("metrics.jsonl", "tensorboard") if (workdir / n).exists()]
  config = workdir / "config.json"
  if config.exists() and (found or config.read_text() != config_text):
    found.append(config)
  if not found:
    return
  stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
  dest = next(d for i in range(1000) if not (d := workdir / (
      f"earlier_start_{stamp}" + (f"_{i}" if i else ""))).exists())
  for p in found:
    move(p, dest / p.name, is_uri(workdir))
  log.warning("no checkpoint to resume in %s: moved the earlier start's %s to %s", workdir,
              ", ".join(p.name for p in found), dest)


def _on_process_0(write: Callable[[], Any]) -> Any:
  """write() on process 0 (None elsewhere); its error is raised on every process: the others
  would wait for it forever in their next collective."""
  return _together(lambda: write() if jax.process_index() == 0 else None)


def _together(fn: Callable[[], T]) -> T:
  """fn() on every process; an error on any one is raised on all of them. Alone, it left the
  others waiting in their next collective until JAX's coordination service aborted them all
  (~5 min, exit 134, the cause in one process's log only)."""
  error = None
  try:
    result = fn()
  except Exception as e:
    error = e
  if not _everywhere(error is None):
    raise error or UserError("another process of this run stopped with an error; its own "
                             "output says which")
  return result


def _check_written(writer: MetricsWriter) -> None:
  """A metrics write that failed (on process 0, the only writer) stops every process here."""
  if not _everywhere(writer.error is None):
    raise writer.error or OSError("process 0 could not write the metrics; its own output says "
                                  "why")


def _check_same_config(config) -> None:
  """Every process runs one config. Another seed on one host silently gave it other initial
  parameters and other rows of each batch; another data file, its own data."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  digest = hashlib.sha256(config.to_json_best_effort(sort_keys=True).encode()).digest()
  digests = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest[:16], np.int32)))
  digests = digests.reshape(jax.process_count(), -1)
  others = [i for i, d in enumerate(digests) if not np.array_equal(d, digests[0])]
  if others:
    raise UserError(f"process(es) {others} of this run were started with another config than "
                    f"process 0; give every process the same --config and --config.* flags")


def _everywhere(ok: bool) -> bool:
  """True iff `ok` on every process (all of them must take the same branch)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _restore(ckpt: Checkpointer, config, s: Setup) -> tuple[Any, int] | None:
  """(state, data position) of the latest readable checkpoint, or None when there is none.

  An unreadable checkpoint (truncated or corrupt files) is skipped with a warning and moved to
  WORKDIR/checkpoints_unreadable/ (so this run can save that step again); if none is readable,
  CheckpointError and nothing changes.
  """
  target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        s.abstract_state, s.state_shardings)
  skipped: list[tuple[int, str]] = []
  for step in reversed(ckpt.steps()):
    error = None
    try:
      meta = ckpt.restore_meta(step)
      _check_compatible(meta, config, s.task, step, ckpt.directory)
      state = ckpt.read(step, target)
    except CheckpointError as e:
      error = str(e)
    # Every process votes once per step, whether its read worked or not (checkpoint.py: no
    # collective may depend on one process's read); verify is a collective with one outcome.
    if _everywhere(error is None):
      try:
        ckpt.verify(step, state, meta)
      except CheckpointError as e:
        error = str(e)
    else:
      error = error or f"checkpoint step {step} is unreadable on another process"
    if error is not None:
      log.warning("%s; trying the previous checkpoint", error)
      skipped.append((step, error))
      continue
    for bad, _ in skipped:
      log.warning("moved unreadable checkpoint step %d to %s", bad, ckpt.set_aside(bad))
    log.info("resumed from step %d in %s", step, ckpt.directory)
    return state, int(meta["data_step"])
  if skipped:
    raise CheckpointError(
        f"no readable checkpoint in {ckpt.directory}: "
        + "; ".join(e for _, e in skipped)
        + ". Restore the files, or move the checkpoints away to start over. Nothing was changed.")
  return None


def _eval_model(s: Setup, state) -> nnx.Module:
  model = nnx.merge(s.graphdef, state["params"], state["rest"])
  model.eval()
  return model


def _task_metadata(s: Setup, state) -> dict:
  """task.metadata(), plus task.model_metadata(model) for tasks whose saved metadata depends on
  the parameters (the forecast task's interval calibration)."""
  meta = s.task.metadata()
  if hasattr(s.task, "model_metadata"):
    meta = {**meta, **s.task.model_metadata(_eval_model(s, state))}
  return meta


def _evaluate(config, s: Setup, state, mesh, writer, step: int,
              final: bool = False) -> dict:
  task = s.task
  batches = _batches(task, "eval", 0, mesh)
  # One read at the end, not a wait for each batch before the next starts; at most RUN_AHEAD
  # batches queued on the device, as in training.
  outs = []
  for _ in range(config.eval_steps):
    outs.append(s.eval_step(state, _to_global(next(batches), mesh)))
    if len(outs) > RUN_AHEAD:
      jax.block_until_ready(outs[-1 - RUN_AHEAD])
  totals = _weighted_mean(jax.device_get(outs))
  if hasattr(task, "finalize_eval"):  # metrics that are not means of batch values
    totals = task.finalize_eval(totals)
  model = None
  if hasattr(task, "evaluate") or hasattr(task, "sample_text"):
    model = _eval_model(s, state)
  if hasattr(task, "evaluate"):  # task-level evaluation (e.g. backtests against baselines)
    totals.update(task.evaluate(model, "eval"))
  writer.write(step, "eval", totals)
  log.info("step %d eval: %s", step, _brief(totals))
  if hasattr(task, "sample_text"):  # e.g. generated text, to TensorBoard and the log
    sample = task.sample_text(model, step)
    writer.write_text(step, "eval/sample", sample)
    log.info("step %d sample: %r", step, sample)
  if final and hasattr(task, "evaluate"):  # the held-out test split, once, at the end
    test = task.evaluate(model, "test")
    writer.write(step, "test", test)
    log.info("step %d test: %s", step, _brief(test))
  return dict(totals, step=step)


def _weighted_mean(rows: list[dict]) -> dict[str, float]:
  """Batch metrics averaged with each batch's aux["weight"] (e.g. its number of observed
  targets), so eval batches of unequal counts give the whole eval set's means; equal weights
  when a task gives none (or all are 0)."""
  w = np.array([float(r.get("weight", 1.0)) for r in rows])
  w = w / w.sum() if w.sum() > 0 else np.full(len(rows), 1 / len(rows))
  return {k: float(sum(wi * float(r[k]) for wi, r in zip(w, rows)))
          for k in rows[0] if k != "weight"}


def _brief(metrics: dict) -> str:
  return " ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Multi-process JAX; must run before anything touches a device."""
  if coordinator and jax.config.jax_platforms in (None, "", "cpu"):
    # Cross-process collectives on CPU need gloo (the default CPU client has none).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes, process_id)
  log.info("process %d of %d", jax.process_index(), jax.process_count())


def _check_required(argv: list[str], known: set[str]) -> str:
  """The --config file's path; UserError when it or --workdir is missing, or for a flag not in
  `known` (the defined flags' names)."""
  def value(flag):
    for i, a in enumerate(argv):
      if a == flag and i + 1 < len(argv):
        if argv[i + 1].startswith("-"):  # absl took the next flag as the value: a run in
          # ./--config.num_steps=0, with that override lost
          raise UserError(f"{flag} needs a value; it is followed by the flag {argv[i + 1]!r}")
        return argv[i + 1]
      if a.startswith(flag + "="):
        return a.split("=", 1)[1]
    return None

  config, workdir = value("--config"), value("--workdir")
  def defined(arg: str) -> bool:
    name = arg.split("=", 1)[0].lstrip("-")
    return name in known or name.startswith("no") and name[2:] in known  # --nodistributed

  unknown = [a for a in argv if a.startswith("-") and a != "--" and not _is_number(a)
             and not a.startswith("--config.") and not defined(a)]
  if unknown:  # absl names it too, but only after the check below said "--workdir is required"
    raise UserError(f"unknown flag {unknown[0]!r}; see gru-tpu train --help")
  if not config or not workdir:
    raise UserError("both --config configs/NAME.py[:arg] and --workdir DIR are required")
  path = config.split(":", 1)[0]
  if not Path(path).is_file():
    raise UserError(f"--config {path}: no such file (give a config such as "
                    f"configs/synthetic.py:size=tiny)")
  return path


def _expand_user(arg: str, before: str | None) -> str:
  """~ in --config's path, as in --workdir's: a shell leaves --config=~/x.py unexpanded."""
  if arg.startswith("--config=~"):
    return "--config=" + os.path.expanduser(arg[len("--config="):])
  return os.path.expanduser(arg) if before == "--config" and arg.startswith("~") else arg


def _is_number(arg: str) -> bool:
  """A negative value after its flag (--config.seed -1) is no flag."""
  try:
    float(arg)
    return True
  except ValueError:
    return False


def _config_file_error(e: BaseException, path: str) -> str | None:
  """One line for an error raised by the config file itself (a SyntaxError, a raise in its
  get_config), or None for any other. absl and ml_collections wrap it, the latter with its
  traceback in the message: the original is the innermost of the chain."""
  chain = [e]
  while (e := e.__cause__ or e.__context__) is not None and e not in chain:
    chain.append(e)
  here = Path(path).resolve()
  for inner in reversed(chain):
    if isinstance(inner, UserError):  # a preset check in get_config: its message as is
      return str(inner)
    if isinstance(inner, SyntaxError) and inner.filename and Path(inner.filename).resolve() == here:
      return f"--config {path}: line {inner.lineno}: SyntaxError: {inner.msg}; fix the file"
    lines = [f.lineno for f in traceback.extract_tb(inner.__traceback__)
             if Path(f.filename).resolve() == here]
    if lines:
      return (f"--config {path}: line {lines[-1]}: {type(inner).__name__}: "
              f"{' '.join(str(inner).split())}; fix the file")
    if isinstance(inner, AttributeError) and inner.name == "get_config":
      return (f"--config {path} defines no get_config(arg); a config file returns its "
              f"ml_collections.ConfigDict from one (see configs/synthetic.py)")
  return None


USAGE = """usage: gru-tpu train --config configs/NAME.py[:arg] --workdir DIR [--config.KEY=VALUE ...]
                     [--distributed | --coordinator_address HOST:PORT --num_processes N
                      --process_id I]

Trains config.task from the config (its docstring has the run command; `arg` holds presets such
as size=tiny) into DIR, resuming from DIR's latest checkpoint. Any config key can be overridden
with --config.KEY=VALUE. See the README's Training section."""


def _one_line(e: Exception) -> str:
  msg = " ".join(str(e).split())
  m = re.search(r"UserError: (.*?)(?: (?:Traceback|File \"|During handling)|$)", msg)
  if m:  # a config file's get_config raised it; absl wraps it with the traceback
    return m.group(1)
  m = re.search(r"'(\w+)'.*Did you mean \"(\w+)\"", msg.replace("\\", ""))
  if m:  # ml_collections' KeyError for a locked config, quoted twice over
    return f"unknown config key {m.group(1)!r} (did you mean {m.group(2)!r}?)"
  m = re.search(r"does not exist and the type does not support indexing\. Attempting to lookup: "
                r"([\w.]+)", msg)
  if m:  # a key below a value (--config.seed.x=1)
    return (f"unknown config key {m.group(1)!r}: a part of it is a value, which has no keys "
            f"below it")
  bare = msg.strip("\"' ")
  if isinstance(e, KeyError) or re.fullmatch(r"\w+", bare):
    return f"unknown config key {bare!r}: check the --config.KEY=VALUE overrides"
  return msg


def _no_orbax_tracebacks(record: logging.LogRecord) -> bool:
  """orbax logs a failed background save with tracebacks from each thread; the error reaches
  the user as one CheckpointError line, so its log records keep only their first line."""
  if "orbax" in record.pathname and record.exc_info:
    record.exc_info = record.exc_text = None
  return True


@contextlib.contextmanager
def _log_to_stderr():
  """The run's log on stderr through our own handler (absl has already claimed the root logger,
  at WARNING), undone on return: an in-process caller (a notebook, a test) keeps its logging."""
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  saved = log.handlers[:], log.level, log.propagate
  log.handlers[:], log.propagate = [handler], False
  log.setLevel(logging.INFO)
  try:
    yield
  finally:
    log.handlers[:], log.propagate = saved[0], saved[2]
    log.setLevel(saved[1])


def main(argv: list[str]) -> int:
  """`gru-tpu train`: absl config flags; a user error is one line on stderr and exit code 2."""
  import ml_collections
  from absl import flags
  from ml_collections import config_flags

  argv = [_expand_user(a, argv[i - 1] if i else None) for i, a in enumerate(argv)]
  fv = flags.FlagValues()
  # sys_argv: the override flags are found in these args, not sys.argv (in-process calls).
  config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:arg]", flag_values=fv,
                                  lock_config=True, sys_argv=["gru-tpu train", *argv])
  flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics.jsonl)",
                      flag_values=fv)
  flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (TPU pods: it "
                    "finds the coordinator itself)", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process "
                      "runs off TPU (implies --distributed)", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "with --coordinator_address", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "with --coordinator_address", flag_values=fv)
  if {"-h", "--help", "--helpshort", "--helpfull"} & set(argv):
    print(USAGE + "\n\n" + fv.get_help(include_special_flags=False))
    return 0
  try:
    path = _check_required(argv, set(fv))
    # ml_collections loads the file into sys.modules["config_config"] with load_module(), which
    # executes it into the module a previous in-process run left there: a file without a
    # get_config of its own ran the previous config's.
    sys.modules.pop("config_config", None)
    try:
      rest = fv(["gru-tpu train", *argv])[1:]
    except Exception as e:  # the config file is Python: any error of its own is the user's
      message = _config_file_error(e, path)
      if message is None:
        raise
      raise UserError(message) from None
    if rest:  # e.g. "config.num_steps=5" without its dashes would silently train the default
      raise UserError(f"unexpected argument {rest[0]!r}; overrides are --config.KEY=VALUE")
    n, i = fv.num_processes, fv.process_id
    if fv.coordinator_address and (n is None or i is None or not 0 <= i < n):
      # jax.distributed.initialize raised a ValueError traceback for a missing one.
      raise UserError(f"--coordinator_address needs --num_processes N >= 1 and --process_id I "
                      f"in [0, N) (got {n} and {i})")
    if (n is not None or i is not None) and not (fv.coordinator_address or fv.distributed):
      # Ignored, each host would train alone: on gs://, all of them in one workdir.
      raise UserError("--num_processes and --process_id need --coordinator_address HOST:PORT "
                      "(or --distributed, on TPU)")
    if not isinstance(fv.config, ml_collections.ConfigDict):  # was "'dict' object has no ..."
      raise UserError(f"--config {path}: get_config returned {type(fv.config).__name__}, not an "
                      f"ml_collections.ConfigDict (start from gru_tpu.config.engine_defaults)")
    fv.config.to_dict()  # config files load lazily: surface a bad file or key now
  except (flags.Error, UserError, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
    print("gru-tpu train: " + _one_line(e), file=sys.stderr)
    return 2
  logging.getLogger("absl").addFilter(_no_orbax_tracebacks)
  with _log_to_stderr():
    if fv.coordinator_address or fv.distributed:
      try:
        initialize_distributed(fv.coordinator_address, fv.num_processes, fv.process_id)
      except ValueError as e:  # --distributed off TPU: "coordinator_address should be defined"
        print(f"gru-tpu train: jax.distributed.initialize(): {_one_line(e).rstrip('.')}; off "
              f"TPU give --coordinator_address HOST:PORT --num_processes N --process_id I",
              file=sys.stderr)
        return 2
    try:
      with Preemption().on_sigterm() as preemption:  # SIGTERM: save, exit 0; Ctrl-C: exit 130
        train_and_evaluate(fv.config, fv.workdir, preemption)
      if preemption.reason == "Ctrl-C":
        return 130  # the shell's code for an interrupted command: `train && sample` stops
    except UserError as e:
      print(f"gru-tpu train: {e}", file=sys.stderr)
      return 2
    except OSError as e:  # a full disk or lost permissions while writing logs or metrics
      print(f"gru-tpu train: {e}; free space or fix permissions, then run the same command to "
            f"resume from the last checkpoint", file=sys.stderr)
      return 2
  return 0
