"""Time-series forecasting: a panel of series -> scaled windows -> Forecaster -> backtests.

Each series is split by time: the last test_length steps are the test tail, the val_length
steps before them the validation tail, the rest the training part. Training windows have all
their targets in the training part; scaling (per series and column) is fitted on the training
part only and saved with every checkpoint as JSON (task metadata). Validation and test windows
start at rolling origins (every backtest_stride steps) inside their tail; their context may
reach back into earlier parts, never forward. `data.train_until` moves the training part's end:
"validation" (the default, where the validation tail begins), "test" (it takes in the
validation tail: refit after choosing settings on it) or "end" (the whole history: the model to
deploy); backtests of a tail it takes in are in-sample and say so (in_sample = 1).

At each eval the validation backtest runs (`evaluate(model, "eval")`): the model's forecasts
(median, samples or quantiles) in original units against naive, seasonal-naive and
statsmodels-ETS forecasts of the same windows, every metric of gru_tpu.tasks.forecast_eval for
each; at the end of training the same on the test tail (split "test").

Interval calibration (config.eval.calibrate): the model's forecasts of every validation-tail
value from every origin that reaches it (the "calibration" windows, stride 1, scored only inside
the validation tail) give one split-conformal factor per target
that stretches or shrinks the forecast distribution around its median so that the central 80 %
interval holds 80 % of the validation truth (forecast_eval.interval_scale). Backtests report the
calibrated distribution (and the raw one's crps and coverage_80 with suffix _uncalibrated);
`model_metadata` saves the factors with every checkpoint (`interval_scale`), computed from that
checkpoint's parameters, so gru_tpu.load(...).forecast and `gru-tpu forecast` apply the same.
The test tail is never read. A model trained on the validation tail cannot calibrate there: it
takes a fixed factor, `eval.interval_scale`, from a held-out run.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gru_tpu.data import order
from gru_tpu.data import timeseries as ts
from gru_tpu.errors import UserError
from gru_tpu.models.forecaster import DECODERS, NUM_PARAMS, WINDOW_NORMS, Forecaster
from gru_tpu.models.lm import CELLS
from gru_tpu.tasks import forecast_eval

HEADS = (*NUM_PARAMS, "quantile")
TRAIN_UNTIL = ("validation", "test", "end")  # where the training part ends

SIZES = {
    "tiny": dict(batch_size=8, hidden=16, num_layers=1, num_steps=100),
    "small": dict(batch_size=64, hidden=64, num_layers=1, num_steps=2000),
    "base": dict(batch_size=256, hidden=256, num_layers=2, num_steps=20000),
}


def default_config(size: str = "small"):
  """The engine's keys plus the forecast task's (configs/*_forecast.py start from this)."""
  import ml_collections

  from gru_tpu.config import engine_defaults
  if size not in SIZES:
    raise UserError(f"size={size!r}: expected one of {', '.join(SIZES)}")
  c = engine_defaults(task="forecast", **SIZES[size])
  c.log_every, c.eval_every, c.eval_steps = 100, 500, 1
  c.checkpoint_every = 1000
  c.optimizer.warmup_steps = 100
  c.optimizer.learning_rate = 3e-3
  d = c.data
  d.source = "statsmodels:co2"   # statsmodels:NAME or csv:PATH
  d.time_column = ""             # "" = the source's (statsmodels); required for csv
  d.time_format = ""             # strftime format of its dates, e.g. "%d/%m/%Y"; "" = inferred
  d.target = ""                  # column(s), "a,b"; "" = the source's
  d.id_column = ""               # a column naming the series of a panel ("" = one series)
  d.known_covariates = ""        # columns known in advance (also over the horizon)
  d.past_covariates = ""         # columns known only up to the forecast origin
  d.season_length = 0            # 0 = the source's, or from the sampling frequency
  d.context_length = 104
  d.horizon = 52
  d.val_length = 0               # validation tail (0 = one horizon)
  d.test_length = 0              # test tail (0 = one horizon)
  d.train_until = "validation"   # training part ends at: validation | test (tail) | end
  d.lags = ""                    # target lags fed as inputs, "1,2,52"; "" = 1 and season_length
  d.calendar_terms = 2           # Fourier terms per calendar cycle (year/week/day); 0 = none
  d.transform = "none"           # of nonnegative targets, before scaling: none | sqrt | log1p
  d.scaling = "standard"         # per series, fitted on the training part: standard|mean_abs|none
  m = c.model
  m.decoder = "direct"           # direct | autoregressive
  m.head = "student_t"           # point | gaussian | student_t | quantile
  m.point_loss = "mse"           # point head: mse | mae
  m.quantiles = (0.1, 0.5, 0.9)  # reported levels (and the quantile head's)
  m.window_norm = "mean"         # per window, from its context: none | mean | standard
  m.embed_dim = 16               # horizon-step embedding of the direct decoder
  if size == "base":
    m.hidden_multiple = 128
  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 200       # forecast samples per window (probabilistic heads)
  c.eval.backtest_stride = 0     # steps between rolling origins in a tail (0 = horizon)
  c.eval.calibrate = True        # conformal interval calibration on the validation tail
  c.eval.interval_scale = 0.0    # > 0: this fixed factor instead (from a held-out run)
  c.eval.baselines = forecast_eval.BASELINES
  return c


def check_samples(head: str, num_samples: int, name: str = "num_samples") -> None:
  """A probabilistic head's quantiles, CRPS and calibration are read off its samples."""
  low = 1 if head == "point" else 2
  if num_samples < low:
    why = "" if low == 1 else f" (a {head} head's intervals come from its samples: one has none)"
    raise UserError(f"{name} must be >= {low}, got {num_samples}{why}")


def check_config(config) -> None:
  d, m = config.data, config.model
  for key, value in (("data.horizon", d.horizon), ("data.context_length", d.context_length)):
    if value < 1:
      raise UserError(f"config.{key} must be >= 1, got {value}")
  # Each was a traceback deep in the model, the windows or numpy: num_samples=0 only at the
  # first eval, after training steps that were then lost.
  for key, value, low in (("data.season_length", d.season_length, 0),
                          ("data.calendar_terms", d.calendar_terms, 0),
                          ("eval.backtest_stride", config.eval.backtest_stride, 0)):
    if value < low:
      raise UserError(f"config.{key} must be >= {low}, got {value}")
  check_samples(m.head, config.eval.num_samples, "config.eval.num_samples")
  for key, value in (("data.val_length", d.val_length), ("data.test_length", d.test_length)):
    if value and value < d.horizon:
      raise UserError(f"config.{key}={value} is shorter than config.data.horizon={d.horizon}; "
                      f"a tail holds at least one full horizon (0 = one horizon)")
  until = d.get("train_until", "validation")
  if until not in TRAIN_UNTIL:
    raise UserError(f"config.data.train_until={until!r}: expected one of {', '.join(TRAIN_UNTIL)}")
  scale = config.eval.get("interval_scale", 0.0)
  if not scale >= 0:
    raise UserError(f"config.eval.interval_scale must be >= 0 (0 = calibrate on the validation "
                    f"tail), got {scale}")
  if (until != "validation" and not scale and config.eval.get("calibrate", True)
      and m.head != "point"):
    # Calibrating on data the model was fitted to would shrink its intervals, not check them.
    raise UserError(
        f"config.data.train_until={until!r} trains on the validation tail, so the intervals "
        f"cannot be calibrated there: set config.eval.interval_scale to the interval_scale of a "
        f"run with the tail held out (its metrics.jsonl test line), or eval.calibrate=False")
  for key, value, allowed in (("model.decoder", m.decoder, DECODERS),
                              ("model.head", m.head, HEADS),
                              ("model.point_loss", m.point_loss, ("mse", "mae")),
                              ("model.window_norm", m.window_norm, WINDOW_NORMS),
                              ("model.cell", m.cell, tuple(CELLS)),
                              ("data.transform", d.transform, ts.TRANSFORMS),
                              ("data.scaling", d.scaling, ("standard", "mean_abs", "none"))):
    if value not in allowed:
      raise UserError(f"config.{key}={value!r}: expected one of {', '.join(allowed)}")
  q = list(m.quantiles)
  if not q or q != sorted(set(q)) or not 0 < q[0] <= q[-1] < 1:
    raise UserError(f"config.model.quantiles={tuple(q)}: give increasing levels in (0, 1)")
  if m.head == "quantile" and not q[0] <= 0.1 < 0.9 <= q[-1]:
    # The head predicts only these levels; the 80 % interval (coverage_80, its calibration)
    # would otherwise be read off narrower ones.
    raise UserError(f"config.model.quantiles={tuple(q)}: the quantile head needs levels at or "
                    f"beyond 0.1 and 0.9 for its 80 % interval; add them, e.g. (0.1, 0.5, 0.9)")
  parse_lags(d.lags)
  for b in config.eval.baselines:
    if b not in forecast_eval.BASELINES:
      raise UserError(f"config.eval.baselines: unknown {b!r}; expected some of "
                      f"{', '.join(forecast_eval.BASELINES)}")
  k = m.get("hidden_multiple", 1)
  if k > 1 and m.hidden % k:
    raise UserError(f"config.model.hidden={m.hidden} must be a multiple of "
                    f"model.hidden_multiple={k} (the TPU MXU tile); round it up")


def parse_lags(value: str) -> list[int]:
  """config.data.lags '1,2,52' -> [1, 2, 52]; '' -> []."""
  try:
    lags = [int(v) for v in ts.names(value)]
  except ValueError:
    lags = [0]
  if any(l < 1 for l in lags):
    raise UserError(f"config.data.lags={value!r}: give steps back as integers >= 1, e.g. '1,52'")
  return lags


def load_panel(d, source: str | None = None, freq: str | float | None = None) -> ts.Panel:
  """config.data -> a validated Panel (source overrides config.data.source; freq: the trained
  frequency the data must have)."""
  source = source or d.source
  df, time_column, targets, season, where = ts.load_frame(source, d.time_column, d.target,
                                                          d.season_length)
  return ts.panel_from_frame(df, time_column=time_column, targets=targets,
                             id_column=d.id_column or None,
                             known=ts.names(d.known_covariates), past=ts.names(d.past_covariates),
                             season_length=season, name=source, where=where, freq=freq,
                             time_format=d.get("time_format", ""))


def build_forecaster(config, meta: dict, rngs: nnx.Rngs) -> Forecaster:
  """config.model + task metadata -> Forecaster (for the task and for gru_tpu.load)."""
  m, d = config.model, config.data
  num_calendar = 2 * meta["calendar_terms"] * len(meta["cycles"])
  return Forecaster(num_targets=len(meta["targets"]), num_known=num_calendar + len(meta["known"]),
                    num_past=len(meta["past"]), lags=meta["lags"],
                    context_length=d.context_length, horizon=d.horizon, decoder=m.decoder,
                    head=m.head, point_loss=m.point_loss, quantiles=tuple(m.quantiles),
                    cell=m.cell, hidden=m.hidden, num_layers=m.num_layers, embed_dim=m.embed_dim,
                    dropout=m.dropout, recurrent_dropout=m.recurrent_dropout,
                    window_norm=m.window_norm, remat=m.remat, unroll=m.get("unroll", 1),
                    dtype=jnp.dtype(m.dtype), impl=m.get("impl", "auto"), rngs=rngs)


def fit_scales(s: ts.Series, n_train: int, method: str, transform: str = "none") -> dict:
  what = f"series {s.id!r}: the training part of the"
  return {"y": ts.fit_scale(ts.transform(s.y[:n_train], transform), method, f"{what} targets"),
          "known": ts.fit_scale(s.known[:n_train], "standard", f"{what} known covariates"),
          "past": ts.fit_scale(s.past[:n_train], "standard", f"{what} past covariates")}


def series_arrays(s: ts.Series, scales: dict, meta: dict, tz=None) -> dict:
  """Transformed, scaled, imputed model inputs of one series, (T, ·) float32 each; calendar
  features on the wall clock of the data's timezone `tz` (UTC for checkpoints from before)."""
  y = ts.apply_scale(ts.transform(s.y, meta.get("transform", "none")), scales["y"])
  clock = tz if meta.get("calendar_clock") == "local" else None
  known = np.concatenate([
      ts.calendar_features(s.time, meta["cycles"], meta["calendar_terms"], clock),
      ts.fill_forward(ts.apply_scale(s.known, scales["known"]))], -1)
  out = {"y": ts.fill_forward(y), "observed": ~np.isnan(y), "known": known,
         "past": ts.fill_forward(ts.apply_scale(s.past, scales["past"]))}
  for key, what in (("y", "target"), ("known", "known covariate"), ("past", "past covariate")):
    with np.errstate(over="ignore"):
      bad = np.argwhere(~np.isfinite(out[key].astype(np.float32)))
    if len(bad):  # the model reads float32: a value that overflows it would make NaN forecasts
      t = bad[0][0]
      when = (np.datetime_as_string(s.time[t], unit="auto")
              if np.issubdtype(s.time.dtype, np.datetime64) else f"{s.time[t]:g}")
      raise UserError(f"series {s.id!r}: a {what} value at {when} is too large for the model "
                      f"(scaled, it overflows float32); fix the value or rescale the column")
  return out


def make_store(arrays: list[dict], pad: int) -> ts.WindowStore:
  """Concatenates the series' arrays, each after `pad` zero rows (unobserved)."""
  def cat(key):
    parts = []
    for a in arrays:
      parts += [np.zeros((pad, a[key].shape[1])), a[key]]
    return np.concatenate(parts).astype(np.float32)
  lengths = np.array([pad + len(a["y"]) for a in arrays])
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  return ts.WindowStore(cat("y"), cat("observed"), cat("known"), cat("past"), starts, pad)


def history_length(s: ts.Series) -> int:
  """Steps up to and including the series' last observed target: its forecast origin."""
  return int(np.flatnonzero(~np.isnan(s.y).all(1))[-1]) + 1


def _tail_origins(lo: int, hi: int, horizon: int, stride: int) -> list[int]:
  return list(range(lo, hi - horizon + 1, stride))


@functools.partial(jax.jit, static_argnums=(4,))
def _predict_jit(graphdef, state, batch, key, num_samples):
  return nnx.merge(graphdef, state).predict(batch, key, num_samples)


def _host_model(model):
  """The model with every array on this host: eval-time forecasting runs per process."""
  graphdef, state = nnx.split(model)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    state = jax.tree.map(lambda a: multihost_utils.process_allgather(a, tiled=True), state)
  return graphdef, state


def predict_windows(model, store: ts.WindowStore, windows: np.ndarray, horizon: int,
                    num_samples: int, seed: int, rows: int = 4096) -> dict:
  """Model forecasts for (series, origin) windows, in scaled units, as numpy: median (N, H, C),
  samples (S, N, H, C) and/or quantiles (N, H, C, Q) (see Forecaster.predict).

  Windows go in chunks of one fixed size (the last one padded), so one compile serves all."""
  model.eval()
  graphdef, state = _host_model(model)
  per_window = num_samples if model.decoder == "autoregressive" else 1
  chunk = int(min(len(windows), max(1, rows // per_window)))
  outs = []
  for i in range(0, len(windows), chunk):
    w = windows[i:i + chunk]
    n = len(w)
    w = np.concatenate([w, np.repeat(w[-1:], chunk - n, 0)])
    batch = store.gather(w[:, 0], w[:, 1], horizon)
    out = _predict_jit(graphdef, state, batch, jax.random.key(seed + i), num_samples)
    out = jax.device_get(out)
    outs.append({k: (v[:, :n] if k == "samples" else v[:n]) for k, v in out.items()})
  return {k: np.concatenate([o[k] for o in outs], axis=1 if k == "samples" else 0)
          for k in outs[0]}


def to_original(pred: dict, loc_NxC: np.ndarray, scale_NxC: np.ndarray,
                transform: str = "none") -> dict:
  """Model-space forecasts (scaled, transformed) -> original units."""
  out = {}
  for k, v in pred.items():
    if k == "samples":
      out[k] = v * scale_NxC[None, :, None] + loc_NxC[None, :, None]
    elif k == "quantiles":
      out[k] = v * scale_NxC[:, None, :, None] + loc_NxC[:, None, :, None]
    else:
      out[k] = v * scale_NxC[:, None] + loc_NxC[:, None]
    out[k] = ts.invert_transform(out[k], transform)
  return out


class ForecastTask:

  def __init__(self, config, panel: ts.Panel | None = None):
    self.config = config
    check_config(config)
    d = config.data
    self.panel = panel if panel is not None else load_panel(d)
    p = self.panel
    H, C = d.horizon, d.context_length
    V, T = d.val_length or H, d.test_length or H
    self.horizon, self.season = H, p.season_length
    lags = sorted(set(parse_lags(d.lags) or {1, self.season}))
    self.pad = max(lags) + C
    need = C + H + V + T
    # Rows after a series' last target value are its future (known covariates for a forecast,
    # as the CSV layout allows): the tails end at the last target value, not at the last row.
    ends = [history_length(s) for s in p.series]
    for s, end in zip(p.series, ends):
      if end < need:
        raise UserError(
            f"{p.name}: series {s.id!r} has {end} time steps up to its last target value; it "
            f"needs at least context_length + horizon + val_length + test_length = {C} + {H} + "
            f"{V} + {T} = {need}. Lower those config.data keys or give a longer series")
    ts.check_transform(p, d.transform)
    self.n_train = [end - V - T for end in ends]  # where each series' validation tail begins
    self.val_length = V
    until = d.get("train_until", "validation")
    # Where each series' training part ends; tails from there on are out of sample.
    self.n_fit = [{"validation": n, "test": n + V, "end": end}[until]
                  for n, end in zip(self.n_train, ends)]
    self.in_sample = {"eval": until != "validation", "test": until == "end"}
    for s, n in zip(p.series, self.n_fit):
      for c in np.flatnonzero(np.isnan(s.y[:n]).all(0)):
        # It trained unscaled, and its naive baselines (NaN) dropped out of their means while
        # the model's metrics kept it: the side-by-side compared other windows.
        raise UserError(f"{p.name}: series {s.id!r} has no observed {p.targets[c]!r} in its "
                        f"training part (its first {n} steps, before the validation and test "
                        f"tails); drop the series or give it earlier values")
    self.scales = {s.id: fit_scales(s, n, d.scaling, d.transform)
                   for s, n in zip(p.series, self.n_fit)}
    self.meta = {"task": "forecast", "source": p.name, "time_column": p.time_column,
                 "id_column": p.id_column, "targets": p.targets, "known": p.known,
                 "past": p.past, "freq": p.freq, "season_length": self.season, "lags": list(lags),
                 "cycles": ts.calendar_cycles(p.freq), "calendar_terms": int(d.calendar_terms),
                 "calendar_clock": "local", "transform": d.transform, "scaling": d.scaling,
                 "scales": self.scales}
    self.store = make_store([series_arrays(s, self.scales[s.id], self.meta, p.tz)
                             for s in p.series], self.pad)
    stride = config.eval.backtest_stride or H
    self.windows = {"train": [], "eval": [], "calibration": [], "test": []}
    for i, (end, n, fit) in enumerate(zip(ends, self.n_train, self.n_fit)):
      self.windows["train"] += [(i, o) for o in range(C, fit - H + 1)]
      self.windows["eval"] += [(i, o) for o in _tail_origins(n, n + V, H, stride)]
      # Every origin with a forecast step inside the validation tail; only those steps count.
      self.windows["calibration"] += [(i, o) for o in range(max(C, n - H + 1), n + V)]
      self.windows["test"] += [(i, o) for o in _tail_origins(n + V, end, H, stride)]
    self.windows = {k: np.array(v, np.int64).reshape(-1, 2) for k, v in self.windows.items()}
    self._references: dict[str, dict] = {}
    self._scale_of: tuple[list, np.ndarray | None] = ([], None)  # (parameter arrays, factor)

  def build_model(self, rngs: nnx.Rngs) -> Forecaster:
    return build_forecaster(self.config, self.meta, rngs)

  def batches(self, split, start_step, shard, num_shards):
    c = self.config
    windows = self.windows["train" if split == "train" else "eval"]
    batches = ts.window_batches(self.store, windows, horizon=self.horizon,
                                batch_size=c.batch_size, seed=c.seed, start_step=start_step,
                                shard=shard, num_shards=num_shards, shuffle=split == "train")
    if split == "train":
      return batches
    # Eval reads the windows in order and wraps around (co2: its 1 window, 64 times a batch);
    # the repeats weigh 0, so windows count once whatever the batch size.
    return order.first_pass_weights(batches, len(windows), c.batch_size, start_step, shard,
                                    num_shards)

  def loss_fn(self, model, batch, rng):
    return model.loss(batch, rngs=nnx.Rngs(dropout=rng))

  def metadata(self) -> dict:
    return self.meta

  def resume_mismatch(self, saved: dict) -> str | None:
    """Why a checkpoint with this saved metadata cannot resume this run (None: it can)."""
    for key in ("targets", "known", "past", "id_column", "lags", "cycles", "calendar_terms"):
      if key in saved and saved[key] != self.meta[key]:
        why = ""
        if key == "lags" and saved.get("freq") == self.meta["freq"]:
          # Same data, read by another gru_tpu version: the default lags come from the season
          # that the sampling frequency gives, whose reading was fixed.
          why = (f" (same frequency {self.meta['freq']!r}: this version reads it as season "
                 f"{self.season}, the checkpoint's as {saved.get('season_length')})")
        return f"data gave {key} = {saved[key]!r}, the data now gives {self.meta[key]!r}{why}"
    return None

  def interval_scale(self, model) -> np.ndarray | None:
    """Per target, the conformal spread factor of the model's forecasts on the calibration
    windows (scaled units; the factor is unit-free). None when off or for a point model."""
    if not self.config.eval.get("calibrate", True) or model.head == "point":
      return None
    if self.config.eval.get("interval_scale", 0.0):
      return np.full(len(self.meta["targets"]), float(self.config.eval.interval_scale))
    # One step's eval, test and checkpoint metadata share the same parameters: compute once.
    arrays = jax.tree.leaves(nnx.state(model))
    seen, scale = self._scale_of
    if len(seen) == len(arrays) and all(a is b for a, b in zip(seen, arrays)):
      return scale
    w, H, pad = self.windows["calibration"], self.horizon, self.store.pad
    pred = predict_windows(model, self.store, w, H, self.config.eval.num_samples,
                           self.config.seed)
    b = self.store.gather(w[:, 0], w[:, 1], H)
    t_WxH = w[:, 1:] + np.arange(H)
    n_W1 = np.array(self.n_train)[w[:, :1]]  # the series' validation tail: [n, n + val_length)
    # Steps before the tail were trained on; steps after it are the test tail: neither counts.
    keep = (t_WxH >= n_W1) & (t_WxH < n_W1 + self.val_length)
    y = np.where(keep[..., None] & (b["observed"][:, pad:] > 0), b["y"][:, pad:], np.nan)
    lo, hi = forecast_eval.central_interval(pred.get("samples"), pred.get("quantiles"),
                                            model.quantiles)
    scale = forecast_eval.interval_scale(y, pred["median"], lo, hi)
    self._scale_of = (arrays, scale)
    return scale

  def model_metadata(self, model) -> dict:
    """Saved with each checkpoint beside metadata(): that checkpoint's interval_scale."""
    scale = self.interval_scale(model)
    return {} if scale is None else {"interval_scale": scale.tolist()}

  def _reference(self, split: str) -> dict:
    """Truth, MASE scales and baseline forecasts of a split's windows (model-independent)."""
    if split in self._references:
      return self._references[split]
    H, m, e = self.horizon, self.season, self.config.eval
    windows = self.windows[split]
    series = [self.panel.series[i] for i in windows[:, 0]]
    y = np.stack([s.y[o:o + H] for s, o in zip(series, windows[:, 1])])
    scale = np.array([[forecast_eval.mase_scale(s.y[:o, c], m) for c in range(y.shape[-1])]
                      for s, o in zip(series, windows[:, 1])])
    baselines = {}
    for name in e.baselines:
      fits = [[forecast_eval.baseline_forecasts(name, s.y[:o, c], H, m, e.num_samples,
                                                self.config.seed) for c in range(y.shape[-1])]
              for s, o in zip(series, windows[:, 1])]
      if all(f is not None for row in fits for f in row):
        baselines[name] = (np.array([[f[0] for f in row] for row in fits]).transpose(0, 2, 1),
                           np.array([[f[1] for f in row] for row in fits]).transpose(2, 0, 3, 1))
    ref = {"y": y, "scale": scale, "baselines": baselines,
           "loc": np.array([[v["loc"] for v in self.scales[s.id]["y"]] for s in series]),
           "unit": np.array([[v["scale"] for v in self.scales[s.id]["y"]] for s in series])}
    self._references[split] = ref
    return ref

  def evaluate(self, model, split: str) -> dict[str, float]:
    """Backtest on the validation ("eval") or test tail: the model's metrics and, prefixed with
    their names, the baselines' (e.g. mase, seasonal_naive_mase, ets_mase)."""
    ref = self._reference(split)
    e = self.config.eval
    pred = predict_windows(model, self.store, self.windows[split], self.horizon, e.num_samples,
                           self.config.seed)

    def score(p):  # p in model space
      p = to_original(p, ref["loc"], ref["unit"], self.meta["transform"])
      return forecast_eval.metrics(ref["y"], p["median"], ref["scale"],
                                   samples_SxNxHxC=p.get("samples"),
                                   quantiles_NxHxCxQ=p.get("quantiles"), levels=model.quantiles)

    out = score(pred)
    scale = self.interval_scale(model)
    if scale is not None and out:  # out is {} when the tail has no observed target
      raw = out
      # In model space, where the factor was fitted and where forecast_frame applies it: after
      # a sqrt/log1p transform is undone, stretching would give other intervals than users get.
      out = score(forecast_eval.scale_spread(pred, scale))
      out.update({f"{k}_uncalibrated": raw[k] for k in ("crps", "coverage_80")},
                 interval_scale=float(scale.mean()))
    for name, (point, samples) in ref["baselines"].items():
      out.update({f"{name}_{k}": v for k, v in forecast_eval.metrics(
          ref["y"], point, ref["scale"], samples_SxNxHxC=samples).items()})
    if self.in_sample[split]:  # data.train_until took this tail into training
      out["in_sample"] = 1.0
    return out


def data_defaults():
  return default_config().data


def make_task(config) -> ForecastTask:
  return ForecastTask(config)


# -- forecasting from a trained model (gru_tpu.load(...).forecast, gru-tpu forecast) --------------

def forecast_frame(model: Forecaster, config, meta: dict, panel: ts.Panel, horizon: int,
                   num_samples: int = 200, seed: int = 0, calibrated: bool = True):
  """Forecasts `horizon` steps after the last observed target of every series in the panel.

  Rows after a series' last observed target are its future: they supply known-future
  covariates (required for all `horizon` steps when the model has any). Returns a long
  DataFrame: [id column], time column, `target`, `point` (the median), and one column per
  level of config.model.quantiles (`q0.1`, ...), in original units. With `calibrated`, the
  spread around the median is scaled by the checkpoint's meta["interval_scale"] (if any).
  """
  import pandas as pd
  d = config.data
  for name, value in (("horizon", horizon), ("num_samples", num_samples)):
    # numpy integers too; 3.0, "3" or True are a caller's slip (True was horizon 1)
    if isinstance(value, bool) or not hasattr(value, "__index__"):
      raise UserError(f"{name} must be an integer, got {value!r}")
  horizon, num_samples = operator.index(horizon), operator.index(num_samples)
  if horizon < 1:
    raise UserError(f"horizon must be >= 1, got {horizon}")
  check_samples(model.head, num_samples)
  if model.decoder == "direct" and horizon > d.horizon:
    raise UserError(f"this model forecasts at most {d.horizon} steps (direct decoder, "
                    f"data.horizon={d.horizon}); ask for fewer, or retrain with a longer "
                    f"data.horizon or model.decoder=autoregressive")
  # The autoregressive decoder is causal, so steps past `horizon` change nothing before it:
  # horizons share a compile, and the draws of their common steps (the key per step is split
  # by the step count), up to data.horizon and then per power of two.
  steps = max(d.horizon, 1 << (horizon - 1).bit_length() if horizon > d.horizon else 0)
  transform = meta.get("transform", "none")  # checkpoints from before transforms: none
  ts.check_transform(panel, transform)
  arrays, windows, times = [], [], []
  for i, s in enumerate(panel.series):
    origin = history_length(s)
    if origin < d.context_length:
      raise UserError(f"{panel.name}: series {s.id!r} has {origin} time steps of history; the "
                      f"model reads context_length={d.context_length} (and forecasts "
                      f"{d.horizon}): give at least {d.context_length} steps")
    given = len(s.time) - origin
    if meta["known"] and given < horizon:
      raise UserError(f"{panel.name}: series {s.id!r}: the known covariates "
                      f"{', '.join(meta['known'])} need values for the {horizon} steps after the "
                      f"last target value; add {horizon - given} more row(s) with them filled and "
                      f"the target empty")
    gap = np.argwhere(np.isnan(s.known[origin:origin + horizon]))
    if len(gap):  # carried forward it would be a made-up price or holiday, not a known one
      t, k = gap[0]
      when = s.time[origin + t]
      when = (np.datetime_as_string(when, unit="auto")
              if np.issubdtype(s.time.dtype, np.datetime64) else f"{when:g}")
      raise UserError(f"{panel.name}: series {s.id!r}: known covariate {meta['known'][k]!r} is "
                      f"empty at {when}, inside the {horizon}-step horizon; fill it (a known "
                      f"covariate needs a value at every forecast step)")
    extra = max(0, origin + steps - len(s.time))
    future = ts.future_times(s.time, extra, meta["freq"], panel.tz)
    ext = ts.Series(s.id, np.concatenate([s.time, future]),
                    np.concatenate([s.y, np.full((extra, s.y.shape[1]), np.nan)]),
                    np.concatenate([s.known, np.zeros((extra, s.known.shape[1]))]),
                    np.concatenate([s.past, np.zeros((extra, s.past.shape[1]))]))
    scales = meta["scales"].get(s.id) or fit_scales(s, origin, meta["scaling"], transform)
    a = series_arrays(ext, scales, meta, panel.tz)
    a["loc"] = np.array([v["loc"] for v in scales["y"]])
    a["unit"] = np.array([v["scale"] for v in scales["y"]])
    arrays.append(a)
    windows.append((i, origin))
    times.append(ext.time[origin:origin + horizon])
  store = make_store(arrays, model.pad)
  pred = predict_windows(model, store, np.array(windows), steps, num_samples, seed)
  if calibrated and "interval_scale" in meta:
    pred = forecast_eval.scale_spread(pred, meta["interval_scale"])
  pred = to_original(pred, np.stack([a["loc"] for a in arrays]),
                     np.stack([a["unit"] for a in arrays]), transform)
  bad = ~np.isfinite(pred["median"][:, :horizon]).all((1, 2))
  if bad.any():
    raise UserError(f"{panel.name}: the forecast of series {panel.series[int(np.argmax(bad))].id!r}"
                    f" is not finite: its history lies far outside the values the model was "
                    f"trained on; check it for outliers or a unit change")
  levels = tuple(config.model.quantiles)
  if "quantiles" in pred:
    qs = np.stack([forecast_eval.interp_levels(pred["quantiles"], model.quantiles, u)
                   for u in levels], -1)
  elif "samples" in pred:
    qs = np.moveaxis(np.quantile(pred["samples"], levels, axis=0), 0, -1)
  else:
    qs = None
  frames = []
  for i, s in enumerate(panel.series):
    for c, target in enumerate(meta["targets"]):
      when = times[i]
      if panel.tz is not None:  # back to the timezone of the given timestamps
        when = pd.DatetimeIndex(when).tz_localize("UTC").tz_convert(panel.tz)
      cols = {panel.time_column: when, "target": target,
              "point": pred["median"][i, :horizon, c]}
      if qs is not None:
        cols.update({f"q{lvl:g}": qs[i, :horizon, c, k] for k, lvl in enumerate(levels)})
      f = pd.DataFrame(cols)
      if panel.id_column:
        f.insert(0, panel.id_column, s.id)
      frames.append(f)
  return pd.concat(frames, ignore_index=True)
