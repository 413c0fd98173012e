"""minGRU (Feng et al. 2024, "Were RNNs All We Needed?"), parallel in time.

  z_t = σ(W_z x_t + b_z),  h̃_t = W_h x_t + b_h,  h_t = (1 - z_t) ⊙ h_{t-1} + z_t ⊙ h̃_t
The gates see only the input, so h_t = a_t h_{t-1} + b_t is a linear recurrence and the whole
sequence is one `jax.lax.associative_scan` (O(log T) depth) after a single projection.
Parameters per layer: w_i (D, I, 2H), b_i (D, 2H), blocks z|h̃; no recurrent weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gru_tpu.models.gru import sigmoid
from gru_tpu.models.stack import RecurrentStack


def _coefficients(gi_Dx_x2H):
  H = gi_Dx_x2H.shape[-1] // 2
  z = sigmoid(gi_Dx_x2H[..., :H])
  return 1.0 - z, z * gi_Dx_x2H[..., H:]


def _combine(earlier, later):
  a1, b1 = earlier
  a2, b2 = later
  return a1 * a2, a2 * b1 + b2


class MinGRU(RecurrentStack):
  """Multi-layer (bi)directional minGRU with the GRU's call signature and layouts."""

  num_gates = 2
  recurrent_weights = False

  def __init__(self, in_features: int, hidden_features: int, *, num_layers: int = 1,
               bidirectional: bool = False, dropout: float = 0.0, recurrent_dropout: float = 0.0,
               unroll: int = 1, remat: bool = False, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if recurrent_dropout:
      raise ValueError("MinGRU: recurrent_dropout must be 0 (minGRU has no recurrent weights to "
                       "drop); use dropout between layers instead")
    super().__init__(in_features, hidden_features, num_layers=num_layers,
                     bidirectional=bidirectional, dropout=dropout, unroll=unroll, remat=remat,
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def _layer(self, p, x_TxDxBxI, mask_TxB, h0_DxBxH, rmask):
    a, b = _coefficients(self._project(p, x_TxDxBxI))
    if mask_TxB is not None:  # past a sequence's end: h_t = h_{t-1}
      keep = mask_TxB[:, None, :, None]
      a, b = jnp.where(keep, a, 1.0), jnp.where(keep, b, 0.0)
    b = b.at[0].add(a[0] * h0_DxBxH)  # fold the initial state into the first step
    _, h_TxDxBxH = jax.lax.associative_scan(_combine, (a, b), axis=0)
    y = h_TxDxBxH if mask_TxB is None else jnp.where(keep, h_TxDxBxH, 0.0)
    return y.astype(self._compute_dtype(x_TxDxBxI)), h_TxDxBxH[-1]

  def _cell_step(self, p, h_1xBxH, x_BxI):
    a, b = _coefficients(self._project(p, x_BxI[None, None])[0])
    h = a * h_1xBxH + b
    return h, h[0].astype(self._compute_dtype(x_BxI))
