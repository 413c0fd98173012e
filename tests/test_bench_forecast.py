"""scripts/bench_forecast.py keeps the issue's protocol: its baselines reproduce the peers'
test-tail numbers, and the refit run trains through the validation tail only."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_forecast.py"


def test_bench_forecast_protocol_refit_and_plot(tmp_path):
  spec = importlib.util.spec_from_file_location("bench_forecast", SCRIPT)
  bench_forecast = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench_forecast)
  out, png = tmp_path / "b.json", tmp_path / "b.png"
  assert bench_forecast.main([
      "--datasets", "sunspots", "--refit", "--json", str(out), "--plot", str(png), "--set",
      "num_steps=4", "eval_every=4", "checkpoint_every=4", "eval.num_samples=20"]) == 0
  (run,) = json.loads(out.read_text())["datasets"]["sunspots"]
  # The peers' measurements with the last cycle (11 years) as the test tail (issue 5).
  assert run["seasonal_naive"]["mase"] == pytest.approx(0.881, abs=5e-4)
  assert run["ets"]["mase"] == pytest.approx(1.502, abs=5e-4)
  for forecaster in ("gru_tpu", "gru_tpu_refit"):
    assert all(math.isfinite(run[forecaster][k]) for k in bench_forecast.METRICS), forecaster
  # The refit takes the held-out run's interval factor, and trained on other data.
  assert run["gru_tpu_refit"]["interval_scale"] == pytest.approx(run["gru_tpu"]["interval_scale"])
  assert run["gru_tpu_refit"]["crps"] != run["gru_tpu"]["crps"]
  assert set(run["validation"]) == set(bench_forecast.METRICS)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
