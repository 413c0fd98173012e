"""The gru-tpu entry point: dispatch, help, a clear error for an unknown command, and
`gru-tpu train` + `gru-tpu forecast` end to end."""

import concurrent.futures
import subprocess
import sys
from pathlib import Path


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "gru_tpu.cli", *args], capture_output=True,
                        text=True, timeout=300)


def test_unknown_command_exits_2_and_names_it():
  r = run_cli("trian")
  assert r.returncode == 2
  assert "unknown command 'trian'" in r.stderr and "bench" in r.stderr


def test_help_lists_commands():
  r = run_cli("--help")
  assert r.returncode == 0 and "bench" in r.stderr


def test_bench_help_reaches_the_subcommand():
  r = run_cli("bench", "--help")
  assert r.returncode == 0 and "--json" in r.stdout


def test_forecast_train_then_forecast_writes_csv_and_png(tmp_path):
  import numpy as np
  import pandas as pd
  i = np.arange(120)
  y = 10 + 0.02 * i + 3 * np.sin(2 * np.pi * i / 12)
  y[7] = np.nan
  pd.DataFrame({"date": pd.date_range("2000-01-01", periods=120, freq="MS"), "sales": y}).to_csv(
      tmp_path / "s.csv", index=False)
  config = str(Path(__file__).parents[1] / "configs" / "csv_forecast.py") + ":size=tiny"
  run = tmp_path / "run"
  r = run_cli("train", "--config", config, "--workdir", str(run),
              f"--config.data.source=csv:{tmp_path / 's.csv'}", "--config.data.target=sales",
              "--config.data.context_length=24", "--config.data.horizon=6",
              "--config.num_steps=20", "--config.eval_every=20", "--config.checkpoint_every=20",
              "--config.eval.baselines=('seasonal_naive',)")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "seasonal_naive_mase" in r.stderr and "step 20 test:" in r.stderr
  ckpt = sorted(p.name for p in (run / "checkpoints").rglob("*"))

  out, png = tmp_path / "f.csv", tmp_path / "f.png"
  r = run_cli("forecast", "--workdir", str(run), "--horizon", "4", "--output", str(out),
              "--plot", str(png), "--num_samples", "20")
  assert r.returncode == 0, r.stderr[-3000:]
  f = pd.read_csv(out)
  assert list(f.columns) == ["date", "target", "point", "q0.1", "q0.5", "q0.9"]
  assert f["date"].tolist() == ["2010-01-01", "2010-02-01", "2010-03-01", "2010-04-01"]
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  with concurrent.futures.ThreadPoolExecutor() as pool:  # independent; mostly imports
    horizon, is_dir, none, column = pool.map(lambda args: run_cli(*args), [
        ("forecast", "--workdir", str(run), "--horizon", "0", "--output", str(out)),
        ("forecast", "--workdir", str(run), "--output", str(tmp_path)),
        ("forecast", "--workdir", str(tmp_path / "none"), "--output", str(out)),
        ("train", "--config", config, "--workdir", str(run),
         f"--config.data.source=csv:{tmp_path / 's.csv'}", "--config.data.target=units")])
  r = horizon
  assert r.returncode == 2 and r.stderr.strip() == "gru-tpu forecast: horizon must be >= 1, got 0"
  r = is_dir
  assert r.returncode == 2 and r.stderr.strip() == (
      f"gru-tpu forecast: {tmp_path} is a directory; give a file name")
  r = none
  assert r.returncode == 2 and "holds no checkpoint" in r.stderr
  r = column
  assert r.returncode == 2 and "no target column 'units' (columns: date, sales)" in r.stderr
  assert "Traceback" not in r.stderr
  assert sorted(p.name for p in (run / "checkpoints").rglob("*")) == ckpt


def test_a_failed_command_ends_with_its_one_line(tmp_path):
  """A damaged checkpoint fails orbax's other reads too; asyncio logged their futures, collected
  at exit, as tracebacks after the one-line error (in 1 run of 4-7). Here such a future is made
  by hand and dropped after the command failed."""
  script = (
      "import asyncio, sys\n"
      "from gru_tpu import cli\n"
      "loop = asyncio.new_event_loop()\n"
      "f = loop.create_future()\n"
      "f.set_exception(ValueError('OUT_OF_RANGE: Error reading params'))\n"
      "code = cli.main(['sample', '--workdir', sys.argv[1]])\n"
      "del f\n"
      "sys.exit(code)\n")
  r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [f"gru-tpu sample: {tmp_path} holds no checkpoint; "
                                           f"train first (gru-tpu train --workdir {tmp_path} ...)"]


def test_a_closed_stdout_is_a_quiet_exit_1():
  """`gru-tpu train --help | head -1`: a BrokenPipeError traceback when the reader was gone."""
  p = subprocess.Popen([sys.executable, "-m", "gru_tpu.cli", "train", "--help"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  p.stdout.close()  # before it writes: its print meets a closed pipe
  err = p.stderr.read()
  assert p.wait(timeout=300) == 1 and "Traceback" not in err and "BrokenPipe" not in err, err
