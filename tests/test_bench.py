"""The benchmark compares like with like: all three implementations compute the same GRU."""

import json

import pytest

from gru_tpu import bench


def test_quick_bench_runs_the_same_function_in_all_three(tmp_path):
  out = tmp_path / "bench.json"
  assert bench.main(["--quick", "--repeats", "1", "--json", str(out)]) == 0
  r = json.loads(out.read_text())
  (shape,) = r["shapes"]
  assert shape["max_abs_diff_vs_torch"]["gru_tpu"] < 1e-5
  assert shape["max_abs_diff_vs_torch"]["flax_linen"] < 1e-5
  for impl in ("gru_tpu", "torch", "flax_linen"):
    assert shape[impl]["train_tok_s"] > 0 and shape[impl]["fwd_tok_s"] > 0
  # Remat keeps only chunk-boundary carries: even at this tiny size it must save memory.
  assert r["remat"]["memory_cut"] > 1.5
  # The floor's ratios come from the same rounds' times: torch's step over the floor's, the
  # floor's over gru_tpu's.
  fl, tokens = shape["xla_matmul_floor"], shape["B"] * shape["T"]
  assert fl["train_vs_torch_ceiling"] == pytest.approx(
      tokens / shape["torch"]["train_tok_s"] / fl["seconds"])
  assert fl["train_vs_flax_linen_ceiling"] == pytest.approx(
      tokens / shape["flax_linen"]["train_tok_s"] / fl["seconds"])
  assert fl["gru_tpu_fraction"] == pytest.approx(
      fl["seconds"] / (tokens / shape["gru_tpu"]["train_tok_s"]))
  assert fl["gflop_s"] == pytest.approx(fl["gflop"] / fl["seconds"])


def test_bad_arguments_are_refused_before_any_timing(tmp_path, capsys):
  """--repeats 0 was a StatisticsError traceback after the compiles and warm-ups."""
  with pytest.raises(SystemExit) as e:
    bench.main(["--quick", "--repeats", "0", "--json", str(tmp_path / "b.json")])
  assert e.value.code == 2
  assert capsys.readouterr().err.splitlines()[-1] == (
      "gru-tpu bench: error: --repeats must be >= 1, got 0")
  assert not (tmp_path / "b.json").exists()


def test_the_matmul_floor_is_five_full_train_step_matmuls():
  """The floor is only a bound if XLA runs all five products at their full size: none merged
  away, none a cheaper shape. XLA's own FLOP count of the compiled floor says so."""
  B, T, H = 4, 16, 32
  floor, args = bench.matmul_floor(B, T, H)
  compiled = floor.lower(*args).compile()
  dots = [line for line in compiled.as_text().splitlines() if " dot(" in line]
  assert len(dots) == 5, dots
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  matmul_flops = 5 * 2 * B * T * H * 3 * H
  # + one (x + 1) of B·T·H adds, shared by the two products that stand for h's
  assert cost["flops"] == pytest.approx(matmul_flops + B * T * H, rel=1e-4)


@pytest.mark.parametrize("where,message", [
    ("{tmp}", "is a directory; give a file name"),
    ("{tmp}/missing/bench.json", "its directory does not exist"),
])
def test_a_bad_json_path_is_refused_before_timing(tmp_path, capsys, where, message):
  with pytest.raises(SystemExit) as e:
    bench.main(["--quick", "--json", where.format(tmp=tmp_path)])
  assert e.value.code == 2 and message in capsys.readouterr().err


def test_every_benchmark_script_refuses_an_unwritable_output_before_its_work(tmp_path, capsys):
  """bench_dtypes, bench_text, bench_forecast and soak wrote their --json/--plot after minutes
  (a soak, hours) of work, and a path in a missing directory lost it all in a traceback."""
  import subprocess
  import sys
  from pathlib import Path
  scripts = Path(__file__).parents[1] / "scripts"
  sys.path.insert(0, str(scripts))
  import bench_dtypes
  import bench_forecast
  import bench_text
  gone = str(tmp_path / "missing" / "out")
  for main, argv, flag in ((bench_dtypes.main, ["--json", gone], "json"),
                           (bench_forecast.main, ["--plot", gone], "plot"),
                           (bench_text.main, ["--json", gone], "json")):
    with pytest.raises(SystemExit) as e:
      main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"error: --{flag} {gone}: its directory does not exist")
  soak = lambda *a: subprocess.run([sys.executable, str(scripts / "soak.py"), *a],
                                   capture_output=True, text=True, timeout=300)
  r = soak("--json", gone, "--workdir", str(tmp_path / "w"), "--", "--config",
           str(scripts.parent / "configs" / "synthetic.py"))
  assert r.returncode == 2 and "--json " + gone + ": its directory does not exist" in r.stderr
  # A misspelt override was an AttributeError traceback.
  r = soak("--json", str(tmp_path / "s.json"), "--workdir", str(tmp_path / "w"), "--",
           "--config", str(scripts.parent / "configs" / "synthetic.py"), "--config.num_stepz=2")
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1].startswith("soak: ") and "num_stepz" in r.stderr
  # Without its dashes an override was silently ignored (a soak of the default length).
  r = soak("--json", str(tmp_path / "s.json"), "--workdir", str(tmp_path / "w"), "--",
           "--config", str(scripts.parent / "configs" / "synthetic.py"), "config.num_steps=2")
  assert r.returncode == 2 and "unexpected argument 'config.num_steps=2'" in r.stderr
  assert not (tmp_path / "w").exists()
  # bench_forecast's --set: a traceback (IndexError, KeyError, JSONDecodeError) or a silent
  # cast (48.9 -> 48) after parsing; now gru-tpu train's override parser, before any training.
  for argv, why in ((["--seeds", "0"], "--seeds must be >= 1, got 0"),
                    (["--set", "num_steps"], "Missing value for flag --config.num_steps"),
                    (["--set", "nosuch=1"], "unknown config key 'nosuch'"),
                    (["--set", "model.hidden=48.9"], "invalid literal for int()"),
                    (["--set", "eval.calibrate=maybe"], "Non-boolean argument")):
    with pytest.raises(SystemExit) as e:
      bench_forecast.main(["--datasets", "sunspots", *argv])
    assert e.value.code == 2 and why in capsys.readouterr().err, argv
  c = bench_forecast.get_config("sunspots", ["data.season_length=5", "eval.calibrate=false"])
  assert (c.data.horizon, c.data.test_length, c.eval.calibrate) == (5, 5, False)
  assert bench_forecast.get_config("sunspots", ["data.season_length=5", "data.horizon=3"]
                                   ).data.horizon == 3
