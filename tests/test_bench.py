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


@pytest.mark.parametrize("where,message", [
    ("{tmp}", "is a directory; give a file name"),
    ("{tmp}/missing/bench.json", "its directory does not exist"),
])
def test_a_bad_json_path_is_refused_before_timing(tmp_path, capsys, where, message):
  with pytest.raises(SystemExit) as e:
    bench.main(["--quick", "--json", where.format(tmp=tmp_path)])
  assert e.value.code == 2 and message in capsys.readouterr().err
