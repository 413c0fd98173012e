"""A run killed again and again ends bit-identical to one that never stopped.

One chain of real `gru-tpu train` processes on the text task (windows reshuffled every
epoch, dropout on, so data order and RNG both matter), each stopped by a real signal at a pinned
point (tests/fault_driver.py): SIGKILL mid-run, SIGKILL while a checkpoint is being committed,
SIGTERM (preemption), then a checkpoint damaged on disk. The straight run goes alongside.
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from gru_tpu.metrics import read_metrics

ROOT = Path(__file__).parents[1]
DRIVER = str(ROOT / "tests" / "fault_driver.py")
FLAGS = ["--config", f"{ROOT / 'configs' / 'char_pystdlib.py'}:size=tiny",
         "--config.num_steps=30", "--config.checkpoint_every=10", "--config.eval_every=30",
         "--config.eval_steps=1", "--config.log_every=1", "--config.model.dropout=0.1",
         "--config.model.recurrent_dropout=0.1"]


def command(workdir: Path, corpus: Path, faults: str = ""):
  env = dict(os.environ, JAX_PLATFORMS="cpu", GRU_TPU_FAULTS=faults,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.pop("GRU_TPU_FAULT_PROCESS", None)
  return dict(args=[sys.executable, DRIVER, *FLAGS, "--workdir", str(workdir),
                    f"--config.data.source=files:{corpus}"], env=env, text=True)


def run(workdir: Path, corpus: Path, faults: str = "") -> subprocess.CompletedProcess:
  return subprocess.run(**command(workdir, corpus, faults), capture_output=True, timeout=600)


def steps(workdir: Path) -> list[str]:
  return sorted((p.name for p in (workdir / "checkpoints").iterdir()), key=lambda n: (len(n), n))


def saved_state(workdir: Path, step: int) -> dict:
  with ocp.StandardCheckpointer() as c:
    state = c.restore(workdir.absolute() / "checkpoints" / str(step) / "state")
  def bits(a):
    return jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a

  return {jax.tree_util.keystr(k): np.asarray(bits(a))
          for k, a in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_killed_preempted_and_damaged_run_ends_bit_identical_to_a_straight_run(tmp_path):
  rng = random.Random(0)
  words = "the quick brown fox jumps over a lazy dog and runs far into the woods".split()
  corpus = tmp_path / "corpus.txt"  # 6.6k train chars: an epoch is ~3 steps of 8 x 33
  corpus.write_text(" ".join(rng.choice(words) for _ in range(1500)))
  straight_dir, w = tmp_path / "straight", tmp_path / "killed"
  straight = subprocess.Popen(**command(straight_dir, corpus), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)

  # 1. SIGKILL with 13 steps dispatched (the step-10 save may still be in flight).
  r = run(w, corpus, "kill@13")
  assert r.returncode == -9, r.stderr[-2000:]

  # 2. SIGKILL while checkpoint 20 is committed: written to its temporary name, never renamed.
  r = run(w, corpus, "kill_in_save@20")
  assert r.returncode == -9, r.stderr[-2000:]
  assert (w / "checkpoints" / "20.orbax-checkpoint-tmp").is_dir()
  assert steps(w) == ["10", "20.orbax-checkpoint-tmp"]

  # 3. The cut-off checkpoint is skipped with a warning naming it; SIGTERM (a preemption
  #    notice) after 23 steps: the run saves the step it is on and exits 0.
  r = run(w, corpus, "term@23")
  assert r.returncode == 0, r.stderr[-3000:]
  assert ("checkpoint step 20 in " in r.stderr and "was cut off mid-write and is skipped; the "
          "latest complete checkpoint is step 10" in r.stderr)
  assert "resumed from step 10" in r.stderr
  assert "preemption notice (SIGTERM) at step 24: saving a checkpoint" in r.stderr
  assert steps(w) == ["10", "20", "24"]  # the partial one was cleaned up, 20 saved anew

  # 4. Checkpoint 24 damaged on disk afterwards (an array file cut short): skipped with a
  #    warning, moved to checkpoints_unreadable/, the run resumes from 20 and finishes.
  state_dir = w / "checkpoints" / "24" / "state"
  victim = max((p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:64])
  r = run(w, corpus)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "checkpoint step 24 in " in r.stderr and "is unreadable (truncated or corrupt" in r.stderr
  assert "resumed from step 20" in r.stderr
  assert (w / "checkpoints_unreadable" / "24" / "state").is_dir()
  assert steps(w) == ["10", "20", "30"]

  _, err = straight.communicate(timeout=600)
  assert straight.returncode == 0, err[-3000:]
  assert steps(straight_dir) == ["10", "20", "30"]
  a, b = saved_state(straight_dir, 30), saved_state(w, 30)
  assert a.keys() == b.keys() and any("opt_state" in k for k in a) and "['rng']" in a
  for k in a:  # params, optimizer moments and count, step, RNG: every bit
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Each step saw the same batch: every row, including those of steps run twice, matches.
  rows = {r["step"]: r for r in read_metrics(straight_dir) if r["split"] == "train"}
  assert sorted(rows) == list(range(1, 31))
  for r in read_metrics(w):
    if r["split"] == "train":
      assert r == rows[r["step"]], r
  evals = [[r for r in read_metrics(d) if r["split"] == "eval"] for d in (straight_dir, w)]
  assert evals[0] == evals[1] and len(evals[0]) == 1
