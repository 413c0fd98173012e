"""The forecast task: no leakage, masks, every decoder and head learning, the engine end to end
(eval/test lines with baselines, exact resume), and gru_tpu.load(...).forecast."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parents[1] / "configs"))
import csv_forecast  # noqa: E402

import gru_tpu  # noqa: E402
from gru_tpu import train  # noqa: E402
from gru_tpu.data import timeseries as ts  # noqa: E402
from gru_tpu.errors import UserError  # noqa: E402
from gru_tpu.metrics import read_metrics  # noqa: E402
from gru_tpu.tasks.forecast import ForecastTask  # noqa: E402


def seasonal_frame(n=150, seed=0, missing=(5, 40, 41)):
  """Monthly: level + trend + a yearly cycle + a little noise, a few values missing."""
  rng = np.random.default_rng(seed)
  i = np.arange(n)
  y = 10 + 0.02 * i + 3 * np.sin(2 * np.pi * i / 12) + 0.1 * rng.normal(size=n)
  y[list(missing)] = np.nan
  return pd.DataFrame({"date": pd.date_range("2000-01-01", periods=n, freq="MS"), "y": y})


def config(source="csv:unused.csv", **overrides):
  c = csv_forecast.get_config("size=tiny")
  c.data.source, c.data.target = source, "y"
  c.data.context_length, c.data.horizon = 24, 6
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 30, 1, 30, 10
  c.eval.baselines = ("naive", "seasonal_naive")
  c.eval.num_samples = 50
  c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-2, 5
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def task_for(df, **overrides):
  panel = ts.panel_from_frame(df, time_column="date", targets=["y"], name="test")
  return ForecastTask(config(**overrides), panel)


def test_splits_scales_and_inputs_never_see_the_future():
  df = seasonal_frame()
  task = task_for(df)
  n_train = task.n_train[0]
  assert n_train == 150 - 12
  assert task.windows["train"][:, 1].max() + 6 <= n_train          # targets inside train
  assert task.windows["eval"].tolist() == [[0, n_train]]
  assert task.windows["test"].tolist() == [[0, 144]]
  changed = df.copy()
  changed.loc[n_train:, "y"] += 100.0                                # only val + test change
  other = task_for(changed)
  assert other.scales == task.scales
  tr = task.windows["train"]
  for k, v in task.store.gather(tr[:, 0], tr[:, 1], 6).items():
    np.testing.assert_array_equal(v, other.store.gather(tr[:, 0], tr[:, 1], 6)[k])
  model = task.build_model(nnx.Rngs(0))
  model.eval()
  for split in ("eval", "test"):
    w = task.windows[split]
    a, b = (t.store.gather(w[:, 0], w[:, 1], 6) for t in (task, other))
    if split == "eval":  # its context lies before the change
      np.testing.assert_array_equal(a["y"][:, :task.pad], b["y"][:, :task.pad])
      pa, pb = (model.predict(x, jax.random.key(0), 8)["samples"] for x in (a, b))
      np.testing.assert_array_equal(pa, pb)


@pytest.mark.parametrize("decoder", ["direct", "autoregressive"])
def test_forecasts_read_only_the_context(decoder):
  task = task_for(seasonal_frame(), **{"model.decoder": decoder})
  model = task.build_model(nnx.Rngs(1))
  model.eval()
  w = task.windows["train"][:4]
  b = task.store.gather(w[:, 0], w[:, 1], 6)
  future = dict(b, y=b["y"].copy(), observed=b["observed"].copy())
  future["y"][:, task.pad:] = 1e3
  future["observed"][:, task.pad:] = 0
  p, q = (model.predict(x, jax.random.key(0), 5) for x in (b, future))
  assert p["samples"].shape == (5, 4, 6, 1)
  for k in p:
    np.testing.assert_array_equal(p[k], q[k])
  with pytest.raises(AssertionError):  # a changed context does change the forecast
    ctx = dict(b, y=b["y"] + 1.0)
    np.testing.assert_array_equal(model.predict(ctx, jax.random.key(0), 5)["median"], p["median"])


def test_missing_values_are_masked_from_the_loss_and_imputed_for_inputs():
  df = seasonal_frame()
  task = task_for(df)
  store = task.store
  row = store.starts[0] + task.pad + 40
  assert store.observed[row, 0] == 0 and store.observed[row - 1, 0] == 1
  assert store.y[row, 0] == store.y[row - 1, 0] == store.y[row + 1, 0]  # carried forward
  model = task.build_model(nnx.Rngs(0))
  model.eval()
  w = task.windows["train"][:3]
  b = task.store.gather(w[:, 0], w[:, 1], 6)
  b["observed"][:, task.pad + 2] = 0          # drop one horizon step of every window
  loss, _ = model.loss(b)
  b2 = dict(b, y=b["y"].copy())
  b2["y"][:, task.pad + 2] = 1e6              # its value no longer matters
  np.testing.assert_allclose(model.loss(b2)[0], loss, rtol=1e-6)
  b3 = dict(b, y=b["y"].copy())
  b3["y"][:, task.pad + 3] = 1e6              # an observed step's does
  assert float(model.loss(b3)[0]) > float(loss) + 1.0


@pytest.mark.parametrize("decoder,head,point_loss", [
    ("direct", "point", "mse"), ("direct", "point", "mae"), ("direct", "gaussian", "mse"),
    ("direct", "student_t", "mse"), ("direct", "quantile", "mse"),
    ("autoregressive", "point", "mse"), ("autoregressive", "gaussian", "mse"),
    ("autoregressive", "student_t", "mse"), ("autoregressive", "quantile", "mse")])
def test_every_decoder_and_head_learns(decoder, head, point_loss):
  task = task_for(seasonal_frame(), **{"model.decoder": decoder, "model.head": head,
                                       "model.point_loss": point_loss, "batch_size": 16})
  model = task.build_model(nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, batch):
    loss, grads = nnx.value_and_grad(lambda m: m.loss(batch)[0])(model)
    opt.update(model, grads)
    return loss

  batches = task.batches("train", 0, 0, 1)
  losses = [float(step(model, opt, next(batches))) for _ in range(40)]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3 * abs(np.mean(losses[:5])) - 0.1, losses
  model.eval()
  w = task.windows["eval"]
  out = model.predict(task.store.gather(w[:, 0], w[:, 1], 6), jax.random.key(0), 7)
  assert out["median"].shape == (1, 6, 1)
  assert ("samples" in out) == (head != "point") and ("quantiles" in out) == (
      head == "quantile" and decoder == "direct")
  if "samples" in out:
    assert out["samples"].shape == (7, 1, 6, 1) and np.isfinite(out["samples"]).all()


def test_quantile_head_is_monotone_and_its_samples_follow_it():
  task = task_for(seasonal_frame(), **{"model.head": "quantile",
                                       "model.quantiles": (0.1, 0.5, 0.9)})
  model = task.build_model(nnx.Rngs(0))
  model.eval()
  w = task.windows["train"][:2]
  out = model.predict(task.store.gather(w[:, 0], w[:, 1], 6), jax.random.key(0), 4000)
  q = out["quantiles"]
  assert (jnp.diff(q, axis=-1) > 0).all()
  emp = np.quantile(out["samples"], [0.1, 0.5, 0.9], axis=0)
  np.testing.assert_allclose(np.moveaxis(emp, 0, -1), q, atol=0.05 * float(np.ptp(q)) + 1e-3)


def write_csv(tmp_path, df=None):
  path = tmp_path / "series.csv"
  (seasonal_frame() if df is None else df).to_csv(path, index=False)
  return f"csv:{path}"


def test_engine_end_to_end_beats_naive_and_reports_baselines(tmp_path):
  src = write_csv(tmp_path)
  c = config(src, num_steps=150, eval_every=75, checkpoint_every=150)
  train.train_and_evaluate(c, tmp_path / "run")
  rows = read_metrics(tmp_path / "run")
  evals = [r for r in rows if r["split"] == "eval"]
  (test,) = [r for r in rows if r["split"] == "test"]
  assert [r["step"] for r in evals] == [75, 150] and test["step"] == 150
  for r in evals + [test]:
    for key in ("mase", "naive_mase", "seasonal_naive_mase", "smape", "crps", "coverage_80"):
      assert np.isfinite(r[key]), key
  assert test["mase"] < test["naive_mase"], test

  m = gru_tpu.load(tmp_path / "run")
  assert isinstance(m, gru_tpu.api.ForecastModel) and m.meta["scales"]["y"]["y"][0]["scale"] > 0
  f = m.forecast(horizon=4, num_samples=30)
  assert list(f.columns) == ["date", "target", "point", "q0.1", "q0.5", "q0.9"]
  assert len(f) == 4 and f["date"].iloc[0] == pd.Timestamp("2012-07-01")
  assert (f["q0.1"] <= f["q0.9"]).all() and 8 < f["point"].mean() < 18  # original units
  hist = seasonal_frame().set_index("date")["y"].iloc[:100]
  g = m.forecast(hist, 6)                                   # a pandas Series works too
  assert g["date"].iloc[0] == pd.Timestamp("2008-05-01") and len(g) == 6
  with pytest.raises(UserError, match="at most 6 steps"):
    m.forecast(hist, 7)
  with pytest.raises(UserError, match="horizon must be >= 1"):
    m.forecast(hist, 0)
  with pytest.raises(UserError, match="context_length=24"):
    m.forecast(hist.iloc[:10], 3)


def test_resume_is_exact(tmp_path, monkeypatch):
  src = write_csv(tmp_path)
  c = config(src, **{"model.decoder": "autoregressive"})
  train.train_and_evaluate(c, tmp_path / "straight")
  real, calls = train._to_global, []

  def crash_at_step_15(batch, mesh):
    calls.append(1)
    if len(calls) == 15:
      raise KeyboardInterrupt("simulated crash")
    return real(batch, mesh)

  monkeypatch.setattr(train, "_to_global", crash_at_step_15)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(c, tmp_path / "resumed")
  monkeypatch.setattr(train, "_to_global", real)
  train.train_and_evaluate(c, tmp_path / "resumed")   # continues from the step-10 checkpoint
  loss = lambda d: {r["step"]: r["loss"] for r in read_metrics(d) if r["split"] == "train"}
  a, b = loss(tmp_path / "straight"), loss(tmp_path / "resumed")
  for step in range(11, 31):
    assert a[step] == b[step], step


def test_bad_task_inputs():
  df = seasonal_frame(n=40, missing=())
  with pytest.raises(UserError, match=r"has 40 time steps; it needs at least .* = 24 \+ 6 \+ 6 "
                                      r"\+ 6 = 42"):
    task_for(df)
  with pytest.raises(UserError, match="config.data.horizon must be >= 1, got 0"):
    task_for(seasonal_frame(), **{"data.horizon": 0})
  with pytest.raises(UserError, match="model.head='laplace'"):
    task_for(seasonal_frame(), **{"model.head": "laplace"})
  with pytest.raises(UserError, match="val_length=3 is shorter than"):
    task_for(seasonal_frame(), **{"data.val_length": 3})
