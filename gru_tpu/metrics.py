"""Run metrics: workdir/metrics.jsonl (one JSON object per event) and TensorBoard events.

Every line has `step` and `split` ("train", "eval" or "test") plus metric names; the training
loss is `loss`. Only process 0 writes. A resumed run appends: steps between the checkpoint and
the kill appear twice (the later row counts). In a gs:// workdir, which cannot be appended to,
an upload replaces the object with all rows so far: at most every UPLOAD_SECONDS, and at each
flush() (the engine's, before every checkpoint save) and close, so the rows up to the latest
checkpoint are always there and later ones follow within UPLOAD_SECONDS.
"""

from __future__ import annotations

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


class MetricsWriter:

  def __init__(self, workdir: str | PathLike):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # gs:// through google-cloud-storage (the [gcs] extra)
    workdir = epath.Path(workdir)
    self.path, self.file, self.rows = workdir / "metrics.jsonl", None, ""
    self.uploaded, self.pending = time.monotonic(), False  # gs://: last upload; rows since
    if is_uri(workdir):
      self.rows = self.path.read_text() if self.path.exists() else ""
      self.rows = self.rows[:self.rows.rfind("\n") + 1]
    else:
      _drop_partial_line(Path(self.path))
      self.file = Path(self.path).open("a")
    self.tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
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

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self.tb.add_text(tag, text, int(step))

  def flush(self) -> None:
    """gs://: uploads the rows not yet uploaded (a local file is flushed at every write)."""
    if self.enabled and self.file is None and self.pending:
      self.path.write_text(self.rows)  # an object upload replaces the old one atomically
      self.uploaded, self.pending = time.monotonic(), False

  def close(self) -> None:
    if self.enabled:
      # Closing also runs while an error propagates (a save that found the disk full); a
      # failed flush here must not replace that error with its own traceback.
      first = self.file.close if self.file is not None else self.flush
      for close in (first, self.tb.close):
        try:
          close()
        except OSError as e:
          logging.getLogger("gru_tpu").warning("could not flush metrics: %s", e)


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
