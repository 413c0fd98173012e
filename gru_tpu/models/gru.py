"""GRU with PyTorch-exact gates: hoisted input projection, one fused recurrent matmul per step.

  r = σ(W_ir x + b_ir + W_hr h + b_hr)
  z = σ(W_iz x + b_iz + W_hz h + b_hz)
  n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))        reset_after=True  (PyTorch, cuDNN, Keras v2)
  n = tanh(W_in x + b_in + (r ⊙ h) W_hn + b_hn)        reset_after=False (Cho et al. 2014)
  h' = (1 - z) ⊙ n + z ⊙ h

The reset_after=True recurrence has a hand-written VJP: the backward scan carries only dh and
emits the gate gradients; dW_h, db_h and the input-projection gradients are then single large
matmuls after the loop instead of per-step accumulations.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from gru_tpu.models.stack import RecurrentStack

f32 = jnp.float32


def sigmoid(x: jax.Array) -> jax.Array:
  # The tanh form vectorises on XLA:CPU (one polynomial, no divide) and is exact in f32.
  return 0.5 * jnp.tanh(0.5 * x) + 0.5


def _recurrent_dot(h_DxBxH: jax.Array, w_h_DxHxG: jax.Array) -> jax.Array:
  return jnp.einsum("dbh,dhg->dbg", h_DxBxH.astype(w_h_DxHxG.dtype), w_h_DxHxG,
                    preferred_element_type=f32)


def _gru_cell(gi_DxBx3H, h_DxBxH, w_h, b_h, rmask):
  """One reset_after=True step. Returns the new state and what the backward pass needs."""
  H = h_DxBxH.shape[-1]
  hm = h_DxBxH if rmask is None else h_DxBxH * rmask
  gh_DxBx3H = _recurrent_dot(hm, w_h) + b_h[:, None, :]
  r = sigmoid(gi_DxBx3H[..., :H] + gh_DxBx3H[..., :H])
  z = sigmoid(gi_DxBx3H[..., H:2 * H] + gh_DxBx3H[..., H:2 * H])
  ghn = gh_DxBx3H[..., 2 * H:]
  n = jnp.tanh(gi_DxBx3H[..., 2 * H:] + r * ghn)
  return n + z * (h_DxBxH - n), (r, z, n, ghn)


def _fwd_scan(gi_TxDxBx3H, w_h, b_h, h0_DxBxH, mask_TxB, rmask, unroll):
  def body(h, inp):
    gi, m_B = inp
    h_new, (r, z, n, ghn) = _gru_cell(gi, h, w_h, b_h, rmask)
    y = h_new
    if m_B is not None:
      keep = m_B[None, :, None]
      h_new = jnp.where(keep, h_new, h)
      y = jnp.where(keep, h_new, 0.0)
    return h_new, (y, r, z, n, ghn)

  return jax.lax.scan(body, h0_DxBxH, (gi_TxDxBx3H, mask_TxB), unroll=unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def gru_recurrence(gi_TxDxBx3H, w_h_DxHx3H, b_h_Dx3H, h0_DxBxH, mask_TxB, rmask_DxBxH, unroll):
  """y (T, D, B, H) f32 and h_T (D, B, H) from hoisted projections gi = x W_i + b_i."""
  h_T, (y, *_) = _fwd_scan(gi_TxDxBx3H, w_h_DxHx3H, b_h_Dx3H, h0_DxBxH, mask_TxB, rmask_DxBxH,
                           unroll)
  return y, h_T


def _gru_recurrence_fwd(gi, w_h, b_h, h0, mask, rmask, unroll):
  h_T, (y, r, z, n, ghn) = _fwd_scan(gi, w_h, b_h, h0, mask, rmask, unroll)
  return (y, h_T), (y, r, z, n, ghn, w_h, h0, mask, rmask)


def _gru_recurrence_bwd(unroll, res, cts):
  y, r, z, n, ghn, w_h, h0, mask, rmask = res
  dy_TxDxBxH, dh_T = cts
  H = h0.shape[-1]
  # h_{t-1}; where a sequence has ended y is 0 but so is every gate gradient, so this is exact.
  hprev_TxDxBxH = jnp.concatenate([h0[None], y[:-1]], axis=0)

  def body(dh, inp):
    dy, hp, r, z, n, ghn, m_B = inp
    d = dh + dy
    if m_B is not None:
      keep = m_B[None, :, None]
      d, passthrough = jnp.where(keep, d, 0.0), jnp.where(keep, 0.0, dh)
    dn_pre = d * (1.0 - z) * (1.0 - n * n)
    dz_pre = d * (hp - n) * z * (1.0 - z)
    dr_pre = dn_pre * ghn * r * (1.0 - r)
    dgi = jnp.concatenate([dr_pre, dz_pre, dn_pre], axis=-1)
    dgh = jnp.concatenate([dr_pre, dz_pre, dn_pre * r], axis=-1)
    dhm = jnp.einsum("dbg,dhg->dbh", dgh.astype(w_h.dtype), w_h, preferred_element_type=f32)
    dh_prev = d * z + (dhm if rmask is None else dhm * rmask)
    if m_B is not None:
      dh_prev = dh_prev + passthrough
    return dh_prev, dgi

  dh0, dgi_TxDxBx3H = jax.lax.scan(body, dh_T, (dy_TxDxBxH, hprev_TxDxBxH, r, z, n, ghn, mask),
                                   reverse=True, unroll=unroll)
  # dgh differs from dgi only in the n block (scaled by r): rebuilt in bulk, not in the loop.
  dgh = jnp.concatenate([dgi_TxDxBx3H[..., :2 * H], dgi_TxDxBx3H[..., 2 * H:] * r], axis=-1)
  hm = hprev_TxDxBxH if rmask is None else hprev_TxDxBxH * rmask
  dw_h = jnp.einsum("tdbh,tdbg->dhg", hm.astype(w_h.dtype), dgh.astype(w_h.dtype),
                    preferred_element_type=f32).astype(w_h.dtype)
  db_h = dgh.sum(axis=(0, 2))
  return dgi_TxDxBx3H, dw_h, db_h, dh0, None, None


gru_recurrence.defvjp(_gru_recurrence_fwd, _gru_recurrence_bwd)


def _reset_before_scan(gi_TxDxBx3H, w_h, b_h, h0, mask_TxB, rmask, unroll):
  """reset_after=False: r gates h *before* the candidate matmul, so two dots per step."""
  H = h0.shape[-1]

  def body(h, inp):
    gi, m_B = inp
    hm = h if rmask is None else h * rmask
    rz = sigmoid(gi[..., :2 * H] + _recurrent_dot(hm, w_h[..., :2 * H]) + b_h[:, None, :2 * H])
    r, z = rz[..., :H], rz[..., H:]
    n = jnp.tanh(gi[..., 2 * H:] + _recurrent_dot(r * hm, w_h[..., 2 * H:])
                 + b_h[:, None, 2 * H:])
    h_new = n + z * (h - n)
    y = h_new
    if m_B is not None:
      keep = m_B[None, :, None]
      h_new = jnp.where(keep, h_new, h)
      y = jnp.where(keep, h_new, 0.0)
    return h_new, y

  h_T, y = jax.lax.scan(body, h0, (gi_TxDxBx3H, mask_TxB), unroll=unroll)
  return y, h_T


class GRU(RecurrentStack):
  """Multi-layer (bi)directional GRU; `y, h_n = gru(x_BxTxI, seq_lengths, initial_carry)`.

  Layouts follow torch.nn.GRU(batch_first=True): y (B, T, D·H), h_n (num_layers·D, B, H).
  Parameters per layer: w_i (D, I, 3H), w_h (D, H, 3H), b_i and b_h (D, 3H), gates r|z|n.
  """

  num_gates = 3

  def __init__(self, in_features: int, hidden_features: int, *, num_layers: int = 1,
               bidirectional: bool = False, reset_after: bool = True, dropout: float = 0.0,
               recurrent_dropout: float = 0.0, unroll: int = 1, remat: bool = False, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(in_features, hidden_features, num_layers=num_layers,
                     bidirectional=bidirectional, dropout=dropout,
                     recurrent_dropout=recurrent_dropout, unroll=unroll, remat=remat, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
    self.reset_after = reset_after

  def _layer(self, p, x_TxDxBxI, mask_TxB, h0_DxBxH, rmask):
    cdt = self._compute_dtype(x_TxDxBxI)
    gi = self._project(p, x_TxDxBxI)
    w_h, b_h = p["w_h"].astype(cdt), p["b_h"].astype(f32)
    run = gru_recurrence if self.reset_after else _reset_before_scan
    y, h_T = run(gi, w_h, b_h, h0_DxBxH, mask_TxB, rmask, self.unroll)
    return y.astype(cdt), h_T

  def _cell_step(self, p, h_1xBxH, x_BxI):
    cdt = self._compute_dtype(x_BxI)
    gi = self._project(p, x_BxI[None, None])[0]
    w_h, b_h = p["w_h"].astype(cdt), p["b_h"].astype(f32)
    if self.reset_after:
      h, _ = _gru_cell(gi, h_1xBxH, w_h, b_h, None)
    else:
      _, h = _reset_before_scan(gi[None], w_h, b_h, h_1xBxH, None, None, 1)
    return h, h[0].astype(cdt)
