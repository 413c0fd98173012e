"""Token sequence model: embedding -> recurrent stack (GRU, LSTM or minGRU) -> logits head."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gru_tpu.models.gru import GRU
from gru_tpu.models.lstm import LSTM
from gru_tpu.models.mingru import MinGRU

CELLS = {"gru": GRU, "lstm": LSTM, "mingru": MinGRU}


def dense(layer: nnx.Linear, x: jax.Array) -> jax.Array:
  """layer(x) in f32: the matmul in the layer's compute dtype (and precision) accumulated in f32,
  its bias added in f32.

  nnx.Linear adds the bias in the compute dtype, so under bf16 the bias gradient, a sum over
  every row (B·T of them), is accumulated in bf16: for the head at B·T = 8192 it was 67 % off.
  The f32 result also keeps the cotangent f32, so the kernel's gradient (again a sum over B·T
  rows) never rests on how a backend accumulates a bf16-output dot: jaxlib 0.12's XLA:CPU did
  that one coarsely enough to put the head's kernel gradient 8 % off f32's.
  """
  kernel = layer.kernel[...]
  cdt = layer.dtype or jnp.result_type(x, kernel)
  y = jnp.dot(x.astype(cdt), kernel.astype(cdt), precision=layer.precision,
              preferred_element_type=jnp.float32)
  return y if layer.bias is None else y + layer.bias[...].astype(jnp.float32)


class SequenceLM(nnx.Module):
  """logits_BxTxV = head(norm(rnn(embed(tokens_BxT)))).

  tie_embeddings: the head is the embedding matrix (transposed), after a projection from hidden
  to embed_dim when they differ; layer_norm: a LayerNorm on the recurrent output; impl: the GRU's
  recurrence (models.gru.IMPLS; the other cells always scan).
  """

  def __init__(self, vocab_size: int, *, cell: str = "gru", embed_dim: int = 64,
               hidden: int = 128, num_layers: int = 1, dropout: float = 0.0,
               recurrent_dropout: float = 0.0, dtype=None, remat: bool = False, unroll: int = 1,
               tie_embeddings: bool = False, layer_norm: bool = False, impl: str = "auto",
               rngs: nnx.Rngs):
    if cell not in CELLS:
      raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
    if impl == "pallas" and cell != "gru":
      raise ValueError(f"impl='pallas' needs cell='gru' (there is no {cell} kernel); use 'auto'")
    # Untied: N(0, 1) like torch.nn.Embedding. Flax's 1/sqrt(embed_dim) default feeds the first
    # layer an ~11x weaker input at embed_dim 128 and measurably slows early training
    # (scripts/bench_text.py). Tied: the default, so the initial logits stay O(1).
    init = {} if tie_embeddings else {"embedding_init": nnx.initializers.normal(1.0)}
    self.embed = nnx.Embed(vocab_size, embed_dim, **init, rngs=rngs)
    self.rnn = CELLS[cell](embed_dim, hidden, num_layers=num_layers, dropout=dropout,
                           recurrent_dropout=recurrent_dropout, dtype=dtype, remat=remat,
                           unroll=unroll, rngs=rngs, **({"impl": impl} if cell == "gru" else {}))
    self.norm = nnx.LayerNorm(hidden, dtype=dtype, rngs=rngs) if layer_norm else None
    self.tied = tie_embeddings
    if tie_embeddings:
      self.proj = (nnx.Linear(hidden, embed_dim, use_bias=False, dtype=dtype, rngs=rngs)
                   if hidden != embed_dim else None)
      self.out_bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32))
    else:
      self.head = nnx.Linear(hidden, vocab_size, dtype=dtype, rngs=rngs)

  def logits(self, y_BxTxH: jax.Array) -> jax.Array:
    if self.norm is not None:
      y_BxTxH = self.norm(y_BxTxH)
    if not self.tied:
      return dense(self.head, y_BxTxH)
    if self.proj is not None:
      y_BxTxH = dense(self.proj, y_BxTxH)
    return self.embed.attend(y_BxTxH).astype(jnp.float32) + self.out_bias[...]

  def __call__(self, tokens_BxT: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    y_BxTxH, _ = self.rnn(self.embed(tokens_BxT), rngs=rngs)
    return self.logits(y_BxTxH)


def _filter_logits(logits_BxV: jax.Array, top_k: int | None, top_p: float | None) -> jax.Array:
  if top_k is not None:
    kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth, -jnp.inf, logits_BxV)
  if top_p is not None:
    order = jnp.argsort(-logits_BxV, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(logits_BxV, order, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    drop_sorted = jnp.cumsum(probs, axis=-1) - probs >= top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(order.shape[0])[:, None], order].set(
        drop_sorted)
    logits_BxV = jnp.where(drop, -jnp.inf, logits_BxV)
  return logits_BxV


def sample_tokens(model: SequenceLM, carry, last_logits_BxV: jax.Array, keys_N: jax.Array,
                  temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None):
  """One token per key, by lax.scan over the carried recurrent state (no prompt re-runs).

  temperature 0 is greedy. Returns (carry, logits after the last token, tokens_BxN).
  """
  def pick(logits, k):
    # Greedy is picked at run time: advance_jit traces temperature (one compile for any value).
    t = jnp.asarray(temperature, jnp.float32)
    # Shifted to a max of 0 first: a tiny t sent every logit to +inf, and the tie went to the
    # first token, not the most likely one.
    shifted = logits - logits.max(-1, keepdims=True)
    sampled = jax.random.categorical(k, _filter_logits(shifted / jnp.where(t > 0, t, 1.0), top_k,
                                                       top_p))
    return jnp.where(t > 0, sampled, jnp.argmax(logits, axis=-1))

  def body(state, k):
    carry, logits = state
    tok = pick(logits, k)
    carry, y_BxH = model.rnn.step(carry, model.embed(tok))
    return (carry, model.logits(y_BxH)), tok

  (carry, logits), toks = jax.lax.scan(body, (carry, last_logits_BxV), keys_N)
  return carry, logits, toks.T


def prime(model: SequenceLM, prompt_BxP: jax.Array):
  """Runs the prompt once through the scanned stack: (carry, logits at its last position)."""
  y_BxPxH, carry = model.rnn(model.embed(prompt_BxP))
  return carry, model.logits(y_BxPxH[:, -1])


# Prompts run through the stack in pieces of this many tokens, the last one right-padded: one
# compile serves every prompt length (per prompt length, a notebook compiled anew for each new
# prompt, and kept every executable).
PROMPT_CHUNK = 64


@jax.jit
def _prime_piece(graphdef, state, carry, piece_BxK, n):
  """prime() from `carry` over the first n tokens of piece_BxK (the rest is padding)."""
  model = nnx.merge(graphdef, state)
  B = piece_BxK.shape[0]
  y_BxKxH, carry = model.rnn(model.embed(piece_BxK), jnp.full((B,), n), carry)
  return carry, model.logits(jax.lax.dynamic_index_in_dim(y_BxKxH, n - 1, 1, keepdims=False))


def prime_jit(graphdef, state, prompt_BxP):
  """prime() on a split model, jitted: the same compiled pieces for any prompt length P >= 1."""
  prompt_BxP = np.asarray(prompt_BxP)
  B, P = prompt_BxP.shape
  carry = nnx.merge(graphdef, state).rnn.initial_carry(B)
  for start in range(0, P, PROMPT_CHUNK):
    piece = prompt_BxP[:, start:start + PROMPT_CHUNK]
    n = piece.shape[1]
    piece = np.pad(piece, ((0, 0), (0, PROMPT_CHUNK - n)))
    carry, logits = _prime_piece(graphdef, state, carry, piece, n)
  return carry, logits


def bucket(n: int, chunk: int) -> int:
  """Tokens to compute for a piece of n <= chunk: chunk itself, or the next power of two, so
  that every length of text runs one of log2(chunk) + 1 compiled functions."""
  return chunk if n >= chunk else min(chunk, 1 << max(n - 1, 0).bit_length())


@functools.partial(jax.jit, static_argnums=(6, 8))
def advance_jit(graphdef, state, carry, logits, key, start, n, temperature, top_k, top_p):
  """Tokens start .. start + n - 1; token t's key depends on t alone, so the text does not
  depend on how generation is chunked. temperature and top_p are traced: changing them does
  not compile again (n and top_k are static: pass n through `bucket`)."""
  keys = jax.vmap(lambda t: jax.random.fold_in(key, t))(start + jnp.arange(n))
  return sample_tokens(nnx.merge(graphdef, state), carry, logits, keys, temperature, top_k,
                       top_p)
