"""Forecast metrics and baselines (numpy, statsmodels), shared by the forecast task's evaluation,
the API and scripts/bench_forecast.py.

Arrays are in original units, windows × horizon × targets, NaN where the truth is missing (those
points count in no metric). Definitions:
  mae, rmse      over all observed points
  mase           per window and target: MAE / the in-sample seasonal-naive MAE of the history
                 before the origin (from its first observed value, linearly interpolated
                 where missing), then averaged
  smape          100 · mean of 2|y - f| / (|y| + |f|)  (0 where both are 0), in percent
  crps           mean CRPS: from samples, E|X - y| - E|X - X'| / 2 (every forecaster that has
                 them, the quantile head's included); from quantile levels alone, 2 · the mean
                 pinball loss over the levels (exact only for many uniform levels: with 0.1,
                 0.5, 0.9 it is ~11 % below a Gaussian's CRPS, so not comparable)
  coverage_80    share of observed points inside the [0.1, 0.9] quantile interval
The point forecast is the median of the forecast distribution (the mean for ETS, whose errors
are additive and symmetric).

Interval calibration (split conformal, multiplicative around the median): `interval_scale`
finds on held-out windows the factor s by which the spread of every forecast around its median
has to be stretched so that the central 80 % interval holds 80 % of the truth; `scale_spread`
applies it to samples and quantiles alike (the median stays, quantiles keep their order).
"""

from __future__ import annotations

import warnings

import numpy as np

from gru_tpu.data.timeseries import observed_history

BASELINES = ("naive", "seasonal_naive", "ets")


def mase_scale(history_T: np.ndarray, m: int) -> float:
  """In-sample MAE of the seasonal naive forecast (lag m; lag 1 if the history is too short)."""
  h = observed_history(np.asarray(history_T, np.float64))
  h = h[~np.isnan(h)]
  m = m if len(h) > m else 1
  if len(h) <= m:
    return float("nan")
  scale = float(np.mean(np.abs(h[m:] - h[:-m])))
  return scale if scale > 0 else float("nan")


def crps_samples(samples_Sx_: np.ndarray, y_: np.ndarray) -> np.ndarray:
  """CRPS of the empirical distribution of the samples (axis 0) at y, elementwise."""
  x = np.sort(samples_Sx_, axis=0)
  S = x.shape[0]
  term1 = np.abs(x - y_[None]).mean(0)
  # E|X - X'| / 2 over all ordered pairs of sorted samples: sum_i (2i - S - 1) x_(i) / S².
  w = (2 * np.arange(1, S + 1) - S - 1).reshape((S,) + (1,) * (x.ndim - 1))
  return term1 - (w * x).sum(0) / S**2


def crps_quantiles(q_xQ: np.ndarray, levels_Q, y_: np.ndarray) -> np.ndarray:
  """2 · the mean pinball loss over the quantile levels (GluonTS's weighted quantile loss)."""
  levels = np.asarray(levels_Q, np.float64)
  e = y_[..., None] - q_xQ
  return 2 * np.maximum(levels * e, (levels - 1) * e).mean(-1)


def crps_gaussian(mu, sigma, y):
  """Closed form (Gneiting & Raftery 2007), the reference for the two estimators above."""
  from scipy.stats import norm
  z = (np.asarray(y) - mu) / sigma
  return sigma * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / np.sqrt(np.pi))


def interp_levels(q_xQ: np.ndarray, levels_Q, u: float) -> np.ndarray:
  """The piecewise-linear quantile function through the levels, at probability u."""
  levels = np.asarray(levels_Q, np.float64)
  if u <= levels[0]:
    return q_xQ[..., 0]
  if u >= levels[-1]:
    return q_xQ[..., -1]
  k = int(np.searchsorted(levels, u, side="right"))
  t = (u - levels[k - 1]) / (levels[k] - levels[k - 1])
  return q_xQ[..., k - 1] + t * (q_xQ[..., k] - q_xQ[..., k - 1])


def central_interval(samples_SxNxHxC=None, quantiles_NxHxCxQ=None, levels=None):
  """The [0.1, 0.9] quantiles (lo, hi) of the forecast distribution (what coverage_80 uses)."""
  if quantiles_NxHxCxQ is not None:
    return tuple(interp_levels(quantiles_NxHxCxQ, levels, u) for u in (0.1, 0.9))
  return tuple(np.quantile(samples_SxNxHxC, [0.1, 0.9], axis=0))


def spread_ratios(y_NxHxC, median_NxHxC, lo_NxHxC, hi_NxHxC) -> np.ndarray:
  """Per point, the smallest s for which [m - s(m - lo), m + s(hi - m)] holds y: |y - m| over
  the interval's half on y's side of the median m (inf where that half is empty)."""
  dev = np.asarray(y_NxHxC, np.float64) - median_NxHxC
  half = np.where(dev >= 0, hi_NxHxC - median_NxHxC, median_NxHxC - lo_NxHxC)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(dev == 0, 0.0, np.where(half > 0, np.abs(dev) / half, np.inf))


def interval_scale(y_NxHxC, median_NxHxC, lo_NxHxC, hi_NxHxC, coverage: float = 0.8):
  """Per target (C,): the split-conformal factor for the central interval [lo, hi], the
  ⌈(n + 1)·coverage⌉-th smallest of the n observed points' spread_ratios (the finite-sample
  guarantee for exchangeable windows). 1 where it is undefined (no data, no spread)."""
  r = spread_ratios(y_NxHxC, median_NxHxC, lo_NxHxC, hi_NxHxC)
  obs = ~np.isnan(np.asarray(y_NxHxC, np.float64))
  out = []
  for c in range(r.shape[-1]):
    rc = np.sort(r[..., c][obs[..., c]])
    if not len(rc):
      out.append(1.0)
      continue
    s = rc[min(len(rc), int(np.ceil((len(rc) + 1) * coverage - 1e-9))) - 1]
    out.append(float(s) if np.isfinite(s) and s > 0 else 1.0)
  return np.array(out)


def scale_spread(pred: dict, scale_C) -> dict:
  """Forecasts (median (N, H, C), samples (S, N, H, C), quantiles (N, H, C, Q)) with their
  spread around the median multiplied by scale_C (one factor per target)."""
  s = np.asarray(scale_C, np.float64)
  m = pred["median"]
  out = dict(pred)
  if "samples" in pred:
    out["samples"] = m[None] + s * (pred["samples"] - m[None])
  if "quantiles" in pred:
    out["quantiles"] = m[..., None] + s[:, None] * (pred["quantiles"] - m[..., None])
  return out


def metrics(y_NxHxC, point_NxHxC, scale_NxC, *, samples_SxNxHxC=None, quantiles_NxHxCxQ=None,
            levels=None) -> dict[str, float]:
  """The metrics above for one forecaster; crps and coverage_80 need samples or quantiles."""
  y = np.asarray(y_NxHxC, np.float64)
  f = np.asarray(point_NxHxC, np.float64)
  obs = ~np.isnan(y)
  if not obs.any():
    return {}
  e = np.where(obs, f - y, np.nan)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-missing windows: NaN, skipped below
    mae_w = np.nanmean(np.abs(e), axis=1)                            # (N, C)
    denom = np.abs(y) + np.abs(f)
    out = {"mae": float(np.nanmean(np.abs(e))), "rmse": float(np.sqrt(np.nanmean(e**2))),
           "mase": float(np.nanmean(mae_w / np.asarray(scale_NxC))),
           "smape": float(100 * np.nanmean(np.where(denom > 0, 2 * np.abs(e) / np.where(
               denom > 0, denom, 1), 0.0)[obs]))}
  yz = np.where(obs, y, 0.0)
  # Samples first: the baselines' CRPS comes from samples, and a quantile head's 3-level pinball
  # estimate read ~11 % lower than the same forecast's sample CRPS beside them.
  if samples_SxNxHxC is not None:
    crps = crps_samples(samples_SxNxHxC, yz)
  elif quantiles_NxHxCxQ is not None:
    crps = crps_quantiles(quantiles_NxHxCxQ, levels, yz)
  else:
    out["crps"] = float(np.abs(e)[obs].mean())  # a point forecast's CRPS is its absolute error
    return out
  out["crps"] = float(crps[obs].mean())
  lo, hi = central_interval(samples_SxNxHxC, quantiles_NxHxCxQ, levels)
  out["coverage_80"] = float(((lo <= y) & (y <= hi))[obs].mean())
  return out


# -- baselines ------------------------------------------------------------------------------------

def _gaussian_samples(point_H, sigma_H, num_samples: int, rng) -> np.ndarray:
  return point_H[None] + sigma_H[None] * rng.standard_normal((num_samples, len(point_H)))


def naive(history_T, horizon: int, num_samples: int, rng):
  """The last value; intervals from the lag-1 residuals, σ√k (Hyndman & Athanasopoulos)."""
  h = observed_history(np.asarray(history_T, np.float64))
  point = np.full(horizon, h[-1])
  sigma = np.sqrt(np.mean(np.diff(h) ** 2)) if len(h) > 1 else 0.0
  return point, _gaussian_samples(point, sigma * np.sqrt(np.arange(1, horizon + 1)),
                                  num_samples, rng)


def seasonal_naive(history_T, horizon: int, m: int, num_samples: int, rng):
  """The value one season back; σ√(⌊(k - 1)/m⌋ + 1) from the lag-m residuals."""
  h = observed_history(np.asarray(history_T, np.float64))
  if m <= 1 or len(h) <= m:
    return naive(h, horizon, num_samples, rng)
  k = np.arange(horizon)
  point = h[len(h) - m + k % m]
  sigma = np.sqrt(np.mean((h[m:] - h[:-m]) ** 2))
  return point, _gaussian_samples(point, sigma * np.sqrt(k // m + 1), num_samples, rng)


def ets(history_T, horizon: int, m: int, num_samples: int, seed: int):
  """statsmodels Holt-Winters, additive trend and (when 2 seasons fit) additive season; samples
  by simulating additive errors. None where it does not fit (too short, or fitting fails)."""
  from statsmodels.tsa.holtwinters import ExponentialSmoothing
  h = observed_history(np.asarray(history_T, np.float64))
  if len(h) < 10 or np.isnan(h).any():
    return None
  seasonal = m > 1 and len(h) >= 2 * m + 2
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      fit = ExponentialSmoothing(h, trend="add", seasonal="add" if seasonal else None,
                                 seasonal_periods=m if seasonal else None).fit()
      point = np.asarray(fit.forecast(horizon))
      sims = np.asarray(fit.simulate(horizon, repetitions=num_samples, error="add",
                                     anchor="end", random_state=seed)).reshape(horizon, -1).T
  except (ValueError, np.linalg.LinAlgError):
    return None
  if not (np.isfinite(point).all() and np.isfinite(sims).all()):
    return None
  return point, sims


def baseline_forecasts(name: str, history_T, horizon: int, m: int, num_samples: int, seed: int):
  """(point (H,), samples (S, H)) of one baseline, or None where it does not fit."""
  rng = np.random.default_rng(seed)
  if name == "naive":
    return naive(history_T, horizon, num_samples, rng)
  if name == "seasonal_naive":
    return seasonal_naive(history_T, horizon, m, num_samples, rng)
  if name == "ets":
    return ets(history_T, horizon, m, num_samples, seed)
  raise ValueError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")
