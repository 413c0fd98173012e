"""orbax checkpoints of the train state plus JSON metadata (config, data position, task info).

No pickle anywhere: arrays go through orbax's array handlers (tensorstore, zarr chunks), the
rest is JSON. Only finalised checkpoints count: orbax writes each step into
`STEP.orbax-checkpoint-tmp` and renames it when every file is on disk, so a save cut off
mid-write is never a step; opening a directory that holds one logs a warning naming it.

The metadata carries a checksum of every array (computed on device, so it works on any mesh
and any number of processes); a restore recomputes them, so a flipped byte in an array file is
an error (`CheckpointError`), not silently wrong weights.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import sys
from os import PathLike
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from gru_tpu.errors import CheckpointError, UserError

log = logging.getLogger("gru_tpu")
# orbax warns on every read-only manager (load, sample, forecast): the one line a CLI error
# should be would always come with it.
logging.getLogger("absl").addFilter(
    lambda record: not record.getMessage().startswith("Given directory is read only"))

# What every checkpoint's JSON metadata holds (train.py writes it; `checksums`, added by save,
# is optional: checkpoints from before it existed restore unverified).
META_KEYS = ("config", "data_step", "task")
# A step's directory: STEP, or STEP.orbax-checkpoint-tmp... while a local save is in flight.
_STEP_DIR = re.compile(r"^(\d+)(\.orbax-checkpoint-tmp.*)?$")


def _words_u32(a: jax.Array) -> jax.Array:
  """The array's bits as uint32 words (wider dtypes split, narrower ones widened)."""
  if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
    a = jax.random.key_data(a)
  if a.dtype == jnp.bool_:
    return a.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[a.dtype.itemsize]
  return jax.lax.bitcast_convert_type(a, unsigned).astype(jnp.uint32)


@jax.jit
def _checksums(tree):
  def one(a):
    w = _words_u32(a)
    i = jnp.arange(w.size, dtype=jnp.uint32).reshape(w.shape)
    # Odd weights: any single flipped bit changes the sum mod 2^32, and a value at the wrong
    # index almost always does.
    return jnp.sum(w * (2 * i + 1), dtype=jnp.uint32)
  return jax.tree.map(one, tree)


def checksums(state: Any) -> dict[str, int]:
  """{array path: uint32 checksum of its bits}; the same on any sharding or process count."""
  sums = _checksums(state)
  flat, _ = jax.tree_util.tree_flatten_with_path(sums)
  # Replicated scalars: every process holds the whole value.
  return {jax.tree_util.keystr(p, simple=True, separator="/"): int(x.addressable_data(0))
          for p, x in flat}


def _reason(e: BaseException) -> str:
  """The innermost cause's first line: tensorstore's outer messages are pages of spec."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  line = (str(e).strip().splitlines() or [""])[0]
  line = re.sub(r' in OCDBT database at local file "[^"]*"', "", line)
  return f"{type(e).__name__}: {line[:300]}"


def _quiet_failed_reads() -> None:
  """A failed restore leaves orbax's other array reads of it running; each fails in turn and,
  never awaited, prints a page-long traceback when collected, for the error already reported.
  From the first failed restore on, those are dropped (other unraisable errors still print)."""
  hook = sys.unraisablehook
  if getattr(hook, "drops_failed_reads", False):
    return

  def quiet(u):
    if getattr(u.object, "__name__", "") == "_read_array_index_and_device_put":
      return
    if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
      return  # one of those reads finishing after orbax closed its event loop
    hook(u)

  quiet.drops_failed_reads = True
  sys.unraisablehook = quiet
  # The same reads, collected by asyncio instead: "Task exception was never retrieved".
  logging.getLogger("asyncio").addFilter(
      lambda record: not record.getMessage().startswith("Task exception was never retrieved"))


def is_uri(path: str | PathLike) -> bool:
  """gs://bucket/... and the like, as opposed to a local path."""
  return "://" in str(path)


def workdir_path(workdir: str | PathLike) -> epath.Path:
  """A run directory as given: a gs:// URI, or a local path with `~` expanded (the shell does
  not expand it after --workdir=)."""
  return epath.Path(os.path.expanduser(os.fspath(workdir)))


def enclosing_run(workdir: epath.Path, *, under: str | None = None) -> epath.Path | None:
  """The run directory (config.json beside checkpoints/) that `workdir` lies inside, at any
  depth, or None; with `under`, only inside that subdirectory of it. Relative paths count
  (`--workdir .` inside RUN/checkpoints trained a second run there)."""
  path = workdir if is_uri(workdir) else epath.Path(os.path.abspath(workdir))
  child = path
  for run in path.parents:
    if not str(run).split("://", 1)[-1].strip("/"):  # past the bucket (gs://) or at /
      break
    if ((under is None or child.name == under) and (run / "config.json").is_file()
        and (run / "checkpoints").is_dir()):
      return run
    child = run
  return None


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ImportError:  # its parent package is missing
    return False


def _check_clients(workdir: epath.Path) -> None:
  """A gs:// workdir needs gcsfs (or TensorFlow, which epath then uses instead) for files and
  google-cloud-storage for orbax's step listing: one clear error up front, not a traceback."""
  if not str(workdir).startswith("gs://"):
    return
  missing = [name for name, ok in (
      ("gcsfs", _installed("gcsfs") or _installed("tensorflow")),
      ("google-cloud-storage", _installed("google.cloud.storage"))) if not ok]
  if missing:
    raise UserError(f"workdir {workdir} needs {' and '.join(missing)}: pip install "
                    f"'gru_tpu[gcs]' (the [tpu] extra includes it)")


def move(src: epath.Path, dest: epath.Path, remote: bool) -> None:
  """Moves a file or a folder (into dest's parent, created if missing)."""
  if not remote:
    dest.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dest)
    return
  if not src.is_dir():
    src.copy(dest)  # an object store needs no parent folder
    src.unlink()
    return
  # An object store has no directory to rename (gcsfs cannot rename into a prefix that holds no
  # object yet): copy every object, then delete the source.
  def copy(src: epath.Path, dest: epath.Path) -> None:
    for p in src.iterdir():  # iterdir keeps the gs:// scheme (fsspec's walk drops it)
      if p.is_dir():
        copy(p, dest / p.name)
      else:
        dest.mkdir(parents=True, exist_ok=True)  # a no-op on an object store
        p.copy(dest / p.name)
  copy(src, dest)
  src.rmtree()


class Checkpointer:

  def __init__(self, workdir: str | PathLike, *, keep: int | None = None,
               async_save: bool = True, create: bool = True):
    """create=False opens an existing directory read-only (for loading). `workdir` may be a
    gs:// URI (what every host of a pod sees); a local path is made absolute for orbax."""
    workdir = epath.Path(workdir)
    _check_clients(workdir)
    self.remote = is_uri(workdir)
    self.directory = (workdir if self.remote else workdir.absolute()) / "checkpoints"
    if create and self.directory.exists() and not self.directory.is_dir():  # not at the 1st save
      raise UserError(f"{self.directory} is a file, not a checkpoints directory; move it away "
                      f"or use another workdir. Nothing was changed.")
    found = {int(m.group(1)) for p in
             (self.directory.iterdir() if self.directory.is_dir() else ())
             if (m := _STEP_DIR.match(p.name))}
    self._saving: int | None = None
    self._cut_off_removed = not create
    # Not orbax's cleanup_tmp_directories: on GCS it removed every folder under checkpoints/
    # that lacks a commit_success.txt (a user's backup/, notes/), and it ran here, so a run
    # refused after this (an incompatible config) had already changed the workdir. The first
    # save removes cut-off steps instead (_remove_cut_off).
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=create,
            read_only=not create, save_interval_steps=1 if create else 0,
            cleanup_tmp_directories=False))
    latest = self.latest_step()
    self.partial_steps = sorted(found - set(self.manager.all_steps()))
    for step in self.partial_steps:
      # A reader (load) cannot tell a cut-off save from one a running job is still writing.
      log.warning("checkpoint step %d in %s %s and is skipped; the latest complete checkpoint "
                  "is %s", step, self.directory,
                  "was cut off mid-write" if create else
                  "is incomplete (cut off mid-write, or still being written)",
                  "none" if latest is None else f"step {latest}")

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def _remove_cut_off(self) -> None:
    """Removes what saves cut off mid-write left, and nothing else: STEP.orbax-checkpoint-tmp*,
    and on GCS a STEP folder orbax does not list (no commit_success.txt). Process 0
    only, before its first save: orbax's save creates the step on process 0 and syncs before
    the others write, as after its own cleanup."""
    self._cut_off_removed = True
    if jax.process_index() != 0:
      return
    complete = set(self.manager.all_steps())  # on GCS: those with their commit_success.txt
    for p in self.directory.iterdir() if self.directory.is_dir() else ():
      m = _STEP_DIR.match(p.name)
      if (m and m.group(1) == str(int(m.group(1))) and p.is_dir()
          and (m.group(2) or (self.remote and int(m.group(1)) not in complete))):
        p.rmtree()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts an async save (waits for the previous one first); errors surface in wait()."""
    meta = dict(meta, checksums=checksums(state))
    try:
      self.manager.wait_until_finished()  # the previous save's error, before a new one starts
      if not self._cut_off_removed:
        self._remove_cut_off()
    except Exception as e:
      raise self._save_error(e) from e
    self._saving = step
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)))
    except Exception as e:
      raise self._save_error(e) from e

  # Reads go through the item handlers, not manager.restore: that ends in a barrier across
  # processes, which a process whose read failed skips, so on a pod one host's bad read
  # (a transient storage error, a chunk only it reads) paired its next collective with the
  # others' barrier and crashed or hung them all. Callers agree on success, then verify().

  def restore_meta(self, step: int) -> dict:
    try:
      with contextlib.closing(ocp.JsonCheckpointHandler()) as h:
        meta = h.restore(self.directory / str(step) / "meta")
    except Exception as e:
      raise self._unreadable(step, _reason(e)) from e
    # Valid JSON of another shape (hand-edited, another program's) is as unusable as a cut-off
    # file: one CheckpointError, not a KeyError from whoever reads it first.
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
      raise self._unreadable(step, f"its meta/metadata lacks {', '.join(missing)}")
    return meta

  def read(self, step: int, abstract_state: Any) -> Any:
    """The state on abstract_state's shardings, as stored (not yet verified); this process's
    part only, with no collective: CheckpointError if its files cannot be read."""
    try:
      with contextlib.closing(ocp.StandardCheckpointHandler()) as h:
        return h.restore(self.directory / str(step) / "state",
                         args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:
      _quiet_failed_reads()
      raise self._unreadable(step, _reason(e)) from e

  def verify(self, step: int, state: Any, meta: dict) -> None:
    """CheckpointError unless the state's checksums are the saved ones. A collective (every
    process must call it), with the same outcome on every process."""
    if "checksums" in meta:
      got = checksums(state)
      bad = sorted(k for k, v in meta["checksums"].items() if got.get(k) != v)
      if bad or got.keys() != meta["checksums"].keys():
        raise self._unreadable(step, "checksum mismatch in " + (", ".join(bad[:3]) or
                                                               "the array names"))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state on abstract_state's shardings, meta); CheckpointError if unreadable or corrupt.
    One process (several: read, agree, then verify, as the engine does)."""
    meta = self.restore_meta(step)
    state = self.read(step, abstract_state)
    self.verify(step, state, meta)
    return state, meta

  def _unreadable(self, step: int, reason: str) -> CheckpointError:
    return CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable "
                           f"(truncated or corrupt files: {reason})", step=step)

  def _save_error(self, e: BaseException) -> CheckpointError:
    kept = [s for s in self.steps() if (self.directory / str(s)).is_dir()]
    return CheckpointError(
        f"saving checkpoint step {self._saving} in {self.directory} failed ({_reason(e)}); "
        f"training stopped. "
        f"Complete checkpoints are kept: {kept or 'none'}. Free disk space (or fix the path) "
        f"and run the same command again to resume.")

  def set_aside(self, step: int) -> epath.Path:
    """Moves checkpoints/STEP to checkpoints_unreadable/STEP: kept for inspection, not deleted."""
    from jax.experimental import multihost_utils
    dest = self.directory.parent / "checkpoints_unreadable" / str(step)
    while dest.exists():  # the workdir is shared: every process picks (and logs) the same name
      dest = dest.with_name(dest.name + "_")
    if jax.process_count() > 1:  # ... before process 0 creates it
      multihost_utils.sync_global_devices(f"gru_tpu set aside {step}: named")
    if jax.process_index() == 0:
      dest.parent.mkdir(exist_ok=True)
      move(self.directory / str(step), dest, self.remote)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"gru_tpu set aside {step}")
    self.manager.reload()
    return dest

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(e) from e

  def close(self) -> None:
    """Finishes in-flight saves; their errors were already raised by wait() or save()."""
    with contextlib.suppress(Exception):
      self.manager.close()
