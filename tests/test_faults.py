"""The fault and bad-input matrix: one real failure per row.

Each row damages a copy of one trained text workdir (or gives a bad input) and asserts the
documented outcome: the CLI's exit code (most commands run in-process through gru_tpu.cli.main,
whose return value is the process's exit status; the disk-full row is a real process, since
orbax's background threads log to its stderr) or the API's exception type, a message naming the
problem and no traceback, and the workdir's existing checkpoint files byte-for-byte unchanged. Some rows then
check what must still work (the previous checkpoint restores) or must not have happened.
Also here: checkpoints hold no pickle and loading one runs no code.
"""

import dataclasses
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

import gru_tpu
from gru_tpu import cli
from gru_tpu.checkpoint import checksums
from gru_tpu.errors import CheckpointError
from gru_tpu.metrics import MetricsWriter, read_metrics

ROOT = Path(__file__).parents[1]
TEXT = f"{ROOT / 'configs' / 'char_pystdlib.py'}:size=tiny"
SYNTHETIC = f"{ROOT / 'configs' / 'synthetic.py'}:size=tiny"
FORECAST = f"{ROOT / 'configs' / 'csv_forecast.py'}:size=tiny"
COMMON = ["--config.num_steps=4", "--config.checkpoint_every=2", "--config.eval_every=100",
          "--config.eval_steps=1", "--config.log_every=1"]
TEXT_FLAGS = ["--config.data.sample_length=4"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
  """A text run with checkpoints at steps 2 and 4; every row works on a copy."""
  root = tmp_path_factory.mktemp("faults")
  (root / "corpus.txt").write_text("to be or not to be, that is the question. " * 150)
  rc = cli.main(["train", "--config", TEXT, "--workdir", str(root / "run"), *COMMON,
                 *TEXT_FLAGS, f"--config.data.source=files:{root / 'corpus.txt'}"])
  assert rc == 0
  return root / "run"


def source(w: Path) -> str:
  return json.loads((w / "config.json").read_text())["data"]["source"]


def train(w: Path, *flags: str, config: str = TEXT, keep_source: bool = True) -> int:
  src = [f"--config.data.source={source(w)}"] if keep_source else []
  text = TEXT_FLAGS if config == TEXT else []
  return cli.main(["train", "--config", config, "--workdir", str(w), *COMMON, *text, *src,
                   *flags])


def sample(w: Path, *flags: str) -> int:
  return cli.main(["sample", "--workdir", str(w), "--length", "8", *flags])


def array_files(w: Path, step: int) -> list[Path]:
  """The checkpoint's array data files (tensorstore/OCDBT), largest first."""
  d = w / "checkpoints" / str(step) / "state"
  return sorted((p for p in d.rglob("*") if p.is_file() and p.parent.name == "d"),
                key=lambda p: -p.stat().st_size)


def truncate(path: Path, keep: int = 64) -> None:
  path.write_bytes(path.read_bytes()[:keep])


def flip_byte(path: Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x5A
  path.write_bytes(bytes(data))


def edit_checksum(w: Path) -> None:
  """A checkpoint whose arrays and recorded checksums disagree (one array rewritten)."""
  meta = w / "checkpoints" / "4" / "meta" / "metadata"
  m = json.loads(meta.read_text())
  key = next(k for k in m["checksums"] if k.startswith("params/"))
  m["checksums"][key] ^= 1
  meta.write_text(json.dumps(m))


def drop_checksum(w: Path) -> None:
  """Metadata that no longer lists one array's checksum: that array would load unverified."""
  meta = w / "checkpoints" / "4" / "meta" / "metadata"
  m = json.loads(meta.read_text())
  del m["checksums"][next(k for k in m["checksums"] if k.startswith("params/"))]
  meta.write_text(json.dumps(m))


def drop_data_step(w: Path, step: int) -> None:
  """Valid JSON metadata without a key the engine reads (it was a KeyError traceback)."""
  meta = w / "checkpoints" / str(step) / "meta" / "metadata"
  meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items()
                              if k != "data_step"}))


def train_in_a_process(w: Path, *flags: str, faults: str = "") -> subprocess.CompletedProcess:
  """The real `gru-tpu train` process (with tests/fault_driver.py's faults): its own stderr."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", GRU_TPU_FAULTS=faults)
  return subprocess.run([sys.executable, str(ROOT / "tests" / "fault_driver.py"), "--config", TEXT,
                         "--workdir", str(w), *COMMON, *TEXT_FLAGS,
                         f"--config.data.source={source(w)}", *flags],
                        capture_output=True, text=True, env=env, timeout=600)


@dataclasses.dataclass
class Row:
  name: str
  # (workdir copy, tmp dir) -> exit code (CLI in-process), a finished process, or raises (API)
  run: Callable[[Path, Path], Any]
  expect: int | type[Exception]  # exit code, or exception type
  message: str  # regex searched in stderr / the exception message
  damage: Callable[[Path], None] | None = None
  after: Callable[[Path, Path], None] | None = None  # what must (not) hold afterwards


def previous_checkpoint_restores(w: Path, tmp: Path) -> None:
  m = gru_tpu.load(w)
  assert m.step == 4 and len(m.generate("to be", 5, temperature=0)) == 5


def no_file_created(w: Path, tmp: Path) -> None:
  assert not (tmp / "pwned").exists()


def assert_metrics_unchanged(w: Path) -> None:
  """Nothing of the refused run reached the workdir's log (it used to train 2 steps uphill)."""
  assert max(r["step"] for r in read_metrics(w)) == 4


def nothing_set_aside(w: Path, tmp: Path) -> None:
  assert not (w / "checkpoints_unreadable").exists()


def train_on_empty_file(w: Path, tmp: Path) -> int:
  (tmp / "empty.txt").write_text("")
  return train(w, f"--config.data.source=files:{tmp / 'empty.txt'}", keep_source=False)


def train_forecast(w: Path, tmp: Path, *flags: str) -> int:
  import pandas as pd
  i = np.arange(120)
  pd.DataFrame({"date": pd.date_range("2000-01-01", periods=120, freq="MS"),
                "sales": 10 + np.sin(2 * np.pi * i / 12)}).to_csv(tmp / "series.csv", index=False)
  return cli.main(["train", "--config", FORECAST, "--workdir", str(w), "--config.num_steps=2",
                   f"--config.data.source=csv:{tmp / 'series.csv'}", *flags])


ROWS = [
    # Damaged checkpoints.
    Row("api-array-file-truncated", lambda w, t: gru_tpu.load(w), CheckpointError,
        r"checkpoint step 4 in .* is unreadable \(truncated or corrupt files: .*\); other "
        r"checkpoints: steps \[2\]", damage=lambda w: truncate(array_files(w, 4)[0])),
    Row("api-array-file-byte-flipped", lambda w, t: gru_tpu.load(w), CheckpointError,
        r"checkpoint step 4 in .* is unreadable", damage=lambda w: flip_byte(array_files(w, 4)[0])),
    Row("api-checksum-mismatch", lambda w, t: gru_tpu.load(w), CheckpointError,
        r"checkpoint step 4 .* is unreadable .*checksum mismatch in params/", damage=edit_checksum),
    Row("api-checksum-missing", lambda w, t: gru_tpu.load(w), CheckpointError,
        r"checkpoint step 4 .* is unreadable .*checksum mismatch in the array names",
        damage=drop_checksum),
    Row("api-array-file-missing", lambda w, t: gru_tpu.load(w), CheckpointError,
        r"checkpoint step 4 .* is unreadable", damage=lambda w: array_files(w, 4)[0].unlink()),
    Row("api-metadata-of-another-shape", lambda w, t: gru_tpu.load(w), CheckpointError,
        r"checkpoint step 4 .* is unreadable .*its meta/metadata lacks config, data_step, task",
        damage=lambda w: (w / "checkpoints" / "4" / "meta" / "metadata").write_text("[]")),
    Row("api-step-not-saved", lambda w, t: gru_tpu.load(w, step=3), CheckpointError,
        r"has no checkpoint at step 3; it has steps \[2, 4\]"),
    Row("sample-metadata-json-truncated", lambda w, t: sample(w), 2,
        r"gru-tpu sample: checkpoint step 4 .* is unreadable .*JSONDecodeError",
        damage=lambda w: truncate(w / "checkpoints" / "4" / "meta" / "metadata", 100)),
    Row("train-every-checkpoint-unreadable", lambda w, t: train(w, "--config.num_steps=6"), 2,
        r"gru-tpu train: no readable checkpoint in .*checkpoint step 4 .*is unreadable.*"
        r"checkpoint step 2 .*is unreadable .*lacks data_step.* Nothing was changed",
        damage=lambda w: (truncate(array_files(w, 4)[0]), drop_data_step(w, 2)),
        after=nothing_set_aside),
    # A workdir that does not fit the config.
    Row("train-workdir-of-another-task", lambda w, t: train(w, config=SYNTHETIC,
                                                           keep_source=False), 2,
        r"holds a checkpoint \(step 4\) from a run with a different config.task \('text' vs now "
        r"'synthetic'\)"),
    Row("train-incompatible-model-size", lambda w, t: train(w, "--config.model.hidden=48"), 2,
        r"holds a checkpoint \(step 4\) from a run with a different config.model.hidden "
        r"\(\d+ vs now 48\); use a fresh --workdir"),
    # Config mistakes.
    Row("train-unknown-config-key", lambda w, t: train(w, "--config.optimizer.learning_rat=1"),
        2, r"unknown config key 'learning_rat' \(did you mean 'learning_rate'\?\)"),
    Row("train-wrong-type", lambda w, t: train(w, "--config.num_steps=many"), 2,
        r"--config.num_steps=many: .*invalid literal for int\(\)"),
    Row("train-negative-learning-rate", lambda w, t: train(
        w, "--config.num_steps=6", "--config.optimizer.learning_rate=-0.01"), 2,
        r"gru-tpu train: config.optimizer.learning_rate=-0.01: expected a number >= 0",
        after=lambda w, t: assert_metrics_unchanged(w)),
    Row("train-missing-config-file", lambda w, t: cli.main(
        ["train", "--config", str(t / "nope.py"), "--workdir", str(w)]), 2,
        r"--config .*nope.py: no such file"),
    # The text task's bad inputs.
    Row("text-empty-corpus", lambda w, t: train_on_empty_file(w, t), 2,
        r"config.data.source='files:.*empty.txt': the corpus is empty"),
    Row("text-glob-matches-nothing", lambda w, t: train(
        w, f"--config.data.source=files:{t}/nothing/*.txt", keep_source=False), 2,
        r"the glob matches no files"),
    Row("text-shell-metacharacters-are-not-run", lambda w, t: train(
        w, f"--config.data.source=files:{t}/x.txt; touch {t}/pwned $(touch {t}/pwned)",
        keep_source=False), 2, r"the glob matches no files", after=no_file_created),
    Row("text-seq-len-longer-than-validation", lambda w, t: train(w, "--config.seq_len=400"), 2,
        r"config.seq_len=400 leaves no window in the validation split of files:.* \(315 tokens; "
        r"a window is seq_len \+ 1 tokens\): lower config.seq_len to 314 or less"),
    Row("sample-no-checkpoint", lambda w, t: sample(t / "empty_workdir"), 2,
        r"empty_workdir holds no checkpoint; train first"),
    Row("sample-prompt-outside-vocab-is-unk", lambda w, t: sample(w, "--prompt", "to Zx"), 0,
        r"prompt characters not in the vocabulary become <unk>: 'Zx'"),
    # The forecast task's bad inputs (tests/test_data_timeseries.py has every CSV case).
    Row("forecast-csv-lacks-the-target-column", lambda w, t: train_forecast(
        w, t, "--config.data.target=revenue"), 2,
        r"csv:.*series.csv: no target column 'revenue' \(columns: date, sales\)"),
    Row("forecast-series-too-short", lambda w, t: train_forecast(
        w, t, "--config.data.target=sales", "--config.data.context_length=200"), 2,
        r"series 'sales' has 120 time steps up to its last target value; it needs at "
        r"least context_length \+ horizon"),
    Row("forecast-api-on-a-text-model", lambda w, t: gru_tpu.load(w).forecast(), AttributeError,
        r"'TextModel' object has no attribute 'forecast'"),
    # Failures while training.
    Row("train-disk-full-on-save", lambda w, t: train_in_a_process(
        w, "--config.num_steps=8", faults="enospc@6"), 2,
        r"gru-tpu train: saving checkpoint step 6 in .* failed \(OSError: \[Errno 28\] No space "
        r"left on device.*Complete checkpoints are kept: \[2, 4\]",
        after=previous_checkpoint_restores),
    Row("train-loss-blows-up", lambda w, t: train(w, "--config.num_steps=8",
                                                  "--config.optimizer.learning_rate=1e38"), 2,
        r"param_norm = inf at step 5; training stopped. The last good checkpoint \(step 4\) is "
        r"intact", after=previous_checkpoint_restores),
]


def snapshot(checkpoints: Path) -> dict[Path, bytes]:
  return {p: p.read_bytes() for p in sorted(checkpoints.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_fault(row, base, tmp_path, capsys):
  w = tmp_path / "run"
  shutil.copytree(base, w)
  if row.damage:
    row.damage(w)
  before = snapshot(w / "checkpoints")
  if isinstance(row.expect, int):
    out = row.run(w, tmp_path)
    rc, err = ((out.returncode, out.stderr) if isinstance(out, subprocess.CompletedProcess)
               else (out, capsys.readouterr().err))
    assert rc == row.expect, err[-3000:]
    assert re.search(row.message, err), err[-3000:]
    assert "Traceback" not in err
  else:
    with pytest.raises(row.expect, match=row.message):
      row.run(w, tmp_path)
  # Existing checkpoint files: all there, byte for byte (a failed save may leave its
  # STEP.orbax-checkpoint-tmp beside them; it is never a checkpoint).
  assert {p: p.read_bytes() for p in before if p.exists()} == before
  assert sorted(p.name for p in (w / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
  if row.after:
    row.after(w, tmp_path)


def test_checkpoints_hold_no_pickle_and_loading_runs_none(base, monkeypatch):
  files = [p for p in (base / "checkpoints").rglob("*") if p.is_file()]
  assert files
  for p in files:
    data = p.read_bytes()
    assert not re.match(rb"\x80[\x02-\x05]", data), f"{p} starts like a pickle"
    if p.parent.name != "d" and not p.name.startswith("manifest"):
      json.loads(data) if p.name != "commit_success.txt" else data.decode()  # JSON or text
  step_meta = json.loads((base / "checkpoints" / "4" / "_CHECKPOINT_METADATA").read_text())
  assert step_meta["item_handlers"] == {
      "meta": "orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler",
      "state": "orbax.checkpoint._src.handlers.standard_checkpoint_handler."
               "StandardCheckpointHandler"}
  tree = json.loads((base / "checkpoints" / "4" / "state" / "_METADATA").read_text())
  # Arrays, and placeholders for empty nodes: no Python objects.
  assert {v["value_metadata"]["value_type"] for v in tree["tree_metadata"].values()} <= {
      "jax.Array", "None", "Dict"}

  def refuse(*a, **k):
    raise AssertionError("unpickling while loading a checkpoint")

  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, refuse)
  m = gru_tpu.load(base)  # arrays and JSON only
  assert m.step == 4 and m.task == "text"


def test_checksums_see_one_flipped_bit_in_any_dtype():
  for a in (np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4),
            np.arange(7, dtype=np.int32), np.arange(5, dtype=np.uint8),
            np.array([True, False]), np.ones(3, jax.numpy.bfloat16)):
    bits = a.view(np.uint8).copy()
    bits[-1] ^= 1
    flipped = bits.view(a.dtype).reshape(a.shape) if a.dtype != bool else ~a
    assert checksums({"a": a}) != checksums({"a": flipped}), a.dtype
  swapped = np.array([2.0, 1.0], np.float32)
  assert checksums({"a": np.array([1.0, 2.0], np.float32)}) != checksums({"a": swapped})


def test_metrics_survive_a_row_cut_off_by_a_kill(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}\n'
                                          '{"step": 2, "split": "tr')
  assert read_metrics(tmp_path) == [{"step": 1, "split": "train", "loss": 2.0}]
  writer = MetricsWriter(tmp_path)  # a resumed run appends after the last whole row
  writer.write(2, "train", {"loss": 1.5})
  writer.close()
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]



def test_metrics_that_are_not_finite_are_strict_json_null(tmp_path):
  """MASE of a constant series is NaN: json.dumps wrote a bare NaN, which strict JSON parsers
  (JavaScript's, Go's) refuse. It is null on disk and NaN again through read_metrics."""
  writer = MetricsWriter(tmp_path)
  writer.write(1, "eval", {"mase": float("nan"), "crps": np.float32("inf"), "mae": 0.5})
  writer.close()

  def refuse(name):
    raise ValueError(f"not JSON: {name}")
  line = (tmp_path / "metrics.jsonl").read_text()
  assert json.loads(line, parse_constant=refuse) == {"step": 1, "split": "eval", "mase": None,
                                                      "crps": None, "mae": 0.5}
  [row] = read_metrics(tmp_path)
  assert np.isnan(row["mase"]) and np.isnan(row["crps"]) and row["mae"] == 0.5


def test_loading_while_a_run_deletes_the_step_being_read(base, tmp_path, monkeypatch):
  """A run still training (keep_checkpoints) deletes the step load() is reading: its files
  vanish mid-read, which orbax reports like corruption. load() reads the new latest instead;
  an explicit step that went away is one clear error, not "unreadable (truncated or corrupt)"."""
  from gru_tpu import checkpoint

  w = tmp_path / "run"
  shutil.copytree(base, w)
  real = checkpoint.Checkpointer.restore

  def deleted_while_read(self, step, target):
    if step == 4 and (w / "checkpoints" / "4").exists():
      shutil.rmtree(w / "checkpoints" / "4")  # the run's cleanup lands mid-read
      raise self._unreadable(step, "FileNotFoundError: Checkpoint at .../4 not found.")
    return real(self, step, target)

  monkeypatch.setattr(checkpoint.Checkpointer, "restore", deleted_while_read)
  assert gru_tpu.load(w).step == 2  # the latest, read again
  shutil.rmtree(w)
  shutil.copytree(base, w)
  with pytest.raises(CheckpointError, match=r"checkpoint step 4 in .* changed while being "
                                            r"loaded, by a run still training there; it now has "
                                            r"steps \[2\]; load again"):
    gru_tpu.load(w, step=4)
  # The run saved a newer step while step 4 was read, and the read failed (4's cleanup had
  # begun, its directory still there): the newer step is read, 4 is not reported as corrupt.
  shutil.rmtree(w)
  shutil.copytree(base, w)

  def newer_saved_meanwhile(self, step, target):
    if step == 4:
      shutil.copytree(w / "checkpoints" / "4", w / "checkpoints" / "6")
      raise self._unreadable(step, "FileNotFoundError: .../4/state/d/0 not found")
    return real(self, step, target)

  monkeypatch.setattr(checkpoint.Checkpointer, "restore", newer_saved_meanwhile)
  assert gru_tpu.load(w).step == 6
  # Really damaged, beside a cut-off save's leftover (not a newer checkpoint): no retry, and
  # the error says what it is.
  shutil.rmtree(w)
  shutil.copytree(base, w)
  (w / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()

  def damaged(self, step, target):
    raise self._unreadable(step, "ValueError: Truncated Zstd-compressed stream")

  monkeypatch.setattr(checkpoint.Checkpointer, "restore", damaged)
  with pytest.raises(CheckpointError, match=r"step 4 .* is unreadable \(truncated or corrupt "
                                            r"files: .*\); other checkpoints: steps \[2\]"):
    gru_tpu.load(w)
  monkeypatch.setattr(checkpoint.Checkpointer, "restore", real)
  # Files vanishing while orbax lists the steps.
  real_init, calls = checkpoint.Checkpointer.__init__, []

  def listing_races(self, *a, **k):
    calls.append(1)
    if len(calls) == 1:
      raise FileNotFoundError("checkpoints/6/_CHECKPOINT_METADATA")
    real_init(self, *a, **k)

  monkeypatch.setattr(checkpoint.Checkpointer, "__init__", listing_races)
  assert gru_tpu.load(w, step=2).step == 2 and len(calls) == 2


def test_setting_aside_the_same_step_again_keeps_every_copy(base, tmp_path):
  """A step damaged again after a rerun, and again: each copy goes beside the earlier ones,
  under a name every process computes alike (they all log it)."""
  from gru_tpu.checkpoint import Checkpointer

  w = tmp_path / "run"
  shutil.copytree(base, w)
  names = []
  for _ in range(3):
    if not (w / "checkpoints" / "4").exists():
      shutil.copytree(base / "checkpoints" / "4", w / "checkpoints" / "4")
    ckpt = Checkpointer(w)
    names.append(ckpt.set_aside(4).name)
    ckpt.close()
  assert names == ["4", "4_", "4__"]
  assert sorted(p.name for p in (w / "checkpoints_unreadable").iterdir()) == names
  assert not (w / "checkpoints" / "4").exists()
