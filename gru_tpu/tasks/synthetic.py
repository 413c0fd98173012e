"""A synthetic next-token task for exercising the engine: tokens follow
x_t = (x_{t-1} + x_{t-lag}) mod V, with a fraction of tokens replaced by noise.

Learnable by a small GRU, generated on the fly (no files), and a pure function of
(seed, split, step): every process can build exactly its own rows of any global batch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import optax
from flax import nnx

from gru_tpu.errors import UserError
from gru_tpu.models.lm import SequenceLM
from gru_tpu.tasks import sequence_lm

SPLITS = {"train": 0, "eval": 1}


def data_defaults():
  """config.data of the synthetic task."""
  import ml_collections
  return ml_collections.ConfigDict(dict(vocab_size=16, lag=1, noise=0.05))


class SyntheticTask:

  def __init__(self, config):
    self.config = config
    d = config.data
    # A ZeroDivisionError, or a numpy error at the first batch after the workdir was created;
    # lag 0 or noise outside [0, 1] trained on a degenerate sequence.
    for key, ok, want in (
        ("vocab_size", _int(d.vocab_size) and d.vocab_size >= 2, "an integer >= 2"),
        ("lag", _int(d.lag) and d.lag >= 1, "an integer >= 1"),
        ("noise", 0 <= d.noise <= 1, "a fraction in [0, 1]")):
      if not ok:
        raise UserError(f"config.data.{key}={getattr(d, key)!r}: expected {want}")
    self.vocab_size = d.vocab_size

  def build_model(self, rngs: nnx.Rngs) -> SequenceLM:
    return sequence_lm(self.vocab_size, self.config.model, rngs)

  def global_batch(self, split: str, step: int) -> np.ndarray:
    c = self.config
    rng = np.random.default_rng([c.seed, SPLITS[split], step])
    B, T, V, lag = c.batch_size, c.seq_len + 1, self.vocab_size, c.data.lag
    x = np.zeros((B, T + lag), np.int32)
    x[:, :lag] = rng.integers(0, V, (B, lag))
    noise = rng.random((B, T + lag)) < c.data.noise
    random_tokens = rng.integers(0, V, (B, T + lag))
    for t in range(lag, T + lag):
      x[:, t] = np.where(noise[:, t], random_tokens[:, t], (x[:, t - 1] + x[:, t - lag]) % V)
    return x[:, lag:]

  def batches(self, split: str, start_step: int, shard: int,
              num_shards: int) -> Iterator[dict[str, np.ndarray]]:
    rows = self.config.batch_size // num_shards
    step = start_step
    while True:
      tokens = self.global_batch(split, step)[shard * rows:(shard + 1) * rows]
      yield {"tokens": tokens}
      step += 1

  def loss_fn(self, model, batch, rng):
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1], rngs=nnx.Rngs(dropout=rng))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    accuracy = (logits.argmax(-1) == tokens[:, 1:]).mean()
    return loss, {"accuracy": accuracy}

  def metadata(self) -> dict:
    return {"task": "synthetic", "vocab_size": self.vocab_size}


def _int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def make_task(config) -> SyntheticTask:
  return SyntheticTask(config)


