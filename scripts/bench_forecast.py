"""Forecast quality: gru_tpu vs seasonal naive vs statsmodels ETS on co2 and sunspots, one run.

  python scripts/bench_forecast.py --json bench_forecast.json [--plot bench_forecast.png] \
      [--seeds 3] [--set key=value ...] [--refit]

For each dataset this trains configs/<name>_forecast.py (size=small) with the last seasonal cycle
as the test tail (horizon = season length: co2 m = h = 52 weeks, sunspots m = h = 11 years) and
reads the test line the run writes to metrics.jsonl: MASE (on the in-sample seasonal-naive scale
of the history before the tail, linearly interpolated where missing), sMAPE, CRPS and 80 %
coverage of gru_tpu and of the naive, seasonal-naive and ETS (Holt-Winters, additive trend and
season) baselines fitted to the same history. With --seeds N the model is trained N times; the
table shows the mean [min, max], the JSON every run. --set overrides config keys of both
datasets (e.g. --set num_steps=500 model.hidden=32; parsed as gru-tpu train's
--config.KEY=VALUE). --plot draws the first seed's test-tail forecast (median, 80 % band)
against the truth, seasonal naive and ETS. The JSON also keeps each
run's last validation-tail metrics (`validation`): choose settings on those, not on the test.
--refit adds the protocol "choose on validation, then refit": per seed a second run trains
through the validation tail as well (data.train_until=test), with the first run's interval
factor (eval.interval_scale), and is scored on the same test tail as gru_tpu_refit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("co2", "sunspots")
METRICS = ("mase", "smape", "crps", "coverage_80")
BASELINES = ("seasonal_naive", "ets", "naive")
FORECASTERS = ("gru_tpu", "gru_tpu_refit", *BASELINES)


def get_config(name: str, overrides: list[str]):
  """size=small with the last season as the test tail; `overrides` (KEY=VALUE) are parsed as
  gru-tpu train's --config.KEY=VALUE (the same type checks and errors)."""
  from absl import flags
  from ml_collections import config_flags

  from gru_tpu.config import load_file
  c = load_file(ROOT / "configs" / f"{name}_forecast.py", "size=small")
  fv = flags.FlagValues()
  argv = ["bench_forecast", *(f"--config.{kv}" for kv in overrides)]
  config_flags.DEFINE_config_dict("config", c, flag_values=fv, sys_argv=argv)
  if rest := fv(argv)[1:]:
    raise ValueError(f"unexpected argument {rest[0]!r}")
  c = fv.config
  m = c.data.season_length or {"co2": 52, "sunspots": 11}[name]
  given = {kv.split("=", 1)[0] for kv in overrides}
  for key in ("horizon", "test_length"):  # after the overrides: a --set season_length counts
    if f"data.{key}" not in given:
      c.data[key] = m
  return c


def test_tail_forecast(workdir: str, c) -> dict:
  """The model's forecast from the history before the test tail, with truth and baselines."""
  import numpy as np
  import pandas as pd

  import gru_tpu
  from gru_tpu.tasks import forecast_eval
  m = gru_tpu.load(workdir)
  (s,) = m.history(None).series
  h = c.data.test_length
  df = pd.DataFrame({m.meta["time_column"]: s.time[:-h], m.meta["targets"][0]: s.y[:-h, 0]})
  f = m.forecast(df, h, num_samples=c.eval.num_samples, seed=c.seed)
  season = m.meta["season_length"]
  ets = forecast_eval.ets(s.y[:-h, 0], h, season, 1, 0)
  return {"time": s.time, "y": s.y[:, 0], "h": h, "frame": f,
          "seasonal_naive": forecast_eval.seasonal_naive(s.y[:-h, 0], h, season, 1,
                                                         np.random.default_rng(0))[0],
          "ets": None if ets is None else ets[0]}


def train_once(c, plot: bool = False) -> tuple[dict, dict, float, dict | None]:
  """(test line, last eval line, seconds, test-tail picture) of one training run."""
  from gru_tpu import train
  from gru_tpu.metrics import read_metrics
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    train.train_and_evaluate(c, workdir)
    seconds = time.perf_counter() - t0
    rows = read_metrics(workdir)
    (test,) = [r for r in rows if r["split"] == "test"]
    val = [r for r in rows if r["split"] == "eval"][-1]
    picture = test_tail_forecast(workdir, c) if plot else None
  return test, val, seconds, picture


def run(name: str, seed: int, overrides: list[str], plot: bool = False,
        refit: bool = False) -> dict:
  c = get_config(name, overrides)
  c.seed = seed
  c.log_every = c.num_steps
  test, val, seconds, picture = train_once(c, plot)
  out = {"seed": seed, "train_seconds": round(seconds, 1), "num_steps": c.num_steps,
         "picture": picture}
  # With the interval calibration's factor and what the raw spread scored (JSON only).
  out["gru_tpu"] = {k: test.get(k) for k in (*METRICS, "interval_scale", "crps_uncalibrated",
                                             "coverage_80_uncalibrated")}
  for f in BASELINES:
    out[f] = {k: test.get(f"{f}_{k}") for k in METRICS}
  # What a user can select on: the same metrics on the validation tail at the end of training.
  out["validation"] = {k: val.get(k) for k in METRICS}
  if refit:
    c.data.train_until = "test"
    c.eval.interval_scale = test.get("interval_scale") or 0.0
    c.eval.calibrate = bool(c.eval.interval_scale)
    test, _, seconds, _ = train_once(c)
    assert test.get("in_sample") is None, "the refit trained on the test tail"
    out["gru_tpu_refit"] = {k: test.get(k) for k in METRICS}
    out["gru_tpu_refit"].update({k: test.get(k) for k in ("interval_scale",
                                                          "coverage_80_uncalibrated")})
    out["refit_train_seconds"] = round(seconds, 1)
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--json", default=None, help="write the results here")
  p.add_argument("--plot", default=None, help="PNG of the test-tail forecasts")
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
  p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
  p.add_argument("--refit", action="store_true",
                 help="also refit through the validation tail (gru_tpu_refit)")
  a = p.parse_args(argv)
  if a.seeds < 1:
    p.error(f"--seeds must be >= 1, got {a.seeds}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from absl import flags

  from gru_tpu.train import _one_line
  for name in a.datasets:  # a bad --set before any training, as one line
    try:
      get_config(name, a.set)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
      p.error(f"--set: {_one_line(e)}")
  from gru_tpu.bench import check_outputs
  check_outputs(p, json=a.json, plot=a.plot)
  import jax
  results = {"jax": jax.__version__, "backend": jax.default_backend(), "overrides": a.set,
             "datasets": {}}
  for name in a.datasets:
    runs = [run(name, seed, a.set, plot=a.plot is not None and seed == 0, refit=a.refit)
            for seed in range(a.seeds)]
    results["datasets"][name] = runs
  pictures = {name: runs[0].pop("picture") for name, runs in results["datasets"].items()}
  width = 20 if a.seeds > 1 else 8
  print(f"{'dataset':<10} {'forecaster':<15} " + " ".join(f"{m:>{width}}" for m in METRICS))
  for name, runs in results["datasets"].items():
    for f in FORECASTERS:
      if f not in runs[0]:
        continue
      cells = []
      for m in METRICS:
        vals = [r[f][m] for r in runs if r[f][m] is not None]
        if not vals:
          cell = "-"
        elif not f.startswith("gru_tpu") or len(vals) == 1:  # baselines do not depend on the seed
          cell = f"{vals[0]:.3f}"
        else:
          cell = f"{sum(vals) / len(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]"
        cells.append(f"{cell:>{width}}")
      print(f"{name:<10} {f:<15} " + " ".join(cells))
    print(f"{'':<10} seconds per training run: {[r['train_seconds'] for r in runs]}")
  if a.json:
    Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
  if a.plot:
    plot(pictures, a.plot)
  return 0


def plot(pictures: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(pictures), 1, figsize=(10, 3.2 * len(pictures)), squeeze=False)
  for ax, (name, p) in zip(axes[:, 0], pictures.items()):
    n, h = len(p["y"]), p["h"]
    show = slice(n - 4 * h, n)
    t, f = p["time"][n - h:], p["frame"]
    ax.plot(p["time"][show], p["y"][show], color="k", lw=1, label="observed")
    ax.fill_between(t, f["q0.1"], f["q0.9"], color="C0", alpha=0.25, lw=0, label="gru_tpu 80 %")
    ax.plot(t, f["point"], color="C0", lw=1.8, label="gru_tpu median")
    ax.plot(t, p["seasonal_naive"], color="C2", lw=1, ls="--", label="seasonal naive")
    if p["ets"] is not None:
      ax.plot(t, p["ets"], color="C3", lw=1, ls=":", label="ETS")
    ax.axvline(p["time"][n - h], color="gray", lw=0.5)
    ax.set_title(f"{name}: test tail (last {h} steps)")
    ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


if __name__ == "__main__":
  sys.exit(main())
