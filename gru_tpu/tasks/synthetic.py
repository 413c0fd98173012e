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

from gru_tpu.models.lm import SequenceLM
from gru_tpu.tasks import sequence_lm

SPLITS = {"train": 0, "eval": 1}


class SyntheticTask:

  def __init__(self, config):
    self.config = config
    self.vocab_size = config.data.vocab_size

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


def make_task(config) -> SyntheticTask:
  return SyntheticTask(config)


