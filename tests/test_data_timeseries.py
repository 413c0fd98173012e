"""Time-series data: statsmodels sources, CSV validation, calendar features, scaling, windows."""

import numpy as np
import pandas as pd
import pytest

from gru_tpu.data import timeseries as ts
from gru_tpu.errors import UserError


def load(source, **kw):
  df, time_column, targets, season, where = ts.load_frame(source, kw.pop("time_column", ""),
                                                          kw.pop("target", ""))
  return ts.panel_from_frame(df, time_column=time_column, targets=targets, season_length=season,
                             name=source, where=where, **kw)


def test_statsmodels_sources_load_offline_with_their_missing_values():
  co2 = load("statsmodels:co2")
  (s,) = co2.series
  assert s.y.shape == (2284, 1) and np.isnan(s.y).sum() == 59
  assert co2.freq.startswith("W") and co2.season_length == 52
  assert ts.calendar_cycles(co2.freq) == ["year"]
  sun = load("statsmodels:sunspots")
  assert sun.series[0].y.shape == (309, 1) and sun.freq == 1.0 and sun.season_length == 11
  assert ts.calendar_cycles(sun.freq) == []
  elnino = load("statsmodels:elnino")
  assert elnino.series[0].y.shape == (61 * 12, 1) and elnino.season_length == 12
  assert elnino.freq == "MS"
  macro = load("statsmodels:macrodata")
  assert macro.targets == ["realgdp", "realcons", "realinv"] and macro.series[0].y.shape == (203, 3)
  assert macro.season_length == 4
  with pytest.raises(UserError, match="expected one of statsmodels:co2"):
    load("statsmodels:airline")


def write(tmp_path, text, name="d.csv"):
  path = tmp_path / name
  path.write_text(text)
  return f"csv:{path}"


def test_csv_panel_with_covariates(tmp_path):
  rows = ["date,store,sales,price,visits"]
  for store in ("a", "b"):
    for t in pd.date_range("2024-01-01", periods=5, freq="D"):
      rows.append(f"{t.date()},{store},{len(rows)},{1.5},{'' if len(rows) == 3 else 7}")
  src = write(tmp_path, "\n".join(rows) + "\n")
  p = load(src, time_column="date", target="sales", id_column="store", known=["price"],
           past=["visits"])
  assert [s.id for s in p.series] == ["a", "b"] and p.freq == "D" and p.season_length == 7
  assert p.series[0].y[:, 0].tolist() == [1, 2, 3, 4, 5]
  assert p.series[1].known.shape == (5, 1) and np.isnan(p.series[0].past[2, 0])
  # Whole-number float ids (a DataFrame's, or "1.0" in a file) name series "1", as integer ids
  # do: a series keeps its name, and its checkpoint scales, from file to file.
  floats = pd.DataFrame({"date": pd.date_range("2024-01-01", periods=2).repeat(2),
                         "store": [1.0, 2.0] * 2, "sales": [1.0, 2, 3, 4]})
  p = ts.panel_from_frame(floats, time_column="date", targets=["sales"], id_column="store")
  assert [s.id for s in p.series] == ["1", "2"]
  assert ts.calendar_cycles("D") == ["year", "week"] and ts.calendar_cycles("h") == [
      "year", "week", "day"]


@pytest.mark.parametrize("text, kw, message", [
    ("date,y\n2024-01-01,1\n", dict(target="sales"),
     r"no target column 'sales' \(columns: date, y\)"),
    ("date,y\n2024-01-01,1\n2024-01-02,abc\n", {}, r"line 3: target column 'y' holds 'abc'"),
    ("date,y\n2024-01-01,1\nyesterday,2\n", {}, r"line 3: cannot parse timestamp 'yesterday'"),
    ("date,y\n2024-01-02,1\n2024-01-01,2\n", {}, r"line 3: .* not sorted by time"),
    ("date,y\n2024-01-01,1\n2024-01-01,2\n", {}, r"line 3: duplicated timestamp"),
    ("date,y\n2024-01-01,\n2024-01-02,\n", {}, r"target 'y' has no values"),
    ("date,y\n,1\n", {}, r"line 2: empty timestamp"),
    # A European export: one column named 'date;y', and nothing said about the separator.
    ("date;y\n2024-01-01;1\n", {}, r"no time column 'date' \(columns: date;y\); the file is not "
                                   r"comma-separated: save it as CSV with commas"),
    # Read as UTC with utc=True: a 22 h step, forecasts written in UTC, exit 0.
    ("date,y\n2024-01-01T00:00,1\n2024-01-02T00:00,2\n2024-01-03T00:00+02:00,3\n", {},
     r"line 4: timestamp '2024-01-03T00:00\+02:00' in time column 'date' has a UTC offset, "
     r"which the first row's '2024-01-01T00:00' lacks"),
    ("date,y\n2024-01-01 00:00Z,1\n2024-01-02 00:00,2\n", {}, r"line 3: .* lacks a UTC offset"),
    # It named line 2's '0' (the first NaT of a datetime parse), not the bad cell.
    ("date,y\n0,1\n1,2\n?,3\n3,4\n", {}, r"line 4: time '\?' in time column 'date' is not a "
                                         r"number, as the column's other times are"),
    # A traceback ('Q' is a bad directive), exit 1
    ("date,y\n2024-01-01,1\n", dict(time_format="%Q"),
     r"config.data.time_format='%Q': cannot parse the times \('Q' is a bad directive"),
    # blank lines count: pandas skips them, the line number must not
    ("date,y\n2024-01-01,1\n\n\n2024-01-02,x\n", {}, r"line 5: target column 'y' holds 'x'"),
    ("date,y\n2024-01-01,1\n2024-01-02,inf\n", {}, r"line 3: .* holds inf, not a finite"),
    ("date,y\n2024-01-01,1\n", dict(known=["price"]),
     r"no known covariate column 'price' .* fix config.data.known_covariates or the file"),
    ("date,y\n2024-01-01,1\n", dict(id_column="store"),
     r"no id column 'store' .* fix config.data.id_column or the file"),
    # The future target as an input: trained "well", then no forecast (its future is empty).
    ("date,y\n2024-01-01,1\n", dict(known=["y"]),
     r"column 'y' is both a target column and a known covariate column \(config.data.target "
     r"and config.data.known_covariates\)"),
    ("date,y\n2024-01-01,1\n", dict(target="y,y"), r"column 'y' is listed twice in "
                                                    r"config.data.target"),
    # pandas kept the empty id as NaN: "series nan has no values", naming no line
    ("date,s,y\n2024-01-01,a,1\n2024-01-01,,2\n", dict(id_column="s"),
     r"line 3: id column 's' is empty; give every row the id of its series"),
])
def test_bad_csv_is_one_clear_error(tmp_path, text, kw, message):
  src = write(tmp_path, text)
  kw = {"time_column": "date", "target": "y", **kw}
  with pytest.raises(UserError, match=message):
    load(src, **kw)


def test_day_month_order_comes_from_the_column_or_config_data_time_format():
  """pandas read 01/02/2018 month first and 13/02/2018 day first, row by row: monthly data on
  the 1st in day/month order became 12 consecutive days a year (a "daily" series, silently)."""
  def times(dates, **kw):
    df = pd.DataFrame({"date": dates, "y": np.arange(len(dates), dtype=float)})
    p = ts.panel_from_frame(df, time_column="date", targets=["y"], **kw)
    return p.freq, pd.DatetimeIndex(p.series[0].time)
  monthly = pd.date_range("2018-01-01", periods=36, freq="MS")
  daily = pd.date_range("2018-01-01", periods=40, freq="D")
  for fmt, dates in (("%d/%m/%Y", monthly), ("%m/%d/%Y", monthly), ("%d.%m.%Y", monthly),
                     ("%d/%m/%Y", daily), ("%m/%d/%Y", daily), ("%d-%m-%Y", daily)):
    freq, got = times(list(dates.strftime(fmt)))
    assert freq == dates.freqstr and (got == dates).all(), fmt
  hourly = pd.date_range("2018-01-01", periods=40, freq="h")  # 01/01 and 02/01 only
  with pytest.raises(UserError, match=r"row 24: '02/01/2018 00:00' in time column 'date' reads "
                                      r"as day/month and as month/day alike.*time_format"):
    times(list(hourly.strftime("%d/%m/%Y %H:%M")))
  assert (times(list(hourly.strftime("%d/%m/%Y %H:%M")), time_format="%d/%m/%Y %H:%M")[1]
          == hourly).all()
  with pytest.raises(UserError, match=r"mixes day/month \(row 3: '13/01/2018'\) and month/day "
                                      r"\(row 1: '01/14/2018'\)"):
    times(["01/01/2018", "01/14/2018", "01/15/2018", "13/01/2018"])
  with pytest.raises(UserError, match=r"row 1: cannot parse timestamp '2018-01-02' .* does not "
                                      r"match config.data.time_format='%d/%m/%Y'"):
    times(["01/01/2018", "2018-01-02"], time_format="%d/%m/%Y")


def test_unreadable_or_missing_csv(tmp_path):
  with pytest.raises(UserError, match="no such file"):
    ts.load_frame(f"csv:{tmp_path}/nope.csv", "date", "y")
  with pytest.raises(UserError, match="no data rows"):
    ts.load_frame(write(tmp_path, "date,y\n"), "date", "y")
  with pytest.raises(UserError, match="set config.data.time_column and config.data.target"):
    ts.load_frame(write(tmp_path, "date,y\n2024-01-01,1\n"), "", "")
  with pytest.raises(UserError, match="expected 'statsmodels:NAME'"):
    ts.load_frame("parquet:x", "", "")


def test_forecast_data_without_a_trained_column_says_to_fix_the_file():
  df = pd.DataFrame({"date": ["2024-01-01", "2024-01-02"], "y": [1.0, 2.0]})
  with pytest.raises(UserError, match=r"no known covariate column 'price' .* the model was "
                     r"trained with it: give a file that has it$"):
    ts.panel_from_frame(df, time_column="date", targets=["y"], known=["price"], freq="D")


def test_numeric_time_and_future_times():
  df = pd.DataFrame({"t": [10, 12, 14, 16], "y": [1.0, 2, 3, 4]})
  p = ts.panel_from_frame(df, time_column="t", targets=["y"])
  assert p.freq == 2.0 and p.season_length == 1
  future = ts.future_times(p.series[0].time, 3, p.freq)
  assert future.tolist() == [18, 20, 22] and future.dtype == np.int64  # integer years stay so
  assert ts.future_times(np.array([0.5, 1.0]), 2, 1.0).tolist() == [1.5, 2.0]
  assert ts.future_times(np.array([2001, 2002, 2004]), 2, 1.0).tolist() == [2005, 2006]  # a gap
  weekly = ts.future_times(pd.date_range("2001-12-01", "2001-12-29", freq="W-SAT").to_numpy(),
                           2, "W-SAT")
  assert [str(t)[:10] for t in weekly] == ["2002-01-05", "2002-01-12"]


def _dates(*days):
  return pd.DatetimeIndex(list(days)).to_numpy("datetime64[ns]")


@pytest.mark.parametrize("times, want", [
    # monthly on the 15th: no pandas alias; it keeps its day
    (_dates("2011-06-15", "2011-07-15", "2011-08-15", "2011-09-15"), ["2011-10-15", "2011-11-15"]),
    # monthly with a missing month: still calendar months, not a 31-day step
    (_dates("2009-08-01", "2009-09-01", "2009-11-01", "2009-12-01"), ["2010-01-01", "2010-02-01"]),
    (_dates("2009-08-31", "2009-09-30", "2009-11-30", "2009-12-31"), ["2010-01-31", "2010-02-28"]),
    # weekly on Sundays, the last one not on the panel's anchor
    (_dates("2022-01-09", "2022-01-16", "2022-01-23"), ["2022-01-30", "2022-02-06"]),
    # monthly on the 30th, February on its last day: back to the 30th after it
    (_dates("2020-12-30", "2021-01-30", "2021-02-28", "2021-03-30"), ["2021-04-30", "2021-05-30"]),
    # daily with a gap: the most common step
    (_dates("2024-01-01", "2024-01-02", "2024-01-04", "2024-01-05"), ["2024-01-06", "2024-01-07"]),
    # trading days: weekdays with holidays (Fri 16, Mon 19, Thu 22 missing): no Saturday
    (_dates("2024-02-13", "2024-02-14", "2024-02-15", "2024-02-20", "2024-02-21", "2024-02-23"),
     ["2024-02-26", "2024-02-27"]),
])
def test_future_times_continue_each_series_own_step(times, want):
  got = ts.future_times(times, 2, "D")
  assert [str(t)[:10] for t in got] == want


@pytest.mark.parametrize("freq, m", [
    ("D", 7), ("B", 5), ("h", 24), ("6h", 4), ("min", 60), ("15min", 4), ("W-SUN", 52),
    ("2W", 26), ("MS", 12), ("2MS", 6), ("ME", 12), ("BME", 12), ("BMS", 12), ("QS-JAN", 4),
    ("YS-JAN", 1), ("YE-DEC", 1), ("2D", 1), ("744h", 12), ("168h", 52), ("24h", 7), ("ms", 1)])
def test_season_from_freq(freq, m):
  assert ts.season_from_freq(freq) == m


def test_a_month_is_a_nominal_month_long():
  assert ts.step_days("MS") == ts.step_days("ME") == pytest.approx(365 / 12)
  assert ts.step_days("2MS") == pytest.approx(365 / 6) and ts.step_days("W-SUN") == 7


def test_timezones_are_kept_and_changing_offsets_read_as_utc(tmp_path):
  days = pd.date_range("2021-04-01", periods=30, freq="D", tz="Asia/Tokyo")
  src = write(tmp_path, "date,y\n" + "".join(f"{d.isoformat()},{i}\n" for i, d in
                                              enumerate(days)))
  p = load(src, time_column="date", target="y")
  assert p.freq == "D" and p.season_length == 7 and str(p.tz) == "UTC+09:00"
  future = pd.DatetimeIndex(ts.future_times(p.series[0].time, 1, p.freq, p.tz))
  assert future.tz_localize("UTC").tz_convert(p.tz)[0].isoformat() == "2021-05-01T00:00:00+09:00"
  # Berlin midnights across the switch to summer time: +01:00, then +02:00.
  days = pd.date_range("2021-03-20", periods=20, freq="D", tz="Europe/Berlin")
  src = write(tmp_path, "date,y\n" + "".join(f"{d.isoformat()},{i}\n" for i, d in
                                              enumerate(days)), "berlin.csv")
  p = load(src, time_column="date", target="y")
  assert str(p.tz) == "UTC" and p.season_length == 7
  assert str(p.series[0].time[-1])[:16] == "2021-04-07T22:00"
  # Hourly in a named zone, into the end of summer time: every hour once, in UTC steps.
  hours = pd.date_range("2024-10-26 12:00", periods=14, freq="h", tz="Europe/Berlin")
  p = ts.panel_from_frame(pd.DataFrame({"date": hours, "y": 1.0}), time_column="date",
                          targets=["y"])
  future = ts.future_times(p.series[0].time, 4, p.freq, p.tz)
  assert p.freq == "h" and (np.diff(future) == np.timedelta64(1, "h")).all()
  assert future[0] - p.series[0].time[-1] == np.timedelta64(1, "h")
  # Daily in a named zone across the switch: local midnight every day.
  days = pd.date_range("2024-10-20", periods=7, freq="D", tz="Europe/Berlin")
  p = ts.panel_from_frame(pd.DataFrame({"date": days, "y": 1.0}), time_column="date",
                          targets=["y"])
  future = pd.DatetimeIndex(ts.future_times(p.series[0].time, 2, p.freq, p.tz))
  assert [t.isoformat() for t in future.tz_localize("UTC").tz_convert(p.tz)] == [
      "2024-10-27T00:00:00+02:00", "2024-10-28T00:00:00+01:00"]


def test_a_panel_needs_one_sampling_step_and_forecast_data_the_trained_one(tmp_path):
  rows = ["date,store,y"]
  rows += [f"{d.date()},d,1" for d in pd.date_range("2024-01-01", periods=30, freq="D")]
  rows += [f"{d.date()},w,1" for d in pd.date_range("2024-01-07", periods=10, freq="W-SUN")]
  src = write(tmp_path, "\n".join(rows) + "\n")
  with pytest.raises(UserError, match=r"series 'w' is sampled every 7 day\(s\) \(W-SUN\) but "
                                      r"series 'd' every 1 day\(s\) \(D\)"):
    load(src, time_column="date", target="y", id_column="store")
  daily = write(tmp_path, "date,y\n" + "".join(
      f"{d.date()},1\n" for d in pd.date_range("2024-01-01", periods=9)), "daily.csv")
  assert load(daily, time_column="date", target="y", freq="D").freq == "D"
  with pytest.raises(UserError, match=r"sampled every 1 day\(s\) \(D\) but the model was "
                                      r"trained on data sampled every 7 day\(s\)"):
    load(daily, time_column="date", target="y", freq="W-SUN")
  with pytest.raises(UserError, match="is dates but the model was trained on numbers"):
    load(daily, time_column="date", target="y", freq=1.0)
  # Business days with and without holidays are one step (they used to be "24h" vs "B").
  bdays = pd.bdate_range("2024-01-01", "2024-03-29")
  holidays = bdays[~bdays.isin(pd.to_datetime(["2024-01-15", "2024-02-19"]))]
  trading = write(tmp_path, "date,store,y\n" + "".join(
      f"{d.date()},{s},1\n" for s, days in (("a", bdays), ("b", holidays)) for d in days),
      "trading.csv")
  panel = load(trading, time_column="date", target="y", id_column="store")
  assert (panel.freq, panel.season_length) == ("B", 5)
  assert load(trading, time_column="date", target="y", id_column="store", freq="B").freq == "B"
  one = ts.panel_from_frame(pd.DataFrame({"date": ["2024-01-01"], "y": [1.0]}),
                            time_column="date", targets=["y"], freq="MS")
  assert one.freq == "MS"  # a single timestamp has no step to disagree with


def test_calendar_features_are_fourier_terms_of_the_year_phase():
  t = pd.date_range("2023-01-01", periods=3, freq="MS").to_numpy()
  f = ts.calendar_features(t, ["year"], 2)
  phase = 2 * np.pi * np.array([0, 31, 59]) / 365
  want = np.stack([np.sin(phase), np.cos(phase), np.sin(2 * phase), np.cos(2 * phase)], -1)
  np.testing.assert_allclose(f, want, atol=1e-6)
  # Hourly data: each cycle's phase counts the hours; a leap year has 366 days.
  t = np.array(["2020-12-31T18:00", "2021-03-03T06:00"], "datetime64[s]")  # Thu, Wed
  f = ts.calendar_features(t, ["year", "week", "day"], 1)
  year = np.array([(365 + 0.75) / 366, (61 + 0.25) / 365])
  week, day = np.array([(3 + 0.75) / 7, (2 + 0.25) / 7]), np.array([0.75, 0.25])
  want = np.concatenate([np.stack([np.sin(2 * np.pi * p), np.cos(2 * np.pi * p)], -1)
                         for p in (year, week, day)], -1)
  np.testing.assert_allclose(f, want, atol=1e-6)


def test_calendar_features_follow_the_datas_wall_clock_across_daylight_saving():
  """A tz-aware series is stored as UTC instants: its phases moved local noon to 11:00 in
  winter and 10:00 in summer (Berlin), so a daily pattern shifted an hour at each change.
  Checkpoints from before (no calendar_clock in their metadata) keep the UTC phases."""
  from gru_tpu.tasks import forecast
  noon = pd.DatetimeIndex(["2024-01-15 12:00", "2024-07-15 12:00"]).tz_localize("Europe/Berlin")
  utc = noon.tz_convert("UTC").tz_localize(None).to_numpy()
  day = ts.calendar_features(utc, ["day"], 1, "Europe/Berlin")
  np.testing.assert_allclose(day, [[0.0, -1.0]] * 2, atol=1e-6)  # sin, cos of 2π · 0.5
  s = ts.Series("a", utc, np.ones((2, 1)), np.zeros((2, 0)), np.zeros((2, 0)))
  scales = forecast.fit_scales(s, 2, "none")
  meta = {"cycles": ["day"], "calendar_terms": 1, "calendar_clock": "local"}
  np.testing.assert_allclose(forecast.series_arrays(s, scales, meta, "Europe/Berlin")["known"],
                             day)
  old = {k: v for k, v in meta.items() if k != "calendar_clock"}
  np.testing.assert_allclose(forecast.series_arrays(s, scales, old, "Europe/Berlin")["known"],
                             ts.calendar_features(utc, ["day"], 1), atol=1e-6)
  assert not np.allclose(ts.calendar_features(utc, ["day"], 1)[0],
                         ts.calendar_features(utc, ["day"], 1)[1])  # the old, UTC phases


@pytest.mark.parametrize("method", ["standard", "mean_abs", "none"])
def test_scaling_round_trips_and_fits_observed_values_only(rng, method):
  x = rng.normal(5, 3, (50, 2))
  x[3, 0] = np.nan
  scales = ts.fit_scale(x, method)
  z = ts.apply_scale(x, scales)
  np.testing.assert_allclose(ts.invert_scale(z, scales), x, rtol=1e-12)
  if method == "standard":
    assert abs(np.nanmean(z[:, 0])) < 1e-12 and abs(np.nanstd(z[:, 0]) - 1) < 1e-12
  if method == "mean_abs":
    assert abs(np.nanmean(np.abs(z[:, 1])) - 1) < 1e-12
  const = ts.fit_scale(np.ones((4, 1)), method)
  assert const[0]["scale"] == 1.0
  if method != "none":
    with pytest.raises(UserError, match="too large to scale"):
      ts.fit_scale(np.array([[1e308], [1e308], [-1e308]]), method)


@pytest.mark.parametrize("name", ["sqrt", "log1p"])
def test_transforms_round_trip_and_refuse_negative_targets(rng, name):
  x = rng.gamma(2.0, 10.0, (50, 1))
  x[3, 0], x[4, 0] = np.nan, 0.0
  z = ts.transform(x, name)
  assert np.isnan(z[3, 0]) and z[4, 0] == 0
  assert (np.argsort(z[5:, 0]) == np.argsort(x[5:, 0])).all()   # monotone: order kept
  np.testing.assert_allclose(ts.invert_transform(z, name), x, rtol=1e-12)
  # A forecast below the transform's zero is a forecast of 0, not a negative value.
  assert ts.invert_transform(np.array([-0.5]), name)[0] == 0.0
  df = pd.DataFrame({"t": np.arange(6), "y": [1.0, np.nan, 2.0, -0.5, 3.0, 4.0]})
  panel = ts.panel_from_frame(df, time_column="t", targets=["y"], name="f.csv")
  ts.check_transform(panel, "none")
  with pytest.raises(UserError, match=rf"f.csv: target 'y' is -0.5 at 3; "
                                      rf"config.data.transform='{name}' needs values >= 0"):
    ts.check_transform(panel, name)


def test_fill_forward_is_causal():
  x = np.array([[np.nan], [1.0], [np.nan], [np.nan], [4.0], [np.nan]])
  np.testing.assert_array_equal(ts.fill_forward(x)[:, 0], [0, 1, 1, 1, 4, 4])
  # Baselines' history starts at the first observation: no invented flat stretch before it.
  np.testing.assert_array_equal(ts.observed_history(x[:, 0]), [1, 2, 3, 4, 4])


def _store(T=40, pad=3):
  y = np.arange(T, dtype=np.float32)[:, None]
  a = {"y": y, "observed": np.ones_like(y), "known": np.zeros((T, 0)), "past": np.zeros((T, 0))}
  from gru_tpu.tasks.forecast import make_store
  return make_store([a, a], pad)


def test_windows_cover_pad_plus_horizon_and_batches_resume_and_shard():
  store = _store()
  b = store.gather(np.array([1]), np.array([10]), 4)
  assert b["y"][0, :, 0].tolist() == list(range(7, 14))  # steps [10 - 3, 10 + 4)
  windows = np.array([(i, o) for i in range(2) for o in range(3, 30)])
  kw = dict(horizon=4, batch_size=8, seed=3)
  it = ts.window_batches(store, windows, **kw)
  first = [next(it)["y"] for _ in range(6)]
  resumed = next(ts.window_batches(store, windows, start_step=5, **kw))["y"]
  np.testing.assert_array_equal(first[5], resumed)
  halves = [next(ts.window_batches(store, windows, start_step=2, shard=i,
                                   num_shards=2, **kw))["y"] for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), first[2])
  other = next(ts.window_batches(store, windows, **dict(kw, seed=4)))["y"]
  assert not np.array_equal(other, first[0])


def test_a_trailing_comma_on_every_row_is_no_index_column(tmp_path):
  """Excel's export: pandas took the dates as the index and the values as the times."""
  p = load(write(tmp_path, "date,y\n2024-01-01,1.5,\n2024-01-02,2.5,\n2024-01-03,3.5,\n"),
           time_column="date", target="y")
  np.testing.assert_array_equal(p.series[0].y[:, 0], [1.5, 2.5, 3.5])
  assert str(p.series[0].time[0]).startswith("2024-01-01")
