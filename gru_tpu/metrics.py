"""Run metrics: workdir/metrics.jsonl (one JSON object per event) and TensorBoard events.

Every line has `step` and `split` ("train", "eval" or "test") plus metric names; the training
loss is `loss`. Only process 0 writes. A resumed run appends: steps between the checkpoint and
the kill appear twice (the later row counts). In a gs:// workdir, which cannot be appended to,
an upload replaces the object with all rows so far: at most every UPLOAD_SECONDS, and at each
flush() (the engine's, before every checkpoint save) and close, so the rows up to the latest
checkpoint are always there and later ones follow within UPLOAD_SECONDS.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from os import PathLike
from pathlib import Path

import jax
from etils import epath

from gru_tpu.checkpoint import is_uri, workdir_path

# An upload per logged step, each of every row so far, made a long run's log steps ever slower
# (O(rows) each, O(rows²) over the run). TensorBoard's own gs:// event file uploads every 120 s.
UPLOAD_SECONDS = 60.0


def _kept(method):
  """An OSError (a full disk, a GCS error) goes to self.error and later writes are skipped:
  only process 0 writes, and the engine raises it on every process at the same step."""
  @functools.wraps(method)
  def run(self, *args):
    if self.enabled and self.error is None:
      try:
        method(self, *args)
      except OSError as e:
        self.error = e
  return run


class MetricsWriter:
  """Writes on process 0; `error` is its first failed write (None while all went well)."""

  def __init__(self, workdir: str | PathLike):
    self.enabled, self.error = jax.process_index() == 0, None
    self.file = self.tb = None
    self._open(epath.Path(workdir))

  @_kept
  def _open(self, workdir: epath.Path) -> None:
    from tensorboardX import SummaryWriter  # gs:// through google-cloud-storage (the [gcs] extra)
    self.path, self.rows = workdir / "metrics.jsonl", ""
    self.uploaded, self.pending = time.monotonic(), False  # gs://: last upload; rows since
    if is_uri(workdir):
      self.rows = self.path.read_text() if self.path.exists() else ""
      self.rows = self.rows[:self.rows.rfind("\n") + 1]
    else:
      _drop_partial_line(Path(self.path))
      self.file = Path(self.path).open("a")
    self.tb = SummaryWriter(str(workdir / "tensorboard"))

  @_kept
  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    row = {"step": int(step), "split": split}
    # NaN and Inf are not JSON (json.dumps would write bare NaN, which strict parsers refuse):
    # a metric with no finite value (e.g. MASE of a flat series) is written as null.
    row.update({k: float(v) if math.isfinite(float(v)) else None for k, v in metrics.items()})
    if self.file is None:
      self.rows += json.dumps(row) + "\n"
      self.pending = True
      if time.monotonic() - self.uploaded >= UPLOAD_SECONDS:
        self.flush()
    else:
      self.file.write(json.dumps(row) + "\n")
      self.file.flush()
    for k, v in metrics.items():
      if math.isfinite(float(v)):
        self.tb.add_scalar(f"{split}/{k}", float(v), int(step))

  @_kept
  def write_text(self, step: int, tag: str, text: str) -> None:
    self.tb.add_text(tag, text, int(step))

  @_kept
  def flush(self) -> None:
    """gs://: uploads the rows not yet uploaded (a local file is flushed at every write)."""
    if self.file is None and self.pending:
      self.path.write_text(self.rows)  # an object upload replaces the old one atomically
      self.uploaded, self.pending = time.monotonic(), False

  def close(self) -> None:
    """Also runs while an error propagates (a save that found the disk full): a write that
    fails here is a warning, not a traceback in place of that error."""
    if not self.enabled:
      return
    before = self.error
    if self.file is None:
      self.flush()
    for f in (self.file, self.tb):
      try:
        if f is not None:
          f.close()
      except OSError as e:
        self.error = self.error or e
    if self.error is not before:
      logging.getLogger("gru_tpu").warning("could not flush metrics: %s", self.error)


def _drop_partial_line(path: Path) -> None:
  """A run killed mid-write can leave half a row; cut it so the next row starts a line."""
  if not path.exists() or path.stat().st_size == 0:
    return
  with path.open("r+b") as f:
    f.seek(-1, 2)
    if f.read(1) == b"\n":  # the usual case: no need to read a long run's whole file
      return
    f.seek(0)
    f.truncate(f.read().rfind(b"\n") + 1)


def read_metrics(workdir: str | PathLike) -> list[dict]:
  """The rows of metrics.jsonl ([] if there is none); a half-written last row is left out.

  A null value (a metric that was not finite) is read back as NaN.
  """
  path = workdir_path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  data = path.read_text()
  lines = data.splitlines()
  if lines and not data.endswith("\n"):
    lines = lines[:-1]  # being written right now, or cut off by a kill
  rows = [json.loads(line) for line in lines if line.strip()]
  return [{k: math.nan if v is None else v for k, v in row.items()} for row in rows]
