"""Notebook API: `m = gru_tpu.load(workdir)`, then `m.generate(...)` (text), `m.model`,
`m.config`, `m.metrics()` (a pandas DataFrame) and `m.plot_metrics()`; `gru-tpu sample`.

Loading rebuilds the model from the checkpoint's saved config and task metadata (tokenizer), so
the training data need not be present; parameters are restored onto this process's first device
whatever mesh or number of processes wrote them. Nothing is executed from the checkpoint: it is
arrays and JSON.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gru_tpu import train
from gru_tpu.checkpoint import Checkpointer
from gru_tpu.data import text
from gru_tpu.errors import CheckpointError, UserError
from gru_tpu.metrics import read_metrics
from gru_tpu.models import lm
from gru_tpu.tasks import sequence_lm


@dataclasses.dataclass
class _ModelOnly:
  """Stands in for a task when only the model is needed (no data loaded)."""
  build_model: Callable[[nnx.Rngs], nnx.Module]


class Loaded:
  """A trained model with its config, task metadata and metrics history; `load` returns the
  subclass for the checkpoint's task (TASKS)."""

  def __init__(self, workdir: Path, config, model, meta: dict, step: int):
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
             num_samples: int = 1, chunk: int = 64) -> Iterator[list[str]]:
    """Yields the next piece of text of every sample, `chunk` tokens at a time."""
    if length < 0:
      raise UserError(f"--length must be >= 0, got {length}")
    if top_k is not None and not 1 <= top_k <= self.tokenizer.vocab_size:
      raise UserError(f"top_k must be in [1, {self.tokenizer.vocab_size}], got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
      raise UserError(f"top_p must be in (0, 1], got {top_p}")
    ids = self.tokenizer.encode(prompt or "\n")
    ids = np.broadcast_to(ids, (num_samples, len(ids)))
    graphdef, state = nnx.split(self.model)
    carry, logits = lm.prime_jit(graphdef, state, jnp.asarray(ids))
    key = jax.random.key(seed)
    for start in range(0, length, chunk):
      n = min(chunk, length - start)
      carry, logits, toks = lm.advance_jit(graphdef, state, carry, logits, key, start, n,
                                     float(temperature), top_k, top_p)
      yield [self.tokenizer.decode(t) for t in np.asarray(toks)]

  def generate(self, prompt: str, length: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> str:
    """`length` new tokens after `prompt` (characters outside the vocabulary become <unk>)."""
    return "".join(piece[0] for piece in self.stream(prompt, length, temperature=temperature,
                                                     top_k=top_k, top_p=top_p, seed=seed))


class SyntheticModel(Loaded):
  """The engine's synthetic next-token model (tests, debugging): the model only."""

  @staticmethod
  def build(config, meta, rngs):
    return sequence_lm(meta["vocab_size"], config.model, rngs)


TASKS = {"text": TextModel, "synthetic": SyntheticModel}


def load(workdir: str | Path, step: int | None = None) -> Loaded:
  """The checkpoint at `step` (default: the latest complete one) as the task's Loaded class,
  on this process's first device."""
  workdir = Path(workdir)
  ckpt = Checkpointer(workdir, async_save=False, create=False)
  steps = ckpt.steps()
  if not steps:
    raise CheckpointError(f"{workdir} holds no checkpoint; train first (gru-tpu train --workdir "
                          f"{workdir} ...)")
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
  except CheckpointError as e:
    others = [s for s in steps if s != step]
    hint = f"; other checkpoints: steps {others} (load(..., step=N), --step N)" if others else ""
    raise CheckpointError(f"{e}{hint}", step=step) from None
  finally:
    ckpt.close()
  model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: builder.build_model(nnx.Rngs(0)))),
                    state["params"], state["rest"])
  return cls(workdir, config, model, meta["task"], step)


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
  try:
    m = load(a.workdir, a.step)
    if not isinstance(m, TextModel):
      raise UserError(f"{a.workdir} holds a {m.task!r} model; gru-tpu sample needs a text one")
    if isinstance(m.tokenizer, text.CharTokenizer):
      unknown = sorted({c for c in a.prompt if c not in m.tokenizer.index})
      if unknown:
        print(f"gru-tpu sample: prompt characters not in the vocabulary become <unk>: "
              f"{''.join(unknown)!r}", file=sys.stderr)
    pieces = m.stream(a.prompt, a.length, temperature=a.temperature, top_k=a.top_k,
                      top_p=a.top_p, seed=a.seed, num_samples=a.num_samples)
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
  return 0
