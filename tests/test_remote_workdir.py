"""gs:// workdirs (what every worker of a TPU pod sees), on a simulated bucket.

Each layer that touches the workdir is pointed at a local directory standing in for gs://BUCKET:
epath (our JSON, orbax's metadata and step listing), tensorstore (orbax's arrays) and
tensorboardX's event files; orbax still takes its GCS code paths (commit files, not renames).
What this cannot show is real GCS behaviour (no directories, network errors): only a bucket can.
"""

import contextlib
import os
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing
from orbax.checkpoint._src.path import gcs_utils
from tensorboardX import record_writer

sys.path.insert(0, str(Path(__file__).parents[1] / "configs"))
import synthetic  # noqa: E402

import gru_tpu  # noqa: E402
from gru_tpu import train  # noqa: E402
from gru_tpu.checkpoint import Checkpointer  # noqa: E402
from gru_tpu.metrics import read_metrics  # noqa: E402

_EPATH_FNS = ("copy", "exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open",
              "remove", "rename", "replace", "rmtree", "stat", "walk")


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs://... → tmp_path/bucket/...; the working directory is an empty tmp_path/cwd."""
  root = tmp_path / "bucket"

  def local(p):
    s = os.fspath(p)
    return f"{root}/{s[len('gs://'):]}" if s.startswith("gs://") else s

  def redirect(fn, *args, **kwargs):
    return fn(*[local(a) if isinstance(a, (str, os.PathLike)) else a for a in args], **kwargs)

  class EventFiles:  # tensorboardX's writer for gs:// would upload with google-cloud-storage
    def open(self, path):
      os.makedirs(os.path.dirname(local(path)), exist_ok=True)
      return open(local(path), "wb")

    def directory_check(self, path):
      pass

  monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", EventFiles())
  # epath would use TensorFlow's gfile (installed by [tfds]) rather than its mockable backends.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                      lambda path: {"driver": "file", "path": local(path)})
  monkeypatch.setattr(gcs_utils, "get_bucket",
                      lambda name: types.SimpleNamespace(hierarchical_namespace_enabled=False))
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  with epath_testing.mock_epath(**dict.fromkeys(_EPATH_FNS, redirect)):
    yield root
  # A gs:// workdir read as a local path used to land here, as ./gs:/BUCKET/...
  assert not list(cwd.iterdir())


def tiny(num_steps):
  c = synthetic.get_config("size=tiny")
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = num_steps, 1, 30, 10
  return c


def train_losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if r["split"] == "train"}


def test_gs_workdir_trains_resumes_exactly_loads_and_sets_aside(bucket, tmp_path, killed_at):
  url, run = "gs://bkt/runs/syn", bucket / "bkt" / "runs" / "syn"
  with killed_at(25):
    train.train_and_evaluate(tiny(30), url)
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["10", "20"]
  # orbax's GCS protocol: a step counts once its commit files are written (no atomic rename).
  commits = sorted((run / "checkpoints" / "20").rglob("commit_success.txt"))
  assert commits and (run / "config.json").is_file() and list((run / "tensorboard").iterdir())
  for p in commits:  # as if killed while saving step 20
    p.unlink()
  with contextlib.closing(Checkpointer(url, create=False)) as ckpt:
    assert ckpt.steps() == [10] and ckpt.partial_steps == [20]
  # A row cut off by a kill: the writer rewrites the object without it before appending.
  with (run / "metrics.jsonl").open("a") as f:
    f.write('{"step": 21, "spl')
  train.train_and_evaluate(tiny(30), url)  # resumes from step 10

  local = tmp_path / "local"
  train.train_and_evaluate(tiny(30), local)
  a, b = train_losses(local), train_losses(url)
  assert sorted(b) == list(range(1, 31))
  for step in a:
    assert a[step] == b[step], f"step {step}: {a[step]} (local, straight) vs {b[step]} (gs://)"

  m = gru_tpu.load(url)
  assert m.step == 30 and str(m.workdir) == url
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["10", "20", "30"]
  assert m.metrics()["loss"].notna().any()

  ckpt = Checkpointer(url, async_save=False)
  files = sorted(p.relative_to(run / "checkpoints" / "20")
                 for p in (run / "checkpoints" / "20").rglob("*") if p.is_file())
  with contextlib.closing(ckpt), mock.patch("jax.process_count", lambda: 1):
    dest = ckpt.set_aside(20)
    assert str(dest) == f"{url}/checkpoints_unreadable/20"
    assert ckpt.steps() == [10, 30]
  moved = run / "checkpoints_unreadable" / "20"
  assert sorted(p.relative_to(moved) for p in moved.rglob("*") if p.is_file()) == files
  assert not (run / "checkpoints" / "20").exists()
