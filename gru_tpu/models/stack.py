"""What every recurrent stack shares: argument checks, directions, layers, dropout, remat, step.

A cell class (GRU, LSTM, MinGRU) supplies three pure functions of arrays:
  _layer(p, x_TxDxBxI, mask_TxB, carry_DxBxH, rmask_DxBxH) -> (y_TxDxBxH, carry)
  _cell_step(p, carry_DxBxH, x_BxI) -> (carry, y_BxH)            (D = 1)
  _zero_carry(D, B) -> carry pytree of (D, B, H) leaves
Everything here is time-major inside: the batch-major input is transposed once on entry and once
on exit, and a bidirectional layer runs both directions in one scan stacked on a D axis.
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from gru_tpu.kernels.gru import batch_axes

Carry = Any  # an array (GRU, MinGRU) or a tuple (h, c) (LSTM); leaves shaped (L·D, B, H)


def _callers_level() -> int:
  """The warnings stacklevel of the first frame outside gru_tpu.models, gru_tpu.convert and flax
  (NNX builds a module through its metaclass, subclasses add __init__ frames, converters build
  the model for the user): the user's call."""
  frame, level = sys._getframe(2), 2
  while frame is not None and frame.f_globals.get("__name__", "").startswith(
      ("gru_tpu.models", "gru_tpu.convert", "flax.")):
    frame, level = frame.f_back, level + 1
  return level


class RecurrentLayer(nnx.Module):
  """One layer's parameters, both directions stacked on a leading D axis.

  Gate blocks are concatenated along the last axis in PyTorch's order (GRU r|z|n, LSTM i|f|g|o),
  kernels are (in, out) so the hoisted projection is a single x @ w_i.
  """

  def __init__(self, in_features: int, hidden: int, gates: int, directions: int, recurrent: bool,
               param_dtype, rngs: nnx.Rngs):
    # PyTorch's init: U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias.
    bound = 1.0 / math.sqrt(hidden)
    init = lambda *shape: jax.random.uniform(rngs.params(), shape, param_dtype, -bound, bound)
    self.w_i = nnx.Param(init(directions, in_features, gates * hidden))
    self.b_i = nnx.Param(init(directions, gates * hidden))
    if recurrent:
      self.w_h = nnx.Param(init(directions, hidden, gates * hidden))
      self.b_h = nnx.Param(init(directions, gates * hidden))

  def arrays(self) -> dict[str, jax.Array]:
    return {k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Param)}


class RecurrentStack(nnx.Module):
  """Multi-layer, optionally bidirectional stack with torch.nn.RNN(batch_first=True) layouts."""

  num_gates: int = 0
  recurrent_weights: bool = True

  def __init__(self, in_features: int, hidden_features: int, *, num_layers: int = 1,
               bidirectional: bool = False, dropout: float = 0.0, recurrent_dropout: float = 0.0,
               unroll: int = 1, remat: bool = False, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    name = type(self).__name__
    for arg, value in (("in_features", in_features), ("hidden_features", hidden_features),
                       ("num_layers", num_layers), ("unroll", unroll)):
      if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
    for arg, value in (("bidirectional", bidirectional), ("remat", remat)):
      if not isinstance(value, (bool, np.bool_)):  # "no" or "False" from a config is truthy
        raise ValueError(f"{name}: {arg} must be True or False, got {value!r}")
    for arg, value in (("dropout", dropout), ("recurrent_dropout", recurrent_dropout)):
      if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"{name}: {arg} must be a number in [0, 1), got {value!r}")
    if dropout and num_layers == 1:
      warnings.warn(f"{name}: dropout={dropout} has no effect with num_layers=1: it acts between "
                    f"layers, as in torch.nn.GRU; use recurrent_dropout or more layers",
                    stacklevel=_callers_level())
    in_features, hidden_features, num_layers, unroll = map(
        int, (in_features, hidden_features, num_layers, unroll))  # numpy ints from configs
    self.in_features = in_features
    self.hidden_features = hidden_features
    self.num_layers = num_layers
    self.bidirectional = bool(bidirectional)
    self.num_directions = 2 if bidirectional else 1
    self.dropout = dropout
    self.recurrent_dropout = recurrent_dropout
    self.unroll = unroll
    self.remat = bool(remat)
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.deterministic = False  # flipped by model.eval() / model.train(), like nnx.Dropout
    self.layers = nnx.List([
        RecurrentLayer(in_features if l == 0 else hidden_features * self.num_directions,
                       hidden_features, self.num_gates, self.num_directions,
                       self.recurrent_weights, param_dtype, rngs)
        for l in range(num_layers)])
    self.rngs = nnx.data(None)
    if dropout or recurrent_dropout:
      try:
        self.rngs = rngs["dropout"].fork()
      except KeyError:  # no dropout (or default) stream: rngs= at call time, checked there
        pass

  # -- cell hooks -----------------------------------------------------------------------------

  def _layer(self, p, x_TxDxBxI, mask_TxB, carry, rmask_DxBxH):
    raise NotImplementedError

  def _cell_step(self, p, carry, x_BxI):
    raise NotImplementedError

  def _zero_carry(self, directions: int, batch: int) -> Carry:
    return jnp.zeros((directions, batch, self.hidden_features), jnp.float32)

  # -- helpers shared by the cells ------------------------------------------------------------

  def _compute_dtype(self, x: jax.Array):
    return self.dtype if self.dtype is not None else jnp.promote_types(x.dtype, self.param_dtype)

  def _project(self, p, x_TxDxBxI: jax.Array) -> jax.Array:
    """The hoisted input projection: every timestep of a layer in one matmul, f32 out."""
    cdt = self._compute_dtype(x_TxDxBxI)
    gi = direction_dot(x_TxDxBxI.astype(cdt), p["w_i"].astype(cdt))
    return gi + p["b_i"].astype(jnp.float32)[None, :, None, :]

  # -- public API -----------------------------------------------------------------------------

  def __call__(self, x_BxTxI: jax.Array, seq_lengths: jax.Array | None = None,
               initial_carry: Carry | None = None, *, deterministic: bool | None = None,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, Carry]:
    """Runs the stack. Returns y (B, T, D·H) and the final carry, leaves (num_layers·D, B, H).

    seq_lengths (B,) marks right padding: the carry freezes after each sequence's end, y is zero
    there, and the reverse direction starts at each sequence's own last valid step.
    """
    try:
      x_BxTxI = jnp.asarray(x_BxTxI)
    except TypeError:  # strings or objects (values read from a file): JAX named no argument
      raise ValueError(f"{type(self).__name__}: x_BxTxI must be a numeric array of shape (B, T, "
                       f"{self.in_features}), got {np.asarray(x_BxTxI).dtype} values") from None
    B, T = self._check_input(x_BxTxI)
    seq_lengths = self._check_lengths(seq_lengths, B, T)
    D = self.num_directions
    carry0 = self._check_carry(initial_carry, B)
    deterministic = self.deterministic if deterministic is None else deterministic
    train_noise = not deterministic and (self.dropout or self.recurrent_dropout)
    stream = (rngs if rngs is not None else self.rngs) if train_noise else None
    if train_noise and stream is None:
      raise ValueError(f"{type(self).__name__}: dropout is on but no rngs were given; pass "
                       "rngs=nnx.Rngs(dropout=...) to the constructor or the call, or use .eval()")
    if isinstance(stream, nnx.Rngs):
      try:
        stream = stream["dropout"]  # or its "default" stream
      except (KeyError, AttributeError):
        raise ValueError(f"{type(self).__name__}: the rngs given have no 'dropout' (or 'default')"
                         " stream for dropout; pass rngs=nnx.Rngs(dropout=...)") from None
    elif stream is not None and not isinstance(stream, nnx.RngStream):
      raise ValueError(f"{type(self).__name__}: rngs must be an nnx.Rngs (e.g. "
                       f"nnx.Rngs(dropout=key)), got {type(stream).__name__}")

    mask_TxB = None if seq_lengths is None else jnp.arange(T)[:, None] < seq_lengths[None, :]
    x_TxBxI = jnp.swapaxes(x_BxTxI, 0, 1)
    if mask_TxB is not None:
      # Padding may hold anything (NaN from a collate): x enters dW_i = xᵀ·dgi and the padded
      # steps' gates, where 0 · NaN = NaN would poison every gradient. The masked steps' values
      # never reach y or h_n, so zeros change nothing else.
      x_TxBxI = jnp.where(mask_TxB[..., None], x_TxBxI, jnp.zeros((), x_TxBxI.dtype))
    finals = []
    for l, layer in enumerate(self.layers):
      if l > 0 and self.dropout and not deterministic:
        keep = 1.0 - self.dropout
        x_TxBxI = jnp.where(jax.random.bernoulli(stream(), keep, x_TxBxI.shape),
                            x_TxBxI / keep, 0).astype(x_TxBxI.dtype)
      rmask = None
      if self.recurrent_dropout and not deterministic:
        keep = 1.0 - self.recurrent_dropout
        # Variational (Gal & Ghahramani): one mask per sequence, drawn outside the scan.
        rmask = jax.random.bernoulli(stream(), keep, (D, B, self.hidden_features)) / keep
      x_TxDxBxI = (x_TxBxI[:, None] if D == 1 else
                   jnp.stack([x_TxBxI, reverse_padded(x_TxBxI, seq_lengths)], axis=1))
      carry_l = jax.tree.map(lambda c: c[l * D:(l + 1) * D], carry0)
      y_TxDxBxH, carry_l = self._run_layer(layer.arrays(), x_TxDxBxI, mask_TxB, carry_l, rmask)
      if D == 2:
        y_TxDxBxH = jnp.stack([y_TxDxBxH[:, 0], reverse_padded(y_TxDxBxH[:, 1], seq_lengths)], 1)
      x_TxBxI = jnp.swapaxes(y_TxDxBxH, 1, 2).reshape(T, B, D * self.hidden_features)
      finals.append(carry_l)
    carry_n = jax.tree.map(lambda *cs: jnp.concatenate(cs, axis=0), *finals)
    return jnp.swapaxes(x_TxBxI, 0, 1), carry_n

  def _run_layer(self, p, x_TxDxBxI, mask_TxB, carry, rmask):
    p, x_TxDxBxI, mask_TxB, carry, rmask = _split_batch(p, x_TxDxBxI, mask_TxB, carry, rmask)
    if not self.remat:
      return self._layer(p, x_TxDxBxI, mask_TxB, carry, rmask)
    # Remat: save only the carry at chunk boundaries (and the layer input); each chunk's
    # projection and recurrence are recomputed in the backward pass. Chunks of ~sqrt(T) steps
    # make both the saved boundaries and the recomputed chunk O(sqrt(T)).
    T = x_TxDxBxI.shape[0]
    K = max(1, round(math.sqrt(T)))
    n = -(-T // K)
    if n * K != T or mask_TxB is not None:
      valid = jnp.arange(n * K) < T
      mask_TxB = valid[:, None] & (jnp.ones((1, x_TxDxBxI.shape[2]), bool) if mask_TxB is None
                                   else jnp.pad(mask_TxB, ((0, n * K - T), (0, 0))))
      x_TxDxBxI = jnp.pad(x_TxDxBxI, ((0, n * K - T),) + ((0, 0),) * 3)
    xs = x_TxDxBxI.reshape(n, K, *x_TxDxBxI.shape[1:])
    ms = None if mask_TxB is None else mask_TxB.reshape(n, K, -1)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk(c, inp):
      y, c = self._layer(p, inp[0], inp[1], c, rmask)
      return c, y

    carry, ys = jax.lax.scan(chunk, carry, (xs, ms))
    return ys.reshape(n * K, *ys.shape[2:])[:T], carry

  def initial_carry(self, batch_size: int) -> Carry:
    """Zeros in the layout the call's initial_carry (and, unidirectional, `step`) takes: leaves
    (num_layers·D, B, H)."""
    if (not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool)
        or batch_size < 0):
      raise ValueError(f"{type(self).__name__}.initial_carry: batch_size must be an int >= 0, "
                       f"got {batch_size!r}")
    return self._zero_carry(self.num_layers * self.num_directions, int(batch_size))

  def step(self, carry: Carry, x_BxI: jax.Array) -> tuple[Carry, jax.Array]:
    """One timestep through all layers (unidirectional, deterministic): for decoding."""
    if self.bidirectional:
      raise ValueError(f"{type(self).__name__}.step: a bidirectional stack cannot run one step "
                       "at a time (the reverse direction needs the whole sequence)")
    x_BxI = jnp.asarray(x_BxI)
    if x_BxI.ndim != 2 or x_BxI.shape[-1] != self.in_features:
      raise ValueError(f"{type(self).__name__}.step: x_BxI must have shape (batch, "
                       f"{self.in_features}), got {x_BxI.shape}")
    _check_real(x_BxI, f"{type(self).__name__}.step: x_BxI")
    self._check_carry_shape(carry, (self.num_layers, x_BxI.shape[0], self.hidden_features),
                            "carry")
    carry = self._real_carry(carry, "carry")
    outs = []
    for l, layer in enumerate(self.layers):
      c_l = jax.tree.map(lambda c: c[l:l + 1], carry)
      c_l, x_BxI = self._cell_step(layer.arrays(), c_l, x_BxI)
      outs.append(c_l)
    return jax.tree.map(lambda *cs: jnp.concatenate(cs, axis=0), *outs), x_BxI

  # -- argument checks ------------------------------------------------------------------------

  def _check_input(self, x):
    name = type(self).__name__
    if x.ndim != 3:
      raise ValueError(f"{name}: x_BxTxI must be rank 3 (batch, time, {self.in_features}), "
                       f"got shape {x.shape}")
    if x.shape[-1] != self.in_features:
      raise ValueError(f"{name}: x_BxTxI has {x.shape[-1]} features but the model was built with "
                       f"in_features={self.in_features}; expected shape (batch, time, "
                       f"{self.in_features}), got {x.shape}")
    if x.shape[1] == 0:
      raise ValueError(f"{name}: x_BxTxI has no timesteps (shape {x.shape})")
    _check_real(x, f"{name}: x_BxTxI")
    return x.shape[0], x.shape[1]

  def _check_lengths(self, seq_lengths, B, T):
    if seq_lengths is None:
      return None
    name = type(self).__name__
    # Range-checked on the host, in numpy, as given: jnp.asarray wraps int64 beyond int32 (x64
    # off), and a jnp.min of a concrete array closed over by a jit is staged and unreadable.
    # Tracers, and global arrays other processes hold parts of, are not checked here; a list or
    # tuple passed through jit or vmap holds one tracer per sequence, so every leaf is looked at.
    on_host = all(not isinstance(v, jax.core.Tracer) and getattr(v, "is_fully_addressable", True)
                  for v in jax.tree.leaves(seq_lengths))
    values = np.asarray(seq_lengths) if on_host else None
    # Strings or None (lengths read from a file) would fail in jnp.asarray, naming no argument.
    got = values if values is not None else jnp.asarray(seq_lengths)
    if got.shape != (B,) or not np.issubdtype(got.dtype, np.integer):
      raise ValueError(f"{name}: seq_lengths must be an int array of shape ({B},) (one length per "
                       f"sequence), got {got.dtype} {got.shape}")
    seq_lengths = jnp.asarray(seq_lengths)
    if values is not None and B:
      lo, hi = int(values.min()), int(values.max())
      if lo < 0 or hi > T:
        raise ValueError(f"{name}: seq_lengths must lie in [0, {T}] (T = x_BxTxI.shape[1]), got "
                         f"values in [{lo}, {hi}]")
    return seq_lengths

  def _check_carry(self, initial_carry, B):
    LD = self.num_layers * self.num_directions
    if initial_carry is None:
      return self._zero_carry(LD, B)
    self._check_carry_shape(initial_carry, (LD, B, self.hidden_features), "initial_carry")
    return self._real_carry(initial_carry, "initial_carry")

  def _real_carry(self, carry, arg):
    """The carry as float32; a complex one is refused (the cast would drop its imaginary part)."""
    for c in jax.tree.leaves(carry):
      if not jnp.issubdtype(jnp.result_type(c), jnp.floating) and not jnp.issubdtype(
          jnp.result_type(c), jnp.integer):
        raise ValueError(f"{type(self).__name__}: {arg} must be real (float), got "
                         f"{jnp.result_type(c)}")
    return jax.tree.map(lambda c: jnp.asarray(c, jnp.float32), carry)

  def _check_carry_shape(self, carry, shape, arg):
    want = jax.tree.map(lambda c: shape, self._zero_carry(1, 1))
    got = jax.tree.map(lambda c: tuple(jnp.shape(c)), carry)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
      raise ValueError(f"{type(self).__name__}: {arg} must be {want} (num_layers·directions, "
                       f"batch, hidden), got {got}")


def _check_real(x: jax.Array, what: str) -> None:
  """The projection's f32 accumulation would drop a complex input's imaginary part silently
  (and return a complex y of the real part's function)."""
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise ValueError(f"{what} must be real (float, int or bool), got {x.dtype}")


def _split_batch(p, x_TxDxBxI, mask_TxB, carry, rmask):
  """Under a context mesh (the engine traces its steps in one), a layer runs on batch rows split
  over every mesh axis that divides the batch, with whole weights: the Pallas kernel's layout.

  Left to XLA, a 'model'-split input kernel (tensor parallelism) split the scan's gates across
  devices, and every time step all-gathered h, exchanged gate slices and (backwards)
  all-reduced: collectives on the recurrence's serial path, T times per layer and direction.
  """
  mesh = jax.sharding.get_abstract_mesh()
  # With one axis of size > 1 the batch split is already the layout (the engine gathers fsdp's
  # weights), and the constraints would only cost copies (+1.4 % HBM traffic in a dp scan step).
  if (mesh.empty or mesh.manual_axes or any(t != AxisType.Auto for t in mesh.axis_types)
      or sum(n > 1 for n in mesh.shape.values()) < 2):
    return p, x_TxDxBxI, mask_TxB, carry, rmask
  axes = batch_axes(mesh, x_TxDxBxI.shape[2])
  if not axes:
    return p, x_TxDxBxI, mask_TxB, carry, rmask
  rows = lambda a, axis: jax.lax.with_sharding_constraint(
      a, P(*(axes if i == axis else None for i in range(a.ndim))))
  return (jax.tree.map(lambda w: jax.lax.with_sharding_constraint(w, P()), p), rows(x_TxDxBxI, 2),
          None if mask_TxB is None else rows(mask_TxB, 1),
          jax.tree.map(lambda c: rows(c, 1), carry), None if rmask is None else rows(rmask, 1))


def direction_dot(a_TxDxBxK: jax.Array, w_DxKxN: jax.Array, out_dtype=jnp.float32,
                  flat: bool = False) -> jax.Array:
  """(T, D, B, K) @ (D, K, N) -> (T, D, B, N) as one plain matmul per direction.

  XLA:CPU lays out the equivalent d-batched einsum with a transposed output and relayout copies.
  T and B stay separate axes: merging T with a sharded B would make the SPMD partitioner gather
  the batch and project it whole on every device. flat (the GRU's CPU path) reshapes to a 2-D
  (T·B, K) matmul, as fast there; the GRU takes it only on a batch not split over devices.
  """
  T, D, B, K = a_TxDxBxK.shape
  if flat:
    outs = [jnp.dot(a_TxDxBxK[:, d].reshape(T * B, K), w_DxKxN[d],
                    preferred_element_type=out_dtype).reshape(T, 1, B, -1) for d in range(D)]
  else:
    outs = [jnp.einsum("tbk,kn->tbn", a_TxDxBxK[:, d], w_DxKxN[d],
                       preferred_element_type=out_dtype)[:, None] for d in range(D)]
  return outs[0] if D == 1 else jnp.concatenate(outs, axis=1)


def _reverse_index(T: int, seq_lengths: jax.Array) -> jax.Array:
  t_TxB = jnp.arange(T)[:, None]
  return jnp.where(t_TxB < seq_lengths[None, :], seq_lengths[None, :] - 1 - t_TxB, t_TxB)


@jax.custom_vjp
def _reverse_gather(x_TxB_, idx_TxB):
  return jnp.take_along_axis(x_TxB_, idx_TxB.reshape(idx_TxB.shape + (1,) * (x_TxB_.ndim - 2)), 0)


def _reverse_fwd(x, idx):
  return _reverse_gather(x, idx), idx


def _reverse_bwd(idx, g):
  # The per-sequence reversal is its own inverse: its transpose is itself (no scatter-add).
  return _reverse_gather(g, idx), None


_reverse_gather.defvjp(_reverse_fwd, _reverse_bwd)


def reverse_padded(x_TxB_: jax.Array, seq_lengths: jax.Array | None) -> jax.Array:
  """Reverses time within each sequence's valid prefix; padding stays where it is."""
  if seq_lengths is None:
    return x_TxB_[::-1]
  return _reverse_gather(x_TxB_, _reverse_index(x_TxB_.shape[0], seq_lengths))
