"""`gru-tpu train` with faults at exact points, for the resume, preemption and fault tests.

  python tests/fault_driver.py TRAIN_FLAGS...     (faults from the environment)

GRU_TPU_FAULTS is a comma-separated list of
  kill@N          SIGKILL this process as it fetches the training batch of step N + 1 (N steps
                  dispatched, the last ones possibly still running)
  term@N          SIGTERM itself at that point: a preemption notice
  kill_in_save@N  SIGKILL itself while checkpoint N is being committed: every file is written to
                  N.orbax-checkpoint-tmp, the rename that finalises it has not happened (on GCS:
                  every object is in N/, its commit_success.txt is not)
  enospc@N        the disk is full while checkpoint N is written (its JSON metadata write fails
                  with ENOSPC, after the arrays went to N.orbax-checkpoint-tmp)
  unreadable@N    reading checkpoint N's arrays fails (a storage error, or a damaged chunk that
                  only this process reads)
GRU_TPU_FAULT_PROCESS=I limits them to process I of a multi-process run.

The signals are real and reach the real command (gru_tpu.cli.main); only their timing is pinned,
so each test kills at the same place every time.
"""

import errno
import os
import signal
import sys


def _signal_self(sig: int) -> None:
  os.kill(os.getpid(), sig)


def install(faults: str, only_process: int | None) -> None:
  import jax
  from orbax.checkpoint._src.handlers import json_checkpoint_handler
  from orbax.checkpoint._src.path import atomicity

  from gru_tpu import checkpoint, train

  at_step, in_save, disk_full, unreadable = {}, {}, set(), set()
  for fault in filter(None, faults.split(",")):
    kind, n = fault.split("@")
    if kind in ("enospc", "unreadable"):
      (disk_full if kind == "enospc" else unreadable).add(int(n))
      continue
    {"kill": at_step, "term": at_step, "kill_in_save": in_save}[kind][int(n)] = {
        "kill": signal.SIGKILL, "term": signal.SIGTERM, "kill_in_save": signal.SIGKILL}[kind]

  def armed() -> bool:
    return only_process is None or jax.process_index() == only_process

  load_task = train.load_task

  def load_task_with_faults(config):
    task = load_task(config)
    batches = task.batches

    def batches_with_faults(split, start_step, *args):
      for k, batch in enumerate(batches(split, start_step, *args), start_step):
        if split == "train" and k in at_step and armed():
          _signal_self(at_step[k])
        yield batch

    task.batches = batches_with_faults
    return task

  train.load_task = load_task_with_faults

  def finalize_with_faults(finalize):
    async def finalize_or_die(self, *args, **kwargs):
      name = self.get_final().name
      if name.isdigit() and int(name) in in_save and armed():
        _signal_self(in_save[int(name)])
      return await finalize(self, *args, **kwargs)
    return finalize_or_die

  for kind in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
    kind.finalize = finalize_with_faults(kind.finalize)

  save_json = json_checkpoint_handler.JsonCheckpointHandler._save_fn

  async def save_json_with_faults(self, x, directory):
    if isinstance(x, dict) and x.get("data_step") in disk_full and armed():
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await save_json(self, x, directory)

  json_checkpoint_handler.JsonCheckpointHandler._save_fn = save_json_with_faults

  read = checkpoint.Checkpointer.read

  def read_with_faults(self, step, abstract_state):
    if step in unreadable and armed():
      raise self._unreadable(step, "ValueError: OUT_OF_RANGE: simulated unreadable chunk")
    return read(self, step, abstract_state)

  checkpoint.Checkpointer.read = read_with_faults


if __name__ == "__main__":
  only = os.environ.get("GRU_TPU_FAULT_PROCESS")
  install(os.environ.get("GRU_TPU_FAULTS", ""), None if only is None else int(only))
  from gru_tpu import cli

  sys.exit(cli.main(["train", *sys.argv[1:]]))
