"""Forecast quality: gru_tpu vs seasonal naive vs statsmodels ETS on co2 and sunspots, one run.

  python scripts/bench_forecast.py --json bench_forecast.json [--seeds 3] [--set key=value ...]

For each dataset this trains configs/<name>_forecast.py (size=small) with the last seasonal cycle
as the test tail (horizon = season length: co2 m = h = 52 weeks, sunspots m = h = 11 years) and
reads the test line the run writes to metrics.jsonl: MASE (on the in-sample seasonal-naive scale
of the history before the tail, linearly interpolated where missing), sMAPE, CRPS and 80 %
coverage of gru_tpu and of the naive, seasonal-naive and ETS (Holt-Winters, additive trend and
season) baselines fitted to the same history. With --seeds N the model is trained N times; the
table shows the mean (and the spread), the JSON every run. --set overrides config keys of both
datasets (e.g. --set num_steps=500 model.hidden=32).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("co2", "sunspots")
METRICS = ("mase", "smape", "crps", "coverage_80")
FORECASTERS = ("gru_tpu", "seasonal_naive", "ets", "naive")


def get_config(name: str, overrides: list[str]):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}_forecast.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("size=small")
  m = c.data.season_length or {"co2": 52, "sunspots": 11}[name]
  c.data.horizon = c.data.test_length = m
  for kv in overrides:
    key, value = kv.split("=", 1)
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(json.loads(value)) if not isinstance(node[leaf], str) else value
  return c


def run(name: str, seed: int, overrides: list[str]) -> dict:
  from gru_tpu import train
  from gru_tpu.metrics import read_metrics
  c = get_config(name, overrides)
  c.seed = seed
  c.log_every = c.num_steps
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    train.train_and_evaluate(c, workdir)
    seconds = time.perf_counter() - t0
    (test,) = [r for r in read_metrics(workdir) if r["split"] == "test"]
  out = {"seed": seed, "train_seconds": round(seconds, 1), "num_steps": c.num_steps}
  for f in FORECASTERS:
    prefix = "" if f == "gru_tpu" else f + "_"
    out[f] = {k: test.get(prefix + k) for k in METRICS}
  return out


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--json", default=None, help="write the results here")
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
  p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
  a = p.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  results = {"jax": jax.__version__, "backend": jax.default_backend(), "overrides": a.set,
             "datasets": {}}
  for name in a.datasets:
    runs = [run(name, seed, a.set) for seed in range(a.seeds)]
    results["datasets"][name] = runs
  print(f"{'dataset':<10} {'forecaster':<15} " + " ".join(f"{m:>14}" for m in METRICS))
  for name, runs in results["datasets"].items():
    for f in FORECASTERS:
      cells = []
      for m in METRICS:
        vals = [r[f][m] for r in runs if r[f][m] is not None]
        if not vals:
          cells.append(f"{'-':>14}")
        elif len(vals) == 1 or f != "gru_tpu":
          cells.append(f"{vals[0]:>14.3f}")
        else:
          cells.append(f"{sum(vals) / len(vals):>7.3f} ({min(vals):.2f}-{max(vals):.2f})"[:14]
                       .rjust(14))
      print(f"{name:<10} {f:<15} " + " ".join(cells))
    print(f"{'':<10} train seconds per run: {[r['train_seconds'] for r in runs]}")
  if a.json:
    Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
