"""gs:// workdirs (what every worker of a TPU pod sees) and data, against a local GCS emulator.

Real `gru-tpu train` processes write through the clients a TPU VM uses: epath through gcsfs
(JSON, orbax's metadata), tensorstore's gcs driver (orbax's arrays), google-cloud-storage
(orbax's step listing, tensorboardX's event files); only the endpoint is local
(gcp-storage-emulator, from [dev]). EPATH_USE_TF=false: with TensorFlow installed epath would
go through tf.io.gfile instead, which this does not cover.
"""

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import gru_tpu
from gru_tpu import checkpoint, cli
from gru_tpu.errors import UserError
from gru_tpu.metrics import read_metrics

ROOT = Path(__file__).parents[1]
DRIVER = str(ROOT / "tests" / "fault_driver.py")
FLAGS = ["--config", f"{ROOT / 'configs' / 'synthetic.py'}:size=tiny", "--config.num_steps=30",
         "--config.checkpoint_every=10", "--config.eval_every=30", "--config.log_every=1"]
URL, PREFIX = "gs://bkt/runs/syn", "runs/syn/"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def gcs(tmp_path):
  """(environment for a process that should see the emulator, the bucket client)."""
  from google.auth.credentials import AnonymousCredentials
  from google.cloud import storage
  port, log = free_port(), tmp_path / "emulator.log"
  # Its log goes to a file: a pipe nobody reads could fill up (it prints a traceback for every
  # connection a killed client drops) and stall the server.
  with log.open("w") as f:
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "gcs_emulator.py"), "start", "--port", str(port),
         "--in-memory", "--default-bucket", "bkt", "--quiet"], stdout=f, stderr=f)
  endpoint = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 60
    while True:
      with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
          break
      assert server.poll() is None, log.read_text()[-2000:]
      assert time.monotonic() < deadline, "the GCS emulator did not start"
      time.sleep(0.2)
    env = dict(os.environ, JAX_PLATFORMS="cpu", STORAGE_EMULATOR_HOST=endpoint,
               TENSORSTORE_GCS_HTTP_URL=endpoint, EPATH_USE_TF="false",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    client = storage.Client(project="test", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": endpoint})
    yield env, client.bucket("bkt")
  finally:
    server.kill()
    server.wait()


def run(env, workdir, faults="", cwd=None, wait=True, flags=()):
  p = subprocess.Popen([sys.executable, DRIVER, *FLAGS, *flags, "--workdir", str(workdir)],
                       env=dict(env, GRU_TPU_FAULTS=faults), cwd=cwd, text=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  if not wait:
    return p
  _, err = p.communicate(timeout=600)
  return p.returncode, err


def objects(bucket, under=""):
  return sorted(b.name[len(PREFIX):] for b in bucket.list_blobs(prefix=PREFIX + under))


def committed(bucket) -> list[int]:
  """Steps whose commit file exists: orbax's GCS protocol, since objects cannot be renamed."""
  return sorted(int(n.split("/")[1]) for n in objects(bucket, "checkpoints/")
                if n.count("/") == 2 and n.endswith("/commit_success.txt"))


def test_gs_workdir_survives_kill_preemption_and_damage_exactly_and_loads(gcs, tmp_path):
  env, bucket = gcs
  cwd = tmp_path / "cwd"  # a gs:// workdir read as a local path used to land here, ./gs:/...
  cwd.mkdir()
  straight = run(env, tmp_path / "straight", wait=False)

  # 1. SIGKILL while step 20's save commits: its objects are written, its commit file is not.
  #    (A kill at step 25 found step 20's save anywhere from not started to committed.)
  rc, err = run(env, URL, "kill_in_save@20", cwd=cwd)
  assert rc == -9, err[-3000:]
  assert committed(bucket) == [10] and objects(bucket, "checkpoints/20/")

  # A run refused for its config changes nothing, and a user's own folders under checkpoints/
  # outlive every run: orbax's GCS cleanup took any folder without a commit_success.txt (this
  # backup of step 10, these notes) for a cut-off save and deleted it, before the refusal too.
  mine = ["checkpoints/backup/10/commit_success.txt", "checkpoints/notes/a.txt"]
  for name in mine:
    bucket.blob(PREFIX + name).upload_from_string("mine")
  before = objects(bucket)
  rc, err = run(env, URL, cwd=cwd, flags=["--config.model.hidden=48"])
  assert rc == 2 and "Nothing was changed" in err, err[-3000:]
  assert objects(bucket) == before

  # 2. The cut-off step is skipped; SIGTERM (a preemption notice) saves the step it is on.
  rc, err = run(env, URL, "term@24", cwd=cwd)
  assert rc == 0, err[-3000:]
  assert "checkpoint step 20 in gs://bkt/runs/syn/checkpoints was cut off mid-write" in err
  assert "resumed from step 10" in err
  steps = committed(bucket)
  assert steps[:2] == [10, 20] and len(steps) == 3, steps

  # 3. The preemption checkpoint damaged (its largest array object cut short) and the last
  #    metrics row cut in half: set aside by copying its objects, the run resumes and finishes.
  last = steps[-1]
  before = objects(bucket, f"checkpoints/{last}/")
  victim = max(bucket.list_blobs(prefix=f"{PREFIX}checkpoints/{last}/state/"),
               key=lambda b: b.size)
  victim.upload_from_string(victim.download_as_bytes()[:64])
  metrics = bucket.blob(PREFIX + "metrics.jsonl")
  metrics.upload_from_string(metrics.download_as_text() + '{"step": 26, "spl')
  rc, err = run(env, URL, cwd=cwd)
  assert rc == 0, err[-3000:]
  assert f"checkpoint step {last} in " in err and "is unreadable (truncated or corrupt" in err
  assert "resumed from step 20" in err
  assert [n.replace("checkpoints_unreadable/", "checkpoints/", 1)
          for n in objects(bucket, f"checkpoints_unreadable/{last}/")] == before
  assert committed(bucket) == [10, 20, 30]
  assert set(mine) <= set(objects(bucket)), objects(bucket, "checkpoints/")
  assert objects(bucket, "config.json") and objects(bucket, "tensorboard/")
  assert not list(cwd.iterdir())

  # Every train row, those of steps run twice included, matches the straight local run.
  _, err = straight.communicate(timeout=600)
  assert straight.returncode == 0, err[-3000:]
  want = {r["step"]: r for r in read_metrics(tmp_path / "straight") if r["split"] == "train"}
  got = [json.loads(line) for line in metrics.download_as_text().splitlines()]
  assert {r["step"] for r in got if r["split"] == "train"} == set(range(1, 31))
  for r in got:
    if r["split"] == "train":
      assert r == want[r["step"]], r

  load = ("import gru_tpu; m = gru_tpu.load('gs://bkt/runs/syn'); "
          "print(m.step, int(m.metrics()['step'].max()))")
  r = subprocess.run([sys.executable, "-c", load], env=env, cwd=cwd, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0 and r.stdout.split() == ["30", "30"], r.stderr[-3000:]


def test_two_processes_share_a_gs_workdir_and_another_topology_resumes_it(gcs, tmp_path):
  """A pod's layout: 2 processes x 4 devices (gloo) save one checkpoint into gs://, each its
  own shards; 1 process x 8 devices resumes from it."""
  env, bucket = gcs
  url, flags = "gs://bkt/runs/two", [f for f in FLAGS if "num_steps" not in f]
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "gru_tpu.cli", "train", *flags, "--config.num_steps=20",
       "--workdir", url, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"], env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  names = [b.name for b in bucket.list_blobs(prefix="runs/two/checkpoints/20/state/")]
  assert {n.split("/")[-1] for n in names if "array_metadatas" in n} == {"process_0", "process_1"}

  r = subprocess.run([sys.executable, "-m", "gru_tpu.cli", "train", *flags,
                      "--config.num_steps=30", "--workdir", url],
                     env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and "resumed from step 20" in r.stderr, r.stderr[-3000:]
  rows = [json.loads(line) for line in
          bucket.blob("runs/two/metrics.jsonl").download_as_text().splitlines()]
  assert sorted(r["step"] for r in rows if r["split"] == "train") == list(range(1, 31))


def test_text_files_and_a_forecast_csv_read_from_gs(gcs):
  env, bucket = gcs
  files = {"data/b.txt": b"second file\n", "data/a.txt": b"first file\n",
           "data/sub/c.txt": b"one level down\n", "data/notes.md": b"not text\n"}
  for name, data in files.items():
    bucket.blob(name).upload_from_string(data)
  bucket.blob("series.csv").upload_from_string("date,sales\n2024-01-01,3\n2024-01-02,4\n")
  script = """if 1:
    from gru_tpu.data import text, timeseries
    from gru_tpu.errors import UserError
    c = text.load_corpus("files:gs://bkt/data/*.txt")
    print(repr(c.train + c.validation + c.test))
    print(timeseries.read_csv("gs://bkt/series.csv").to_dict("list"))
    for source in ("files:gs://bkt/data/**/*.txt", "files:gs://bkt/nothing/*.txt",
                   "files:gs://nobkt/*.txt"):
      try:
        text.load_corpus(source)
      except UserError as e:
        print(e)
    try:
      timeseries.read_csv("gs://nobkt/series.csv")
    except UserError as e:
      print(e)
  """
  r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  corpus, frame, recursive, empty, no_bucket, no_csv = r.stdout.splitlines()
  # A missing bucket was train's OSError line: "b/nobkt/o; free space or fix permissions"
  assert "'files:gs://nobkt/*.txt': cannot read it (FileNotFoundError" in no_bucket
  assert "gs://nobkt/series.csv" in no_csv, no_csv
  assert corpus == repr(b"first file\nsecond file\n")  # sorted by name, this level only
  assert frame == repr({"date": ["2024-01-01", "2024-01-02"], "sales": [3, 4]})
  assert "a gs:// glob takes * and ? within one directory level, not **" in recursive
  assert "the glob matches no files" in empty


def test_forecast_writes_its_csv_and_png_to_gs(gcs, tmp_path):
  """On a TPU VM results go next to a gs:// workdir; `--output gs://...` was refused as a local
  path whose directory does not exist."""
  env, bucket = gcs
  i = np.arange(120)
  pd.DataFrame({"date": pd.date_range("2000-01-01", periods=120, freq="MS"),
                "sales": 10 + 3 * np.sin(2 * np.pi * i / 12)}).to_csv(tmp_path / "s.csv",
                                                                      index=False)
  run = tmp_path / "run"
  assert cli.main(["train", "--config", f"{ROOT / 'configs' / 'csv_forecast.py'}:size=tiny",
                   "--workdir", str(run), f"--config.data.source=csv:{tmp_path / 's.csv'}",
                   "--config.data.target=sales", "--config.data.context_length=24",
                   "--config.data.horizon=6", "--config.num_steps=2", "--config.eval_every=2",
                   "--config.eval.baselines=('seasonal_naive',)"]) == 0
  r = subprocess.run([sys.executable, "-m", "gru_tpu.cli", "forecast", "--workdir", str(run),
                      "--horizon", "4", "--num_samples", "20", "--output", "gs://bkt/out/f.csv",
                      "--plot", "gs://bkt/out/f.png"], env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  got = pd.read_csv(io.StringIO(bucket.blob("out/f.csv").download_as_text()))
  want = pd.read_csv(io.StringIO(gru_tpu.load(run).forecast(None, 4, num_samples=20).to_csv(
      index=False)))  # in this process: another device count, so float32 rounding may differ
  pd.testing.assert_frame_equal(got, want, rtol=1e-6)
  assert bucket.blob("out/f.png").download_as_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gs_workdir_without_its_clients_is_one_clear_error(monkeypatch):
  monkeypatch.setattr(checkpoint, "_installed", lambda module: module == "gcsfs")
  with pytest.raises(UserError, match=r"^workdir gs://b/run needs google-cloud-storage: pip "
                                      r"install 'gru_tpu\[gcs\]' \(the \[tpu\] extra"):
    checkpoint.Checkpointer("gs://b/run")
  monkeypatch.setattr(checkpoint, "_installed", lambda module: False)
  with pytest.raises(UserError, match=r"needs gcsfs and google-cloud-storage"):
    checkpoint.Checkpointer("gs://b/run")


def test_an_earlier_starts_metrics_are_set_aside_in_a_gs_workdir(gcs):
  """Objects cannot be renamed: the move is a copy and a delete, of the folder's objects too."""
  env, bucket = gcs
  files = {"w/metrics.jsonl": b'{"step": 1}\n', "w/config.json": b"{}\n",
           "w/tensorboard/events.1": b"tb", "w/tensorboard/sub/events.2": b"tb2",
           "w/checkpoints/keep.txt": b"not moved"}
  for name, data in files.items():
    bucket.blob(name).upload_from_string(data)
  script = """if 1:
    from etils import epath
    from gru_tpu import train
    train._set_aside_earlier_start(epath.Path("gs://bkt/w"), "{}\\n")
  """
  r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  names = {b.name: b.download_as_bytes() for b in bucket.list_blobs(prefix="w/")}
  (aside,) = {n.split("/")[1] for n in names if n.startswith("w/earlier_start_")}
  assert names == {n.replace("w/", f"w/{aside}/", 1) if "checkpoints" not in n else n: data
                   for n, data in files.items()}
