"""Character/byte language modelling: corpus -> tokenizer -> windows -> SequenceLM -> next token.

Eval metrics: loss (nats per token), bits_per_char (bits per token: per byte for the byte
tokenizer), perplexity (exp of the mean eval loss).
"""

from __future__ import annotations

import functools
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gru_tpu.data import order, text
from gru_tpu.errors import UserError
from gru_tpu.models import lm
from gru_tpu.models.lm import SequenceLM
from gru_tpu.tasks import sequence_lm


class TextTask:

  def __init__(self, config):
    self.config = config
    d = config.data
    if d.get("sample_length", 0) < 0:  # trained on, logging an empty sample at every eval
      raise UserError(f"config.data.sample_length={d.sample_length}: expected an integer >= 0 "
                      f"(0: the prompt alone)")
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
    batches = ({"tokens": w} for w in windows)
    if split == "train":
      return batches
    # Eval reads the windows in order from the first; where eval_steps x batch_size passes
    # their number it wraps around, and the repeats weigh 0.
    return order.first_pass_weights(batches, (len(self.tokens(name)) - 1) // c.seq_len,
                                    c.batch_size, start_step, shard, num_shards)

  def loss_fn(self, model, batch, rng):
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1], rngs=nnx.Rngs(dropout=rng))
    loss_BxT = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    if "weight" not in batch:  # training
      loss = loss_BxT.mean()
      return loss, {"bits_per_char": loss / math.log(2)}
    w_B = batch["weight"]  # eval: 0 for a window already scored in this eval
    loss = (loss_BxT.mean(axis=1) * w_B).sum() / jnp.maximum(w_B.sum(), 1.0)
    return loss, {"bits_per_char": loss / math.log(2), "weight": w_B.sum()}

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

  @functools.cached_property
  def train_sha256(self) -> str:
    return hashlib.sha256(self.corpus.train).hexdigest()

  def metadata(self) -> dict:
    return {"task": "text", "source": self.corpus.name, "tokenizer": self.tokenizer.to_json(),
            "train_sha256": self.train_sha256}

  def resume_mismatch(self, saved: dict) -> str | None:
    """Why a checkpoint with this saved metadata cannot resume this run (None: it can)."""
    old = saved.get("tokenizer")
    if old is not None and old != self.tokenizer.to_json():
      n = text.tokenizer_from_json(old).vocab_size
      return (f"vocabulary differs from the one {self.corpus.name} gives now ({n} vs "
              f"{self.tokenizer.vocab_size} symbols: the text changed)")
    old = saved.get("train_sha256")  # None: saved before it was kept
    if old is not None and old != self.train_sha256:
      # Same characters, other text: every window moved, so this is no longer the first run.
      return (f"training text differs from the one {self.corpus.name} gives now (SHA-256 "
              f"{old[:12]}... vs {self.train_sha256[:12]}...)")
    return None


def data_defaults():
  return text.data_config()


def make_task(config) -> TextTask:
  return TextTask(config)
