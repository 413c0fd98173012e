"""minGRU: associative-scan form equals the sequential recurrence, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gru_tpu.models import MinGRU

I, H, B, T = 3, 4, 3, 9


def sequential_reference(model, x, lengths, h0):
  """Plain Python loop over each sequence's valid steps, per layer and direction."""
  L, D = model.num_layers, model.num_directions
  sig = lambda v: 1 / (1 + np.exp(-v))
  h_n = np.zeros((L * D, B, H))
  inp = np.asarray(x, np.float64)
  for l, layer in enumerate(model.layers):
    w, b = np.asarray(layer.w_i[...], np.float64), np.asarray(layer.b_i[...], np.float64)
    out = np.zeros((B, T, D * H))
    for d in range(D):
      for s in range(B):
        steps = range(lengths[s]) if d == 0 else reversed(range(lengths[s]))
        h = np.asarray(h0[l * D + d, s], np.float64)
        for t in steps:
          g = inp[s, t] @ w[d] + b[d]
          z = sig(g[:H])
          h = (1 - z) * h + z * g[H:]
          out[s, t, d * H:(d + 1) * H] = h
        h_n[l * D + d, s] = h
    inp = out
  return inp, h_n


@pytest.mark.parametrize("L,bi", [(1, False), (2, False), (2, True)])
def test_parallel_equals_sequential(L, bi, rng):
  model = MinGRU(I, H, num_layers=L, bidirectional=bi, rngs=nnx.Rngs(0))
  D = 2 if bi else 1
  x = rng.standard_normal((B, T, I)).astype(np.float32)
  lengths = np.array([T, 4, 1])
  h0 = rng.standard_normal((L * D, B, H)).astype(np.float32)
  y, h_n = model(x, lengths, h0)
  y_ref, h_ref = sequential_reference(model, x, lengths, h0)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h_n, h_ref, rtol=1e-5, atol=1e-5)


def test_gradients_equal_step_loop(rng):
  model = MinGRU(I, H, num_layers=2, rngs=nnx.Rngs(1))
  x = jnp.asarray(rng.standard_normal((B, T, I)), jnp.float32)
  h0 = jnp.asarray(rng.standard_normal((2, B, H)), jnp.float32)

  def scanned(m):
    y, h = m(x, initial_carry=h0)
    return (y ** 2).sum() + h.sum()

  def looped(m):
    carry, total = h0, 0.0
    for t in range(T):
      carry, y_t = m.step(carry, x[:, t])
      total = total + (y_t ** 2).sum()
    return total + carry.sum()

  np.testing.assert_allclose(scanned(model), looped(model), rtol=1e-5)
  g_scan = jax.tree.leaves(nnx.jit(nnx.grad(scanned))(model))  # jit: eager takes 4x as long
  g_loop = jax.tree.leaves(nnx.jit(nnx.grad(looped))(model))
  for a, b in zip(g_scan, g_loop, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_remat_changes_nothing(rng):
  x = jnp.asarray(rng.standard_normal((B, T, I)), jnp.float32)
  base, remat = (MinGRU(I, H, num_layers=2, remat=r, rngs=nnx.Rngs(2)) for r in (False, True))
  loss = lambda m: (m(x, jnp.asarray([T, 5, 2]))[0] ** 2).sum()
  for a, b in zip(jax.tree.leaves(nnx.grad(loss)(base)), jax.tree.leaves(nnx.grad(loss)(remat)),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_recurrent_dropout_is_rejected():
  with pytest.raises(ValueError, match="MinGRU: recurrent_dropout must be 0"):
    MinGRU(I, H, recurrent_dropout=0.1, rngs=nnx.Rngs(0))
