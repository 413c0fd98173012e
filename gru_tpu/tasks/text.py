"""Character/byte language modelling: corpus -> tokenizer -> windows -> SequenceLM -> next token.

Eval metrics: loss (nats per token), bits_per_char (bits per token: per byte for the byte
tokenizer), perplexity (exp of the mean eval loss).
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
from flax import nnx

from gru_tpu.data import text
from gru_tpu.errors import UserError
from gru_tpu.models import lm
from gru_tpu.models.lm import SequenceLM
from gru_tpu.tasks import sequence_lm


class TextTask:

  def __init__(self, config):
    self.config = config
    d = config.data
    self.corpus = text.load_corpus(d.source, tfds_data_dir=d.get("tfds_data_dir", ""),
                                   tfds_manual_dir=d.get("tfds_manual_dir", ""),
                                   tfds_text_key=d.get("tfds_text_key", "text"))
    self.tokenizer = text.make_tokenizer(config.data.tokenizer, self.corpus)
    self._tokens: dict[str, np.ndarray] = {}
    for split in ("train", "validation"):  # before training, not at the first eval
      n = len(self.tokens(split))
      if n <= config.seq_len:
        raise UserError(text.no_window_message(config.seq_len, n,
                                               f"the {split} split of {self.corpus.name}"))

  def tokens(self, split: str) -> np.ndarray:
    if split not in self._tokens:
      self._tokens[split] = self.tokenizer.encode(
          self.corpus.split(split), f"the {split} split of {self.corpus.name}")
    return self._tokens[split]

  def build_model(self, rngs: nnx.Rngs) -> SequenceLM:
    return sequence_lm(self.tokenizer.vocab_size, self.config.model, rngs)

  def batches(self, split, start_step, shard, num_shards):
    c = self.config
    name = "train" if split == "train" else "validation"
    windows = text.window_batches(
        self.tokens(name), seq_len=c.seq_len, batch_size=c.batch_size, seed=c.seed,
        start_step=start_step, shard=shard, num_shards=num_shards,
        shuffle=split == "train", split=name)
    return ({"tokens": w} for w in windows)

  def loss_fn(self, model, batch, rng):
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1], rngs=nnx.Rngs(dropout=rng))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return loss, {"bits_per_char": loss / math.log(2)}

  def finalize_eval(self, metrics: dict) -> dict:
    return dict(metrics, perplexity=math.exp(min(metrics["loss"], 700.0)))

  def sample_text(self, model, step: int) -> str:
    """A short sample at each eval, for the log and TensorBoard."""
    d = self.config.data
    prompt = self.tokenizer.encode(d.sample_prompt or "\n")[None]
    graphdef, state = nnx.split(model)
    carry, logits = lm.prime_jit(graphdef, state, prompt)
    _, _, toks = lm.advance_jit(graphdef, state, carry, logits, jax.random.key(step), 0,
                                d.sample_length, 0.8, None, None)
    return d.sample_prompt + self.tokenizer.decode(np.asarray(toks)[0])

  def metadata(self) -> dict:
    return {"task": "text", "source": self.corpus.name, "tokenizer": self.tokenizer.to_json()}

  def resume_mismatch(self, saved: dict) -> str | None:
    """Why a checkpoint with this saved metadata cannot resume this run (None: it can)."""
    old = saved.get("tokenizer")
    if old is not None and old != self.tokenizer.to_json():
      n = text.tokenizer_from_json(old).vocab_size
      return (f"vocabulary differs from the one {self.corpus.name} gives now ({n} vs "
              f"{self.tokenizer.vocab_size} symbols: the text changed)")
    return None


def data_defaults():
  return text.data_config()


def make_task(config) -> TextTask:
  return TextTask(config)
