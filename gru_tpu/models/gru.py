"""GRU with PyTorch-exact gates: hoisted input projection, one fused recurrent matmul per step.

  r = σ(W_ir x + b_ir + W_hr h + b_hr)
  z = σ(W_iz x + b_iz + W_hz h + b_hz)
  n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))     reset_after=True  (PyTorch, cuDNN, Keras v2)
  n = tanh(W_in x + b_in + (r ⊙ h) W_hn + b_hn)     reset_after=False (Cho et al. 2014)
  h' = (1 - z) ⊙ n + z ⊙ h

The reset_after=True recurrence has a hand-written VJP: the forward keeps gh = h W_h + b_h per
step, the backward scan carries only dh (one matmul with W_h^T per step) and emits d loss/d h_t;
gate gradients, dW_h, db_h and the input-projection gradients are then bulk elementwise ops and
single large matmuls after the loop instead of per-step accumulations. With impl="pallas" (or
"auto" on TPU) the same recurrence runs as the Pallas kernels of gru_tpu.kernels.gru instead.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gru_tpu.kernels import gru as kernel
from gru_tpu.models.stack import RecurrentStack, direction_dot

f32 = jnp.float32
IMPLS = ("auto", "scan", "pallas")
log = logging.getLogger("gru_tpu.models")


def sigmoid(x: jax.Array) -> jax.Array:
  # The tanh form vectorises on XLA:CPU (one polynomial, no divide) and is exact in f32.
  return 0.5 * jnp.tanh(0.5 * x) + 0.5


def _recurrent_dot(h_DxBxH: jax.Array, w_h_DxHxG: jax.Array) -> jax.Array:
  return jnp.einsum("dbh,dhg->dbg", h_DxBxH.astype(w_h_DxHxG.dtype), w_h_DxHxG,
                    preferred_element_type=f32)


# On CPU at least this many steps run per loop iteration (see gru_recurrence).
CPU_MIN_UNROLL = 4


def compiler_options(backend: str | None = None) -> dict[str, object]:
  """XLA options for jitting a step that runs these models: pass to jax.jit(compiler_options=).

  On CPU the new fusion emitters compile the gate fusion of the scan body into code ~6x slower
  than the legacy emitter's, which would dominate the step; elsewhere nothing is needed. XLA
  builds without the legacy emitter (jax >= 0.11.2) refuse the option, so they get none.
  """
  if (backend or jax.default_backend()) == "cpu" and _cpu_knows("xla_cpu_use_fusion_emitters"):
    return {"xla_cpu_use_fusion_emitters": False}
  return {}


@functools.cache
def _cpu_knows(option: str) -> bool:
  """Whether this jaxlib's XLA:CPU has a compile option: an unknown one fails every compile."""
  x = jax.device_put(np.float32(0), jax.devices("cpu")[0])
  try:
    jax.jit(lambda v: v + 1, compiler_options={option: False}).lower(x).compile()
  except jax.errors.JaxRuntimeError as e:
    if "No such compile option" not in str(e):
      raise
    return False
  return True


def _gates(g_Bx3H, gh_Bx3H):
  """PyTorch's r, z, n from the input part g = x W_i + b_i and recurrent part gh = h W_h + b_h."""
  H = g_Bx3H.shape[-1] // 3
  r = sigmoid(g_Bx3H[..., :H] + gh_Bx3H[..., :H])
  z = sigmoid(g_Bx3H[..., H:2 * H] + gh_Bx3H[..., H:2 * H])
  n = jnp.tanh(g_Bx3H[..., 2 * H:] + r * gh_Bx3H[..., 2 * H:])
  return r, z, n


def _gru_cell(g_Bx3H, h_BxH, w_h_Hx3H, b_h_3H, rmask_BxH=None):
  """One reset_after=True step: the single recurrent matmul, then the gates -> (h', gh)."""
  hm = h_BxH if rmask_BxH is None else h_BxH * rmask_BxH
  gh = jnp.dot(hm.astype(w_h_Hx3H.dtype), w_h_Hx3H, preferred_element_type=f32) + b_h_3H
  r, z, n = _gates(g_Bx3H, gh)
  return n + z * (h_BxH - n), gh


def _chains(a_DxBx_, chains: int) -> list[jax.Array]:
  """Split the (direction, batch) axes into independent recurrences ("chains") of (B/P, ...)."""
  D, B = a_DxBx_.shape[:2]
  Bp = B // chains
  return [a_DxBx_[d, p * Bp:(p + 1) * Bp] for d in range(D) for p in range(chains)]


def _unchain(parts: list[jax.Array], D: int) -> jax.Array:
  P = len(parts) // D
  return jnp.stack([jnp.concatenate(parts[d * P:(d + 1) * P], axis=0) for d in range(D)])


def _per_chain(a_Dx_, chains: int) -> list[jax.Array]:
  return [a_Dx_[d] for d in range(a_Dx_.shape[0]) for _ in range(chains)]


def _weight_grad(a_TxDxBxK, g_TxDxBxN, flat: bool = False):
  """sum over t, b of a^T g per direction -> (D, K, N) f32.

  flat (the CPU path): as a (T·B, K)^T (T·B, N) matmul, which XLA:CPU runs faster than the
  two-axis contraction (the train step measured ~20 % slower without). Elsewhere T and B stay
  separate: merging T with a sharded B would make the SPMD partitioner gather the batch onto
  every device (see direction_dot).
  """
  T, D, B, K = a_TxDxBxK.shape
  if flat:
    return jnp.stack([jnp.dot(a_TxDxBxK[:, d].reshape(T * B, K).T,
                              g_TxDxBxN[:, d].reshape(T * B, -1), preferred_element_type=f32)
                      for d in range(D)])
  return jnp.stack([jnp.einsum("tbk,tbn->kn", a_TxDxBxK[:, d], g_TxDxBxN[:, d],
                               preferred_element_type=f32) for d in range(D)])


def _block_scan(step, carry, xs, k: int, reverse: bool = False, prepare=None):
  """lax.scan over time that runs k steps per loop iteration on (T/k, k, ...) blocks.

  Each iteration reads one (k, ...) input block, maps it with `prepare` if given, and writes one
  output block. k is lowered to a divisor of T.
  """
  T = jax.tree.leaves(xs)[0].shape[0]
  k = max(d for d in range(1, min(k, T) + 1) if T % d == 0)
  blocks = jax.tree.map(lambda a: a.reshape(T // k, k, *a.shape[1:]), xs)

  def body(carry, xk):
    xk = xk if prepare is None else prepare(xk)
    ys = [None] * k
    for j in (reversed(range(k)) if reverse else range(k)):
      carry, ys[j] = step(carry, jax.tree.map(lambda a: a[j], xk))
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)

  carry, ys = jax.lax.scan(body, carry, blocks, reverse=reverse)
  return carry, jax.tree.map(lambda a: a.reshape(T, *a.shape[2:]), ys)


def _fwd_scan(gi_TxDxBx3H, b_i, w_h, b_h, h0_DxBxH, mask_TxB, rmask, unroll, chains,
              save_gh=False, w_i=None):
  """The recurrence. With w_i, the first argument is x (T, D, B, I) and each block of steps is
  projected inside the loop: no (T, D, B, 3H) buffer, and the block stays in cache."""
  D = h0_DxBxH.shape[0]
  w, bi, bh = (_per_chain(a, chains) for a in (w_h, b_i, b_h))
  rm = _chains(rmask, chains) if rmask is not None else [None] * len(w)

  def body(hs, inp):
    gi, m_B = inp
    gis = _chains(gi, chains)
    keeps = ([None] * len(hs) if m_B is None else
             _chains(jnp.broadcast_to(m_B[None, :, None], (D, m_B.shape[0], 1)), chains))
    new, ys, ghs = [], [], []
    for c, h in enumerate(hs):
      h_new, gh = _gru_cell(gis[c] + bi[c], h, w[c], bh[c], rm[c])
      ghs.append(gh)
      if keeps[c] is not None:
        h_new, y = jnp.where(keeps[c], h_new, h), jnp.where(keeps[c], h_new, 0.0)
      else:
        y = h_new
      new.append(h_new)
      ys.append(y)
    return tuple(new), (_unchain(ys, D), _unchain(ghs, D) if save_gh else None)

  project = None if w_i is None else (lambda xk: (direction_dot(xk[0], w_i, flat=True), xk[1]))
  hs, (y, gh) = _block_scan(body, tuple(_chains(h0_DxBxH, chains)), (gi_TxDxBx3H, mask_TxB),
                            unroll, prepare=project)
  return (y, gh) if save_gh else y, _unchain(list(hs), D)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _recurrence(x_TxDxBxI, w_i, b_i, w_h, b_h, h0_DxBxH, mask_TxB, rmask, unroll, chains,
                block_projection):
  if block_projection:
    return _fwd_scan(x_TxDxBxI, b_i, w_h, b_h, h0_DxBxH, mask_TxB, rmask, unroll, chains,
                     w_i=w_i)
  return _fwd_scan(direction_dot(x_TxDxBxI, w_i), b_i, w_h, b_h, h0_DxBxH, mask_TxB, rmask,
                   unroll, chains)


def _recurrence_fwd(x, w_i, b_i, w_h, b_h, h0, mask, rmask, unroll, chains, block_projection):
  # Training: project in bulk (gi is needed again in the backward pass) and keep gh and y.
  # r, z, n are then recomputed in bulk (cheap elementwise) rather than stored.
  gi = direction_dot(x, w_i, flat=block_projection)
  (y, gh), h_T = _fwd_scan(gi, b_i, w_h, b_h, h0, mask, rmask, unroll, chains, save_gh=True)
  return (y, h_T), (x, w_i, gi, gh, b_i, w_h, h0, mask, rmask, y)


def _recurrence_bwd(unroll, chains, block_projection, res, cts):
  x, w_i, gi, gh, b_i, w_h, h0, mask, rmask, y = res
  dy_TxDxBxH, dh_T = cts
  D, _, H = h0.shape
  hprev = jnp.concatenate([h0[None], y[:-1]], axis=0)  # h_{t-1}; 0 past a sequence's end
  hm = hprev if rmask is None else hprev * rmask
  r, z, n = _gates(gi + b_i[None, :, None], gh)
  # With d = d loss/d h_t: dn_pre = d·a, dz_pre = d·(h_{t-1} - n)z(1-z), dr_pre = d·a·ghn·r(1-r)
  # and the recurrent-side gate gradient is dgh = [d d d] ⊙ A, so the loop needs only A and z.
  a = (1.0 - z) * (1.0 - n * n)
  # Per gate (r, z, n of dgh, n of dgi): dgh = d ⊙ [P_r P_z P_hn], dgi = d ⊙ [P_r P_z P_in].
  P = [a * gh[..., 2 * H:] * r * (1.0 - r), (hprev - n) * z * (1.0 - z), a * r, a]
  if mask is not None:
    # Past a sequence's end the carry passes through unchanged and no gate gradient flows.
    keep = mask[:, None, :, None]
    P = [jnp.where(keep, p, 0.0) for p in P]
    z, dy_TxDxBxH = jnp.where(keep, z, 1.0), jnp.where(keep, dy_TxDxBxH, 0.0)
  A = jnp.concatenate(P[:3], axis=-1)  # dgh = [d d d] ⊙ A
  # W_h^T made contiguous once: a dot with a transposed operand is ~1.7x slower on XLA:CPU.
  w_t = _per_chain(jnp.swapaxes(w_h, 1, 2), chains)
  rm = _chains(rmask, chains) if rmask is not None else [None] * len(w_t)

  def body(dhs, inp):
    dys, As, zs = (_chains(v, chains) for v in inp)
    new, ds = [], []
    for c, dh in enumerate(dhs):
      d = dh + dys[c]
      dgh = jnp.tile(d, (1, 3)) * As[c]
      dhm = jnp.dot(dgh.astype(w_t[c].dtype), w_t[c], preferred_element_type=f32)
      new.append(d * zs[c] + (dhm if rm[c] is None else dhm * rm[c]))
      ds.append(d)
    return tuple(new), _unchain(ds, D)

  dh0, d = _block_scan(body, tuple(_chains(dh_T, chains)), (dy_TxDxBxH, A, z), unroll,
                       reverse=True)
  if block_projection:
    # XLA:CPU fuses the tile into the product; gate by gate it keeps more buffers (temp
    # 120 -> 128 MiB at B=32, T=256, H=256) and the train step is ~4 % slower.
    d3 = jnp.tile(d, (1, 1, 1, 3))
    dgh, dgi = d3 * A, d3 * jnp.concatenate(P[:2] + P[3:], axis=-1)
  else:
    # Gate by gate, with no (T, D, B, 3H) tile of d: on TPU the tile is materialised and relaid
    # out, ~1.9 GB more HBM traffic per step at T=256, B=64, H=1024 (scripts/aot_compile.py).
    g = [d * p for p in P]
    dgh, dgi = jnp.concatenate(g[:3], axis=-1), jnp.concatenate(g[:2] + g[3:], axis=-1)
  cdt = w_h.dtype
  dx = direction_dot(dgi.astype(cdt), jnp.swapaxes(w_i, 1, 2), flat=block_projection).astype(
      x.dtype)
  dw_i = _weight_grad(x, dgi.astype(cdt), block_projection).astype(w_i.dtype)
  dw_h = _weight_grad(hm.astype(cdt), dgh.astype(cdt), block_projection).astype(cdt)
  return (dx, dw_i, dgi.sum(axis=(0, 2)), dw_h, dgh.sum(axis=(0, 2)), _unchain(list(dh0), D),
          None, None)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def gru_recurrence(x_TxDxBxI, w_i_DxIx3H, b_i_Dx3H, w_h_DxHx3H, b_h_Dx3H, h0_DxBxH,
                   mask_TxB=None, rmask_DxBxH=None, unroll: int = 1):
  """One GRU layer, both directions: y (T, D, B, H) f32 and h_T (D, B, H).

  Matmul operands are used in the dtype they come in (bf16 for bf16 compute); gates, carry and
  outputs are f32. The input projection x W_i for the whole sequence is one matmul before the
  loop, and inside it one recurrent matmul per step (per direction).

  On CPU (batch even and >= 8, and not split over devices: see _may_split_batch) three things
  differ, chosen at lowering time (lax.platform_dependent, so AOT compiles for TPU from a CPU
  host get the form above): the batch is split into two independent recurrences, whose
  half-batch matmuls XLA:CPU runs concurrently on two cores (a loop body of few ops runs
  sequentially, one core per dot); at least CPU_MIN_UNROLL steps run per loop iteration; and
  when not differentiated, each block of steps is projected inside the loop (a fresh
  (T, D, B, 3H) buffer costs more in page faults there than the matmul itself).
  """
  B = h0_DxBxH.shape[1]
  args = (x_TxDxBxI, w_i_DxIx3H, b_i_Dx3H, w_h_DxHx3H, b_h_Dx3H, h0_DxBxH, mask_TxB, rmask_DxBxH)
  if B % 2 or B < 8 or _may_split_batch():
    return _recurrence(*args, unroll, 1, False)
  return jax.lax.platform_dependent(
      *args, cpu=lambda *a: _recurrence(*a, max(unroll, CPU_MIN_UNROLL), 2, True),
      default=lambda *a: _recurrence(*a, unroll, 1, False))


def _may_split_batch() -> bool:
  """Whether the batch may be split over devices: the CPU form's chains and (T·B)-flat matmuls
  would then make the partitioner gather the batch and permute rows inside the time loops (a
  tiny train step on 8 CPU devices took 110–130 ms instead of 7)."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.size > 1 if not mesh.empty else jax.device_count() > 1


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


def pallas_fallback(reset_after: bool, T: int, B: int, H: int, D: int, dtype) -> str | None:
  """Why impl="auto" runs the scan for this layer (None: it runs the Pallas kernel).

  auto = the kernel when compiling for a TPU (the context mesh's devices, else the default
  device), for reset_after=True, when its blocks fit the chip's VMEM, and when the batch
  partitioning is known (a context mesh, or a single device).
  """
  if not reset_after:
    return "reset_after=False has no Pallas kernel"
  chip = kernel.target_chip()
  if chip is None:
    return "not compiling for a TPU"
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty and jax.device_count() > 1:
    return ("several devices but no context mesh (jax.set_mesh) to shard the kernel over; the "
            "engine sets one")
  why = kernel.plan(T, kernel.local_rows(mesh, B, dtype)[2], H, dtype, chip, D=D)
  return why if isinstance(why, str) else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _pallas_layer(x_TxDxBxI, w_i, b_i, w_h, b_h, h0_DxBxH, lengths_B, rmask, cdt):
  gi = direction_dot(x_TxDxBxI, w_i, cdt)
  return kernel.gru_sequence(gi, w_h, b_i, b_h, h0_DxBxH, lengths_B, rmask)


def _pallas_layer_fwd(x, w_i, b_i, w_h, b_h, h0, lengths, rmask, cdt):
  gi = direction_dot(x, w_i, cdt)
  out, vjp = jax.vjp(lambda gi, w_h, b_i, b_h, h0: kernel.gru_sequence(gi, w_h, b_i, b_h, h0,
                                                                       lengths, rmask),
                     gi, w_h, b_i, b_h, h0)
  return out, (x, w_i, vjp)


def _pallas_layer_bwd(cdt, res, cts):
  # The projection's gradients as in the scan's VJP: matmuls in the compute dtype (autodiff of a
  # dot would mix the f32 cotangent with bf16 operands).
  x, w_i, vjp = res
  dgi, dw_h, db_i, db_h, dh0 = vjp(cts)
  dx = direction_dot(dgi, jnp.swapaxes(w_i, 1, 2), cdt).astype(x.dtype)
  dw_i = _weight_grad(x, dgi).astype(w_i.dtype)
  return dx, dw_i, db_i, dw_h, db_h, dh0, None, None


_pallas_layer.defvjp(_pallas_layer_fwd, _pallas_layer_bwd)


class GRU(RecurrentStack):
  """Multi-layer (bi)directional GRU; `y, h_n = gru(x_BxTxI, seq_lengths, initial_carry)`.

  Layouts follow torch.nn.GRU(batch_first=True): y (B, T, D·H), h_n (num_layers·D, B, H).
  Parameters per layer: w_i (D, I, 3H), w_h (D, H, 3H), b_i and b_h (D, 3H), gates r|z|n.
  impl: "scan" (lax.scan), "pallas" (the Pallas kernels; interpret mode off TPU), or "auto"
  (pallas on TPU where it fits, else scan; see pallas_fallback).
  """

  num_gates = 3

  def __init__(self, in_features: int, hidden_features: int, *, num_layers: int = 1,
               bidirectional: bool = False, reset_after: bool = True, dropout: float = 0.0,
               recurrent_dropout: float = 0.0, unroll: int = 1, remat: bool = False, dtype=None,
               param_dtype=jnp.float32, impl: str = "auto", rngs: nnx.Rngs):
    if impl not in IMPLS:
      raise ValueError(f"GRU: impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(reset_after, (bool, np.bool_)):
      raise ValueError(f"GRU: reset_after must be True or False, got {reset_after!r}")
    super().__init__(in_features, hidden_features, num_layers=num_layers,
                     bidirectional=bidirectional, dropout=dropout,
                     recurrent_dropout=recurrent_dropout, unroll=unroll, remat=remat, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
    self.reset_after = bool(reset_after)
    self.impl = impl

  def _use_pallas(self, x_TxDxBxI, cdt) -> bool:
    T, D, B, _ = x_TxDxBxI.shape
    if B == 0:  # nothing to compute; the kernel's blocks cannot tile an empty batch
      return False
    if self.impl == "pallas" and not self.reset_after:
      log.warning("GRU(impl='pallas', reset_after=False): no Pallas kernel for this form; "
                  "running the scan")
      return False
    if self.impl != "auto":
      return self.impl == "pallas"
    why = pallas_fallback(self.reset_after, T, B, self.hidden_features, D, cdt)
    if why is not None and kernel.target_chip() is not None:
      log.warning("GRU(impl='auto') runs the scan on this TPU: %s", why)
    return why is None

  def _layer(self, p, x_TxDxBxI, mask_TxB, h0_DxBxH, rmask):
    cdt = self._compute_dtype(x_TxDxBxI)
    if self._use_pallas(x_TxDxBxI, cdt):
      lengths = None if mask_TxB is None else mask_TxB.sum(0, dtype=jnp.int32)  # right padding
      y, h_T = _pallas_layer(x_TxDxBxI.astype(cdt), p["w_i"].astype(cdt), p["b_i"], p["w_h"],
                             p["b_h"], h0_DxBxH, lengths, rmask, jnp.dtype(cdt))
      return y, h_T
    w_h, b_h = p["w_h"].astype(cdt), p["b_h"].astype(f32)
    if self.reset_after:
      y, h_T = gru_recurrence(x_TxDxBxI.astype(cdt), p["w_i"].astype(cdt), p["b_i"].astype(f32),
                              w_h, b_h, h0_DxBxH, mask_TxB, rmask, self.unroll)
    else:
      y, h_T = _reset_before_scan(self._project(p, x_TxDxBxI), w_h, b_h, h0_DxBxH, mask_TxB,
                                  rmask, self.unroll)
    return y.astype(cdt), h_T

  def _cell_step(self, p, h_1xBxH, x_BxI):
    cdt = self._compute_dtype(x_BxI)
    gi = self._project(p, x_BxI[None, None])[0]
    w_h, b_h = p["w_h"].astype(cdt), p["b_h"].astype(f32)
    if self.reset_after:
      h = _gru_cell(gi[0], h_1xBxH[0], w_h[0], b_h[0])[0][None]
    else:
      _, h = _reset_before_scan(gi[None], w_h, b_h, h_1xBxH, None, None, 1)
    return h, h[0].astype(cdt)
