"""Notebook API: `m = gru_tpu.load(workdir)`, then `m.generate(...)`, `m.model`, `m.config`.

Loading rebuilds the model from the checkpoint's saved config and task metadata (tokenizer), so
the training data need not be present; parameters are restored onto this process's first device
whatever mesh wrote them.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gru_tpu import train
from gru_tpu.checkpoint import Checkpointer
from gru_tpu.data import text
from gru_tpu.errors import UserError
from gru_tpu.metrics import read_metrics
from gru_tpu.models import lm
from gru_tpu.tasks import sequence_lm


@dataclasses.dataclass
class _ModelOnly:
  """Stands in for a task when only the model is needed (no data loaded)."""
  config: Any
  vocab_size: int

  def build_model(self, rngs):
    return sequence_lm(self.vocab_size, self.config.model, rngs)


class Loaded:
  """A trained model with its config, tokenizer and metrics history."""

  def __init__(self, workdir: Path, config, model, tokenizer, step: int):
    self.workdir, self.config, self.model, self.tokenizer, self.step = (
        workdir, config, model, tokenizer, step)
    self.model.eval()

  def metrics(self) -> list[dict]:
    return read_metrics(self.workdir)

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


def load(workdir: str | Path, step: int | None = None) -> Loaded:
  workdir = Path(workdir)
  ckpt = Checkpointer(workdir, async_save=False, create=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise UserError(f"{workdir} holds no checkpoint; train first (gru-tpu train --workdir "
                    f"{workdir} ...)")
  meta = ckpt.restore_meta(step)
  config = ml_collections.ConfigDict(meta["config"])
  if meta["task"].get("task") != "text":
    raise UserError(f"{workdir} was trained on task {meta['task'].get('task')!r}; load() "
                    f"supports text checkpoints")
  tokenizer = text.tokenizer_from_json(meta["task"]["tokenizer"])
  tx = train.make_optimizer(config)
  init = functools.partial(train.init_state, _ModelOnly(config, tokenizer.vocab_size), tx,
                           config.seed)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        jax.eval_shape(init))
  state, _ = ckpt.restore(step, target)
  ckpt.close()
  model = nnx.merge(nnx.graphdef(nnx.eval_shape(
      lambda: _ModelOnly(config, tokenizer.vocab_size).build_model(nnx.Rngs(0)))),
      state["params"], state["rest"])
  return Loaded(workdir, config, model, tokenizer, step)


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
