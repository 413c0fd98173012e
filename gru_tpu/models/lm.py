"""Token sequence model: embedding -> recurrent stack (GRU, LSTM or minGRU) -> logits head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gru_tpu.models.gru import GRU
from gru_tpu.models.lstm import LSTM
from gru_tpu.models.mingru import MinGRU

CELLS = {"gru": GRU, "lstm": LSTM, "mingru": MinGRU}


class SequenceLM(nnx.Module):
  """logits_BxTxV = head(rnn(embed(tokens_BxT)))."""

  def __init__(self, vocab_size: int, *, cell: str = "gru", embed_dim: int = 64,
               hidden: int = 128, num_layers: int = 1, dropout: float = 0.0,
               recurrent_dropout: float = 0.0, dtype=None, remat: bool = False, unroll: int = 1,
               rngs: nnx.Rngs):
    if cell not in CELLS:
      raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
    self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
    self.rnn = CELLS[cell](embed_dim, hidden, num_layers=num_layers, dropout=dropout,
                           recurrent_dropout=recurrent_dropout, dtype=dtype, remat=remat,
                           unroll=unroll, rngs=rngs)
    self.head = nnx.Linear(hidden, vocab_size, dtype=dtype, rngs=rngs)

  def __call__(self, tokens_BxT: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    y_BxTxH, _ = self.rnn(self.embed(tokens_BxT), rngs=rngs)
    return self.head(y_BxTxH).astype(jnp.float32)
