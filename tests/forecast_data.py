"""Shared by the forecast tests: a small learnable monthly series and tiny configs."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parents[1] / "configs"))
import csv_forecast  # noqa: E402

from gru_tpu.data import timeseries as ts  # noqa: E402
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
  c.update_from_flattened_dict(overrides)
  return c


def task_for(df, **overrides):
  panel = ts.panel_from_frame(df, time_column="date", targets=["y"], name="test")
  return ForecastTask(config(**overrides), panel)
