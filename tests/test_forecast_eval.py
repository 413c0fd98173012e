"""Forecast metrics against straightforward references, and the baselines against statsmodels."""

import numpy as np
import pytest

from gru_tpu.tasks import forecast_eval as fe


def crps_pairs(x_S, y):
  """The definition, E|X - y| - E|X - X'| / 2, over all sample pairs (O(S²))."""
  return np.abs(x_S - y).mean() - 0.5 * np.abs(x_S[:, None] - x_S[None, :]).mean()


def test_crps_from_samples_matches_the_pairwise_definition(rng):
  x = rng.normal(size=(37, 3, 2))
  y = rng.normal(size=(3, 2))
  got = fe.crps_samples(x, y)
  for i in range(3):
    for j in range(2):
      assert got[i, j] == pytest.approx(crps_pairs(x[:, i, j], y[i, j]), rel=1e-12)


def test_crps_from_samples_and_quantiles_approach_the_gaussian_closed_form(rng):
  from scipy.stats import norm
  mu, sigma = 1.5, 2.0
  y = np.array([-3.0, 0.0, 1.5, 4.0, 9.0])
  exact = fe.crps_gaussian(mu, sigma, y)
  samples = mu + sigma * rng.standard_normal((40000, 1))
  np.testing.assert_allclose(fe.crps_samples(samples * np.ones_like(y), y), exact, rtol=0.02)
  levels = np.arange(1, 100) / 100
  q = np.broadcast_to(norm.ppf(levels, mu, sigma), (len(y), len(levels)))
  np.testing.assert_allclose(fe.crps_quantiles(q, levels, y), exact, rtol=0.03)
  # closed form by numerical integration of (F(x) - 1{x >= y})^2
  grid = np.linspace(-30, 30, 600001)
  F = norm.cdf(grid, mu, sigma)
  for yi, e in zip(y, exact):
    assert np.trapezoid((F - (grid >= yi)) ** 2, grid) == pytest.approx(e, rel=1e-4)


def test_a_quantile_heads_crps_comes_from_its_samples_as_the_baselines_does(rng):
  """With samples and 3 quantile levels, crps is the samples' (the estimator the baselines
  get): the levels' 2 x pinball read ~11 % below it for the same calibrated Gaussian forecast,
  so a quantile head looked better than an equally good baseline."""
  from scipy.stats import norm
  levels = (0.1, 0.5, 0.9)
  y = rng.standard_normal((400, 1, 1))                                 # truth ~ N(0, 1)
  samples = rng.standard_normal((400, 400, 1, 1))                      # forecast N(0, 1)
  q = np.broadcast_to(norm.ppf(levels), (400, 1, 1, 3))
  m = fe.metrics(y, np.zeros_like(y), np.ones((400, 1)), samples_SxNxHxC=samples,
                 quantiles_NxHxCxQ=q, levels=levels)
  assert m["crps"] == pytest.approx(fe.crps_samples(samples, y).mean(), rel=1e-12)
  assert m["crps"] == pytest.approx(1 / np.sqrt(np.pi), rel=0.05)    # E CRPS of N(0,1) at N(0,1)
  assert fe.crps_quantiles(q, levels, y).mean() < 0.92 * m["crps"]     # the old estimate
  # Coverage still reads the head's own 0.1 / 0.9 quantiles.
  inside = (q[..., 0] <= y) & (y <= q[..., 2])
  assert m["coverage_80"] == pytest.approx(inside.mean())


def test_point_metrics_by_hand_with_a_missing_value():
  y = np.array([[[1.0], [np.nan], [3.0], [4.0]]])           # (N=1, H=4, C=1)
  f = np.array([[[2.0], [100.0], [3.0], [2.0]]])
  m = fe.metrics(y, f, np.array([[0.5]]))
  assert m["mae"] == pytest.approx(1.0)                       # (1 + 0 + 2) / 3
  assert m["rmse"] == pytest.approx(np.sqrt(5 / 3))
  assert m["mase"] == pytest.approx(2.0)                      # 1.0 / 0.5
  assert m["smape"] == pytest.approx(100 * (2 / 3 + 0 + 4 / 6) / 3)
  assert m["crps"] == pytest.approx(1.0) and "coverage_80" not in m
  # sMAPE counts a point where truth and forecast are both 0 as 0 %, not 0/0
  z = fe.metrics(np.array([[[0.0], [2.0]]]), np.array([[[0.0], [1.0]]]), np.array([[1.0]]))
  assert z["smape"] == pytest.approx(100 * (0 + 2 / 3) / 2)


def test_mase_scale_interpolates_missing_history_and_averages_per_window():
  h = np.array([0.0, 1, 2, np.nan, 4, 5, 6])                  # interpolated: 0..6
  assert fe.mase_scale(h, 2) == pytest.approx(2.0)
  assert fe.mase_scale(h[:2], 2) == pytest.approx(1.0)       # too short for m: lag 1
  # Empty steps before a series starts (a panel CSV on a common grid) are no history: held
  # constant they would halve this scale and pass for a perfect seasonal-naive fit.
  late = np.concatenate([np.full(7, np.nan), h])
  assert fe.mase_scale(late, 2) == pytest.approx(2.0)
  for name in ("naive", "seasonal_naive"):
    np.testing.assert_array_equal(fe.baseline_forecasts(name, late, 3, 2, 5, 0)[1],
                                  fe.baseline_forecasts(name, h, 3, 2, 5, 0)[1], err_msg=name)
  y = np.zeros((2, 3, 1))
  f = np.stack([np.full((3, 1), 1.0), np.full((3, 1), 3.0)])
  assert fe.metrics(y, f, np.array([[1.0], [2.0]]))["mase"] == pytest.approx((1 + 1.5) / 2)


def test_coverage_and_quantile_interpolation(rng):
  y = rng.normal(size=(4, 50, 1))
  samples = rng.normal(size=(4000, 4, 50, 1))
  m = fe.metrics(y, np.zeros_like(y), np.ones((4, 1)), samples_SxNxHxC=samples)
  lo, hi = np.quantile(samples, [0.1, 0.9], axis=0)
  assert m["coverage_80"] == pytest.approx(((lo <= y) & (y <= hi)).mean())
  q = np.array([[0.0, 1.0, 3.0]])
  levels = (0.1, 0.5, 0.9)
  assert fe.interp_levels(q, levels, 0.3)[0] == pytest.approx(0.5)
  assert fe.interp_levels(q, levels, 0.7)[0] == pytest.approx(2.0)
  assert fe.interp_levels(q, levels, 0.05)[0] == 0.0 and fe.interp_levels(q, levels, 0.95)[0] == 3


def test_baselines(rng):
  t = np.arange(60, dtype=float)
  h = 10 + 0.1 * t + np.sin(2 * np.pi * t / 12) + 0.1 * rng.normal(size=60)
  point, samples = fe.seasonal_naive(h, 15, 12, 500, rng)
  np.testing.assert_allclose(point, np.concatenate([h[-12:], h[-12:-9]]))
  sigma = np.sqrt(np.mean((h[12:] - h[:-12]) ** 2))
  assert samples[:, 0].std() == pytest.approx(sigma, rel=0.15)
  assert samples[:, 14].std() == pytest.approx(sigma * np.sqrt(2), rel=0.15)
  point, samples = fe.naive(h, 9, 2000, rng)
  np.testing.assert_array_equal(point, [h[-1]] * 9)
  # A random walk's k-step error: σ√k from the lag-1 residuals (the ±σ band of step 1 at every
  # step would understate the naive baseline's CRPS and coverage far out).
  sigma = np.sqrt(np.mean(np.diff(h) ** 2))
  np.testing.assert_allclose(samples.std(0), sigma * np.sqrt(np.arange(1, 10)), rtol=0.1)
  gappy = h.copy()
  gappy[[20, 58, 59]] = np.nan  # inside and at the end: interpolated, then held constant
  point, samples = fe.naive(gappy, 3, 100, rng)
  np.testing.assert_array_equal(point, [h[57]] * 3)
  assert np.isfinite(samples).all()
  from statsmodels.tsa.holtwinters import ExponentialSmoothing
  want = ExponentialSmoothing(h, trend="add", seasonal="add", seasonal_periods=12).fit()
  point, samples = fe.ets(h, 12, 12, 200, 0)
  np.testing.assert_allclose(point, want.forecast(12))
  assert samples.shape == (200, 12) and abs(samples.mean(0) - point).max() < 0.5
  assert fe.ets(h[:8], 4, 12, 10, 0) is None


def test_interval_scale_by_hand():
  # median 0, interval [-1, 2]: a point's ratio is |y| over the half on its side of the median.
  y = np.array([0.5, -0.2, 1.0, -0.9, 3.0, -2.0, 0.0, 4.4, np.nan, -0.6]).reshape(1, -1, 1)
  m, lo, hi = np.zeros_like(y), np.full_like(y, -1.0), np.full_like(y, 2.0)
  r = fe.spread_ratios(y, m, lo, hi)[0, :, 0]
  np.testing.assert_allclose(r[[0, 1, 2, 3, 4, 5, 6, 7, 9]],
                             [0.25, 0.2, 0.5, 0.9, 1.5, 2.0, 0.0, 2.2, 0.6])
  # 9 observed points: the ⌈(9 + 1)·0.8⌉ = 8th smallest ratio of 0, .2, .25, .5, .6, .9, 1.5, 2, 2.2
  assert fe.interval_scale(y, m, lo, hi) == pytest.approx([2.0])
  assert fe.interval_scale(y, m, lo, hi, coverage=0.5) == pytest.approx([0.6])  # 5th
  # no spread below the median: a point there is covered only if it is the median
  assert np.isinf(fe.spread_ratios(np.array([-1.0]), np.zeros(1), np.zeros(1), np.ones(1))[0])
  assert fe.interval_scale(np.full((1, 2, 1), np.nan), np.zeros((1, 2, 1)), lo[:, :2],
                           hi[:, :2]) == pytest.approx([1.0])             # nothing observed


@pytest.mark.parametrize("spread", [0.4, 3.0])   # under- and over-dispersed forecasters
def test_interval_scale_calibrates_samples_and_quantiles_to_80_percent(rng, spread):
  """Truth y = mu + N(0, 1); the forecaster's distribution is N(mu, spread²) (and a skewed
  second target). After scale_spread the central 80 % interval holds 80 % of the calibration
  points, by construction, and ~80 % of fresh points from the same distribution."""
  N, H = 40, 25
  mu = rng.normal(size=(N, H, 2)) * 5
  y, fresh = (mu + rng.standard_normal((N, H, 2)) * [1.0, 2.0] for _ in range(2))
  samples = mu + spread * rng.standard_normal((2000, N, H, 2)) * [1.0, 1.0]
  samples[..., 1] = mu[..., 1] + spread * (rng.gamma(4.0, size=(2000, N, H)) - 4.0 + 0.3)
  pred = {"median": np.median(samples, 0), "samples": samples}
  lo, hi = fe.central_interval(samples)
  scale = fe.interval_scale(y, pred["median"], lo, hi)
  assert scale[0] == pytest.approx(1.2816 / (1.2816 * spread), rel=0.1)  # z_0.9 / (z_0.9·spread)
  cal = fe.scale_spread(pred, scale)
  np.testing.assert_allclose(np.median(cal["samples"], 0), pred["median"], atol=1e-12)
  lo2, hi2 = fe.central_interval(cal["samples"])
  np.testing.assert_allclose(lo2, pred["median"] + scale * (lo - pred["median"]), atol=1e-9)
  for c in range(2):
    before = ((lo <= y) & (y <= hi))[..., c].mean()
    after = ((lo2 <= y) & (y <= hi2))[..., c].mean()
    assert abs(before - 0.8) > 0.15                         # miscalibrated to start with
    assert 0.8 <= after <= 0.8 + 2 / (N * H)                # the conformal quantile, exactly
    assert fe.metrics(fresh[..., c:c + 1], cal["median"][..., c:c + 1], np.ones((N, 1)),
                      samples_SxNxHxC=cal["samples"][..., c:c + 1])["coverage_80"] == \
        pytest.approx(0.8, abs=0.04)
  # quantile forecasts scale the same way and keep their order
  levels = (0.1, 0.5, 0.9)
  q = np.moveaxis(np.quantile(samples, levels, axis=0), 0, -1)
  qc = fe.scale_spread({"median": q[..., 1], "quantiles": q}, scale)["quantiles"]
  assert (np.diff(qc, axis=-1) >= 0).all()
  np.testing.assert_allclose(qc[..., 0], lo2, atol=1e-9)
