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


def test_point_metrics_by_hand_with_a_missing_value():
  y = np.array([[[1.0], [np.nan], [3.0], [4.0]]])           # (N=1, H=4, C=1)
  f = np.array([[[2.0], [100.0], [3.0], [2.0]]])
  m = fe.metrics(y, f, np.array([[0.5]]))
  assert m["mae"] == pytest.approx(1.0)                       # (1 + 0 + 2) / 3
  assert m["rmse"] == pytest.approx(np.sqrt(5 / 3))
  assert m["mase"] == pytest.approx(2.0)                      # 1.0 / 0.5
  assert m["smape"] == pytest.approx(100 * (2 / 3 + 0 + 4 / 6) / 3)
  assert m["crps"] == pytest.approx(1.0) and "coverage_80" not in m


def test_mase_scale_interpolates_missing_history_and_averages_per_window():
  h = np.array([0.0, 1, 2, np.nan, 4, 5, 6])                  # interpolated: 0..6
  assert fe.mase_scale(h, 2) == pytest.approx(2.0)
  assert fe.mase_scale(h[:2], 2) == pytest.approx(1.0)       # too short for m: lag 1
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
  point, _ = fe.naive(h, 3, 10, rng)
  np.testing.assert_array_equal(point, [h[-1]] * 3)
  from statsmodels.tsa.holtwinters import ExponentialSmoothing
  want = ExponentialSmoothing(h, trend="add", seasonal="add", seasonal_periods=12).fit()
  point, samples = fe.ets(h, 12, 12, 200, 0)
  np.testing.assert_allclose(point, want.forecast(12))
  assert samples.shape == (200, 12) and abs(samples.mean(0) - point).max() < 0.5
  assert fe.ets(h[:8], 4, 12, 10, 0) is None
