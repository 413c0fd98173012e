"""Time series for forecasting: sources -> validated panels -> scaled, imputed arrays -> windows.

Sources (config.data.source):
  statsmodels:NAME  series shipped inside the statsmodels wheel (offline): co2 (weekly, 59
                    missing values), sunspots (yearly), elnino (monthly), macrodata (quarterly,
                    multivariate).
  csv:PATH          a CSV file: config.data.time_column, config.data.target (one or more
                    columns), optional config.data.id_column (a panel of series), optional
                    known-future and past-only covariate columns.
A panel is a list of Series, each with its own time index. Missing targets are NaN: they are
masked out of the loss and the metrics (the `observed` mask) and imputed only where a model
input needs a number, by carrying the last observation forward (causal: an input never depends
on a later value); values before a series' first observation are 0 in scaled units.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from etils import epath

from gru_tpu.data import order
from gru_tpu.errors import UserError

# name -> (time column, default targets, season length)
STATSMODELS = {"co2": ("date", ("co2",), 52), "sunspots": ("YEAR", ("SUNACTIVITY",), 11),
               "elnino": ("date", ("sst",), 12),
               "macrodata": ("date", ("realgdp", "realcons", "realinv"), 4)}


@dataclasses.dataclass
class Series:
  id: str
  time: np.ndarray    # (T,) datetime64[ns] or float64
  y: np.ndarray       # (T, C) float64 in original units, NaN = missing
  known: np.ndarray   # (T, K) known-future covariates (original units, NaN = missing)
  past: np.ndarray    # (T, P) past-only covariates


@dataclasses.dataclass
class Panel:
  name: str
  series: list[Series]
  time_column: str
  targets: list[str]
  known: list[str]
  past: list[str]
  id_column: str | None
  freq: str | float   # a pandas offset alias (datetime time) or the numeric step
  season_length: int
  tz: object = None   # the time column's timezone (times are UTC instants); None: naive


def names(value) -> list[str]:
  """A config list of columns: 'a,b' or ('a', 'b') -> ['a', 'b']."""
  if isinstance(value, str):
    return [v.strip() for v in value.split(",") if v.strip()]
  return [str(v) for v in (value or ())]


def _statsmodels_frame(name: str):
  import pandas as pd
  from statsmodels import datasets
  if name not in STATSMODELS:
    raise UserError(f"config.data.source='statsmodels:{name}': expected one of "
                    f"{', '.join('statsmodels:' + n for n in STATSMODELS)}")
  df = getattr(datasets, name).load_pandas().data
  if name == "co2":
    df = df.rename_axis("date").reset_index()
  elif name == "sunspots":
    df = df.assign(YEAR=df.YEAR.astype(int))
  elif name == "elnino":
    long = df.melt(id_vars="YEAR", var_name="month", value_name="sst")
    long["date"] = pd.to_datetime(long.YEAR.astype(int).astype(str) + "-" + long.month,
                                  format="%Y-%b")
    df = long.sort_values("date")[["date", "sst"]].reset_index(drop=True)
  elif name == "macrodata":
    df = df.assign(date=pd.PeriodIndex.from_fields(
        year=df.year.astype(int), quarter=df.quarter.astype(int), freq="Q").to_timestamp())
  return df


def read_csv(path: str):
  """The file as a DataFrame; df.attrs["lines"][i] is row i's line in the file (pandas skips
  blank lines, so error messages cannot count rows)."""
  import io
  import pandas as pd
  p = epath.Path(path)  # local, or gs://
  if not p.is_file():
    raise UserError(f"csv:{path}: no such file (relative paths are from the current directory)")
  data = p.read_bytes()
  try:
    df = pd.read_csv(io.BytesIO(data), index_col=False)  # a trailing comma: no index column
  except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
    raise UserError(f"csv:{path}: not a readable CSV ({' '.join(str(e).split())}); save it as "
                    f"comma-separated UTF-8 with a header row") from None
  if df.empty:
    raise UserError(f"csv:{path}: no data rows; the file needs a header row and one row per "
                    f"timestamp")
  lines = [i + 1 for i, line in enumerate(data.splitlines()) if line.strip()][1:]
  # A quoted field spanning lines breaks the count; then rows are numbered as if none were blank.
  df.attrs["lines"] = lines if len(lines) == len(df) else [i + 2 for i in range(len(df))]
  return df


def load_frame(source: str, time_column: str = "", target="", season_length: int = 0):
  """source -> (DataFrame, time column, targets, season length (0 = from the frequency), where).

  `where(i)` names row i of the frame for error messages (the file line for a CSV).
  """
  if source.startswith("statsmodels:"):
    name = source[len("statsmodels:"):]
    df = _statsmodels_frame(name)
    t, y, m = STATSMODELS[name]
    return (df, time_column or t, names(target) or list(y), season_length or m,
            lambda i: f"{source} row {i}")
  if source.startswith("csv:"):
    path = source[len("csv:"):]
    df = read_csv(path)
    if not time_column or not names(target):
      raise UserError(f"{source}: set config.data.time_column and config.data.target (columns "
                      f"of the file: {', '.join(map(str, df.columns))})")
    lines = df.attrs["lines"]
    return df, time_column, names(target), season_length, lambda i: f"{path} line {lines[i]}"
  raise UserError(f"config.data.source={source!r}: expected 'statsmodels:NAME' (co2, sunspots, "
                  f"elnino, macrodata) or 'csv:PATH'")


def _numeric(df, col: str, what: str, where) -> np.ndarray:
  import pandas as pd
  s = df[col]
  if pd.api.types.is_bool_dtype(s):
    return s.to_numpy(np.float64)
  values = pd.to_numeric(s, errors="coerce")
  bad = values.isna() & s.notna() & (s.astype(str).str.strip() != "")
  if bad.any():
    i = int(np.flatnonzero(bad.to_numpy())[0])
    raise UserError(f"{where(i)}: {what} column {col!r} holds {s.iloc[i]!r}, not a number; fix "
                    f"the value or leave the cell empty for a missing value")
  values = values.to_numpy(np.float64)
  inf = np.isinf(values)
  if inf.any():  # pandas reads "inf"; one would turn the scaling and every loss into NaN
    i = int(np.flatnonzero(inf)[0])
    raise UserError(f"{where(i)}: {what} column {col!r} holds {values[i]:g}, not a finite "
                    f"number; fix the value or leave the cell empty for a missing value")
  return values


def _ids(df, col: str, where) -> np.ndarray:
  """The id column as strings, every row one; whole-number floats (a DataFrame's 1.0, or "1.0" in
  a file) keep their integer spelling, so "1" names the same series in every file."""
  import pandas as pd
  s = df[col]
  empty = s.isna() | (s.astype(str).str.strip() == "")
  if empty.any():
    raise UserError(f"{where(int(np.flatnonzero(empty.to_numpy())[0]))}: id column {col!r} is "
                    f"empty; give every row the id of its series")
  if pd.api.types.is_float_dtype(s) and (s == s.round()).all():
    s = s.astype(np.int64)
  return s.astype(str).to_numpy()


def _day_first(raw, col: str, where) -> bool:
  """Whether numeric dates such as 01/02/2024 (or 01.02.2024, 01-02-2024) put the day first.

  pandas reads them month first wherever the day is <= 12 and day first elsewhere, row by row:
  monthly data on the 1st in day/month order became twelve consecutive days a year, silently.
  The column's own values decide: a field above 12 is a day; else, in dates without a time, a
  field that never changes while the other does is the day (monthly data). When nothing
  settles it, both readings are valid and the column is refused."""
  parts = raw.str.extract(r"^\s*(\d{1,2})[/.\-](\d{1,2})[/.\-]\d{2,4}((?:[\sT].*)?)$")
  if parts.isna().any(axis=None):
    return False  # not all such dates (ISO, names, ...): pandas' own reading
  a, b = parts[0].astype(int).to_numpy(), parts[1].astype(int).to_numpy()
  if (a > 12).any() and (b > 12).any():
    i, j = int(np.argmax(a > 12)), int(np.argmax(b > 12))
    raise UserError(f"time column {col!r} mixes day/month ({where(i)}: {raw.iloc[i]!r}) and "
                    f"month/day ({where(j)}: {raw.iloc[j]!r}) dates; write one order, or ISO "
                    f"dates such as 2024-01-31")
  if (a > 12).any() or (b > 12).any():
    return bool((a > 12).any())
  dates_only = (parts[2].str.strip() == "").all()  # hourly data of two days: 01/01, 02/01
  if dates_only and len(set(a)) != len(set(b)) and min(len(set(a)), len(set(b))) == 1:
    return len(set(a)) == 1
  if (a != b).any():
    i = int(np.argmax(a != b))
    raise UserError(f"{where(i)}: {raw.iloc[i]!r} in time column {col!r} reads as day/month and "
                    f"as month/day alike, and no date in the column settles which; set "
                    f"config.data.time_format ('%d/%m/%Y' or '%m/%d/%Y', plus the time if any: "
                    f"'%d/%m/%Y %H:%M'), or write ISO dates such as 2024-01-31")
  return False


# A UTC offset ending a timestamp that has a time of day: 13:00Z, 13:00+02:00, 13:00:00-0500.
_OFFSET = r"\d:\d\d(?::\d\d(?:\.\d*)?)?\s*(?:Z|[+-]\d\d(?::?\d\d)?)$"


def _times(df, col: str, where, time_format: str = ""):
  """(times, tz): datetime64[ns] (UTC if the column had offsets) or int64/float64, and the
  column's timezone (None if naive), which forecasts are written back in. `time_format`: a
  strftime format for the column ("" = inferred)."""
  import pandas as pd
  s = df[col]
  if s.isna().any():
    raise UserError(f"{where(int(np.flatnonzero(s.isna().to_numpy())[0]))}: empty timestamp in "
                    f"time column {col!r}; every row needs a time")
  if pd.api.types.is_integer_dtype(s) and not pd.api.types.is_bool_dtype(s):
    return s.to_numpy(np.int64), None
  if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
    return s.to_numpy(np.float64), None
  if pd.api.types.is_datetime64_any_dtype(s):
    t = pd.DatetimeIndex(s)
  else:
    raw = s.astype(str)
    how = (dict(format=time_format) if time_format else
           dict(format="mixed", dayfirst=_day_first(raw, col, where)))
    try:  # pandas 2 returns offsets that change as an object Index; DatetimeIndex refuses it
      t = pd.DatetimeIndex(pd.to_datetime(raw, errors="coerce", **how))
    except ValueError:  # UTC offsets that change within the column (daylight saving)
      aware = raw.str.contains(_OFFSET).to_numpy()
      if aware.any() and not aware.all():  # utc=True would read the naive ones as UTC
        i = int(np.flatnonzero(aware != aware[0])[0])
        raise UserError(f"{where(i)}: timestamp {s.iloc[i]!r} in time column {col!r} "
                        f"{'has' if aware[i] else 'lacks'} a UTC offset, which the first row's "
                        f"{s.iloc[0]!r} {'lacks' if aware[i] else 'has'}; give every "
                        f"timestamp an offset or none") from None
      try:
        t = pd.to_datetime(raw, errors="coerce", utc=True, **how)
      except ValueError as e:  # not a date, or an invalid format string
        what = f"config.data.time_format={time_format!r}" if time_format else f"column {col!r}"
        raise UserError(f"{what}: cannot parse the times ({' '.join(str(e).split())})"
                        ) from None
    if t.isna().any():
      number = pd.to_numeric(raw, errors="coerce")
      if number.notna().sum() > len(raw) / 2:  # numbers with a few bad cells: name one of those
        i = int(np.flatnonzero(number.isna().to_numpy())[0])
        raise UserError(f"{where(i)}: time {s.iloc[i]!r} in time column {col!r} is not a "
                        f"number, as the column's other times are; fix the value")
      i = int(np.flatnonzero(t.isna())[0])
      fix = (f"it does not match config.data.time_format={time_format!r}" if time_format else
             "use ISO dates such as 2024-01-31 or 2024-01-31 13:00, or plain numbers")
      raise UserError(f"{where(i)}: cannot parse timestamp {s.iloc[i]!r} in time column "
                      f"{col!r}; {fix}")
    t = pd.DatetimeIndex(t)
  tz = t.tz
  if tz is not None:
    t = t.tz_convert(None)
  return t.to_numpy("datetime64[ns]"), tz


def _mode(x: np.ndarray):
  values, counts = np.unique(x, return_counts=True)
  return values[counts.argmax()]


@dataclasses.dataclass(frozen=True)
class Months:
  """A step of whole calendar months on one day of the month, clipped to short months (day 31:
  month ends), so monthly data on the 15th or the 30th keeps its day; pandas has no alias."""
  months: int
  day: int

  def after(self, last, i: int):
    import pandas as pd
    first = last.normalize().replace(day=1) + pd.DateOffset(months=i * self.months)
    return first.replace(day=min(self.day, first.days_in_month)) + (last - last.normalize())


def series_step(time: np.ndarray, tz=None):
  """(alias, step) of one series: a pandas offset alias naming its sampling frequency (for the
  season and the calendar features) and what steps its own timestamps (a pandas offset, a
  Timedelta or Months; a number for numeric time). pandas' inferred frequency if it has one;
  else whole months when every timestamp falls on one day of the month (so a series on the
  15th, or with a missing month, keeps its calendar); else business days for weekdays only,
  mostly one apart (trading days with holidays); else the most common step. (None, None)
  for a single timestamp. Datetimes are read on tz's wall clock (UTC if None)."""
  import pandas as pd
  if np.issubdtype(time.dtype, np.number):
    if len(time) < 2:
      return None, None
    diffs = np.diff(time)
    step = _mode(diffs)  # years with a gap still step by 1; jittery floats: the median
    step = float(step if np.mean(diffs == step) >= 0.5 else np.median(diffs))
    return step, step
  idx = _local(time, tz)
  if len(idx) >= 3:
    with warnings.catch_warnings():  # pandas 3 warns that infer_freq will return an offset
      warnings.simplefilter("ignore", DeprecationWarning)
      try:
        freq = pd.infer_freq(idx)
      except ValueError:  # a repeated wall-clock hour (daylight saving ends)
        freq = None
    freq = getattr(freq, "freqstr", freq)
    if freq:
      return freq, pd.tseries.frequencies.to_offset(freq)
  if len(idx) < 2:
    return None, None
  months = np.diff(idx.year * 12 + idx.month)
  day = int(idx.day.max())
  if ((idx - idx.normalize()).nunique() == 1 and months.min() > 0
      and (idx.day == np.minimum(day, idx.days_in_month)).all()):
    m = int(_mode(months))
    return f"{m if m > 1 else ''}{'ME' if day == 31 else 'MS'}", Months(m, day)
  # Business days with holidays (trading days): weekdays only, at one time of day, mostly one
  # weekday apart, and over a weekend at least once. As days they would get season 7 and
  # forecasts on Saturdays; holidays are unknown, so forecasts step over weekends only.
  day_T = idx.normalize().to_numpy("datetime64[D]")
  if (idx.day_of_week < 5).all() and (idx - idx.normalize()).nunique() == 1:
    busdays = np.busday_count(day_T[:-1], day_T[1:])
    if _mode(busdays) == 1 and (np.diff(day_T).astype(np.int64) > busdays).any():
      return "B", pd.offsets.BusinessDay(1)
  step = pd.Timedelta(_mode(np.diff(idx.to_numpy("datetime64[ns]"))))
  return pd.tseries.frequencies.to_offset(step).freqstr, step


def _local(time: np.ndarray, tz):
  """datetime64 UTC instants -> a naive DatetimeIndex of tz's wall clock (tz None: as is)."""
  import pandas as pd
  idx = pd.DatetimeIndex(time)
  return idx if tz is None else idx.tz_localize("UTC").tz_convert(tz).tz_localize(None)


def step_days(freq: str | float) -> float:
  """The nominal length of one step of `freq` in days, averaged over 12 steps (a month is
  ~30.4; MS and ME agree), or the numeric step for numeric time."""
  import pandas as pd
  if not isinstance(freq, str):
    return float(freq)
  offset = pd.tseries.frequencies.to_offset(freq)
  anchor = pd.Timestamp("2001-01-01") + offset  # anchored offsets (W-SAT, MS) first snap to one
  return ((anchor + 12 * offset) - anchor) / pd.Timedelta(days=12)


def season_from_freq(freq: str | float) -> int:
  """The usual seasonal period of a sampling frequency (1 = none): a year of months, quarters or
  weeks, a week of days (5 business days), a day of hours, an hour of minutes, a minute of
  seconds; multiples divide it (6h -> 4, 2W -> 26) when they fit a whole number of times."""
  import pandas as pd
  if not isinstance(freq, str):
    return 1
  offset = pd.tseries.frequencies.to_offset(freq)
  kind, n = type(offset).__name__, offset.n
  per_year = {"SemiMonth": 24, "Month": 12, "Quarter": 4, "Year": 1}
  for name, k in per_year.items():
    if name in kind:
      return k // n if k % n == 0 and k // n > 1 else 1
  if kind.endswith("BusinessDay"):
    return 5 if n == 1 else 1
  if kind == "Week":
    return 52 // n if 52 % n == 0 else 1
  seconds = step_days(freq) * 86400
  if seconds >= 7 * 86400:  # a fixed step of days from an irregular series: weeks or ~months
    weeks, months = seconds / (7 * 86400), seconds / (30.44 * 86400)
    if weeks == round(weeks) and 52 % round(weeks) == 0:
      return 52 // round(weeks)
    m = round(months)
    return 12 // m if m and abs(months - m) < 0.1 * m and 12 % m == 0 and m < 12 else 1
  if seconds < 1:  # sub-second sampling: no calendar season
    return 1
  for period in (60, 3600, 86400, 7 * 86400):
    if seconds < period:
      k = period / seconds
      return int(round(k)) if abs(k - round(k)) < 1e-9 and k > 1 else 1
  return 1


def future_times(time: np.ndarray, n: int, freq: str | float, tz=None) -> np.ndarray:
  """The n timestamps after a series' last one, at that series' own step (see series_step;
  `freq`, the panel's, when it has a single timestamp), as UTC instants. Steps of a day or more
  follow tz's wall clock (daily data stays at local midnight across daylight saving); shorter
  ones step in UTC, where every hour exists once. Integer time stays integer when the step is
  whole."""
  import pandas as pd
  _, step = series_step(time, tz)
  if step is None:
    step = freq if not isinstance(freq, str) else pd.tseries.frequencies.to_offset(freq)
  k = np.arange(1, n + 1)
  if np.issubdtype(time.dtype, np.number):
    out = time[-1] + step * k
    return out.astype(np.int64) if np.issubdtype(time.dtype, np.integer) and step == int(step) \
        else out.astype(np.float64)
  if (tz is not None and isinstance(step, (pd.Timedelta, pd.offsets.Tick))
      and pd.Timedelta(step) < pd.Timedelta(days=1)):
    tz, step = None, series_step(time)[1] or step  # hours: in UTC
  last = _local(time[-1:], tz)[0]
  # i·step from `last`: no drift, no snapping to an offset's anchor
  local = pd.DatetimeIndex([step.after(last, i) if isinstance(step, Months) else last + i * step
                            for i in k])
  if tz is not None:
    local = local.tz_localize(tz, ambiguous=np.zeros(n, bool), nonexistent="shift_forward")
    local = local.tz_convert(None)
  return local.to_numpy("datetime64[ns]")


def _infer_freq(series: list[Series], tz, label) -> str | float | None:
  """The panel's frequency: its longest series' (None when it has one timestamp); every other
  series must step about as often."""
  longest = max(series, key=lambda s: len(s.time))
  freq = series_step(longest.time, tz)[0]
  if freq is None:
    return None
  for s in series:
    own = series_step(s.time, tz)[0]
    if own is not None and not 0.9 <= step_days(own) / step_days(freq) <= 1.1:
      raise UserError(f"{label(s)} is sampled every {_every(own)} but series "
                      f"{longest.id!r} every {_every(freq)}; one model needs one frequency: "
                      f"resample the series to a common step, or train them separately")
  return freq


def _every(freq: str | float) -> str:
  return f"{freq:g}" if not isinstance(freq, str) else f"{step_days(freq):.3g} day(s) ({freq})"


def panel_from_frame(df, *, time_column: str, targets: list[str], id_column: str | None = None,
                     known: list[str] = (), past: list[str] = (), season_length: int = 0,
                     name: str = "data", where=lambda i: f"row {i}",
                     freq: str | float | None = None, time_format: str = "") -> Panel:
  """Validates a DataFrame and splits it into series; every bad input is one UserError.

  `freq`: the frequency a model was trained on; the data must have it (dates vs numbers, about
  the same step), and the panel keeps it."""
  known, past = list(known), list(past)
  wanted = [("time", time_column, "time_column"), *(("target", c, "target") for c in targets),
            *(("known covariate", c, "known_covariates") for c in known),
            *(("past covariate", c, "past_covariates") for c in past)]
  if id_column:
    wanted.append(("id", id_column, "id_column"))
  have = [str(c) for c in df.columns]
  for role, col, key in wanted:
    if col not in have:
      fix = (f"fix config.data.{key} or the file" if freq is None else  # training
             "the model was trained with it: give a file that has it")  # forecasting
      if len(have) == 1 and any(sep in have[0] for sep in ";\t|"):  # "date;y": one column
        fix = "the file is not comma-separated: save it as CSV with commas"
      raise UserError(f"{name}: no {role} column {col!r} (columns: {', '.join(have)}); {fix}")
  if not targets:
    raise UserError(f"{name}: no target column; set config.data.target")
  roles = {}
  for role, col, key in wanted:  # a target also given as a known covariate leaks the future
    if col in roles and roles[col][1] == key:
      raise UserError(f"{name}: column {col!r} is listed twice in config.data.{key}")
    if col in roles:
      raise UserError(f"{name}: column {col!r} is both a {roles[col][0]} column and a {role} "
                      f"column (config.data.{roles[col][1]} and config.data.{key}); a column "
                      f"has one role: drop it from one (past targets are inputs already, as lags)")
    roles[col] = (role, key)
  df = df.reset_index(drop=True)
  t_all, tz = _times(df, time_column, where, time_format)
  y_all = np.stack([_numeric(df, c, "target", where) for c in targets], -1)
  kn_all = np.stack([_numeric(df, c, "known covariate", where) for c in known], -1) if known \
      else np.zeros((len(df), 0))
  pa_all = np.stack([_numeric(df, c, "past covariate", where) for c in past], -1) if past \
      else np.zeros((len(df), 0))
  if id_column:
    ids = _ids(df, id_column, where)
    groups = [(i, np.flatnonzero(ids == i)) for i in dict.fromkeys(ids)]  # first-seen order
  else:
    groups = [(targets[0] if len(targets) == 1 else "series", np.arange(len(df)))]
  series = []
  for sid, rows in groups:
    t = t_all[rows]
    step = np.diff(t)
    zero = step == np.zeros((), step.dtype)
    back = step < np.zeros((), step.dtype)
    label = f" (series {sid!r})" if id_column else ""
    if zero.any() or back.any():
      k = int(np.flatnonzero(zero | back)[0]) + 1
      if zero[k - 1]:
        raise UserError(f"{where(rows[k])}: duplicated timestamp {t[k]}{label} (also at "
                        f"{where(rows[k - 1])}); keep one row per time"
                        f"{' and series' if id_column else ''}")
      raise UserError(f"{where(rows[k])}: timestamp {t[k]} comes after {t[k - 1]}{label}: the "
                      f"rows are not sorted by time; sort the file by {time_column!r}")
    y = y_all[rows]
    for c, col in enumerate(targets):
      if np.isnan(y[:, c]).all():
        raise UserError(f"{name}: target {col!r}{label} has no values (all {len(rows)} missing);"
                        f" drop the series or fix the column")
    series.append(Series(sid, t, y, kn_all[rows], pa_all[rows]))
  label = lambda s: f"{name}: series {s.id!r}" if id_column else name
  own = _infer_freq(series, tz, label)
  dates = np.issubdtype(series[0].time.dtype, np.datetime64)
  if freq is not None:
    if dates != isinstance(freq, str):
      raise UserError(f"{name}: time column {time_column!r} is "
                      f"{'dates' if dates else 'numbers'} but the model was trained on "
                      f"{'dates' if isinstance(freq, str) else 'numbers'}")
    if own is not None and not 0.9 <= step_days(own) / step_days(freq) <= 1.1:
      raise UserError(f"{name} is sampled every {_every(own)} but the model was trained on "
                      f"data sampled every {_every(freq)}; resample it to that step")
  else:
    freq = own if own is not None else ("D" if dates else 1.0)  # one timestamp: no step
  return Panel(name, series, time_column, list(targets), known, past, id_column, freq,
               season_length or season_from_freq(freq), tz)


# -- calendar features ----------------------------------------------------------------------------

def calendar_cycles(freq: str | float) -> list[str]:
  """Which calendar cycles the sampling step resolves: year (below ~1 year), week (daily or
  finer), day (hourly or finer). Numeric time has none."""
  if not isinstance(freq, str):
    return []
  days = step_days(freq)
  return [c for c, limit in (("year", 300), ("week", 6), ("day", 0.9)) if days < limit]


def calendar_features(time: np.ndarray, cycles: list[str], terms: int, tz=None) -> np.ndarray:
  """(T, 2·terms·len(cycles)): sin/cos of k·2π·phase, k = 1..terms, for each cycle's phase, on
  tz's wall clock (the UTC instants' phases moved a local daily pattern by an hour at each
  daylight-saving change)."""
  if not cycles or terms <= 0:
    return np.zeros((len(time), 0), np.float32)
  t = _local(time, tz)
  hours = t.hour + t.minute / 60 + t.second / 3600
  phases = {"year": (t.day_of_year - 1 + hours / 24) / np.where(t.is_leap_year, 366, 365),
            "week": (t.day_of_week + hours / 24) / 7, "day": hours / 24}
  cols = []
  for c in cycles:
    phase = 2 * np.pi * np.asarray(phases[c], np.float64)
    for k in range(1, terms + 1):
      cols += [np.sin(k * phase), np.cos(k * phase)]
  return np.stack(cols, -1).astype(np.float32)


# -- transform, scaling and imputation ----------------------------------------------------------

TRANSFORMS = ("none", "sqrt", "log1p")


def transform(x: np.ndarray, name: str) -> np.ndarray:
  """Variance-stabilising transform of nonnegative targets, applied before scaling: the model
  sees sqrt(y) or log(1 + y), so its spread can grow with the level (counts, sunspots, sales)."""
  if name == "sqrt":
    return np.sqrt(x)
  if name == "log1p":
    return np.log1p(x)
  return x


def invert_transform(x: np.ndarray, name: str) -> np.ndarray:
  """The inverse of `transform`; forecasts below the transform's zero map to 0. Monotone, so
  medians, quantiles and interval coverage carry over unchanged."""
  if name == "sqrt":
    return np.square(np.maximum(x, 0.0))
  if name == "log1p":
    return np.expm1(np.maximum(x, 0.0))
  return x


def check_transform(panel: Panel, name: str) -> None:
  """A UserError naming the first negative target value when `name` needs values >= 0."""
  if name == "none":
    return
  for s in panel.series:
    bad = np.argwhere(s.y < 0)  # NaN (missing) compares False
    if len(bad):
      t, c = bad[0]
      label = f" (series {s.id!r})" if panel.id_column else ""
      when = s.time[t]
      when = (np.datetime_as_string(when, unit="auto") if np.issubdtype(s.time.dtype, np.datetime64)
              else f"{when:g}")
      raise UserError(f"{panel.name}: target {panel.targets[c]!r}{label} is {s.y[t, c]:g} at "
                      f"{when}; config.data.transform={name!r} needs values >= 0: use "
                      f"transform='none' or shift the series")


def fit_scale(x_TxC: np.ndarray, method: str, what: str = "values") -> list[dict]:
  """Per-column {loc, scale} from the observed values of x (the training part only)."""
  out = []
  for c in range(x_TxC.shape[1]):
    v = x_TxC[:, c][~np.isnan(x_TxC[:, c])]
    if method not in ("standard", "mean_abs", "none"):
      raise UserError(f"config.data.scaling={method!r}: expected 'standard', 'mean_abs' or "
                      f"'none'")
    loc, scale = 0.0, 1.0
    with np.errstate(over="ignore"):
      if method == "standard" and len(v):
        loc, scale = float(v.mean()), float(v.std())
      elif method == "mean_abs" and len(v):
        scale = float(np.abs(v).mean())
    if not (np.isfinite(loc) and np.isfinite(scale)):
      raise UserError(f"{what} (column {c}): values up to {np.abs(v).max():g} are too large "
                      f"to scale (their {method} statistics overflow); rescale the column")
    out.append({"loc": loc, "scale": scale if scale > 1e-8 else 1.0})
  return out


def apply_scale(x_TxC: np.ndarray, scales: list[dict]) -> np.ndarray:
  loc = np.array([s["loc"] for s in scales]).reshape(-1)
  scale = np.array([s["scale"] for s in scales]).reshape(-1)
  return (x_TxC - loc) / scale


def invert_scale(x_xC: np.ndarray, scales: list[dict]) -> np.ndarray:
  loc = np.array([s["loc"] for s in scales])
  scale = np.array([s["scale"] for s in scales])
  return x_xC * scale + loc


def fill_forward(x_TxC: np.ndarray) -> np.ndarray:
  """Last observation carried forward along time; 0 before the first observation (causal)."""
  T = len(x_TxC)
  valid = ~np.isnan(x_TxC)
  idx = np.where(valid, np.arange(T)[:, None], -1)
  idx = np.maximum.accumulate(idx, axis=0)
  out = np.take_along_axis(np.nan_to_num(x_TxC), np.maximum(idx, 0), axis=0)
  return np.where(idx >= 0, out, 0.0)


def observed_history(x_T: np.ndarray) -> np.ndarray:
  """A history for baselines and the MASE scale: from its first observed value on (steps before
  it are no history: a panel CSV on a common grid leaves them empty), linearly interpolated
  where missing, the last value held to the end (so the end stays at the origin)."""
  ok = ~np.isnan(x_T)
  if ok.all() or not ok.any():
    return x_T
  i = np.arange(len(x_T))
  return np.interp(i, i[ok], x_T[ok])[np.argmax(ok):]


# -- windows --------------------------------------------------------------------------------------

@dataclasses.dataclass
class WindowStore:
  """Every series' arrays, scaled and imputed, concatenated after `pad` leading empty steps.

  A window with origin o (its first forecast step) in series i covers steps
  [o - pad, o + horizon) of that series: rows starts[i] + o + arange(pad + horizon) here.
  """
  y: np.ndarray          # (N, C) float32 scaled, imputed
  observed: np.ndarray   # (N, C) float32 1 where the target was observed
  known: np.ndarray      # (N, K') float32 calendar features + scaled known covariates
  past: np.ndarray       # (N, P) float32 scaled, imputed
  starts: np.ndarray     # (num_series,) row of each series' step -pad
  pad: int

  def gather(self, series_W: np.ndarray, origin_W: np.ndarray, horizon: int) -> dict:
    rows = (self.starts[series_W] + origin_W)[:, None] + np.arange(self.pad + horizon)
    return {"y": self.y[rows], "observed": self.observed[rows], "known": self.known[rows],
            "past": self.past[rows]}


def window_batches(store: WindowStore, windows: np.ndarray, *, horizon: int, batch_size: int,
                   seed: int, start_step: int = 0, shard: int = 0,
                   num_shards: int = 1, shuffle: bool = True):
  """Rows [shard·B/num_shards, (shard+1)·B/num_shards) of global batch start_step,
  start_step + 1, ... (endless); the engine passes this process's shard.

  `windows` is (num_windows, 2) of (series, origin). Their order is shuffled with the seed, anew
  each epoch (`order.WindowOrder`); batch k is a pure function of (seed, k), so a resumed run
  continues the exact data order from its step and every process builds only its own rows.
  """
  return order.endless(
      lambda idx_R: store.gather(windows[idx_R, 0], windows[idx_R, 1], horizon),
      order.WindowOrder(len(windows), batch_size, seed, shuffle), start_step, shard, num_shards)
