"""LSTM with PyTorch-exact gates (i, f, g, o; both bias vectors), on the GRU's interface.

  [i f g o] = x W_i + b_i + h W_h + b_h,  c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g),  h' = σ(o) ⊙ tanh(c')
The carry is the tuple (h, c); `h_n` is returned as (h_n, c_n) like torch.nn.LSTM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gru_tpu.models.gru import _recurrent_dot, sigmoid
from gru_tpu.models.stack import RecurrentStack


def _lstm_cell(gi_DxBx4H, h, c, w_h, b_h, rmask):
  H = h.shape[-1]
  hm = h if rmask is None else h * rmask
  g = gi_DxBx4H + _recurrent_dot(hm, w_h) + b_h[:, None, :]
  i, f, o = sigmoid(g[..., :H]), sigmoid(g[..., H:2 * H]), sigmoid(g[..., 3 * H:])
  c_new = f * c + i * jnp.tanh(g[..., 2 * H:3 * H])
  return o * jnp.tanh(c_new), c_new


class LSTM(RecurrentStack):
  """Multi-layer (bi)directional LSTM: `y, (h_n, c_n) = lstm(x_BxTxI, seq_lengths, carry0)`."""

  num_gates = 4

  def _zero_carry(self, directions, batch):
    z = jnp.zeros((directions, batch, self.hidden_features), jnp.float32)
    return (z, z)

  def _layer(self, p, x_TxDxBxI, mask_TxB, carry, rmask):
    cdt = self._compute_dtype(x_TxDxBxI)
    w_h, b_h = p["w_h"].astype(cdt), p["b_h"].astype(jnp.float32)

    def body(hc, inp):
      gi, m_B = inp
      h, c = _lstm_cell(gi, *hc, w_h, b_h, rmask)
      y = h
      if m_B is not None:
        keep = m_B[None, :, None]
        h, c = jnp.where(keep, h, hc[0]), jnp.where(keep, c, hc[1])
        y = jnp.where(keep, h, 0.0)
      return (h, c), y

    carry, y = jax.lax.scan(body, carry, (self._project(p, x_TxDxBxI), mask_TxB),
                            unroll=self.unroll)
    return y.astype(cdt), carry

  def _cell_step(self, p, carry, x_BxI):
    cdt = self._compute_dtype(x_BxI)
    gi = self._project(p, x_BxI[None, None])[0]
    h, c = _lstm_cell(gi, *carry, p["w_h"].astype(cdt), p["b_h"].astype(jnp.float32), None)
    return (h, c), h[0].astype(cdt)
