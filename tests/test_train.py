"""The training engine on the synthetic task: files, learning, exact resume, meshes, bad input,
and loading what a sharded or multi-process run wrote onto this process's one device."""

import concurrent.futures
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx

sys.path.insert(0, str(Path(__file__).parents[1] / "configs"))
import synthetic  # noqa: E402

import gru_tpu  # noqa: E402
from gru_tpu import cli, sharding, train  # noqa: E402
from gru_tpu.errors import UserError  # noqa: E402
from gru_tpu.metrics import read_metrics  # noqa: E402
from gru_tpu.tasks.synthetic import SyntheticTask  # noqa: E402

CONFIG = str(Path(__file__).parents[1] / "configs" / "synthetic.py")
DRIVER = str(Path(__file__).parent / "fault_driver.py")


def tiny(**overrides):
  c = synthetic.get_config("size=tiny")
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 30, 1, 30, 10
  c.update_from_flattened_dict(overrides)
  return c


def losses(workdir, split="train"):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if r["split"] == split}


def test_trains_writes_metrics_config_and_checkpoints(tmp_path):
  evals = train.train_and_evaluate(tiny(num_steps=60, eval_every=60, checkpoint_every=20,
                                        keep_checkpoints=2), tmp_path)
  train_loss = losses(tmp_path)
  assert sorted(train_loss) == list(range(1, 61))
  assert np.mean([train_loss[s] for s in range(51, 61)]) < 0.6 * train_loss[1]
  assert evals[-1]["step"] == 60 and evals[-1]["loss"] < 0.6 * train_loss[1]
  assert json.loads((tmp_path / "config.json").read_text())["task"] == "synthetic"
  # Saved at 20, 40 and 60; keep_checkpoints=2 removed the oldest.
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["40", "60"]
  assert list((tmp_path / "tensorboard").iterdir())


def test_logged_rates_leave_out_compiling_evals_and_saves(tmp_path, monkeypatch, caplog):
  """steps/s, tokens/s and the ETA are training's: the interval after an eval or a save (and
  the first, with the compile) measured 0.01 steps/s here, ~10 on a CPU run where the rest
  measured ~400. A clock that reads 1 ms later each time, and 1000 s for each of those."""
  now = [0.0]

  def later(seconds):
    now[0] += seconds

  def perf_counter():
    later(1e-3)
    return now[0]

  monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=perf_counter))
  real_setup, real_evaluate, real_save = train.setup, train._evaluate, train.Checkpointer.save

  def setup(*args):
    s = real_setup(*args)
    step, calls = s.train_step, []

    def slow_first_step(*a):
      if not calls:
        calls.append(later(1000))  # compiling
      return step(*a)
    return dataclasses.replace(s, train_step=slow_first_step)

  monkeypatch.setattr(train, "setup", setup)
  monkeypatch.setattr(train, "_evaluate", lambda *a, **k: (later(1000), real_evaluate(*a, **k))[1])
  monkeypatch.setattr(train.Checkpointer, "save",
                      lambda *a, **k: (later(1000), real_save(*a, **k))[1])
  with caplog.at_level(logging.INFO, logger="gru_tpu"):
    train.train_and_evaluate(tiny(num_steps=40, log_every=10, eval_every=20,
                                  checkpoint_every=20), tmp_path)
  lines = [r.getMessage() for r in caplog.records if "steps/s" in r.getMessage()]
  rates = [float(re.search(r"\| ([\d.]+) steps/s, \d+ tokens/s \| ETA", m)[1]) for m in lines]
  assert len(rates) == 4 and min(rates) > 10, lines  # ~10 clock reads per 10 steps: ~1000


def test_resume_is_exact(tmp_path, killed_at):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  c = tiny(grad_accum=2, **{"model.recurrent_dropout": 0.1})  # a key per micro-batch
  train.train_and_evaluate(c, straight)
  with killed_at(25):
    train.train_and_evaluate(c, resumed)
  train.train_and_evaluate(c, resumed)  # continues from the step-20 checkpoint
  a, b = losses(straight), losses(resumed)  # steps 21-24 appear twice in `resumed`: last wins
  assert sorted(b) == list(range(1, 31))
  for step in range(21, 31):
    assert a[step] == b[step], f"step {step}: {a[step]} vs {b[step]}"


def test_bf16_compute_trains_and_profile_window_is_written(tmp_path):
  train.train_and_evaluate(tiny(num_steps=40, eval_every=40, profile_start=3, profile_steps=2,
                                **{"model.dtype": "bfloat16"}), tmp_path)
  loss = losses(tmp_path)
  assert np.mean([loss[s] for s in range(31, 41)]) < 0.7 * loss[1]
  assert list((tmp_path / "profile").rglob("*.xplane.pb"))


def test_eval_runs_the_model_without_dropout():
  """eval_step runs the deterministic model: with recurrent dropout on, its loss is that of the
  same parameters built without dropout, and a train-mode loss on the same batch is not."""
  mesh = sharding.make_mesh((("data", 1),))
  drop, plain = (train.setup(tiny(**{"model.recurrent_dropout": p}), mesh) for p in (0.5, 0.0))
  state_drop, state_plain = drop.init(), plain.init()
  for a, b in zip(jax.tree.leaves(state_drop["params"]), jax.tree.leaves(state_plain["params"]),
                  strict=True):
    np.testing.assert_array_equal(a, b)  # dropout adds no parameter: same init
  batch = train._to_global(next(drop.task.batches("eval", 0, 0, 1)), mesh)
  want = float(plain.eval_step(state_plain, batch)["loss"])
  assert float(drop.eval_step(state_drop, batch)["loss"]) == pytest.approx(want, rel=1e-6)
  model = nnx.merge(drop.graphdef, state_drop["params"], state_drop["rest"])  # train mode
  noisy = float(drop.task.loss_fn(model, batch, jax.random.key(0))[0])
  assert abs(noisy - want) > 1e-3 * abs(want)


def test_grad_accumulation_matches_the_full_batch(tmp_path):
  train.train_and_evaluate(tiny(num_steps=5), tmp_path / "full")
  train.train_and_evaluate(tiny(num_steps=5, grad_accum=4), tmp_path / "accum")
  a, b = losses(tmp_path / "full"), losses(tmp_path / "accum")
  np.testing.assert_allclose([b[s] for s in range(1, 6)], [a[s] for s in range(1, 6)], rtol=1e-5)


def test_every_step_and_micro_batch_hands_the_task_its_own_key():
  """train_step folds the step (and the micro-batch) into the run's key: dropout masks drawn
  from one key would repeat at every step. The exact-resume test cannot see that: a repeated
  key repeats the same way after a restart."""
  import functools

  import optax
  from flax import nnx

  class DrawTask:  # its "metric" u is a uniform drawn from the key it is handed
    def build_model(self, rngs):
      return nnx.Linear(1, 1, rngs=rngs)

    def loss_fn(self, model, batch, rng):
      u = jax.random.uniform(rng, ())
      return model(batch["x"]).mean(), {"u": u, "u2": u * u}

  task, tx = DrawTask(), optax.sgd(0.1)
  graphdef = nnx.split(task.build_model(nnx.Rngs(0)), nnx.Param, ...)[0]
  batch = {"x": np.ones((4, 1), np.float32)}
  for accum in (1, 2):
    step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, task=task, tx=tx,
                                     grad_accum=accum))
    state, draws = train.init_state(task, tx, seed=0), []
    for _ in range(3):
      state, m = step(state, batch)
      draws.append(float(m["u"]))
      if accum == 2:  # the mean of u^2 exceeds the squared mean of u: the two u differ
        assert float(m["u2"]) - float(m["u"]) ** 2 > 1e-6, m
    assert len(set(draws)) == 3, f"grad_accum={accum}: {draws}"
    assert float(step(train.init_state(task, tx, seed=0), batch)[1]["u"]) == draws[0]


def test_learning_rate_warms_up_linearly_then_follows_a_cosine():
  """Step s updates with the rate at c = s - 1 (optax counts updates from 0, so the first
  step's rate is 0): peak·c/warmup_steps up to c = warmup_steps, then a cosine down to
  peak·final_lr_fraction at c = num_steps, flat after. Read off AdamW's updates: with a constant
  gradient, Adam's normalised step is 1, so each update is -rate (no decay on zero params)."""
  import math

  import jax.numpy as jnp
  c = tiny(num_steps=12, **{"optimizer.warmup_steps": 4, "optimizer.learning_rate": 0.1,
                            "optimizer.final_lr_fraction": 0.2})
  peak, end, w, n = 0.1, 0.02, 4, 12
  tx = train.make_optimizer(c)
  params, grads = jnp.zeros(()), jnp.full((), 0.5)
  opt_state, got = tx.init(params), []
  for _ in range(n + 2):
    updates, opt_state = tx.update(grads, opt_state, params)
    got.append(-float(updates))
  want = [peak * k / w if k <= w else
          end + (peak - end) * 0.5 * (1 + math.cos(math.pi * min(k - w, n - w) / (n - w)))
          for k in range(n + 2)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def test_optimizer_clips_the_global_norm_then_steps_adamw_with_decoupled_decay():
  """make_optimizer against AdamW written out in numpy: gradients scaled to global norm
  grad_clip when above it, Adam moments with b1, b2 and bias correction, and weight decay added
  to the normalised step (decoupled), all times the scheduled rate. Nonzero parameters, and
  gradients above and below the clip, so that dropping the clip or the decay shows."""
  import math

  import jax.numpy as jnp
  o = {"learning_rate": 0.1, "warmup_steps": 2, "final_lr_fraction": 0.3, "weight_decay": 0.05,
       "grad_clip": 1.0, "b1": 0.8, "b2": 0.9}
  c = tiny(num_steps=6, **{f"optimizer.{k}": v for k, v in o.items()})
  tx = train.make_optimizer(c)
  rng = np.random.default_rng(0)
  p = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
  opt_state = tx.init(params)
  m, v = (jax.tree.map(np.zeros_like, p) for _ in range(2))
  peak, end, w, n = 0.1, 0.03, 2, 6
  for k, scale in enumerate([3.0, 0.2, 2.0, 0.5, 4.0, 0.1, 1.5]):
    raw = jax.tree.map(lambda a: scale * rng.standard_normal(a.shape) / 3, p)
    norm = math.sqrt(sum(float(np.sum(a * a)) for a in jax.tree.leaves(raw)))
    assert (norm > 1.0) == (scale >= 1.5), norm  # both sides of the clip are exercised
    g = jax.tree.map(lambda a: a * min(1.0, 1.0 / norm), raw)
    lr = peak * k / w if k <= w else end + (peak - end) * 0.5 * (
        1 + math.cos(math.pi * min(k - w, n - w) / (n - w)))
    m = jax.tree.map(lambda m_, g_: 0.8 * m_ + 0.2 * g_, m, g)
    v = jax.tree.map(lambda v_, g_: 0.9 * v_ + 0.1 * g_ * g_, v, g)
    want = jax.tree.map(lambda m_, v_, p_: -lr * (
        m_ / (1 - 0.8 ** (k + 1)) / (np.sqrt(v_ / (1 - 0.9 ** (k + 1))) + 1e-8) + 0.05 * p_),
        m, v, p)
    updates, opt_state = tx.update(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), raw),
                                   opt_state, params)
    for name in p:
      np.testing.assert_allclose(np.asarray(updates[name]), want[name], rtol=2e-4, atol=1e-7,
                                 err_msg=f"step {k} {name}")
    p = jax.tree.map(lambda p_, u: p_ + u, p, want)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)


def run_cli(workdir, *flags, devices=1):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "gru_tpu.cli", "train", "--config",
                         f"{CONFIG}:size=tiny", "--workdir", str(workdir), *flags],
                        capture_output=True, text=True, env=env, timeout=600)


def test_same_losses_on_1_device_8_data_and_4x2_data_model(tmp_path):
  common = ["--config.num_steps=12", "--config.log_every=1", "--config.checkpoint_every=6",
            "--config.eval_every=12"]
  with concurrent.futures.ThreadPoolExecutor() as pool:  # mostly 1-thread imports, compiles
    runs = {
        "one": pool.submit(run_cli, tmp_path / "one", *common),
        "data8": pool.submit(run_cli, tmp_path / "data8", *common, devices=8),
        "data4_model2_fsdp": pool.submit(run_cli, tmp_path / "data4_model2_fsdp", *common,
                                         "--config.mesh=(('data', 4), ('model', 2))",
                                         "--config.sharding=fsdp", devices=8),
    }
    runs = {name: r.result() for name, r in runs.items()}
  for name, r in runs.items():
    assert r.returncode == 0, f"{name}: {r.stderr[-2000:]}"
  ref = losses(tmp_path / "one")
  for name in ("data8", "data4_model2_fsdp"):
    got = losses(tmp_path / name)
    np.testing.assert_allclose([got[s] for s in range(1, 13)], [ref[s] for s in range(1, 13)],
                               rtol=2e-5, err_msg=name)
  # Restore anywhere: the fsdp x tensor-parallel checkpoint on this process's single device
  # gives the eval loss the 8-device run measured.
  m = gru_tpu.load(tmp_path / "data4_model2_fsdp")
  assert m.step == 12 and isinstance(m.model.head.kernel[...].sharding,
                                     jax.sharding.SingleDeviceSharding)
  (ev,) = [r for r in read_metrics(tmp_path / "data4_model2_fsdp") if r["split"] == "eval"]
  np.testing.assert_allclose(loaded_loss(m, "eval", range(m.config.eval_steps)), ev["loss"],
                             rtol=2e-5)
  # ... and resume training there: its step-6 checkpoint continues on one device (dp) as the
  # one-device run did.
  shutil.rmtree(tmp_path / "data4_model2_fsdp" / "checkpoints" / "12")
  train.train_and_evaluate(tiny(num_steps=12, checkpoint_every=6, eval_every=12),
                           tmp_path / "data4_model2_fsdp")
  rows = [r["step"] for r in read_metrics(tmp_path / "data4_model2_fsdp") if r["split"] == "train"]
  assert rows == [*range(1, 13), *range(7, 13)]  # resumed at 6, not started over
  got = losses(tmp_path / "data4_model2_fsdp")
  np.testing.assert_allclose([got[s] for s in range(7, 13)], [ref[s] for s in range(7, 13)],
                             rtol=2e-5)
  np.testing.assert_allclose(losses(tmp_path / "data4_model2_fsdp", "eval")[12],
                             losses(tmp_path / "one", "eval")[12], rtol=2e-5)


def test_lstm_and_mingru_train_the_same_on_one_device_and_sharded(tmp_path):
  """The other cells through the engine: tensor parallelism splits their 4H (LSTM) and 2H
  (MinGRU) gate dimensions, and fsdp their weights, without changing a loss."""
  cells = ("lstm", "mingru")
  overrides = dict(num_steps=3, log_every=1, checkpoint_every=3, eval_every=3)
  driver = (
      "import sys; sys.path.insert(0, sys.argv[1]); import synthetic; from gru_tpu import train\n"
      "for cell in sys.argv[3:]:\n"
      "  c = synthetic.get_config('size=tiny')\n"
      f"  c.update_from_flattened_dict({overrides!r})\n"
      "  c.model.cell, c.sharding, c.mesh = cell, 'fsdp', (('data', 4), ('model', 2))\n"
      "  train.train_and_evaluate(c, sys.argv[2] + '/' + cell)\n")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", driver, str(Path(CONFIG).parent),
                      str(tmp_path / "sharded"), *cells],
                     capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  first = {}
  for cell in cells:
    train.train_and_evaluate(tiny(**overrides, **{"model.cell": cell}), tmp_path / cell)
    one, sharded = losses(tmp_path / cell), losses(tmp_path / "sharded" / cell)
    assert sorted(one) == sorted(sharded) == [1, 2, 3]
    np.testing.assert_allclose([sharded[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)],
                               rtol=2e-5, err_msg=cell)
    first[cell] = one[1]
  assert first["lstm"] != first["mingru"]  # the cell key took effect


def loaded_loss(m, split: str, batch_indices) -> float:
  """Mean loss of a loaded synthetic model (eval mode) on the task's global batches."""
  task = SyntheticTask(m.config)
  return float(np.mean([task.loss_fn(m.model, {"tokens": task.global_batch(split, k)},
                                     jax.random.key(0))[0] for k in batch_indices]))


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process_preempt_together_and_restore_anywhere(tmp_path):
  """2 processes x 4 CPU devices (gloo) == 1 process x 8 devices, step for step; SIGTERM to one
  process stops both at the same step (JAX's preemption sync point) with a checkpoint; that
  checkpoint resumes on 1 process x 8 devices and loads onto this process's one device."""
  # The processes agree on the stopping step through the coordination service, some wall time
  # after the signal: on a loaded machine (two test workers) that was once step 8 of 8.
  N = 32
  common = [f"--config.num_steps={N}", "--config.log_every=1", "--config.checkpoint_every=100",
            f"--config.eval_every={N}"]
  ref = run_cli(tmp_path / "one", *common, devices=8)
  assert ref.returncode == 0, ref.stderr[-2000:]
  port = free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", GRU_TPU_FAULTS="term@2", GRU_TPU_FAULT_PROCESS="1")
  procs = [subprocess.Popen(
      [sys.executable, DRIVER, "--config", f"{CONFIG}:size=tiny",
       "--workdir", str(tmp_path / "two"), *common, f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  (saved,) = [int(p.name) for p in (tmp_path / "two" / "checkpoints").iterdir()]
  assert 3 <= saved < N, f"preempted at step {saved}"
  for _, err in outs:  # both processes stopped at the agreed step
    assert f"preemption notice (SIGTERM) at step {saved}: saving a checkpoint" in err
  assert sorted(losses(tmp_path / "two")) == list(range(1, saved + 1))  # process 0 writes once

  r = run_cli(tmp_path / "two", *common, devices=8)  # resume on another topology
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"resumed from step {saved}" in r.stderr
  a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
  assert sorted(b) == list(range(1, N + 1))
  np.testing.assert_allclose([b[s] for s in range(1, N + 1)], [a[s] for s in range(1, N + 1)],
                             rtol=2e-5)
  # The checkpoint the 2 processes wrote, on one device: the loss of the next batch is the one
  # the resumed run measured with those parameters.
  m = gru_tpu.load(tmp_path / "two", step=saved)
  np.testing.assert_allclose(loaded_loss(m, "train", [saved]), b[saved + 1], rtol=2e-5)


def test_a_workdir_each_process_cannot_see_is_refused(tmp_path):
  """Processes on different hosts given a local path each get their own disk's directory."""
  port = free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "gru_tpu.cli", "train", "--config", f"{CONFIG}:size=tiny",
       "--workdir", str(tmp_path / f"host{i}"), f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 2, err[-3000:]
    assert (f"--workdir {tmp_path / 'host0'}" in err or f"--workdir {tmp_path / 'host1'}" in err)
    assert "is not shared: process(es) [1] of 2 do not see what process 0 writes" in err
  assert [p.name for p in (tmp_path / "host0").iterdir()] == []  # the token is gone
  assert not (tmp_path / "host1").exists()


def test_an_error_on_one_process_stops_every_process_at_once(tmp_path):
  """Another config on one process trained silently (its own seed: its own initial parameters
  and rows); a data file one host lacks left the other waiting in its next collective until
  JAX's coordination service aborted both (~5 min, exit 134). Both exit 2 at once now."""
  text = Path(__file__).parents[1] / "configs" / "shakespeare_char.py"
  for i in range(2):
    (tmp_path / f"host{i}").mkdir()
  (tmp_path / "host0" / "corpus.txt").write_text("to be or not to be, that is the question\n" * 40)
  cases = [  # (flags for process 0, for process 1) -> what each says
      (([], ["--config.seed=7"]), ["process(es) [1] of this run were started with another "
                                   "config than process 0; give every process the same"] * 2),
      (([], []), ["another process of this run stopped with an error; its own output says",
                  "corpus.txt"]),
  ]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  for n, (flags, said) in enumerate(cases):
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "gru_tpu.cli", "train", "--config", f"{text}:size=tiny",
         "--workdir", str(tmp_path / f"run{n}"), "--config.data.source=files:corpus.txt",
         "--config.num_steps=2", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}", *flags[i]], cwd=tmp_path / f"host{i}",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    try:
      outs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
      for p in procs:
        p.kill()
    for p, err, message in zip(procs, outs, said):
      assert p.returncode == 2 and message in err, err[-3000:]
    assert not (tmp_path / f"run{n}" / "checkpoints").exists()


@pytest.mark.parametrize("flag,message", [
    ("--config.optimizer.learning_rat=0.1",
     "unknown config key 'learning_rat' (did you mean 'learning_rate'?)"),
    ("--config.optimizer.zzz=1", "unknown config key 'zzz'"),
    ("--config.batch_size=abc", "--config.batch_size=abc: invalid literal for int()"),
    ("--config.model.unroll=0", "config.model.unroll=0: expected an integer >= 1"),
    # Segfaulted in XLA with 4 devices; a traceback with one.
    ("--config.mesh=(('data', -1), ('data', 1))", "each once"),
])
def test_bad_config_override_is_one_clear_line(tmp_path, flag, message):
  r = run_cli(tmp_path, flag)
  assert r.returncode == 2
  assert message in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("overrides,message", [
    ({"eval_every": 0}, r"config.eval_every=0: expected an integer >= 1"),
    # orbax's max_to_keep=0 deleted every checkpoint, old ones included
    ({"keep_checkpoints": 0}, r"config.keep_checkpoints=0: expected an integer >= 1"),
    ({"batch_size": 0}, r"config.batch_size=0"),
    ({"seq_len": 0}, r"config.seq_len=0"),
    ({"seed": -1}, r"config.seed=-1: expected an integer >= 0"),
    # Wrapped by JAX (seed 0's model) and numpy (seed 0's batches one epoch on); 2**63: traceback
    ({"seed": 2**32}, r"config.seed=4294967296: expected an integer in \[0, 2\*\*31\)"),
    ({"seed": 2**31}, r"config.seed=2147483648: expected an integer in \[0, 2\*\*31\)"),
    ({"eval_steps": 0}, r"config.eval_steps=0: expected an integer >= 1"),  # KeyError at eval
    ({"model.num_layers": 0}, r"config.model.num_layers=0"),
    ({"model.cell": "rnn"}, r"config.model.cell='rnn': expected one of gru, lstm, mingru"),
    ({"model.dtype": "bf16"}, r"config.model.dtype='bf16': expected one of float32, bfloat16, float16"),
    ({"model.dropout": 1.5}, r"config.model.dropout=1.5: expected a value in \[0, 1\)"),
    ({"model.cell": "mingru", "model.recurrent_dropout": 0.1},
     r"config.model.recurrent_dropout=0.1: minGRU has no recurrent weights"),
    ({"mesh": (("dat", -1), ("model", 1))}, r"expected axes \('data', N\)"),
    ({"mesh": (("data", -1, 1),)}, r"expected axes \('data', N\)"),
    ({"mesh": (("data", 0),)}, r"sizes positive or -1"),
    # These trained without a word: a negative rate or clip norm climbed the loss
    ({"optimizer.learning_rate": -1e-2}, r"config.optimizer.learning_rate=-0.01: expected a "
                                          r"number >= 0"),
    ({"optimizer.learning_rate": float("nan")}, r"config.optimizer.learning_rate=nan"),
    ({"optimizer.grad_clip": -1.0}, r"config.optimizer.grad_clip=-1.0: expected a number > 0"),
    ({"optimizer.grad_clip": 0.0}, r"config.optimizer.grad_clip=0.0: expected a number > 0"),
    ({"optimizer.warmup_steps": -5}, r"config.optimizer.warmup_steps=-5: expected an integer >= 0"),
    ({"optimizer.final_lr_fraction": -0.5}, r"config.optimizer.final_lr_fraction=-0.5"),
    ({"optimizer.weight_decay": -1e-4}, r"config.optimizer.weight_decay=-0.0001"),
    ({"optimizer.b1": 1.5}, r"config.optimizer.b1=1.5: expected a value in \[0, 1\)"),
    ({"optimizer.b2": 1.0}, r"config.optimizer.b2=1.0: expected a value in \[0, 1\)"),
    # Tracebacks (GRU in_features, ZeroDivisionError, numpy at the first batch) or a degenerate
    # task trained without a word.
    ({"model.embed_dim": 0}, r"config.model.embed_dim=0: expected an integer >= 1"),
    ({"data.vocab_size": 0}, r"config.data.vocab_size=0: expected an integer >= 2"),
    ({"data.lag": 0}, r"config.data.lag=0: expected an integer >= 1"),
    ({"data.noise": -1.0}, r"config.data.noise=-1.0: expected a fraction in \[0, 1\]"),
    # Another task's config: a KeyError traceback in the task
    ({"task": "forecast"}, r"config.task='forecast' reads config.data.calendar_terms, "
                           r"context_length, horizon, id_column and \d+ more, which this config "
                           r"lacks: is it a config for another task\?"),
])
def test_bad_engine_values_are_one_clear_error_before_anything_is_written(tmp_path, overrides,
                                                                         message):
  with pytest.raises(UserError, match=message):
    train.train_and_evaluate(tiny(**overrides), tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_config_presets_are_checked():
  assert synthetic.get_config("size=small,").batch_size == 64
  for arg, message in (("size=huge", r"preset size='huge': expected one of tiny, small"),
                       ("tiny", r"presets are KEY=VALUE \(e.g. :size=tiny\); got 'tiny'"),
                       ("sise=tiny", r"preset 'sise' is unknown; this config knows size")):
    with pytest.raises(UserError, match=message):
      synthetic.get_config(arg)


def test_help_presets_and_stray_arguments_on_the_command_line(tmp_path):
  r = subprocess.run([sys.executable, "-m", "gru_tpu.cli", "train", "--help"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and r.stdout.startswith("usage: gru-tpu train --config")
  assert "--workdir" in r.stdout
  r = subprocess.run([sys.executable, "-m", "gru_tpu.cli", "train", "--config",
                      f"{CONFIG}:size=huge", "--workdir", str(tmp_path)],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and r.stderr.strip() == (
      "gru-tpu train: --config preset size='huge': expected one of tiny, small")
  r = run_cli(tmp_path, "config.num_steps=5")  # without its dashes: not an override
  assert r.returncode == 2 and "unexpected argument 'config.num_steps=5'" in r.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_incomplete_multi_process_flags_are_one_line(tmp_path, capsys, monkeypatch):
  for flags in ([], ["--num_processes=2"], ["--num_processes=2", "--process_id=2"]):
    assert train.main(["--config", f"{CONFIG}:size=tiny", "--workdir", str(tmp_path),
                       "--coordinator_address=127.0.0.1:1", *flags]) == 2
    assert "--coordinator_address needs --num_processes N >= 1 and --process_id I in [0, N)" in (
        capsys.readouterr().err)
  # Without the address they were ignored: each host trained alone, in one gs:// workdir.
  assert train.main(["--config", f"{CONFIG}:size=tiny", "--workdir", str(tmp_path),
                     "--num_processes=2", "--process_id=1"]) == 2
  assert "--num_processes and --process_id need --coordinator_address" in capsys.readouterr().err
  # --distributed off TPU finds no coordinator: it was a ValueError traceback, exit 1.
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a: (_ for _ in ()).throw(
      ValueError("coordinator_address should be defined.")))
  assert train.main(["--config", f"{CONFIG}:size=tiny", "--workdir", str(tmp_path),
                     "--distributed"]) == 2
  assert capsys.readouterr().err.strip() == (
      "gru-tpu train: jax.distributed.initialize(): coordinator_address should be defined; off "
      "TPU give --coordinator_address HOST:PORT --num_processes N --process_id I")
  assert not tmp_path.exists() or not any(tmp_path.iterdir())


SPLIT_BATCH = """
import json
import numpy as np
from gru_tpu import sharding, train
mesh = sharding.make_mesh((("model", 2), ("data", 2)))
x = np.arange(8 * 3).reshape(8, 3)
g = train._to_global({"x": x}, mesh)["x"]
pos = {d.id: int(i[1]) for i, d in np.ndenumerate(mesh.devices)}
print(json.dumps({"equal": bool((np.asarray(g) == x).all()),
                  "shards": [[pos[s.device.id], np.asarray(s.data)[:, 0].tolist()]
                             for s in g.addressable_shards]}))
"""


def test_each_device_holds_only_its_data_positions_rows():
  """The global batch is split over 'data' (replicated over 'model'): 4 devices, data 2 x
  model 2, each holds the 4 rows of its data position. Replicated batches gave the same losses
  (every test compared losses) while each device computed the whole batch: 3.7x the per-device
  FLOPs in scripts/aot_compile.py on v5e:2x2."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", SPLIT_BATCH], capture_output=True, text=True,
                     env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.splitlines()[-1])
  assert out["equal"]
  assert sorted(out["shards"]) == [[0, [0, 3, 6, 9]]] * 2 + [[1, [12, 15, 18, 21]]] * 2


def test_processes_sharing_data_positions_load_the_same_rows(tmp_path):
  """'model' written first puts each process on every 'data' position: both must load the
  whole batch. Each used to load its own half, and the run trained on wrong batches with no
  error (losses 0.3-0.6 % off). Two processes x 4 devices against one process, resuming a
  checkpoint whose arrays only process 1 cannot read: orbax's restore ended in a barrier that
  process skipped, and both crashed in mismatched collectives; now both set it aside and
  resume from the one before."""
  overrides = {"num_steps": 4, "log_every": 1, "checkpoint_every": 1, "eval_every": 4}
  train.train_and_evaluate(tiny(**overrides), tmp_path / "one")
  shutil.copytree(tmp_path / "one", tmp_path / "two")
  shutil.rmtree(tmp_path / "two" / "checkpoints" / "4")
  port = free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", GRU_TPU_FAULTS="unreadable@3", GRU_TPU_FAULT_PROCESS="1")
  procs = [subprocess.Popen(
      [sys.executable, DRIVER, "--config", f"{CONFIG}:size=tiny",
       "--workdir", str(tmp_path / "two"), *(f"--config.{k}={v}" for k, v in overrides.items()),
       "--config.mesh=(('model', 2), ('data', 4))", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert "resumed from step 2" in err
  assert (tmp_path / "two" / "checkpoints_unreadable" / "3").is_dir()
  steps = [r["step"] for r in read_metrics(tmp_path / "two") if r["split"] == "train"]
  assert steps == [1, 2, 3, 4, 3, 4]  # the copied rows, then the 2-process run's
  a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
  np.testing.assert_allclose([b[s] for s in (3, 4)], [a[s] for s in (3, 4)], rtol=2e-5)
  np.testing.assert_allclose(losses(tmp_path / "two", "eval")[4], losses(tmp_path / "one",
                                                                          "eval")[4], rtol=2e-5)

def test_workdir_that_is_a_file_is_refused(tmp_path):
  (tmp_path / "f").write_text("mine")
  with pytest.raises(UserError, match="is a file; give a directory"):
    train.train_and_evaluate(tiny(), tmp_path / "f")
  assert (tmp_path / "f").read_text() == "mine"
  (tmp_path / "run").mkdir()  # it trained to the first save, then blamed the disk
  (tmp_path / "run" / "checkpoints").write_text("mine")
  with pytest.raises(UserError, match=r"run/checkpoints is a file, not a checkpoints directory"):
    train.train_and_evaluate(tiny(), tmp_path / "run")
  assert (tmp_path / "run" / "checkpoints").read_text() == "mine"


def test_a_learning_rate_of_zero_is_allowed():
  """0 trains nothing, on purpose (timing steps, checking a pipeline); only < 0 climbs the loss."""
  train.check_engine_config(tiny(**{"optimizer.learning_rate": 0.0}))
  with pytest.raises(UserError, match="expected a number >= 0"):
    train.check_engine_config(tiny(**{"optimizer.learning_rate": -1e-9}))


def test_loaded_metrics_keep_the_rows_of_the_run_that_went_on(tmp_path, killed_at):
  """A run killed after step 7 resumes from step 5 with another learning rate: steps 6 and 7
  are in metrics.jsonl twice, and m.metrics() keeps the later rows (the run that went on), once
  each, sorted by split and step."""
  common = dict(num_steps=10, checkpoint_every=5, eval_every=5, eval_steps=1)
  with killed_at(9):  # batches: steps 1-5, the eval at 5, steps 6 and 7, then step 8's
    train.train_and_evaluate(tiny(**common), tmp_path)
  train.train_and_evaluate(tiny(**common, **{"optimizer.learning_rate": 0.02}), tmp_path)
  rows = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 6, 7, 8, 9, 10]
  first_7, later_7 = (r["loss"] for r in rows if r["step"] == 7)
  assert first_7 != later_7  # step 6 updated with another rate
  m = gru_tpu.load(tmp_path)
  df = m.metrics()
  assert list(zip(df["split"], df["step"])) == (
      [("eval", 5), ("eval", 10)] + [("train", s) for s in range(1, 11)])
  assert df.set_index(["split", "step"]).loc[("train", 7), "loss"] == later_7
  import matplotlib.pyplot as plt
  ax = m.plot_metrics("loss")
  lines = {line.get_label(): line for line in ax.get_lines()}
  plt.close(ax.figure)
  assert sorted(lines) == ["eval loss", "train loss"]
  assert list(lines["train loss"].get_xdata()) == list(range(1, 11))


def test_a_workdir_inside_a_runs_checkpoints_is_refused(tmp_path, monkeypatch):
  """--workdir RUN/checkpoints trained a second run among the first's steps (exit 0); so did
  `--workdir .` from inside it and a path two levels down (a step's state/)."""
  run = tmp_path / "run"
  (run / "checkpoints" / "4" / "state").mkdir(parents=True)
  (run / "config.json").write_text("{}")
  for inside in (run / "checkpoints", run / "checkpoints" / "4", run / "checkpoints" / "new",
                 run / "checkpoints" / "4" / "state", Path("."), Path("../4/state/x")):
    monkeypatch.chdir(run / "checkpoints" / "4")
    with pytest.raises(UserError, match=f"--workdir {re.escape(str(inside))} is inside the run "
                                        f"directory {run}; give that to resume it"):
      train.train_and_evaluate(tiny(num_steps=2), inside)
  assert sorted(p.relative_to(run) for p in run.rglob("*")) == [
      Path("checkpoints"), Path("checkpoints/4"), Path("checkpoints/4/state"), Path("config.json")]


def test_a_workdir_another_run_is_training_in_is_refused(tmp_path):
  """A second run on a workdir deleted the first's in-flight save as a cut-off one, failed the
  first's next save ("disk full"), and both wrote every step's metrics. The other run here is
  this process holding the lock on another open file (an flock is per open file)."""
  w = tmp_path / "run"
  in_flight = w / "checkpoints" / "20.orbax-checkpoint-tmp-1"  # the other run's save
  in_flight.mkdir(parents=True)
  fd = os.open(w / ".gru_tpu.lock", os.O_RDWR | os.O_CREAT)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"whatever was here\n")
    with pytest.raises(UserError, match=r"--workdir .* is in use by another training run "
                                        r"\(`fuser -v .*\.gru_tpu\.lock` names it on its host\); "
                                        r"wait for it to end"):
      train.train_and_evaluate(tiny(), w)
  finally:
    os.close(fd)
  assert in_flight.is_dir()
  assert sorted(p.name for p in w.iterdir()) == [".gru_tpu.lock", "checkpoints"]
  assert (w / ".gru_tpu.lock").read_bytes() == b"whatever was here\n"


@pytest.mark.parametrize("unwritable", [".gru_tpu.lock", "config.json"])
def test_a_write_error_on_process_0_is_raised_on_every_process(tmp_path, monkeypatch, unwritable):
  """Process 0 alone raised (a lock file or config.json it could not write: here directories),
  and with 2 processes the other one waited for it in its next collective, both forever."""
  seen = []
  monkeypatch.setattr(train, "_everywhere", lambda ok: (seen.append(ok), ok)[1])
  (tmp_path / unwritable).mkdir()
  with pytest.raises(UserError, match=r"cannot write there \(Is a directory\)"):
    train.train_and_evaluate(tiny(), tmp_path)
  assert seen[-1] is False  # told the others before raising
  monkeypatch.setattr(train, "_everywhere", lambda ok: False)  # what process 1 then hears
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with pytest.raises(UserError, match="another process of this run stopped with an error"):
    train._lock_workdir(train.workdir_path(tmp_path))
  from jax.experimental import multihost_utils  # the shared-workdir check's token, too
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: x)
  seen.clear()
  monkeypatch.setattr(train, "_everywhere", lambda ok: (seen.append(ok), ok)[1])
  (tmp_path / "f").write_text("")
  with pytest.raises(OSError):
    train._check_shared(train.workdir_path(tmp_path / "f" / "run"))
  assert seen == [False]


def test_a_failed_metrics_write_stops_every_process_at_its_step(tmp_path, monkeypatch):
  """A metrics write failed on process 0 (the only writer; a full disk, a GCS error) was raised
  there alone: process 1 waited in its next collective until both were aborted (~5 min). All
  hear of it at that step now, before a checkpoint could outrun its rows."""
  from gru_tpu.metrics import MetricsWriter

  class FullDisk:
    def __init__(self, f):
      self.f, self.rows = f, 0

    def write(self, row):
      self.rows += 1
      if self.rows == 3:
        raise OSError(errno.ENOSPC, "No space left on device")
      self.f.write(row)

    def __getattr__(self, name):
      return getattr(self.f, name)

  real_open = MetricsWriter._open

  def full_disk_open(self, workdir):
    real_open(self, workdir)
    self.file = FullDisk(self.file)

  monkeypatch.setattr(MetricsWriter, "_open", full_disk_open)
  seen = []
  monkeypatch.setattr(train, "_everywhere", lambda ok: (seen.append(ok), ok)[1])
  with pytest.raises(OSError, match="No space left on device"):
    train.train_and_evaluate(tiny(num_steps=30, log_every=1, checkpoint_every=5), tmp_path)
  assert seen[-1] is False and sorted(losses(tmp_path)) == [1, 2]
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
  monkeypatch.setattr(train, "_everywhere", lambda ok: False)  # what process 1 then hears
  with pytest.raises(OSError, match="process 0 could not write the metrics"):
    train._check_written(types.SimpleNamespace(error=None))


def test_an_unwritable_workdir_is_one_clear_error(tmp_path, monkeypatch):
  """A read-only filesystem (simulated: the tests may run as root, whom chmod does not stop)."""
  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")

  monkeypatch.setattr(train, "Checkpointer", read_only)
  with pytest.raises(UserError, match=r"cannot write there \(Read-only file system\); use a "
                                      r"writable directory. Nothing was changed."):
    train.train_and_evaluate(tiny(), tmp_path / "run")


def test_a_full_disk_mid_run_is_one_line_that_says_how_to_resume(tmp_path, monkeypatch, capsys):
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(train, "train_and_evaluate", full)
  log = logging.getLogger("gru_tpu")
  before = log.handlers[:], log.level, log.propagate
  assert train.main(["--config", f"{CONFIG}:size=tiny", "--workdir", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "No space left on device" in err
  assert "run the same command to resume from the last checkpoint" in err
  # The CLI's stderr handler is gone again: it had stayed, writing to a since-closed capture
  # stream, and with propagate off later tests' caplog saw nothing from gru_tpu.
  assert (log.handlers[:], log.level, log.propagate) == before


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_saves_the_step_it_is_on_and_a_second_one_stops_at_once(tmp_path, monkeypatch,
                                                                       capsys, presses):
  """A first Ctrl-C on `gru-tpu train` stops like a preemption notice (the step it is on is
  saved); a second stops at once without saving. Exit 130 and no traceback either way, and the
  caller's signal handlers are back afterwards."""
  real, calls = train._to_global, []

  def ctrl_c(batch, mesh):
    calls.append(1)
    if len(calls) == 3:  # as step 3's batch goes to the devices
      for _ in range(presses):
        signal.raise_signal(signal.SIGINT)
    return real(batch, mesh)

  monkeypatch.setattr(train, "_to_global", ctrl_c)
  # pytest-xdist's workers may ignore SIGINT; a terminal's process has Python's default handler.
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    rc = cli.main(["train", "--config", f"{CONFIG}:size=tiny", "--workdir", str(tmp_path),
                   "--config.num_steps=10", "--config.checkpoint_every=100",
                   "--config.eval_every=100", "--config.log_every=1"])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
  finally:
    signal.signal(signal.SIGINT, outer)
  err = capsys.readouterr().err
  assert rc == 130 and "Traceback" not in err, err[-2000:]
  ckpts = tmp_path / "checkpoints"
  saved = sorted(p.name for p in ckpts.iterdir()) if ckpts.exists() else []
  if presses == 1:
    assert "Ctrl-C at step 3: saving a checkpoint and stopping; run the same command" in err
    assert saved == ["3"] and sorted(losses(tmp_path)) == [1, 2, 3]
  else:
    assert saved == []
    assert err.strip().splitlines()[-1] == ("gru-tpu train: interrupted; run the same command "
                                            "to resume from the latest checkpoint")


def test_a_workdir_under_home_is_expanded(tmp_path, monkeypatch):
  """`--workdir=~/run` (quoted, or after `=`, the shell leaves the ~): a run, its metrics and
  gru_tpu.load all go to $HOME/run, not to a directory named "~"."""
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.chdir(tmp_path)
  train.train_and_evaluate(tiny(num_steps=2, eval_every=2, checkpoint_every=2), "~/run")
  assert not (tmp_path / "~").exists()
  assert (tmp_path / "run" / "metrics.jsonl").exists()
  assert sorted(losses("~/run")) == [1, 2]
  assert gru_tpu.load("~/run").step == 2


def test_a_failing_metrics_flush_does_not_replace_the_error(tmp_path, monkeypatch):
  from gru_tpu.metrics import MetricsWriter
  w = MetricsWriter(tmp_path)

  def full():
    raise OSError(28, "No space left on device")

  real_close = w.tb.close
  monkeypatch.setattr(w.tb, "close", full)
  w.close()  # logged, not raised: it runs while a CheckpointError propagates
  # Left open, tensorboardX's atexit hook closes it at shutdown, where Python >= 3.12 refuses the
  # thread that needs ("can't create new thread at interpreter shutdown", printed after the run).
  real_close()


def test_a_gs_metrics_file_is_uploaded_at_saves_and_on_a_timer_not_per_row(tmp_path,
                                                                            monkeypatch):
  """An object cannot be appended to: each upload of metrics.jsonl sends every row so far. One
  per logged row made a long run's log steps ever slower (O(rows) each, O(rows²) a run). Now
  the rows up to each checkpoint are uploaded before its save, others at most every
  UPLOAD_SECONDS. (A local workdir stands in for gs://: only metrics.py is told so.)"""
  import types

  from gru_tpu import metrics
  uploads, clock, at_saves = [], [0.0], []
  path_type = type(epath.Path(tmp_path))
  real_write, real_save = path_type.write_text, train.Checkpointer.save

  def write_text(path, text, *args, **kwargs):
    if path.name != "metrics.jsonl":
      return real_write(path, text, *args, **kwargs)
    uploads.append([json.loads(line)["step"] for line in text.splitlines()])

  monkeypatch.setattr(metrics, "is_uri", lambda path: True)
  monkeypatch.setattr(metrics, "time", types.SimpleNamespace(monotonic=lambda: clock[0]),
                      raising=False)
  monkeypatch.setattr(path_type, "write_text", write_text)
  monkeypatch.setattr(train.Checkpointer, "save", lambda self, step, *a: (
      at_saves.append((step, uploads[-1])), real_save(self, step, *a)))
  train.train_and_evaluate(tiny(num_steps=20, checkpoint_every=10, eval_every=20), tmp_path)
  # One upload before each save (train rows 1..20, and the eval row of step 20); nothing new
  # to upload at the end.
  assert at_saves == [(10, [*range(1, 11)]), (20, [*range(1, 21), 20])]
  assert len(uploads) == 2

  w, uploads[:] = metrics.MetricsWriter(tmp_path / "w"), []
  for step in range(1, 4):
    clock[0] += 25.0
    w.write(step, "train", {"loss": 1.0})
  assert uploads == [[1, 2, 3]]  # 75 s after the writer opened
  w.write(4, "train", {"loss": 1.0})
  w.close()
  assert uploads == [[1, 2, 3], [1, 2, 3, 4]]


def test_a_profile_window_resumes_and_ends_with_the_run(tmp_path, killed_at):
  """A run resumed inside its profile window traces again (it used to stop a trace it never
  started: RuntimeError), and a window reaching past num_steps is cut at the end."""
  c = tiny(num_steps=30, profile_start=5, profile_steps=100)
  with killed_at(13):
    train.train_and_evaluate(c, tmp_path)
  try:  # a fresh process: no trace left over from the killed run
    jax.profiler.stop_trace()
  except RuntimeError:
    pass
  shutil.rmtree(tmp_path / "profile")
  train.train_and_evaluate(c, tmp_path)  # from step 10, inside the window
  assert sorted(losses(tmp_path)) == list(range(1, 31))
  assert list((tmp_path / "profile").rglob("*.xplane.pb"))


def test_missing_config_file_is_one_clear_line(tmp_path):
  r = subprocess.run([sys.executable, "-m", "gru_tpu.cli", "train", "--config", "nope.py",
                      "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "--config nope.py: no such file" in r.stderr


@pytest.mark.parametrize("source,message", [
    ("def get_config(:\n", "line 1: SyntaxError: invalid syntax; fix the file"),  # traceback
    ("def get_config(arg=None):\n  raise RuntimeError('boom')\n",
     "line 2: RuntimeError: boom; fix the file"),  # a traceback
    ("def get_config(arg=None):\n  raise ValueError('bad size')\n",
     "line 2: ValueError: bad size; fix the file"),  # ml_collections' traceback on one line
    ("x = 1\n", "defines no get_config(arg)"),  # "module 'config_config' has no attribute"
    ("def get_config(arg=None):\n  return {'num_steps': 1}\n",
     "get_config returned dict, not an ml_collections.ConfigDict"),  # "no attribute 'to_dict'"
    ("import ml_collections\ndef get_config(arg=None):\n"
     "  return ml_collections.ConfigDict({'num_steps': 1})\n",
     "the config lacks task, seed, mesh, sharding and 16 more; start it from "
     "gru_tpu.config.engine_defaults"),  # an AttributeError traceback at config.mesh
])
def test_a_broken_config_file_is_one_line_naming_it(tmp_path, capsys, source, message):
  """In-process, after another config: a file without get_config ran the previous one's."""
  assert cli.main(["train", "--config", f"{CONFIG}:size=huge", "--workdir", str(tmp_path)]) == 2
  capsys.readouterr()
  path = tmp_path / "mine.py"
  path.write_text(source)
  assert cli.main(["train", "--config", str(path), "--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
  assert not (tmp_path / "run").exists()


def test_batch_not_divisible_by_data_parallel_size(tmp_path):
  r = run_cli(tmp_path, "--config.batch_size=12", devices=8)
  assert r.returncode == 2
  assert "config.batch_size=12 is not divisible by the data-parallel size" in r.stderr
  # Each micro-batch is split over 'data' too: 16 rows in 4 micro-batches of 4 cannot be.
  r = run_cli(tmp_path, "--config.batch_size=16", "--config.grad_accum=4", devices=8)
  assert r.returncode == 2
  assert ("config.batch_size / config.grad_accum = 4 is not divisible by the data-parallel "
          "size 8") in r.stderr


def test_mesh_not_matching_devices(tmp_path):
  r = run_cli(tmp_path, "--config.mesh=(('data', 3), ('model', 1))", devices=8)
  assert r.returncode == 2 and "needs 3 devices but 8 are available" in r.stderr


def snapshot(directory: Path) -> dict:
  return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resuming_with_another_length_optimizer_or_data_order_says_it_is_not_exact(tmp_path,
                                                                                    monkeypatch):
  """Raising num_steps to extend a run also stretches the cosine schedule; another seed or batch
  size changes the batches: allowed, not silent."""
  saved = {"config": json.loads(tiny().to_json_best_effort()), "task": {}}
  seen = []
  monkeypatch.setattr(train.log, "warning", lambda msg, *args: seen.append(msg % args))
  train._check_compatible(saved, tiny(), None, 20, tmp_path)
  assert seen == []
  later = tiny(num_steps=60, **{"optimizer.learning_rate": 0.5})
  train._check_compatible(saved, later, None, 20, tmp_path)
  assert len(seen) == 2
  assert seen[0].startswith("config.num_steps differs from the checkpoint's (30 vs now 60): the "
                            "learning-rate schedule and optimizer follow the new values from "
                            "step 20 on")
  assert seen[1].startswith("config.optimizer differs") and "'learning_rate': 0.5" in seen[1]
  seen.clear()  # another data order: it used to resume without a word
  train._check_compatible(saved, tiny(seed=1, batch_size=8), None, 20, tmp_path)
  assert seen == [
      f"config.{key} differs from the checkpoint's ({a} vs now {b}): the batches from step 20 on "
      f"are not the ones the first run would have seen, so this run will not equal one trained "
      f"with it from the start" for key, a, b in (("seed", 0, 1), ("batch_size", 16, 8))]
  seen.clear()  # it said nothing, although each micro-batch's dropout key is fold_in(rng, i)
  train._check_compatible(saved, tiny(grad_accum=2), None, 20, tmp_path)
  assert seen == ["config.grad_accum differs from the checkpoint's (1 vs now 2): the "
                  "micro-batches from step 20 on are not the first run's (their dropout draws "
                  "and the gradient's rounding differ), so this run will not equal one trained "
                  "with it from the start"]


def test_a_text_run_resumes_with_keys_added_since_and_its_data_moved(tmp_path):
  """A checkpoint from before data.tfds_* existed ran as their defaults; where the data lies
  (tfds dirs) or what is logged (sample_*) is no change of data, so it resumes (it was refused
  as "a different config.data.tfds_data_dir (None vs now '')")."""
  import char_pystdlib  # configs/ is on sys.path (top of this file)
  now = char_pystdlib.get_config("size=tiny")
  old = json.loads(now.to_json_best_effort())
  for key in ("tfds_data_dir", "tfds_manual_dir", "tfds_text_key"):
    del old["data"][key]
  train._check_compatible({"config": old, "task": {}}, now, None, 20, tmp_path)
  moved = json.loads(now.to_json_best_effort())
  moved["data"].update(tfds_manual_dir="/elsewhere", sample_prompt="x", sample_length=9)
  train._check_compatible({"config": moved, "task": {}}, now, None, 20, tmp_path)
  other = json.loads(now.to_json_best_effort())
  other["data"].update(tokenizer="byte", tfds_text_key="content")
  with pytest.raises(UserError, match=r"different config.data.tfds_text_key \('content' vs now "
                                      r"'text'\), config.data.tokenizer \('byte' vs now 'char'\)"):
    train._check_compatible({"config": other, "task": {}}, now, None, 20, tmp_path)


def test_incompatible_workdir_is_refused_untouched(tmp_path, monkeypatch):
  train.train_and_evaluate(tiny(num_steps=10), tmp_path)
  before = snapshot(tmp_path / "checkpoints")
  with pytest.raises(UserError, match=r"different config.model"):
    train.train_and_evaluate(tiny(num_steps=20, **{"model.hidden": 64}), tmp_path)
  assert snapshot(tmp_path / "checkpoints") == before
  seen = []  # a checkpoint past num_steps: the run does not go back, and says so
  monkeypatch.setattr(train.log, "warning", lambda msg, *args: seen.append(msg % args))
  assert train.train_and_evaluate(tiny(num_steps=5), tmp_path) == []
  assert seen[-1].startswith("nothing to train: ") and seen[-1].endswith(
      "is at step 10 and config.num_steps=5; raise it to train on")
  assert snapshot(tmp_path / "checkpoints") == before


def test_nan_loss_stops_with_last_good_checkpoint_intact(tmp_path):
  train.train_and_evaluate(tiny(num_steps=10), tmp_path)
  before = snapshot(tmp_path / "checkpoints")
  # A NaN learning rate is refused before training now; one of 1e38 overflows the first update.
  bad = tiny(num_steps=30, **{"optimizer.learning_rate": 1e38})
  with pytest.raises(train.TrainingDiverged, match="param_norm = inf at step 11"):
    train.train_and_evaluate(bad, tmp_path)
  assert snapshot(tmp_path / "checkpoints") == before


def test_only_log_eval_and_save_steps_read_metrics_and_nothing_recompiles(tmp_path, monkeypatch,
                                                                        compiles):
  """Between log steps the loop only dispatches: a metrics read there (a transfer, and a wait
  for the step) would add to every step of a small model on TPU. After the first step nothing
  compiles again, also after an eval and a checkpoint save; each of those compiles once."""
  at, reads = [None], []  # at: the step whose batch was handed out last
  real_batches, real_get = train._batches, jax.device_get

  def batches(task, split, start, mesh):
    for step, batch in enumerate(real_batches(task, split, start, mesh), start + 1):
      if split == "train":
        at[0] = step
      yield batch

  monkeypatch.setattr(train, "_batches", batches)
  monkeypatch.setattr(jax, "device_get", lambda x: (reads.append(at[0]), real_get(x))[1])
  with compiles(lambda: at[0]) as compiled:
    # 26 steps: the last is none of the multiples, and is logged, evaluated and saved anyway.
    evals = train.train_and_evaluate(
        tiny(num_steps=26, log_every=6, eval_every=12, checkpoint_every=8, keep_checkpoints=4),
        tmp_path)
  # log steps (6, 12, 18, 24), saves (8, 16, 24), evals (12, 24), and the last step
  assert set(reads) == {6, 8, 12, 16, 18, 24, 26}
  assert reads.count(16) == 1 and reads.count(18) == 1  # one read for all the steps since
  assert set(compiled) <= {None, 1, 8, 12}  # init; the step; the first save's checksums; eval
  assert 1 in compiled and 12 in compiled
  assert sorted(losses(tmp_path)) == [6, 12, 18, 24, 26]
  assert [e["step"] for e in evals] == sorted(losses(tmp_path, "eval")) == [12, 24, 26]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [8, 16, 24, 26]


def test_a_start_without_a_checkpoint_sets_the_earlier_starts_metrics_aside(tmp_path, caplog):
  """Checkpoints moved away to start over (as the no-readable-checkpoint error suggests): the
  new start appended to the old rows, so read_metrics showed the old run's steps 3-4 as this
  one's, and a config.json in the directory was overwritten."""
  train.train_and_evaluate(tiny(num_steps=4, eval_every=4, checkpoint_every=4), tmp_path)
  before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*")
            if p.is_file() and "checkpoints" not in p.parts and p.name != ".gru_tpu.lock"}
  assert {p.name for p in before} >= {"metrics.jsonl", "config.json"}
  shutil.move(tmp_path / "checkpoints", tmp_path.parent / "old_checkpoints")
  with caplog.at_level(logging.WARNING, logger="gru_tpu"):
    train.train_and_evaluate(tiny(num_steps=2, eval_every=2, checkpoint_every=2, seed=1),
                             tmp_path)
  assert "no checkpoint to resume" in caplog.text
  assert [r["step"] for r in read_metrics(tmp_path) if r["split"] == "train"] == [1, 2]
  assert json.loads((tmp_path / "config.json").read_text())["seed"] == 1
  (aside,) = tmp_path.glob("earlier_start_*")
  assert {Path(aside.name) / p: b for p, b in before.items()} == {
      p.relative_to(tmp_path): p.read_bytes() for p in aside.rglob("*") if p.is_file()}
  # A user's config.json where a first run starts is kept; the same config alone is no start.
  fresh = tmp_path.parent / "fresh"
  fresh.mkdir()
  (fresh / "config.json").write_text("mine\n")
  train.train_and_evaluate(tiny(num_steps=1, eval_every=1, checkpoint_every=1), fresh)
  (aside,) = fresh.glob("earlier_start_*")
  assert (aside / "config.json").read_text() == "mine\n"
  same = tmp_path.parent / "same"
  same.mkdir()
  (same / "config.json").write_text(tiny(num_steps=1, eval_every=1, checkpoint_every=1)
                                    .to_json_best_effort(indent=2) + "\n")
  train.train_and_evaluate(tiny(num_steps=1, eval_every=1, checkpoint_every=1), same)
  assert not list(same.glob("earlier_start_*"))


def test_flag_mistakes_are_one_line_naming_them(tmp_path, capsys, monkeypatch):
  w, cfg = str(tmp_path / "w"), f"{CONFIG}:size=tiny"
  monkeypatch.chdir(tmp_path)  # where a swallowed flag would have been the workdir
  for argv, said in (
      # absl took the next flag as the value: a run in ./--config.num_steps=0 at 200 steps
      (["--config", cfg, "--workdir", "--config.num_steps=0"],
       "--workdir needs a value; it is followed by the flag '--config.num_steps=0'"),
      (["--config", "--workdir", w], "--config needs a value; it is followed by the flag"),
      # It said "both --config ... and --workdir DIR are required"
      (["--bogus"], "unknown flag '--bogus'; see gru-tpu train --help"),
      (["--config", cfg, "--workdir", w, "--num_step=3"], "unknown flag '--num_step=3'"),
      # Modules of gru_tpu.tasks that are no task: an AttributeError traceback
      (["--config", cfg, "--workdir", w, "--config.task=forecast_eval"],
       "config.task='forecast_eval' is not a task; the tasks are 'text', 'forecast' and"),
      (["--config", cfg, "--workdir", w, "--config.task=nope"], "config.task='nope' is not a"),
      (["--config", cfg, "--workdir", w, "--config.seed.x=1"],
       "unknown config key 'seed.x': a part of it is a value, which has no keys below it"),
  ):
    assert train.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("gru-tpu train: ") and said in err and "\n" not in err, (argv, err)
  # ~ was expanded in --workdir=~/x but not in --config=~/x.py
  monkeypatch.setenv("HOME", str(tmp_path))
  assert train.main(["--config=~/nope.py", "--workdir=~/w"]) == 2
  assert f"--config {tmp_path}/nope.py: no such file" in capsys.readouterr().err
  assert not any(tmp_path.iterdir())
  assert cli.main([]) == 2 and "a COMMAND is needed" in capsys.readouterr().err
