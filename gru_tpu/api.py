"""Notebook API: `m = gru_tpu.load(workdir)`, then `m.generate(...)` (text) or
`m.forecast(...)` (forecast), `m.model`, `m.config`, `m.metrics()` (a pandas DataFrame) and
`m.plot_metrics()`; `gru-tpu sample` and `gru-tpu forecast`.

Loading rebuilds the model from the checkpoint's saved config and task metadata (tokenizer,
scalers), so the training data need not be present; parameters are restored onto this
process's first device whatever mesh or number of processes wrote them. Nothing is executed
from the checkpoint: it is arrays and JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from gru_tpu import train
from gru_tpu.checkpoint import Checkpointer, enclosing_run, workdir_path
from gru_tpu.data import text
from gru_tpu.data import timeseries as ts
from gru_tpu.errors import CheckpointError, UserError
from gru_tpu.metrics import read_metrics
from gru_tpu.models import lm
from gru_tpu.tasks import forecast, sequence_lm


@dataclasses.dataclass
class _ModelOnly:
  """Stands in for a task when only the model is needed (no data loaded)."""
  build_model: Callable[[nnx.Rngs], nnx.Module]


class Loaded:
  """A trained model with its config, task metadata and metrics history; `load` returns the
  subclass for the checkpoint's task (TASKS: TextModel, ForecastModel, SyntheticModel)."""

  def __init__(self, workdir: epath.Path, config, model, meta: dict, step: int):
    self.workdir, self.config, self.model, self.meta, self.step = (
        workdir, config, model, meta, step)
    self.model.eval()

  @staticmethod
  def build(config, meta: dict, rngs: nnx.Rngs) -> nnx.Module:
    raise NotImplementedError

  @property
  def task(self) -> str:
    return self.config.task

  def metrics(self):
    """metrics.jsonl as a pandas DataFrame (step, split, one column per metric).

    Steps run again after a resume appear once (the later row), sorted by split and step.
    """
    import pandas as pd

    df = pd.DataFrame(read_metrics(self.workdir))
    if df.empty:
      return df
    df = df.drop_duplicates(["split", "step"], keep="last")
    return df.sort_values(["split", "step"], kind="stable").reset_index(drop=True)

  def plot_metrics(self, *names: str, ax=None):
    """One line per split for each metric (default: loss) against step; returns the axes."""
    try:
      import matplotlib.pyplot as plt
    except ImportError:
      raise UserError("plot_metrics() needs matplotlib: pip install 'gru_tpu[notebook]'") from None
    df = self.metrics()
    names = names or ("loss",)
    missing = [n for n in names if n not in df.columns]
    if missing:
      raise UserError(f"no metric {', '.join(missing)} in {self.workdir / 'metrics.jsonl'}; "
                      f"it has {sorted(c for c in df.columns if c not in ('step', 'split'))}")
    if ax is None:
      _, ax = plt.subplots(figsize=(6, 3.5))
    for name in names:
      for split, rows in df.dropna(subset=[name]).groupby("split", sort=False):
        ax.plot(rows["step"], rows[name], label=f"{split} {name}",
                marker="o" if split != "train" else None)
    ax.set_xlabel("step")
    ax.set_title(f"{self.workdir.name} ({self.task})")
    ax.legend()
    return ax


def _check_seed(seed: int) -> None:
  """config.seed's range: JAX wraps seeds mod 2**32 (2**32 drew seed 0's samples) and one past
  int64 was an OverflowError traceback."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**31:
    raise UserError(f"seed must be an integer in [0, 2**31), got {seed!r}")


def _check_int(name: str, value: int, low: int) -> None:
  """A float or string count failed at the first piece (range(), `<`), past the CLI's prompt."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise UserError(f"{name} must be an integer >= {low}, got {value!r}")


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


class TextModel(Loaded):
  """A text model: `generate` and `stream`, with its tokenizer."""

  def __init__(self, *args):
    super().__init__(*args)
    self.tokenizer = text.tokenizer_from_json(self.meta["tokenizer"])

  @staticmethod
  def build(config, meta, rngs):
    return sequence_lm(text.tokenizer_from_json(meta["tokenizer"]).vocab_size, config.model, rngs)

  def stream(self, prompt: str, length: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             num_samples: int = 1, chunk: int = 64, _stacklevel: int = 2
             ) -> Iterator[list[str]]:
    """Yields the next piece of text of every sample, `chunk` tokens at a time.

    The arguments are checked here, not at the first piece: the CLI had already printed the
    prompt when a bad one raised."""
    _check_int("length", length, 0)
    if not _is_real(temperature) or not temperature >= 0:  # NaN too; a negative one would
      # sample the least likely tokens
      raise UserError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    _check_int("num_samples", num_samples, 1)
    _check_seed(seed)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or not 1 <= top_k <= self.tokenizer.vocab_size):
      raise UserError(f"top_k must be an integer in [1, {self.tokenizer.vocab_size}], got "
                      f"{top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
      raise UserError(f"top_p must be a number in (0, 1], got {top_p!r}")
    _check_int("chunk", chunk, 1)
    if not isinstance(prompt, str):
      raise UserError(f"prompt must be a str, got {type(prompt).__name__}")
    try:
      prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (e.g. from os.fsdecode): no tokenizer's
      raise UserError(f"prompt is not text at index {e.start} ({prompt[e.start]!r}: {e.reason});"
                      f" decode its bytes as UTF-8 first") from None
    if isinstance(self.tokenizer, text.CharTokenizer):
      # An empty prompt primes with "\n" (_pieces), which a corpus may lack too.
      unknown = sorted({c for c in prompt or "\n" if c not in self.tokenizer.index})
      if unknown:  # a notebook's prompt too, not only the CLI's
        warnings.warn(f"prompt characters not in the vocabulary become <unk>: "
                      f"{''.join(unknown)!r}", stacklevel=_stacklevel)
    return self._pieces(prompt, length, temperature, top_k, top_p, seed, num_samples, chunk)

  def _pieces(self, prompt, length, temperature, top_k, top_p, seed, num_samples, chunk):
    ids = self.tokenizer.encode(prompt or "\n")
    ids = np.broadcast_to(ids, (num_samples, len(ids)))
    graphdef, state = nnx.split(self.model)
    carry, logits = lm.prime_jit(graphdef, state, ids)
    key = jax.random.key(seed)
    decoders = [self.tokenizer.stream_decoder() for _ in range(num_samples)]
    for start in range(0, length, chunk):
      n = min(chunk, length - start)
      # A short last piece computes a few tokens more (bucket), dropped here: the carry after
      # them is never used, and each token's key depends on its position alone.
      carry, logits, toks = lm.advance_jit(graphdef, state, carry, logits, key, start,
                                           lm.bucket(n, chunk), float(temperature), top_k,
                                           top_p)
      # Stateful per sample: a byte model's character may span two chunks.
      yield [d(t, final=start + n == length) for d, t in zip(decoders, np.asarray(toks)[:, :n])]

  def generate(self, prompt: str, length: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> str:
    """`length` new tokens after `prompt` (characters outside the vocabulary become <unk>)."""
    return "".join(piece[0] for piece in self.stream(prompt, length, temperature=temperature,
                                                     top_k=top_k, top_p=top_p, seed=seed,
                                                     _stacklevel=3))


class ForecastModel(Loaded):
  """A forecaster: `forecast(history, horizon)` -> DataFrame in original units; `plot`."""

  @staticmethod
  def build(config, meta, rngs):
    return forecast.build_forecaster(config, meta, rngs)

  def history(self, data: Any = None):
    """A Panel from a DataFrame (the training CSV's layout), a pandas Series (index = time),
    a source string (csv:PATH, statsmodels:NAME) or None (the training source); a Panel as is."""
    import pandas as pd
    meta = self.meta
    if isinstance(data, ts.Panel):
      return data
    if data is None or isinstance(data, str):
      # The training layout is the checkpoint's: trained on a statsmodels source, the config
      # leaves the columns "" (the source's), which a CSV in that layout could not name.
      d = ml_collections.ConfigDict(self.config.data.to_dict())
      d.time_column, d.target = meta["time_column"], ",".join(meta["targets"])
      d.season_length = meta["season_length"]
      return forecast.load_panel(d, data, freq=meta["freq"])
    if isinstance(data, pd.Series):
      if len(meta["targets"]) != 1:
        raise UserError(f"this model forecasts {len(meta['targets'])} targets "
                        f"({', '.join(meta['targets'])}): pass a DataFrame with those columns")
      data = pd.DataFrame({meta["time_column"]: data.index, meta["targets"][0]: data.to_numpy()})
    if not isinstance(data, pd.DataFrame):
      raise UserError(f"history must be a pandas DataFrame or Series (got {type(data).__name__})")
    return ts.panel_from_frame(data, time_column=meta["time_column"], targets=meta["targets"],
                               id_column=meta["id_column"], known=meta["known"],
                               past=meta["past"], season_length=meta["season_length"],
                               name="history", freq=meta["freq"],
                               time_format=self.config.data.get("time_format", ""))

  def forecast(self, history: Any = None, horizon: int | None = None, *, num_samples: int = 200,
               seed: int = 0, calibrated: bool = True):
    """Forecasts `horizon` steps (default: the trained horizon) after each series' history, in
    original units: a DataFrame with [id column], time column, target, point, q<level>...
    The intervals carry the checkpoint's validation calibration (meta["interval_scale"]) unless
    calibrated=False."""
    _check_seed(seed)
    return forecast.forecast_frame(self.model, self.config, self.meta, self.history(history),
                                   self.config.data.horizon if horizon is None else horizon,
                                   num_samples=num_samples, seed=seed, calibrated=calibrated)

  def plot(self, history: Any, frame, path: str | Path, max_panels: int = 6):
    """History (its last few seasons), the point forecast and its quantile bands, saved to
    `path` (PNG, or the format its suffix names); returns the matplotlib Figure."""
    return plot_forecast(self.history(history), frame, path, tuple(self.config.model.quantiles),
                         max_panels)


class SyntheticModel(Loaded):
  """The engine's synthetic next-token model (tests, debugging): the model only."""

  @staticmethod
  def build(config, meta, rngs):
    return sequence_lm(meta["vocab_size"], config.model, rngs)


TASKS = {"text": TextModel, "forecast": ForecastModel, "synthetic": SyntheticModel}


def load(workdir: str | os.PathLike, step: int | None = None) -> Loaded:
  """The checkpoint at `step` (default: the latest complete one) as the task's Loaded class,
  on this process's first device. `workdir`: a local path or a gs:// URI.

  A run may still be training there and delete old checkpoints (keep_checkpoints) while one is
  read: the latest is then read again, and an explicit `step` that went away is an error."""
  workdir = workdir_path(workdir)
  if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer))):
    # "20" was "has no checkpoint at step 20; it has steps [20, ...]"
    raise UserError(f"step must be an integer (a checkpoint step), got {step!r}")
  step = None if step is None else int(step)
  attempts = 3
  for attempt in range(attempts):
    try:
      return _load(workdir, step)
    except _Removed as e:  # e.step None: the listing raced, so any step is worth a retry
      if attempt + 1 == attempts or (step is not None and e.step is not None):
        what = "the checkpoints" if e.step is None else f"checkpoint step {e.step}"
        now = f"; it now has steps {e.steps}" if e.steps else ""
        raise CheckpointError(f"{what} in {workdir} changed while being loaded, by a run still "
                              f"training there{now}; load again", step=e.step) from None


class _Removed(Exception):
  """The step being read (None: the step listing) vanished under a running job's cleanup."""

  def __init__(self, step: int | None, steps: list[int] | None = None):
    self.step, self.steps = step, steps


def _no_checkpoint(workdir: epath.Path) -> CheckpointError:
  # A path inside a run (its checkpoints/, a step, config.json) was told to train there.
  run = enclosing_run(workdir)
  if run is not None:
    return CheckpointError(f"{workdir} is inside the run directory {run}; give that: "
                           f"--workdir {run}")
  return CheckpointError(f"{workdir} holds no checkpoint; train first (gru-tpu train --workdir "
                         f"{workdir} ...)")


def _load(workdir: epath.Path, requested: int | None) -> Loaded:
  if not (workdir / "checkpoints").is_dir():
    raise _no_checkpoint(workdir)
  try:
    ckpt = Checkpointer(workdir, async_save=False, create=False)
  except FileNotFoundError:  # a step was deleted while orbax listed the steps
    raise _Removed(None) from None
  step = requested
  try:
    steps = ckpt.steps()
    if not steps:
      raise CheckpointError(f"{workdir} holds no checkpoint; train first (gru-tpu train "
                            f"--workdir {workdir} ...)")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise CheckpointError(f"{workdir} has no checkpoint at step {step}; it has steps {steps}",
                            step=step)
    try:
      meta = ckpt.restore_meta(step)
      config = ml_collections.ConfigDict(meta["config"])
      kind = meta["task"].get("task")
      if kind not in TASKS:
        raise UserError(f"{workdir} was trained on task {kind!r}; load() supports "
                        f"{', '.join(TASKS)} checkpoints")
      cls = TASKS[kind]
      builder = _ModelOnly(lambda rngs: cls.build(config, meta["task"], rngs))
      init = functools.partial(train.init_state, builder, train.make_optimizer(config),
                               config.seed)
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            jax.eval_shape(init))
      state, _ = ckpt.restore(step, target)
    except CheckpointError as e:  # the reads wrap every error of theirs in one
      # Files vanishing mid-read look like corruption: ask the directory, not the error. A
      # newer complete step means a run saved there (and deletes old steps) since the listing;
      # a cut-off save's leftover directory does not count.
      ckpt.manager.reload()
      if not (ckpt.directory / str(step)).exists() or (
          requested is None and max(ckpt.steps(), default=step) > step):
        raise _Removed(step, ckpt.steps()) from None
      others = [s for s in steps if s != step]
      hint = f"; other checkpoints: steps {others} (load(..., step=N), --step N)" if others else ""
      raise CheckpointError(f"{e}{hint}", step=step) from None
  finally:
    ckpt.close()
  model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: builder.build_model(nnx.Rngs(0)))),
                    state["params"], state["rest"])
  return cls(workdir, config, model, meta["task"], step)


def _image_format(path: str | Path) -> str:
  """The format a plot is saved in: the path's suffix (png without one); UserError for a suffix
  matplotlib cannot write."""
  from matplotlib.backend_bases import FigureCanvasBase
  fmt = workdir_path(path).suffix[1:].lower() or "png"
  formats = FigureCanvasBase.get_supported_filetypes()
  if fmt not in formats:
    raise UserError(f"{path}: cannot save a plot as .{fmt}; give a file name ending in one of "
                    f"{', '.join('.' + f for f in sorted(formats))} (e.g. forecast.png)")
  return fmt


def plot_forecast(panel: ts.Panel, frame, path: str | Path, levels: tuple,
                  max_panels: int = 6):
  """One axis per (series, target), at most max_panels: history, median, quantile bands; saved
  to path, and returned (a Figure a notebook displays)."""
  # A bare Figure needs no display and leaves pyplot alone: matplotlib.use("Agg") had switched
  # a notebook's backend, which also closed every figure open in it.
  from matplotlib.figure import Figure

  fmt = _image_format(path)  # before the file is opened (and emptied)

  keys = [(s, c, t) for s in panel.series for c, t in enumerate(panel.targets)][:max_panels]
  fig = Figure(figsize=(10, 3 * len(keys)))
  axes = fig.subplots(len(keys), 1, squeeze=False)
  pairs = [(levels[i], levels[-1 - i]) for i in range(len(levels) // 2)]
  for ax, (s, c, target) in zip(axes[:, 0], keys):
    f = frame[frame["target"] == target]
    if panel.id_column:
      f = f[f[panel.id_column].astype(str) == s.id]
    seen = np.flatnonzero(~np.isnan(s.y[:, c]))
    show = slice(max(0, seen[-1] + 1 - max(4 * len(f), 3 * panel.season_length, 20)),
                 seen[-1] + 1)
    ax.plot(s.time[show], s.y[show, c], color="k", lw=1, label="history")
    t = f[panel.time_column].to_numpy()
    for k, (lo, hi) in enumerate(pairs):
      if f"q{lo:g}" in f and f"q{hi:g}" in f:
        ax.fill_between(t, f[f"q{lo:g}"], f[f"q{hi:g}"], color="C0", alpha=0.15 + 0.15 * k,
                        lw=0, label=f"{lo:g}-{hi:g}")
    ax.plot(t, f["point"], color="C0", lw=1.5, label="forecast (median)")
    ax.set_title(f"{target}" + (f" - {s.id}" if panel.id_column else ""))
    ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  path = workdir_path(path)  # a local path or gs:// (through epath), like a workdir
  with path.open("wb") as f:
    fig.savefig(f, format=fmt, dpi=100)
  return fig


def main(argv: list[str]) -> int:
  """`gru-tpu sample`: stream text from a trained text model to stdout."""
  import argparse
  import sys

  p = argparse.ArgumentParser(prog="gru-tpu sample", description=main.__doc__)
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompt", default="")
  p.add_argument("--length", type=int, default=200)
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  p.add_argument("--top_k", type=int, default=None)
  p.add_argument("--top_p", type=float, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num_samples", type=int, default=1)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  a = p.parse_args(argv)
  # A prompt from a non-UTF-8 terminal holds surrogate escapes, which no encoder accepts.
  a.prompt = os.fsencode(a.prompt).decode("utf-8", errors="replace")
  try:
    m = load(a.workdir, a.step)
    if not isinstance(m, TextModel):
      raise UserError(f"{a.workdir} holds a {m.task!r} model; gru-tpu sample needs a text one")
    with warnings.catch_warnings(record=True) as caught:  # as one line of this command
      warnings.simplefilter("always")
      pieces = m.stream(a.prompt, a.length, temperature=a.temperature, top_k=a.top_k,
                        top_p=a.top_p, seed=a.seed, num_samples=a.num_samples)  # checks them
    for w in caught:
      print(f"gru-tpu sample: {w.message}", file=sys.stderr)
    if a.num_samples == 1:
      sys.stdout.write(a.prompt)
      for piece in pieces:
        sys.stdout.write(piece[0])
        sys.stdout.flush()
      sys.stdout.write("\n")
    else:
      samples = [a.prompt] * a.num_samples
      for piece in pieces:
        samples = [s + t for s, t in zip(samples, piece)]
      for i, s in enumerate(samples):
        sys.stdout.write(f"--- sample {i}\n{s}\n")
  except UserError as e:
    print(f"gru-tpu sample: {e}", file=sys.stderr)
    return 2
  return 0  # a reader gone (`| head`): cli.main's BrokenPipeError, a quiet exit 1


def forecast_main(argv: list[str]) -> int:
  """`gru-tpu forecast`: a forecast CSV (and PNG) from a trained forecast model."""
  import argparse
  import sys

  p = argparse.ArgumentParser(prog="gru-tpu forecast", description=forecast_main.__doc__)
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", default=None, help="history: csv:PATH or statsmodels:NAME in the "
                 "training layout (default: the training source)")
  p.add_argument("--horizon", type=int, default=None, help="steps (default: the trained one)")
  p.add_argument("--output", default="forecast.csv", help="CSV path")
  p.add_argument("--plot", default=None, help="PNG path (history, forecast, intervals)")
  p.add_argument("--num_samples", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  a = p.parse_args(argv)
  try:
    m = load(a.workdir, a.step)
    if not isinstance(m, ForecastModel):
      raise UserError(f"{a.workdir} holds a {m.meta['task']!r} model; gru-tpu forecast needs a "
                      f"forecast one")
    for path in filter(None, (a.output, a.plot)):  # before the forecast's work
      path = workdir_path(path)  # gs:// too: on a TPU VM the results go next to the workdir
      if path.is_dir():
        raise UserError(f"{path} is a directory; give a file name")
      if not str(path).startswith("gs://") and not path.absolute().parent.is_dir():
        raise UserError(f"{path}: the directory does not exist")  # gs:// has no directories
    if a.plot:  # matplotlib refused an unknown suffix only after the forecast and the CSV
      _image_format(a.plot)
    history = m.history(a.data)  # read once: for the forecast and the plot
    frame = m.forecast(history, a.horizon, num_samples=a.num_samples, seed=a.seed)
    with workdir_path(a.output).open("w") as f:
      frame.to_csv(f, index=False)
    if a.plot:
      m.plot(history, frame, a.plot)
  except UserError as e:
    print(f"gru-tpu forecast: {e}", file=sys.stderr)
    return 2
  print(f"wrote {a.output}" + (f" and {a.plot}" if a.plot else ""), file=sys.stderr)
  return 0
