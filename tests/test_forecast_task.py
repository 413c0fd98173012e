"""The forecast task: splits and scaling without leakage, the engine end to end (eval/test
lines with baselines, exact resume), panels with covariates, multivariate sources,
gru_tpu.load(...).forecast and bad input."""

import json

import jax
import numpy as np
import pandas as pd
import pytest
from flax import nnx
from forecast_data import config, seasonal_frame, task_for

import gru_tpu
from gru_tpu import sharding, train
from gru_tpu.data import timeseries as ts
from gru_tpu.errors import UserError
from gru_tpu.metrics import read_metrics
from gru_tpu.tasks.forecast import (ForecastTask, forecast_frame, predict_windows,
                                    series_arrays, to_original)


def assert_training_ignores_values_from(t: int, df, task, **overrides) -> ForecastTask:
  """Changing the values from step t on changes neither the scales nor any training window;
  returns the task built on the changed data."""
  changed = df.copy()
  changed.loc[t:, "y"] += 100.0
  other = task_for(changed, **overrides)
  assert other.scales == task.scales
  tr = task.windows["train"]
  for k, v in task.store.gather(tr[:, 0], tr[:, 1], 6).items():
    np.testing.assert_array_equal(v, other.store.gather(tr[:, 0], tr[:, 1], 6)[k])
  return other


def test_splits_scales_and_inputs_never_see_the_future():
  df = seasonal_frame()
  task = task_for(df)
  n_train = task.n_train[0]
  assert n_train == 150 - 12
  assert task.windows["train"][:, 1].max() + 6 <= n_train          # targets inside train
  assert task.windows["eval"].tolist() == [[0, n_train]]
  assert task.windows["test"].tolist() == [[0, 144]]
  other = assert_training_ignores_values_from(n_train, df, task)     # only val + test change
  later = assert_training_ignores_values_from(144, df, task)         # only the test tail
  # A tail's MASE scales and baseline forecasts come from the history before its origin.
  for split, changed in (("eval", other), ("test", later)):
    a, b = task._reference(split), changed._reference(split)
    assert (a["y"] != b["y"]).all() and set(a["baselines"]) == {"naive", "seasonal_naive"}
    np.testing.assert_array_equal(a["scale"], b["scale"])
    for name, (point, samples) in a["baselines"].items():
      np.testing.assert_array_equal(point, b["baselines"][name][0], err_msg=name)
      np.testing.assert_array_equal(samples, b["baselines"][name][1], err_msg=name)
  model = task.build_model(nnx.Rngs(0))
  model.eval()
  for split in ("eval", "test"):
    w = task.windows[split]
    a, b = (t.store.gather(w[:, 0], w[:, 1], 6) for t in (task, other))
    if split == "eval":  # its context lies before the change
      np.testing.assert_array_equal(a["y"][:, :task.pad], b["y"][:, :task.pad])
      pa, pb = (model.predict(x, jax.random.key(0), 8)["samples"] for x in (a, b))
      np.testing.assert_array_equal(pa, pb)


@pytest.mark.parametrize("stride", [1, 6])
def test_backtest_and_calibration_windows_stay_inside_their_tails(stride, monkeypatch):
  """Every eval window's horizon lies in the validation tail and every test window's in the test
  tail, for any backtest stride; calibration scores each origin with a step in the validation
  tail on exactly those steps (not the trained ones before, nor the test tail after)."""
  from gru_tpu.tasks import forecast_eval
  task = task_for(seasonal_frame(), **{"data.val_length": 12, "data.test_length": 9,
                                       "eval.backtest_stride": stride})
  n, H, end = task.n_train[0], 6, 150
  assert n == 150 - 12 - 9
  for split, (lo, hi) in (("eval", (n, n + 12)), ("test", (n + 12, end))):
    origins = task.windows[split][:, 1]
    assert origins.tolist() == list(range(lo, hi - H + 1, stride)), split
  assert task.windows["calibration"][:, 1].tolist() == list(range(n - H + 1, n + 12))
  seen, real = {}, forecast_eval.interval_scale

  def spy(y, *args):  # the truth the calibration scores against: NaN where a step is not
    seen["y"] = y
    return real(y, *args)

  monkeypatch.setattr(forecast_eval, "interval_scale", spy)
  model = task.build_model(nnx.Rngs(0))
  task.interval_scale(model)
  t_WxH = task.windows["calibration"][:, 1:] + np.arange(H)
  scored = ~np.isnan(seen["y"][..., 0])
  np.testing.assert_array_equal(scored, (t_WxH >= n) & (t_WxH < n + 12))


def test_a_series_history_ends_at_the_last_step_any_target_was_observed():
  """With several targets a step counts while any one of them is observed: the tails of a series
  whose last value of one target is missing still end at the series' last step."""
  from gru_tpu.tasks.forecast import history_length
  df = seasonal_frame().rename(columns={"y": "a"})
  df["b"] = df["a"] * 2
  df.loc[149, "b"] = np.nan
  df.loc[148, ["a", "b"]] = np.nan
  s = ts.panel_from_frame(df, time_column="date", targets=["a", "b"], name="two").series[0]
  assert history_length(s) == 150


def test_future_rows_after_the_last_target_value_are_not_a_tail():
  # The CSV layout gives known covariates for the forecast horizon as rows after the last target
  # value; trained on that same file, the tails must still end at the last target value (they
  # used to be the empty future rows: a test backtest without truth, a KeyError, no checkpoint).
  df = seasonal_frame()
  future = pd.DataFrame({"date": pd.date_range("2012-07-01", periods=6, freq="MS"),
                         "y": np.nan})
  task, other = task_for(df), task_for(pd.concat([df, future], ignore_index=True))
  assert other.n_train == task.n_train and other.scales == task.scales
  for split in ("train", "eval", "calibration", "test"):
    np.testing.assert_array_equal(other.windows[split], task.windows[split])
  model = task.build_model(nnx.Rngs(0))
  model.eval()
  out = other.evaluate(model, "test")
  assert out["mae"] == task.evaluate(model, "test")["mae"] and "crps_uncalibrated" in out


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
  # The checkpoint carries the factor the test line used; forecasting from the history before
  # the test tail reproduces the test window's calibrated and raw coverage exactly.
  assert test["interval_scale"] == m.meta["interval_scale"][0] != 1.0
  df = seasonal_frame()
  cover = {}
  for calibrated in (True, False):
    f = m.forecast(df.iloc[:144], 6, num_samples=c.eval.num_samples, seed=c.seed,
                   calibrated=calibrated)
    y = df["y"].to_numpy()[144:]
    cover[calibrated] = f
    # The same forecast as the test backtest's (the checkpoint's scales, not the history's)
    assert np.abs(f["point"] - y).mean() == pytest.approx(test["mae"], rel=1e-5)
    assert ((f["q0.1"] <= y) & (y <= f["q0.9"])).mean() == pytest.approx(
        test["coverage_80" if calibrated else "coverage_80_uncalibrated"])
  np.testing.assert_allclose(cover[True]["point"], cover[False]["point"])
  np.testing.assert_allclose(cover[True]["q0.9"] - cover[True]["point"],
                             test["interval_scale"] * (cover[False]["q0.9"] - cover[False]["point"]),
                             rtol=1e-4)
  f = m.forecast(horizon=4, num_samples=30)
  assert list(f.columns) == ["date", "target", "point", "q0.1", "q0.5", "q0.9"]
  assert len(f) == 4 and f["date"].iloc[0] == pd.Timestamp("2012-07-01")
  assert (f["q0.1"] <= f["q0.9"]).all() and 8 < f["point"].mean() < 18  # original units
  hist = seasonal_frame().set_index("date")["y"].iloc[:100]
  g = m.forecast(hist, 6)                                   # a pandas Series works too
  assert g["date"].iloc[0] == pd.Timestamp("2008-05-01") and len(g) == 6
  # Forecast times continue the history's own calendar and timezone.
  first = seasonal_frame().iloc[:100]
  tokyo = m.forecast(first.assign(date=first["date"].dt.tz_localize("Asia/Tokyo")), 2)
  assert [t.isoformat() for t in tokyo["date"]] == ["2008-05-01T00:00:00+09:00",
                                                    "2008-06-01T00:00:00+09:00"]
  mid = m.forecast(first.assign(date=first["date"] + pd.Timedelta(days=14)), 2)
  assert mid["date"].tolist() == [pd.Timestamp("2008-05-15"), pd.Timestamp("2008-06-15")]
  weekly = first.assign(date=pd.date_range("2000-01-02", periods=100, freq="W-SUN"))
  with pytest.raises(UserError, match=r"sampled every 7 day\(s\) \(W-SUN\) but the model was "
                                      r"trained on data sampled every 30.4 day\(s\) \(MS\)"):
    m.forecast(weekly, 2)
  with pytest.raises(UserError, match="at most 6 steps"):
    m.forecast(hist, 7)
  with pytest.raises(UserError, match="horizon must be >= 1"):
    m.forecast(hist, 0)
  for name, kwargs in (("horizon", {"horizon": 3.0}), ("horizon", {"horizon": True}),
                       ("num_samples", {"horizon": 2, "num_samples": 20.0})):  # a TypeError
    with pytest.raises(UserError, match=rf"{name} must be an integer, got "):
      m.forecast(hist, **kwargs)
  assert len(m.forecast(hist, np.int64(2), num_samples=2)) == 2
  with pytest.raises(UserError, match=r"num_samples must be >= 2, got 1 \(a student_t head"):
    m.forecast(hist, 2, num_samples=1)  # was a frame without its quantile columns
  with pytest.raises(UserError, match="context_length=24"):
    m.forecast(hist.iloc[:10], 3)


def test_a_transformed_tail_is_scored_with_the_intervals_its_forecasts_get(monkeypatch):
  """Under a log1p/sqrt transform, the calibration factor stretches the spread in model space
  (where it was fitted) in the test line as in forecast_frame; it used to stretch after the
  transform was undone, so the line scored other intervals than a forecast gets."""
  from gru_tpu.tasks import forecast_eval
  df = seasonal_frame()
  task = task_for(df, **{"data.transform": "log1p"})
  model = task.build_model(nnx.Rngs(0))
  model.eval()
  scored, real = [], forecast_eval.metrics
  monkeypatch.setattr(forecast_eval, "metrics",
                      lambda *a, **k: scored.append(k.get("samples_SxNxHxC")) or real(*a, **k))
  out = task.evaluate(model, "test")
  meta = dict(task.meta, **task.model_metadata(model))
  assert meta["interval_scale"][0] != 1.0 and task.windows["test"].tolist() == [[0, 144]]
  panel = ts.panel_from_frame(df.iloc[:144], time_column="date", targets=["y"], name="test")
  f = forecast_frame(model, task.config, meta, panel, 6, num_samples=task.config.eval.num_samples,
                     seed=task.config.seed)
  lo, hi = np.quantile(scored[1][:, 0, :, 0], [0.1, 0.9], axis=0)  # [0]: raw, [1]: calibrated
  np.testing.assert_allclose(lo, f["q0.1"], rtol=1e-5)
  np.testing.assert_allclose(hi, f["q0.9"], rtol=1e-5)
  y = df["y"].to_numpy()[144:]
  assert out["coverage_80"] == pytest.approx(((f["q0.1"] <= y) & (y <= f["q0.9"])).mean())


def test_resume_is_exact(tmp_path, killed_at):
  """With dropout and micro-batches weighted by their observed targets (values are missing)."""
  src = write_csv(tmp_path)
  c = config(src, grad_accum=2, **{"model.decoder": "autoregressive",
                                   "model.recurrent_dropout": 0.1})
  train.train_and_evaluate(c, tmp_path / "straight")
  with killed_at(15):
    train.train_and_evaluate(c, tmp_path / "resumed")
  train.train_and_evaluate(c, tmp_path / "resumed")   # continues from the step-10 checkpoint
  rows = lambda d, split: {r["step"]: r for r in read_metrics(d) if r["split"] == split}
  for split in ("train", "eval", "test"):
    a, b = rows(tmp_path / "straight", split), rows(tmp_path / "resumed", split)
    assert a == b and a, split


def test_interval_calibration_reads_the_validation_tail_only():
  df = seasonal_frame()
  task = task_for(df, **{"data.val_length": 12})
  n = task.n_train[0]
  # every origin whose horizon (6) reaches into the validation tail [n, n + 12)
  assert task.windows["calibration"][:, 1].tolist() == list(range(n - 6 + 1, n + 12))
  model = task.build_model(nnx.Rngs(0))
  scale = task.interval_scale(model)
  assert scale.shape == (1,) and scale[0] > 0
  test_changed, val_changed = df.copy(), df.copy()
  test_changed.loc[n + 12:, "y"] += 100.0  # also what late origins forecast
  val_changed.loc[n + 8, "y"] += 100.0
  np.testing.assert_array_equal(task_for(test_changed, **{"data.val_length": 12})
                                .interval_scale(model), scale)
  assert task_for(val_changed, **{"data.val_length": 12}).interval_scale(model)[0] > scale[0]
  assert task.model_metadata(model) == {"interval_scale": scale.tolist()}
  off = task_for(df, **{"eval.calibrate": False})
  assert off.interval_scale(model) is None and off.model_metadata(model) == {}
  point = task_for(df, **{"model.head": "point"})
  assert point.interval_scale(point.build_model(nnx.Rngs(0))) is None


@pytest.mark.parametrize("until", ["test", "end"])
def test_train_until_takes_tails_into_training_and_marks_their_backtests(until):
  df = seasonal_frame()
  fixed = {"data.train_until": until, "eval.interval_scale": 1.5}
  held, task = task_for(df), task_for(df, **fixed)
  n, end = held.n_train[0], 150                      # validation tail [n, n + 6), test [144, 150)
  fit = {"test": n + 6, "end": end}[until]
  assert task.n_fit == [fit] and task.n_train == held.n_train
  assert task.windows["train"][:, 1].max() + 6 == fit  # the last window ends at the new end
  for split in ("eval", "calibration", "test"):        # the tails' backtests stay where they were
    np.testing.assert_array_equal(task.windows[split], held.windows[split])
  assert task.scales != held.scales                    # fitted on the longer training part
  assert_training_ignores_values_from(fit, df, task, **fixed)
  model = task.build_model(nnx.Rngs(0))
  model.eval()
  # A tail the model trained on says so; the held-out run's lines have no such key.
  assert {s: task.evaluate(model, s).get("in_sample") for s in ("eval", "test")} == {
      "eval": 1.0, "test": 1.0 if until == "end" else None}
  assert {s: held.evaluate(model, s).get("in_sample") for s in ("eval", "test")} == {
      "eval": None, "test": None}
  # The fixed factor from a held-out run replaces calibrating on the tail it trained on.
  np.testing.assert_array_equal(task.interval_scale(model), [1.5])
  assert task.model_metadata(model) == {"interval_scale": [1.5]}
  assert task.evaluate(model, "test")["interval_scale"] == 1.5


def test_training_on_the_validation_tail_needs_a_fixed_interval_factor():
  df = seasonal_frame()
  with pytest.raises(UserError, match=r"train_until='test' trains on the validation tail, so the "
                                      r"intervals cannot be calibrated there: set "
                                      r"config.eval.interval_scale"):
    task_for(df, **{"data.train_until": "test"})
  assert task_for(df, **{"data.train_until": "end", "eval.calibrate": False}).in_sample["test"]
  assert task_for(df, **{"data.train_until": "end", "model.head": "point"}).n_fit == [150]
  with pytest.raises(UserError, match=r"train_until='valid': expected one of validation, test, "
                                      r"end"):
    task_for(df, **{"data.train_until": "valid"})
  with pytest.raises(UserError, match=r"config.eval.interval_scale must be >= 0"):
    task_for(df, **{"eval.interval_scale": -1.0})


def test_sqrt_transform_feeds_the_model_sqrt_and_forecasts_in_original_units():
  df = seasonal_frame()
  df["y"] = df["y"] ** 2                      # nonnegative, spread growing with the level
  task = task_for(df, **{"data.transform": "sqrt", "eval.calibrate": False})
  n = task.n_train[0]
  (sc,) = task.scales["y"]["y"]
  y = df["y"].to_numpy()
  want = (np.sqrt(y) - sc["loc"]) / sc["scale"]
  assert sc == ts.fit_scale(np.sqrt(y[:n, None]), "standard")[0]     # fitted on sqrt(train)
  obs = ~np.isnan(y)
  np.testing.assert_allclose(task.store.y[task.pad:, 0][obs], want[obs], rtol=1e-6)
  # The model's (transformed, scaled) forecasts come back in original units: quantiles map
  # through the monotone inverse, so the test line's coverage is the model-space coverage.
  model = task.build_model(nnx.Rngs(0))
  out = task.evaluate(model, "test")
  w = task.windows["test"]
  pred = predict_windows(model, task.store, w, 6, task.config.eval.num_samples, task.config.seed)
  lo, hi = np.quantile(pred["samples"], [0.1, 0.9], axis=0)
  z = want[144:150, None]
  assert out["coverage_80"] == pytest.approx(((lo <= z) & (z <= hi)).mean())
  ref = task._reference("test")
  orig = to_original(pred, ref["loc"], ref["unit"], "sqrt")
  np.testing.assert_allclose(orig["median"], (pred["median"] * sc["scale"] + sc["loc"]) ** 2,
                             rtol=1e-5)
  assert (orig["samples"] >= 0).all()
  f = forecast_frame(model, task.config, task.meta, task.panel, 6, num_samples=20)
  assert (f[["point", "q0.1", "q0.9"]].to_numpy() >= 0).all() and task.meta["transform"] == "sqrt"
  # The series' level is ~10 in sqrt units and ~100 in original ones; a missed inverse shows.
  assert 50 < f["point"].mean() < 250, f["point"]
  negative = seasonal_frame()
  negative.loc[7, "y"] = -1.0
  with pytest.raises(UserError, match=r"target 'y' is -1 at 2000-08-01.*transform='sqrt'"):
    task_for(negative, **{"data.transform": "sqrt"})
  with pytest.raises(UserError, match=r"data.transform='box_cox': expected one of none, sqrt"):
    task_for(df, **{"data.transform": "box_cox"})


def test_bad_task_inputs():
  df = seasonal_frame(n=40, missing=())
  with pytest.raises(UserError, match=r"has 40 time steps up to its last target value; it needs at "
                                      r"least .* = 24 \+ 6 \+ 6 \+ 6 = 42"):
    task_for(df)
  with pytest.raises(UserError, match="config.data.horizon must be >= 1, got 0"):
    task_for(seasonal_frame(), **{"data.horizon": 0})
  # Tracebacks in the model, the windows or numpy (num_samples=0 only at the first eval).
  for key, value, low in (("data.season_length", -3, 0), ("data.calendar_terms", -1, 0),
                          ("eval.num_samples", 0, 1), ("eval.backtest_stride", -2, 0)):
    with pytest.raises(UserError, match=rf"config.{key} must be >= {low}, got {value}"):
      task_for(seasonal_frame(), **{key: value, "model.head": "point"})
  # One draw has no spread: an AxisError in the first eval's calibration, training lost.
  with pytest.raises(UserError, match=r"config.eval.num_samples must be >= 2, got 1 \(a "
                                      r"student_t head's intervals come from its samples"):
    task_for(seasonal_frame(), **{"eval.num_samples": 1})
  with pytest.raises(UserError, match=r"config.model.unroll=0: expected an integer >= 1"):
    train.check_engine_config(config(**{"model.unroll": 0}))  # the engine checks its keys
  with pytest.raises(UserError, match="impl='pallas' needs config.model.cell='gru'"):
    train.check_engine_config(config(**{"model.cell": "lstm", "model.impl": "pallas"}))
  with pytest.raises(UserError, match="model.head='laplace'"):
    task_for(seasonal_frame(), **{"model.head": "laplace"})
  with pytest.raises(UserError, match="val_length=3 is shorter than"):
    task_for(seasonal_frame(), **{"data.val_length": 3})
  # The 80 % interval would be read off the (0.25, 0.75) levels and mislabelled.
  with pytest.raises(UserError, match="quantile head needs levels at or beyond 0.1 and 0.9"):
    task_for(seasonal_frame(), **{"model.head": "quantile",
                                  "model.quantiles": (0.25, 0.5, 0.75)})
  late = seasonal_frame()  # values only from the validation tail on: trained unscaled, and
  late.loc[:137, "y"] = np.nan  # its NaN naive baselines left their means silently
  with pytest.raises(UserError, match=r"series 'y' has no observed 'y' in its training part "
                                      r"\(its first 138 steps"):
    task_for(late)
  huge = seasonal_frame()
  huge.loc[60, "y"] = 1e300  # finite, but its variance overflows: every scaled value would be 0
  with pytest.raises(UserError, match="series 'y': the training part of the targets .* too "
                                      "large to scale"):
    task_for(huge)
  task = task_for(seasonal_frame())
  s = task.panel.series[0]
  s.y[-1] = 1e300  # a forecast history far outside the training scale: it overflows float32
  with pytest.raises(UserError, match=r"series 'y': a target value at 2012-06-01 is too large"):
    series_arrays(s, task.scales["y"], task.meta)


def test_panel_with_covariates_and_a_multivariate_source():
  from gru_tpu.tasks.forecast import forecast_frame, load_panel
  rng = np.random.default_rng(0)
  frames = []
  for store, level in (("a", 10.0), ("b", 100.0)):
    i = np.arange(80)
    price = rng.uniform(1, 2, 80)
    frames.append(pd.DataFrame({
        "date": pd.date_range("2020-01-06", periods=80, freq="W-MON"), "store": store,
        "sales": level + np.sin(2 * np.pi * i / 52) - price, "price": price,
        "visits": rng.normal(size=80)}))
  df = pd.concat(frames, ignore_index=True)
  future = df.groupby("store").tail(3).copy()          # 3 future weeks: prices known, no sales
  future["date"] += pd.Timedelta(weeks=3)
  future["sales"] = np.nan
  df = pd.concat([df, future]).sort_values(["store", "date"], ignore_index=True)
  c = config(**{"data.context_length": 20, "data.horizon": 3, "data.id_column": "store",
                "data.known_covariates": "price", "data.past_covariates": "visits"})
  c.data.target = "sales"
  panel = ts.panel_from_frame(df[df.sales.notna()].reset_index(drop=True), time_column="date",
                              targets=["sales"], id_column="store", known=["price"],
                              past=["visits"], name="panel")
  task = ForecastTask(c, panel)
  assert set(task.scales) == {"a", "b"} and task.scales["b"]["y"][0]["loc"] > 90
  for i, s in enumerate(panel.series):  # a window reads its own series' rows, pad zeros first
    arrays = series_arrays(s, task.scales[s.id], task.meta)
    for key in ("y", "observed", "known", "past"):
      padded = np.concatenate([np.zeros((task.pad, arrays[key].shape[1])), arrays[key]])
      for o in (30, 77):
        got = task.store.gather(np.array([i]), np.array([o]), 3)[key][0]
        np.testing.assert_array_equal(got, padded[o:o + task.pad + 3].astype(np.float32),
                                      err_msg=f"{s.id} {key} {o}")
  assert task.meta["cycles"] == ["year"] and task.store.known.shape[1] == 4 + 1
  model = task.build_model(nnx.Rngs(0))
  model.eval()
  assert np.isfinite(float(model.loss(next(task.batches("train", 0, 0, 1)))[0]))
  full = ts.panel_from_frame(df, time_column="date", targets=["sales"], id_column="store",
                             known=["price"], past=["visits"], name="panel")
  f = forecast_frame(model, c, task.meta, full, 3, num_samples=10)
  assert list(f.columns) == ["store", "date", "target", "point", "q0.1", "q0.5", "q0.9"]
  assert f.groupby("store").size().tolist() == [3, 3]
  assert f[f.store == "b"]["point"].mean() > 50 > f[f.store == "a"]["point"].mean()
  with pytest.raises(UserError, match="known covariates price need values for the 3 steps"):
    forecast_frame(model, c, task.meta, panel, 3, num_samples=10)
  gap = df.copy()  # a future row given, its price left empty: not carried forward silently
  gap.loc[(gap.store == "b") & gap.sales.isna(), "price"] = [1.5, np.nan, 1.5]
  gap = ts.panel_from_frame(gap, time_column="date", targets=["sales"], id_column="store",
                            known=["price"], past=["visits"], name="panel")
  with pytest.raises(UserError, match=r"series 'b': known covariate 'price' is empty at "
                                      r"2021-07-26, inside the 3-step horizon"):
    forecast_frame(model, c, task.meta, gap, 3, num_samples=10)

  c = config("statsmodels:macrodata", **{"data.context_length": 16, "data.horizon": 4,
                                         "model.decoder": "autoregressive"})
  c.data.target, c.data.time_column = "", ""
  task = ForecastTask(c, load_panel(c.data))
  assert task.meta["targets"] == ["realgdp", "realcons", "realinv"]
  model = task.build_model(nnx.Rngs(0))
  model.eval()
  f = forecast_frame(model, c, task.meta, task.panel, 5, num_samples=4)  # AR: beyond horizon
  assert len(f) == 15 and set(f["target"]) == {"realgdp", "realcons", "realinv"}
  assert f["date"].iloc[0] == pd.Timestamp("2009-10-01")


def untrained_macrodata_model(workdir, **overrides):
  """A ForecastModel as loaded after training on statsmodels:macrodata (its columns left "")."""
  from gru_tpu.api import ForecastModel
  from gru_tpu.tasks.forecast import load_panel
  c = config("statsmodels:macrodata", **{"data.context_length": 16, "data.horizon": 4,
                                         **overrides})
  c.data.target, c.data.time_column = "", ""
  task = ForecastTask(c, load_panel(c.data))
  return ForecastModel(workdir, c, task.build_model(nnx.Rngs(0)), task.meta, 0)


def test_autoregressive_horizons_share_compiles_and_their_common_steps(tmp_path, compiles):
  """A notebook asks an autoregressive model for one horizon after another: each new horizon
  compiled the decoder's scan anew, and its draws (one key per step, split by the step count)
  differed from another horizon's on the steps both forecast."""
  m = untrained_macrodata_model(tmp_path, **{"model.decoder": "autoregressive"})
  short, long = (m.forecast(None, horizon=h, num_samples=8, seed=3) for h in (5, 8))
  with compiles() as seen:
    mid = m.forecast(None, horizon=7, num_samples=8, seed=3)
  assert seen == []
  head = lambda f, h: f.groupby("target", sort=False).head(h).reset_index(drop=True)
  pd.testing.assert_frame_equal(head(mid, 5), short)
  pd.testing.assert_frame_equal(head(long, 7), mid)
  three = m.forecast(None, horizon=3, num_samples=8, seed=3)  # within data.horizon
  pd.testing.assert_frame_equal(three, head(m.forecast(None, horizon=4, num_samples=8, seed=3),
                                            3))


def test_a_statsmodels_model_forecasts_a_csv_in_its_layout(tmp_path):
  # Trained on statsmodels:NAME the config's columns stay "" (the source's); a CSV with those
  # columns (what `gru-tpu forecast --data csv:PATH` documents) used to ask for
  # config.data.time_column, which neither the CLI nor m.forecast can set.
  m = untrained_macrodata_model(tmp_path)
  df, time_column, targets, _, _ = ts.load_frame("statsmodels:macrodata")
  df[[time_column, *targets]].to_csv(tmp_path / "macro.csv", index=False)
  f = m.forecast(f"csv:{tmp_path / 'macro.csv'}", num_samples=4)
  pd.testing.assert_frame_equal(f, m.forecast(None, num_samples=4))


def test_plot_leaves_the_callers_matplotlib_alone(tmp_path):
  """m.plot in a notebook switched the process to the Agg backend, which closed every figure."""
  import matplotlib
  import matplotlib.pyplot as plt
  m = untrained_macrodata_model(tmp_path, **{"model.quantiles": (0.05, 0.1, 0.5, 0.9, 0.95)})
  previous = matplotlib.get_backend()
  plt.switch_backend("svg")
  try:
    mine = plt.figure()
    frame = m.forecast(None, num_samples=4)
    fig = m.plot(None, frame, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m.plot(None, frame, tmp_path / "f.svg")  # the format the suffix names
    assert b"<svg" in (tmp_path / "f.svg").read_bytes()[:1000]
    assert matplotlib.get_backend() == "svg" and plt.fignum_exists(mine.number)
  finally:
    plt.close("all")
    plt.switch_backend(previous)
  # One panel per target, each with the history, the median and a band per pair of levels.
  levels = tuple(m.config.model.quantiles)
  pairs = [f"{levels[i]:g}-{levels[-1 - i]:g}" for i in range(len(levels) // 2)]
  assert len(pairs) >= 2 and [ax.get_title() for ax in fig.axes] == m.meta["targets"]
  for ax in fig.axes:
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(labels) == sorted(["history", "forecast (median)", *pairs]), labels
    assert len(ax.collections) == len(pairs)


def test_a_series_history_needs_a_single_target_model(tmp_path):
  m = untrained_macrodata_model(tmp_path)
  series = pd.Series(np.arange(40.0), index=pd.date_range("2000-01-01", periods=40, freq="QS"))
  with pytest.raises(UserError, match=r"this model forecasts 3 targets \(realgdp, realcons, "
                                      r"realinv\): pass a DataFrame with those columns"):
    m.forecast(series)


def test_a_plot_format_matplotlib_cannot_write_is_refused_before_the_forecast(tmp_path,
                                                                             monkeypatch, capsys):
  """--plot f.txt was matplotlib's traceback, after the forecast, the CSV and an empty f.txt."""
  from gru_tpu import api
  m = untrained_macrodata_model(tmp_path)
  monkeypatch.setattr(api, "load", lambda workdir, step=None: m)
  out, plot = tmp_path / "f.csv", tmp_path / "f.txt"
  assert api.forecast_main(["--workdir", str(tmp_path), "--output", str(out),
                            "--plot", str(plot)]) == 2
  assert capsys.readouterr().err.startswith(
      f"gru-tpu forecast: {plot}: cannot save a plot as .txt; give a file name ending in one of ")
  assert not out.exists() and not plot.exists()
  plot.write_text("keep")  # m.plot: refused before the file is opened (and emptied)
  with pytest.raises(UserError, match=r"cannot save a plot as .txt; .* \(e.g. forecast.png\)"):
    m.plot(None, None, plot)
  assert plot.read_text() == "keep"


def test_a_seed_outside_the_engines_range_is_refused(tmp_path):
  """2**70 was an OverflowError traceback in jax.random.key; 2**32 silently seed 0's draws."""
  m = untrained_macrodata_model(tmp_path)
  for bad in (2**70, 2**32):
    with pytest.raises(UserError, match=r"seed must be an integer in \[0, 2\*\*31\)"):
      m.forecast(None, seed=bad)


def test_lags_from_config():
  assert task_for(seasonal_frame()).meta["lags"] == [1, 12]               # 1 and the season
  task = task_for(seasonal_frame(), **{"data.lags": "3, 1,24"})
  assert task.meta["lags"] == [1, 3, 24] and task.pad == 24 + 24
  with pytest.raises(UserError, match="config.data.lags='1,x'"):
    task_for(seasonal_frame(), **{"data.lags": "1,x"})
  with pytest.raises(UserError, match="integers >= 1"):
    task_for(seasonal_frame(), **{"data.lags": "0"})


def test_resume_names_what_changed_in_the_data():
  task = task_for(seasonal_frame())
  assert task.resume_mismatch(json.loads(json.dumps(task.meta))) is None  # as saved: JSON
  saved = {**task.meta, "lags": [1, 24], "season_length": 24}  # an older version's reading
  assert task.resume_mismatch(saved) == (
      "data gave lags = [1, 24], the data now gives [1, 12] (same frequency 'MS': this "
      "version reads it as season 12, the checkpoint's as 24)")
  assert "data gave known = ['price']" in task.resume_mismatch({**task.meta, "known": ["price"]})
  # The calendar features' layout: another sampling step gives other cycles (the input width).
  assert task.resume_mismatch({**task.meta, "cycles": ["week", "year"]}).startswith(
      "data gave cycles = ['week', 'year'], the data now gives ['year']")
  assert task.resume_mismatch({**task.meta, "calendar_terms": 1}).startswith(
      "data gave calendar_terms = 1")


def test_a_checkpoint_from_before_a_new_config_key_resumes_with_its_default(tmp_path):
  from etils import epath
  c = config(f"csv:{tmp_path}/s.csv")
  task = task_for(seasonal_frame())
  saved = json.loads(c.to_json_best_effort())
  del saved["data"]["train_until"], saved["eval"]["interval_scale"]  # written before they were
  check = lambda now: train._check_compatible({"config": saved}, now, task, 4, epath.Path("/w"))
  check(c)
  c.data.train_until, c.eval.interval_scale = "end", 0.8
  with pytest.raises(UserError, match=r"different config.data.train_until \('validation' vs now "
                                      r"'end'\)"):
    check(c)
  saved["data"]["lags"] = "1,12"  # a key it had still counts
  with pytest.raises(UserError, match=r"config.data.lags \('1,12' vs now ''\)"):
    check(config(f"csv:{tmp_path}/s.csv"))


def test_grad_accumulation_with_no_past_covariates_and_missing_values(tmp_path):
  """The batch's `past` array is (B, T, 0): splitting it into micro-batches divided by zero
  (every forecast config without past covariates, co2's default included). With missing values
  the micro-batches' means are over different numbers of targets: weighted by them, the step
  is the full batch's (equal weights were 1e-4 off on co2)."""
  df = seasonal_frame()
  df.loc[np.random.default_rng(0).choice(len(df) - 30, 25, replace=False), "y"] = np.nan
  src, mesh, out = write_csv(tmp_path, df), sharding.make_mesh((("data", 1),)), {}
  for accum in (1, 2):
    s = train.setup(config(src, grad_accum=accum), mesh)
    batch = train._to_global(next(s.task.batches("train", 0, 0, 1)), mesh)
    assert batch["past"].shape[-1] == 0
    state, metrics = s.train_step(s.init(), batch)
    out[accum] = (metrics, state["params"])
  observed = batch["observed"][:, -6:].reshape(-1, 2, 6).sum((0, 2))  # per strided micro-batch
  assert observed[0] != observed[1]
  assert "weight" not in out[1][0] and "weight" not in out[2][0]
  for k in ("loss", "mae", "grad_norm"):
    np.testing.assert_allclose(out[2][0][k], out[1][0][k], rtol=2e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(out[2][1]), jax.tree.leaves(out[1][1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_eval_batches_are_weighted_by_their_observed_targets(tmp_path):
  """Eval metrics over several batches with different numbers of observed targets are the
  whole eval set's means (an equal-weight mean of batch means was not)."""
  df = seasonal_frame()
  df.loc[np.random.default_rng(0).choice(len(df) - 30, 25, replace=False), "y"] = np.nan
  src, mesh = write_csv(tmp_path, df), sharding.make_mesh((("data", 1),))
  s = train.setup(config(src), mesh)
  batch, state = next(s.task.batches("train", 0, 0, 1)), s.init()
  full = jax.device_get(s.eval_step(state, train._to_global(batch, mesh)))
  halves = [jax.device_get(s.eval_step(state, train._to_global(
      jax.tree.map(lambda a, i=i: a[i::2], batch), mesh))) for i in (0, 1)]
  assert halves[0]["weight"] != halves[1]["weight"]
  mean = train._weighted_mean(halves)
  assert "weight" not in mean
  for k in ("loss", "mae"):
    np.testing.assert_allclose(mean[k], full[k], rtol=1e-5, err_msg=k)
    assert abs(np.mean([h[k] for h in halves]) - full[k]) > 1e-4 * abs(full[k]), k
  assert train._weighted_mean([{"loss": 1.0}, {"loss": 3.0}]) == {"loss": 2.0}
  assert train._weighted_mean([{"loss": 1.0, "weight": 0}, {"loss": 3.0, "weight": 0}]) == {
      "loss": 2.0}


def test_an_eval_that_wraps_around_its_windows_counts_each_once():
  """Eval reads the validation windows in order and wraps around: 11 windows in batches of 8
  read windows 0-4 twice in the second batch, and they counted twice."""
  task = task_for(seasonal_frame(), **{"eval.backtest_stride": 1, "data.val_length": 16})
  n, B = len(task.windows["eval"]), task.config.batch_size
  assert (n, B) == (11, 8)
  model = task.build_model(nnx.Rngs(0))
  model.eval()
  it = task.batches("eval", 0, 0, 1)
  rows = [task.loss_fn(model, next(it), jax.random.key(0)) for _ in range(3)]
  got = train._weighted_mean([dict(aux, loss=loss) for loss, aux in rows])
  once = task.store.gather(task.windows["eval"][:, 0], task.windows["eval"][:, 1], task.horizon)
  loss, aux = task.loss_fn(model, once, jax.random.key(0))
  np.testing.assert_allclose([got["loss"], got["mae"]], [loss, aux["mae"]], rtol=1e-5)
  halves = [next(task.batches("eval", 1, shard, 2))["weight"] for shard in (0, 1)]
  assert np.concatenate(halves).tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
