"""GRU parity with torch.nn.GRU (outputs, h_n, gradients), masks, step API, knobs, bad input."""

import itertools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import randomize_biases
from gru_tpu.convert import gru_from_torch, lstm_from_torch
from gru_tpu.models import GRU, LSTM, MinGRU

TOL = dict(rtol=1e-5, atol=1e-5)
I, H, B, T = 5, 6, 8, 7


def make_pair(L, bi, torch_cls=torch.nn.GRU, seed=0, **kwargs):
  torch.manual_seed(seed)
  ref = randomize_biases(torch_cls(I, H, num_layers=L, bidirectional=bi, batch_first=True), seed)
  convert = gru_from_torch if torch_cls is torch.nn.GRU else lstm_from_torch
  ours = convert(ref, **kwargs)
  return ref.double(), ours


def torch_grads_as_ours(ref, model):
  """torch's .grad of every weight, laid out like the gru_tpu params: {(l, name): (D, ...)}."""
  out = {}
  D = model.num_directions
  for l in range(model.num_layers):
    for ours_name, torch_name in (("w_i", "weight_ih"), ("w_h", "weight_hh"), ("b_i", "bias_ih"),
                                  ("b_h", "bias_hh")):
      gs = [getattr(ref, f"{torch_name}_l{l}{sfx}").grad.numpy() for sfx in ("", "_reverse")[:D]]
      out[l, ours_name] = np.stack([g.T for g in gs])
  return out


def assert_grads_match(ref, model, dmodel):
  for (l, name), want in torch_grads_as_ours(ref, model).items():
    np.testing.assert_allclose(np.asarray(getattr(dmodel.layers[l], name)[...]), want,
                               err_msg=f"d{name} layer {l}", **TOL)


def check_parity(torch_cls, L, bi, with_lengths, rng, batch=B, T=T, **kwargs):
  """Outputs, final state and every gradient (params, x, h0) against torch, ≤ 1e-5. kwargs go
  to the converter (GRU knobs such as unroll)."""
  B = batch
  ref, model = make_pair(L, bi, torch_cls, **kwargs)
  D = 2 if bi else 1
  lstm = torch_cls is torch.nn.LSTM
  x = rng.standard_normal((B, T, I))
  lengths = (np.array([T, 3, 1, 5, 7, 2, 6, 4])[:B] if with_lengths else np.full(B, T))
  h0 = rng.standard_normal((1 + lstm, L * D, B, H))
  gy, gh = rng.standard_normal((B, T, D * H)), rng.standard_normal((1 + lstm, L * D, B, H))

  # Reference: every sequence on its own unpadded slice, so padding cannot leak into torch.
  x_t = torch.tensor(x, requires_grad=True)
  h0_t = torch.tensor(h0, requires_grad=True)
  ys, hs, loss = [], [], 0
  for b in range(B):
    carry = h0_t[:, :, b:b + 1]
    y_b, h_b = ref(x_t[b:b + 1, :lengths[b]], (carry[0], carry[1]) if lstm else carry[0])
    h_b = torch.stack(h_b if lstm else (h_b,))[:, :, 0]
    ys.append(y_b[0].detach().numpy())
    hs.append(h_b.detach().numpy())
    loss = loss + (y_b[0] * torch.tensor(gy[b, :lengths[b]])).sum() + (
        h_b * torch.tensor(gh[:, :, b])).sum()
  loss.backward()

  graphdef, params = nnx.split(model)

  def ours_loss(params, x, h0):
    y, h_n = nnx.merge(graphdef, params)(x, jnp.asarray(lengths) if with_lengths else None,
                                         tuple(h0) if lstm else h0[0])
    h_n = jnp.stack(h_n if lstm else (h_n,))
    return (y * gy).sum() + (h_n * gh).sum(), (y, h_n)

  (_, (y, h_n)), (dparams, dx, dh0) = jax.value_and_grad(ours_loss, argnums=(0, 1, 2),
                                                         has_aux=True)(
      params, jnp.asarray(x, jnp.float32), jnp.asarray(h0, jnp.float32))
  y, h_n = np.asarray(y), np.asarray(h_n)
  for b in range(B):
    np.testing.assert_allclose(y[b, :lengths[b]], ys[b], **TOL)
    np.testing.assert_array_equal(y[b, lengths[b]:], 0.0)
    np.testing.assert_allclose(h_n[:, :, b], hs[b], **TOL)
  np.testing.assert_allclose(np.asarray(dx), x_t.grad.numpy(), **TOL)
  np.testing.assert_allclose(np.asarray(dh0), h0_t.grad.numpy(), **TOL)
  assert_grads_match(ref, model, nnx.merge(graphdef, dparams))


@pytest.mark.parametrize("L,bi,with_lengths",
                         list(itertools.product([1, 2], [False, True], [False, True])))
def test_gru_matches_torch_outputs_state_and_gradients(L, bi, with_lengths, rng):
  check_parity(torch.nn.GRU, L, bi, with_lengths, rng)


@pytest.mark.parametrize("unroll", [1, 2])
def test_gru_matches_torch_on_the_tpu_gpu_recurrence(unroll, rng):
  """A batch that is odd (or < 8) runs the recurrence every backend but CPU runs: one chain,
  the projection outside the loop, the gate-by-gate backward (B = 8 above takes the CPU form).
  T = 8 with unroll 2: the forward and the backward scan run 2-step blocks."""
  check_parity(torch.nn.GRU, 1, True, True, rng, batch=5, T=8, unroll=unroll)


@pytest.mark.parametrize("bi", [False, True])
def test_lstm_matches_torch_outputs_state_and_gradients(bi, rng):
  check_parity(torch.nn.LSTM, 2, bi, True, rng)


def test_reset_before_matches_cho_et_al_loop(rng):
  model = GRU(I, H, reset_after=False, rngs=nnx.Rngs(1))
  p = {k: np.asarray(v[...][0], np.float64) for k, v in vars(model.layers[0]).items()
       if isinstance(v, nnx.Param)}
  p["b_h"] = p["b_h"] + 0.5  # make sure b_hn is exercised
  model.layers[0].b_h[...] = jnp.asarray(p["b_h"][None], jnp.float32)
  x = rng.standard_normal((B, T, I))
  sig = lambda v: 1 / (1 + np.exp(-v))
  h = np.zeros((B, H))
  for t in range(T):
    gi = x[:, t] @ p["w_i"] + p["b_i"]
    gh_rz = h @ p["w_h"][:, :2 * H] + p["b_h"][:2 * H]
    r, z = sig(gi[:, :H] + gh_rz[:, :H]), sig(gi[:, H:2 * H] + gh_rz[:, H:])
    n = np.tanh(gi[:, 2 * H:] + (r * h) @ p["w_h"][:, 2 * H:] + p["b_h"][2 * H:])
    h = (1 - z) * n + z * h
  y, h_n = model(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(y)[:, -1], h, **TOL)
  np.testing.assert_allclose(np.asarray(h_n)[0], h, **TOL)


def _cho_reference(p, x, h0, lengths):
  """Cho et al. GRU as a float64 torch loop, each sequence on its own unpadded slice."""
  L, D = len(p), len(p[0])
  ys, h_n = [], [[None] * x.shape[0] for _ in range(L * D)]
  for b in range(x.shape[0]):
    inp = x[b, :lengths[b]]
    for l in range(L):
      outs = []
      for d, q in enumerate(p[l]):
        h, out = h0[l * D + d, b], [None] * lengths[b]
        for t in (range(lengths[b]) if d == 0 else reversed(range(lengths[b]))):
          gi, gh = inp[t] @ q["w_i"] + q["b_i"], h @ q["w_h"][:, :2 * H] + q["b_h"][:2 * H]
          r, z = torch.sigmoid(gi[:H] + gh[:H]), torch.sigmoid(gi[H:2 * H] + gh[H:])
          n = torch.tanh(gi[2 * H:] + (r * h) @ q["w_h"][:, 2 * H:] + q["b_h"][2 * H:])
          h = out[t] = (1 - z) * n + z * h
        h_n[l * D + d][b] = h
        outs.append(torch.stack(out) if out else torch.zeros((0, H), dtype=torch.float64))
      inp = torch.cat(outs, -1)
    ys.append(inp)
  return ys, torch.stack([torch.stack(h) for h in h_n])


@pytest.mark.parametrize("remat", [False, True])
def test_reset_before_outputs_state_and_gradients_match_cho_et_al_loop(remat, rng):
  """reset_after=False, 2 layers, bidirectional, lengths 0..T, nonzero biases and h0: y, h_n and
  the gradients of every parameter, x and h0 against autograd through the equations."""
  model = GRU(I, H, num_layers=2, bidirectional=True, reset_after=False, remat=remat,
              rngs=nnx.Rngs(9))
  for layer in model.layers:
    layer.b_h[...] = jnp.asarray(rng.uniform(-1, 1, layer.b_h.shape), jnp.float32)
  lengths = np.array([T, 0, 3, 1, 5, 7, 2, 6])
  x, h0 = rng.standard_normal((B, T, I)), rng.standard_normal((4, B, H))
  gy, gh = rng.standard_normal((B, T, 2 * H)), rng.standard_normal((4, B, H))
  p = [[{k: torch.tensor(np.asarray(getattr(layer, k)[...][d], np.float64), requires_grad=True)
         for k in ("w_i", "w_h", "b_i", "b_h")} for d in range(2)] for layer in model.layers]
  x_t, h0_t = torch.tensor(x, requires_grad=True), torch.tensor(h0, requires_grad=True)
  ys, h_ref = _cho_reference(p, x_t, h0_t, lengths)
  (sum((y * torch.tensor(gy[b, :lengths[b]])).sum() for b, y in enumerate(ys))
   + (h_ref * torch.tensor(gh)).sum()).backward()

  graphdef, params = nnx.split(model)

  def loss(params, x, h0):
    y, h_n = nnx.merge(graphdef, params)(x, jnp.asarray(lengths), h0)
    return (y * gy).sum() + (h_n * gh).sum(), (y, h_n)

  (_, (y, h_n)), (dparams, dx, dh0) = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(
      params, jnp.asarray(x, jnp.float32), jnp.asarray(h0, jnp.float32))
  for b in range(B):
    np.testing.assert_allclose(y[b, :lengths[b]], ys[b].detach().numpy(), **TOL)
    np.testing.assert_array_equal(y[b, lengths[b]:], 0.0)
  np.testing.assert_allclose(h_n, h_ref.detach().numpy(), **TOL)
  np.testing.assert_allclose(dx, x_t.grad.numpy(), **TOL)
  np.testing.assert_allclose(dh0, h0_t.grad.numpy(), **TOL)
  dmodel = nnx.merge(graphdef, dparams)
  for l, layer in enumerate(dmodel.layers):
    for k in ("w_i", "w_h", "b_i", "b_h"):
      np.testing.assert_allclose(getattr(layer, k)[...], np.stack([q[k].grad for q in p[l]]),
                                 err_msg=f"d{k} layer {l}", **TOL)


@pytest.mark.parametrize("reset_after", [True, False])
def test_scan_equals_step_loop(reset_after, rng):
  model = GRU(I, H, num_layers=2, reset_after=reset_after, rngs=nnx.Rngs(2))
  x = jnp.asarray(rng.standard_normal((B, T, I)), jnp.float32)
  h0 = jnp.asarray(rng.standard_normal((2, B, H)), jnp.float32)
  y, h_n = model(x, initial_carry=h0)
  carry, ys = h0, []
  for t in range(T):
    carry, y_t = model.step(carry, x[:, t])
    ys.append(y_t)
  np.testing.assert_allclose(np.stack(ys, 1), y, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(carry, h_n, rtol=1e-6, atol=1e-6)


def _outputs_and_grads(model, x, lengths):
  graphdef, params = nnx.split(model)

  def loss(params):
    y, h_n = nnx.merge(graphdef, params)(x, lengths)
    return (y ** 2).sum() + (h_n ** 3).sum(), (y, h_n)

  (_, out), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return out, jax.tree.leaves(g)


@pytest.mark.parametrize("knobs,with_lengths", [(dict(remat=True), True), (dict(unroll=3), True),
                                                (dict(remat=True, unroll=2), False)])
def test_remat_and_unroll_change_nothing(knobs, with_lengths, rng):
  kw = dict(num_layers=2, bidirectional=True)
  base, other = GRU(I, H, rngs=nnx.Rngs(3), **kw), GRU(I, H, rngs=nnx.Rngs(3), **kw, **knobs)
  x = jnp.asarray(rng.standard_normal((B, 11, I)), jnp.float32)  # 11: not a multiple of chunks
  # Without lengths, remat's padding to whole chunks is the only masked step.
  lengths = jnp.asarray([11, 4, 9, 1, 2, 11, 10, 3]) if with_lengths else None
  (y0, h0), g0 = _outputs_and_grads(base, x, lengths)
  (y1, h1), g1 = _outputs_and_grads(other, x, lengths)
  np.testing.assert_allclose(y1, y0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(h1, h0, rtol=1e-6, atol=1e-6)
  for a, b in zip(g1, g0, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_compute_within_tolerance(rng):
  """bf16 matmuls with f32 params, gates and carry: outputs within 2e-2 of f32."""
  f32 = GRU(I, H, num_layers=2, rngs=nnx.Rngs(4))
  bf16 = GRU(I, H, num_layers=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(4))
  x = jnp.asarray(rng.standard_normal((B, 16, I)), jnp.float32)
  y32, h32 = f32(x)
  y16, h16 = bf16(x)
  assert y16.dtype == jnp.bfloat16 and h16.dtype == jnp.float32
  assert bf16.layers[0].w_i[...].dtype == jnp.float32
  err = float(jnp.abs(y16.astype(jnp.float32) - y32).max())
  assert 0 < err < 2e-2, err
  assert float(jnp.abs(h16 - h32).max()) < 2e-2


def test_causal_in_time(rng):
  model = GRU(3, 4, num_layers=2, rngs=nnx.Rngs(5))
  x = jnp.asarray(rng.standard_normal((1, 6, 3)), jnp.float32)
  jac = jax.jit(jax.jacrev(lambda x: model(x)[0]))(x)[0, :, :, 0]  # (T, H, T, I)
  for t in range(6):
    assert float(jnp.abs(jac[t, :, t + 1:]).max(initial=0.0)) == 0.0, f"y_{t} depends on future x"
    assert float(jnp.abs(jac[t, :, t]).max()) > 0, f"y_{t} must depend on x_{t}"


def test_dropout_train_vs_eval(rng):
  kw = dict(num_layers=2, dropout=0.3, recurrent_dropout=0.3)
  model = GRU(I, H, rngs=nnx.Rngs(6), **kw)
  plain = GRU(I, H, num_layers=2, rngs=nnx.Rngs(6))
  x = jnp.asarray(rng.standard_normal((B, T, I)), jnp.float32)
  y_a, _ = model(x)
  y_b, _ = model(x)
  assert float(jnp.abs(y_a - y_b).max()) > 1e-3, "train mode must draw fresh masks per call"
  model.eval()
  y_c, _ = model(x)
  np.testing.assert_array_equal(y_c, model(x)[0])
  np.testing.assert_allclose(y_c, plain(x)[0], rtol=1e-6, atol=1e-6)
  model.train()
  g = nnx.grad(lambda m: (m(x)[0] ** 2).sum())(model)
  assert all(bool(jnp.isfinite(v).all()) for v in jax.tree.leaves(g))


def test_dropout_with_one_layer_warns_that_it_does_nothing(rng):
  """As torch.nn.GRU: dropout acts between layers, so one layer ignores it (silently, before)."""
  with pytest.warns(UserWarning, match=r"GRU: dropout=0.5 has no effect with num_layers=1") as w:
    model = GRU(I, H, dropout=0.5, rngs=nnx.Rngs(0))
  assert w[0].filename == __file__  # the user's line, not the library's
  x = jnp.asarray(rng.standard_normal((B, T, I)), jnp.float32)
  y_train = model(x)[0]
  model.eval()
  np.testing.assert_array_equal(y_train, model(x)[0])


def test_dropout_rngs_can_come_at_call_time_only(rng):
  model = GRU(I, H, num_layers=2, dropout=0.3, rngs=nnx.Rngs(params=0))  # no dropout stream
  x = jnp.asarray(rng.standard_normal((B, T, I)), jnp.float32)
  with pytest.raises(ValueError, match="dropout is on but no rngs were given"):
    model(x)
  y_a, y_b = model(x, rngs=nnx.Rngs(dropout=1))[0], model(x, rngs=nnx.Rngs(dropout=2))[0]
  assert float(jnp.abs(y_a - y_b).max()) > 1e-3


@pytest.mark.parametrize("cls,kw", [(c, kw) for c in (GRU, LSTM, MinGRU)
                                    for kw in ({}, {"bidirectional": True})]
                         + [(GRU, {"reset_after": False})])
def test_nan_in_the_padding_reaches_no_gradient(cls, kw, rng):
  """Padding may hold anything: gradients equal those with zero padding, NaN included."""
  model = cls(I, H, num_layers=2, rngs=nnx.Rngs(0), **kw)
  lengths = jnp.asarray([T, 3, 1, 0, 5, 7, 2, 6])
  x = np.asarray(rng.standard_normal((B, T, I)), np.float32)
  pad = np.arange(T)[None, :] >= np.asarray(lengths)[:, None]
  x[pad] = 0.0
  dirty = x.copy()
  dirty[pad] = np.nan

  def grads(x):
    return nnx.grad(lambda m, x: (m(x, lengths)[0] ** 2).sum(), argnums=(0, 1))(model, x)

  (g_m, g_x), (d_m, d_x) = grads(jnp.asarray(x)), grads(jnp.asarray(dirty))
  for a, b in zip(jax.tree.leaves(g_m), jax.tree.leaves(d_m), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(np.asarray(d_x)[~pad], np.asarray(g_x)[~pad])


@pytest.fixture
def drawn_masks(monkeypatch):
  """The masks jax.random.bernoulli draws during the test, as numpy arrays, in order."""
  drawn, real = [], jax.random.bernoulli

  def spy(key, p, shape):
    mask = real(key, p, shape)
    drawn.append(np.asarray(mask))
    return mask

  monkeypatch.setattr(jax.random, "bernoulli", spy)
  return drawn


def test_recurrent_dropout_mask_is_fixed_over_time(drawn_masks, rng):
  """Variational dropout: exactly one (D, B, H) mask per call, drawn outside the scan."""
  model = GRU(I, H, recurrent_dropout=0.5, bidirectional=True, rngs=nnx.Rngs(7))
  model(jnp.asarray(rng.standard_normal((B, T, I)), jnp.float32))
  assert [m.shape for m in drawn_masks] == [(2, B, H)]


def _gru_loop(p, x_BxTxI, h_BxH, rmask_BxH):
  """One reset_after=True layer as a plain Python loop in jnp: the recurrent matmul reads h ⊙
  rmask (variational dropout), the carry update the unmasked h."""
  H = h_BxH.shape[-1]
  ys = []
  for t in range(x_BxTxI.shape[1]):
    gi = x_BxTxI[:, t] @ p["w_i"] + p["b_i"]
    gh = (h_BxH * rmask_BxH) @ p["w_h"] + p["b_h"]
    r, z = jax.nn.sigmoid(gi[:, :H] + gh[:, :H]), jax.nn.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
    n = jnp.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
    h_BxH = (1 - z) * n + z * h_BxH
    ys.append(h_BxH)
  return jnp.stack(ys, 1), h_BxH


def _assert_matches_reference(ref_loss, ref_p, x, y, h_n, dx):
  """y, h_n and dx against ref_loss(ref_p, x)'s aux (y, h_n) and its x-gradient; returns its
  parameter gradients."""
  (_, (y_ref, h_ref)), (dref, dx_ref) = jax.value_and_grad(ref_loss, (0, 1), has_aux=True)(
      ref_p, x)
  np.testing.assert_allclose(y, y_ref, **TOL)
  np.testing.assert_allclose(h_n, h_ref, **TOL)
  np.testing.assert_allclose(dx, dx_ref, **TOL)
  return dref


@pytest.mark.parametrize("batch", [8, 5])  # the CPU recurrence and every other backend's
def test_dropout_and_recurrent_dropout_match_a_loop_with_the_drawn_masks(batch, drawn_masks,
                                                                         rng):
  """Training mode, 2 layers: inter-layer dropout keeps 1 - dropout of the inputs and scales
  them by 1/(1 - dropout); recurrent dropout keeps 1 - recurrent_dropout of h's units, one mask
  per sequence, scaled likewise. y, h_n and every gradient against a jnp loop that applies the
  masks the model drew (nonzero biases, the custom VJP's rmask terms included)."""
  drop, rdrop, Tn = 0.4, 0.3, 6
  model = GRU(I, H, num_layers=2, dropout=drop, recurrent_dropout=rdrop, rngs=nnx.Rngs(3))
  for layer in model.layers:
    layer.b_h[...] = jnp.asarray(rng.uniform(-1, 1, layer.b_h.shape), jnp.float32)
  x = jnp.asarray(rng.standard_normal((batch, Tn, I)), jnp.float32)
  gy = jnp.asarray(rng.standard_normal((batch, Tn, H)), jnp.float32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, x):
    y, h_n = nnx.merge(graphdef, params, rest)(x, rngs=nnx.Rngs(dropout=11))
    return (y * gy).sum() + (h_n ** 2).sum(), (y, h_n)

  (_, (y, h_n)), (dparams, dx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
  rmask0, dmask1, rmask1 = drawn_masks[:3]  # drawn per layer: (input dropout,) recurrent dropout
  assert rmask0.shape == rmask1.shape == (1, batch, H) and dmask1.shape == (Tn, batch, H)
  for mask, keep in ((rmask0, 1 - rdrop), (rmask1, 1 - rdrop), (dmask1, 1 - drop)):
    assert abs(mask.mean() - keep) < 0.2, (mask.mean(), keep)  # keep-, not drop-probability

  ref_p = [{k: getattr(layer, k)[...][0] for k in ("w_i", "w_h", "b_i", "b_h")}
           for layer in model.layers]

  def ref_loss(ref_p, x):
    y0, h0 = _gru_loop(ref_p[0], x, jnp.zeros((batch, H)), rmask0[0] / (1 - rdrop))
    x1 = y0 * np.swapaxes(dmask1, 0, 1) / (1 - drop)
    y1, h1 = _gru_loop(ref_p[1], x1, jnp.zeros((batch, H)), rmask1[0] / (1 - rdrop))
    h_n = jnp.stack([h0, h1])
    return (y1 * gy).sum() + (h_n ** 2).sum(), (y1, h_n)

  dref = _assert_matches_reference(ref_loss, ref_p, x, y, h_n, dx)
  dmodel = nnx.merge(graphdef, dparams, rest)
  for l, layer in enumerate(dmodel.layers):
    for k in ("w_i", "w_h", "b_i", "b_h"):
      np.testing.assert_allclose(getattr(layer, k)[...][0], dref[l][k], err_msg=f"d{k} layer {l}",
                                 **TOL)


def _lstm_loop(p, x_BxTxI, h_BxH, rmask_BxH):
  """One LSTM layer as a jnp loop: the recurrent matmul reads h ⊙ rmask, the carry is unmasked."""
  H, c_BxH, ys = h_BxH.shape[-1], jnp.zeros_like(h_BxH), []
  for t in range(x_BxTxI.shape[1]):
    g = x_BxTxI[:, t] @ p["w_i"] + p["b_i"] + (h_BxH * rmask_BxH) @ p["w_h"] + p["b_h"]
    i, f, o = (jax.nn.sigmoid(g[:, k * H:(k + 1) * H]) for k in (0, 1, 3))
    c_BxH = f * c_BxH + i * jnp.tanh(g[:, 2 * H:3 * H])
    h_BxH = o * jnp.tanh(c_BxH)
    ys.append(h_BxH)
  return jnp.stack(ys, 1), h_BxH


def _cho_loop(p, x_BxTxI, h_BxH, rmask_BxH):
  """One reset_after=False layer as a jnp loop: both recurrent matmuls read h ⊙ rmask."""
  H, ys = h_BxH.shape[-1], []
  for t in range(x_BxTxI.shape[1]):
    gi, hm = x_BxTxI[:, t] @ p["w_i"] + p["b_i"], h_BxH * rmask_BxH
    rz = jax.nn.sigmoid(gi[:, :2 * H] + hm @ p["w_h"][:, :2 * H] + p["b_h"][:2 * H])
    r, z = rz[:, :H], rz[:, H:]
    n = jnp.tanh(gi[:, 2 * H:] + (r * hm) @ p["w_h"][:, 2 * H:] + p["b_h"][2 * H:])
    h_BxH = (1 - z) * n + z * h_BxH
    ys.append(h_BxH)
  return jnp.stack(ys, 1), h_BxH


@pytest.mark.parametrize("make,loop", [
    (lambda **kw: LSTM(I, H, **kw), _lstm_loop),
    (lambda **kw: GRU(I, H, reset_after=False, **kw), _cho_loop)], ids=["LSTM", "reset_before"])
def test_recurrent_dropout_of_the_scan_cells_matches_a_loop_with_the_drawn_mask(make, loop,
                                                                                drawn_masks, rng):
  """The LSTM's and the reset_after=False GRU's own scans (not the GRU's custom VJP above):
  y, the final h and every gradient against a jnp loop with the mask the model drew."""
  rdrop = 0.4
  model = make(recurrent_dropout=rdrop, rngs=nnx.Rngs(5))
  model.layers[0].b_h[...] = jnp.asarray(rng.uniform(-1, 1, model.layers[0].b_h.shape),
                                         jnp.float32)
  x = jnp.asarray(rng.standard_normal((B, T, I)), jnp.float32)
  gy = jnp.asarray(rng.standard_normal((B, T, H)), jnp.float32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, x):
    y, carry = nnx.merge(graphdef, params, rest)(x, rngs=nnx.Rngs(dropout=2))
    h_n = carry[0] if isinstance(carry, tuple) else carry
    return (y * gy).sum() + (h_n ** 2).sum(), (y, h_n[0])

  (_, (y, h_n)), (dparams, dx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
  (rmask,) = drawn_masks
  assert 0 < rmask.mean() < 1 and rmask.shape == (1, B, H)
  ref_p = {k: getattr(model.layers[0], k)[...][0] for k in ("w_i", "w_h", "b_i", "b_h")}

  def ref_loss(ref_p, x):
    y, h = loop(ref_p, x, jnp.zeros((B, H)), rmask[0] / (1 - rdrop))
    return (y * gy).sum() + (h ** 2).sum(), (y, h)

  dref = _assert_matches_reference(ref_loss, ref_p, x, y, h_n, dx)
  for k in ("w_i", "w_h", "b_i", "b_h"):
    np.testing.assert_allclose(getattr(nnx.merge(graphdef, dparams, rest).layers[0], k)[...][0],
                               dref[k], err_msg=f"d{k}", **TOL)


BAD_CALLS = [
    (dict(x=np.zeros((B, I))), "x_BxTxI must be rank 3"),
    (dict(x=np.zeros((B, T, I + 1))), "in_features=5"),
    (dict(x=np.zeros((B, 0, I))), r"x_BxTxI has no timesteps \(shape \(8, 0, 5\)\)"),
    (dict(seq_lengths=np.array([1, 2])), r"seq_lengths must be an int array of shape \(8,\)"),
    (dict(seq_lengths=np.array([1, 2, 3, 4, 5, 6, 7, T + 1])), r"seq_lengths must lie in \[0, 7\]"),
    (dict(seq_lengths=np.array([1, 2, 3, 4, 5, 6, 7, -1])), r"seq_lengths must lie in \[0, 7\]"),
    (dict(seq_lengths=np.ones(B, np.float32)), "seq_lengths must be an int array"),
    # Lengths read from a file: a TypeError/ValueError from jnp.asarray that named no argument.
    (dict(seq_lengths=[str(t) for t in range(B)]), r"seq_lengths must be an int array .* <U1"),
    (dict(seq_lengths=[None] + [1] * (B - 1)), r"seq_lengths must be an int array .* object"),
    # int64 beyond int32 wrapped to 1 in jnp.asarray (x64 off) and passed the range check
    (dict(seq_lengths=np.array([2**32 + 1, 1, 2, 3, 4, 5, 6, 7], np.int64)),
     r"seq_lengths must lie in \[0, 7\] .* got values in \[1, 4294967297\]"),
    (dict(initial_carry=np.zeros((1, B, H))), r"initial_carry must be \(2, 8, 6\)"),
    # The imaginary part was dropped silently and y came back complex64 (of the real part).
    (dict(x=np.zeros((B, T, I), np.complex64)), r"GRU: x_BxTxI must be real .* got complex64"),
    # Values read from a file: JAX's TypeError named no argument.
    (dict(x=np.zeros((B, T, I)).astype(str)), r"GRU: x_BxTxI must be a numeric array of shape "
                                              r"\(B, T, 5\), got <U32 values"),
    (dict(x=np.zeros((B, T, I), object)), r"x_BxTxI must be a numeric array .* got object"),
]


@pytest.mark.parametrize("bad,message", BAD_CALLS)
def test_bad_input_is_a_clear_value_error(bad, message):
  model = GRU(I, H, num_layers=2, rngs=nnx.Rngs(0))
  args = dict(x=np.zeros((B, T, I), np.float32), seq_lengths=None, initial_carry=None) | bad
  with pytest.raises(ValueError, match=message):
    model(args.pop("x"), **args)


def test_bad_constructor_and_step_arguments():
  with pytest.raises(ValueError, match="hidden_features must be a positive int"):
    GRU(I, 0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\)"):
    GRU(I, H, dropout=1.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"recurrent_dropout must be a number in .*, got '0.1'"):
    GRU(I, H, recurrent_dropout="0.1", rngs=nnx.Rngs(0))
  # Strings from a config or a command line are truthy: "no" would have meant True.
  for flag in ("reset_after", "bidirectional", "remat"):
    with pytest.raises(ValueError, match=f"GRU: {flag} must be True or False, got 'no'"):
      GRU(I, H, **{flag: "no"}, rngs=nnx.Rngs(0))
  assert GRU(I, H, bidirectional=np.True_, rngs=nnx.Rngs(0)).bidirectional is True
  with pytest.raises(ValueError, match="initial_carry must be real .float., got complex64"):
    GRU(I, H, rngs=nnx.Rngs(0))(np.zeros((B, T, I), np.float32),
                                initial_carry=np.zeros((1, B, H), np.complex64))
  with pytest.raises(ValueError, match="bidirectional stack cannot run one step"):
    GRU(I, H, bidirectional=True, rngs=nnx.Rngs(0)).step(jnp.zeros((2, B, H)), jnp.zeros((B, I)))
  with pytest.raises(ValueError, match=r"carry must be \(1, 8, 6\)"):
    GRU(I, H, rngs=nnx.Rngs(0)).step(jnp.zeros((2, B, H)), jnp.zeros((B, I)))
  # It was (num_layers, B, H) for a bidirectional stack too, a carry its call refused.
  bi = GRU(I, H, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
  assert bi(np.zeros((B, T, I), np.float32), initial_carry=bi.initial_carry(B))[1].shape == (
      4, B, H)
  # Call-time rngs without a dropout stream: a KeyError / "PRNGKeyArray is not callable".
  drop = GRU(I, H, num_layers=2, dropout=0.3, rngs=nnx.Rngs(params=0))
  with pytest.raises(ValueError, match=r"GRU: the rngs given have no 'dropout' \(or 'default'\)"):
    drop(np.zeros((B, T, I), np.float32), rngs=nnx.Rngs(params=1))
  with pytest.raises(ValueError, match=r"GRU: rngs must be an nnx.Rngs .* got PRNGKeyArray"):
    drop(np.zeros((B, T, I), np.float32), rngs=jax.random.key(1))
  with pytest.raises(ValueError, match=r"initial_carry: batch_size must be an int >= 0, got -1"):
    GRU(I, H, rngs=nnx.Rngs(0)).initial_carry(-1)
  # A bool is an Integral: True was a batch of 1, as the constructor's sizes no longer allow.
  with pytest.raises(ValueError, match=r"batch_size must be an int >= 0, got True"):
    GRU(I, H, rngs=nnx.Rngs(0)).initial_carry(True)
  # step returned a complex carry (and a y with the imaginary part dropped) where the call
  # refuses a complex initial_carry.
  for cls in (GRU, LSTM, MinGRU):
    model = cls(I, H, rngs=nnx.Rngs(0))
    carry = jax.tree.map(lambda c: c.astype(jnp.complex64), model.initial_carry(B))
    with pytest.raises(ValueError, match=f"{cls.__name__}: carry must be real .float., got "
                                         "complex64"):
      model.step(carry, jnp.zeros((B, I)))
    with pytest.raises(ValueError, match=f"{cls.__name__}.step: x_BxI must be real"):
      model.step(model.initial_carry(B), jnp.zeros((B, I), jnp.complex64))
  # numpy ints (from configs or shapes) are sizes too, stored as Python ints
  model = GRU(np.int64(I), np.int32(H), num_layers=np.int64(1), rngs=nnx.Rngs(0))
  assert type(model.hidden_features) is int and model.initial_carry(np.int64(2)).shape == (1, 2, H)
  # An empty batch is empty on every impl (the Pallas blocks cannot tile it).
  for impl in ("scan", "pallas"):
    y, h_n = GRU(I, H, impl=impl, rngs=nnx.Rngs(0))(np.zeros((0, T, I), np.float32))
    assert y.shape == (0, T, H) and h_n.shape == (1, 0, H)


def test_jit_of_whole_model_traces_lengths(rng):
  """seq_lengths may be a tracer under jit (range checks then happen only eagerly)."""
  model = GRU(I, H, rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.standard_normal((B, T, I)), jnp.float32)
  lengths = jnp.asarray([T, 2, 3, 4, 1, 7, 6, 5])
  y_jit, _ = nnx.jit(lambda m, x, n: m(x, n))(model, x, lengths)
  np.testing.assert_allclose(y_jit, model(x, lengths)[0], rtol=1e-6, atol=1e-6)
  # Closed over, the concrete lengths are still range-checked (their jnp.min was staged into
  # the jit and could not be read: ConcretizationTypeError).
  graphdef, params = nnx.split(model)
  y_closed, _ = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, lengths))(params, x)
  np.testing.assert_allclose(y_closed, y_jit, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"seq_lengths must lie in \[0, 7\]"):
    too_long = lengths + 1
    jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, too_long))(params, x)


def test_seq_lengths_as_a_list_may_be_traced(rng):
  """A list of lengths through jit is a list of tracers: the host range check read it with
  np.asarray (TracerArrayConversionError) where a traced array is let through."""
  model = GRU(I, H, bidirectional=True, rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.standard_normal((3, T, I)), jnp.float32)
  lengths = [T, 0, 2]
  y_jit, h_jit = jax.jit(lambda x, n: model(x, n))(x, lengths)
  y, h_n = model(x, lengths)
  np.testing.assert_allclose(y_jit, y, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(h_jit, h_n, rtol=1e-6, atol=1e-6)


def test_cpu_compiler_options_keep_the_numbers(rng):
  """The CPU speed options (legacy fusion emitter) must not change results."""
  from gru_tpu.models import compiler_options
  from gru_tpu.models.gru import _cpu_knows
  assert compiler_options("cpu") == {"xla_cpu_use_fusion_emitters": False}  # jax 0.10 has it
  assert compiler_options("tpu") == {}
  # jax >= 0.11.2 dropped the option and refuses to compile with it: it must then be left out.
  assert not _cpu_knows("xla_cpu_no_such_option")
  model = GRU(I, H, num_layers=2, bidirectional=True, rngs=nnx.Rngs(8))
  graphdef, params = nnx.split(model)
  x = jnp.asarray(rng.standard_normal((B, 12, I)), jnp.float32)
  grad = jax.grad(lambda p: (nnx.merge(graphdef, p)(x)[0] ** 2).sum())
  fast = jax.jit(grad, compiler_options=compiler_options("cpu"))(params)
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(jax.jit(grad)(params)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _region(text: str, start: int) -> str:
  """The brace-balanced region opened by the first '{' that ends a line at or after `start`."""
  i = text.index("{\n", start)
  depth = 0
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j + 1]
  raise ValueError("unbalanced braces")


def _dots(mlir: str, body: str, funcs: dict) -> int:
  """dot_generals in `body`, following func.call into the module's private functions."""
  return body.count("stablehlo.dot_general") + sum(
      _dots(mlir, funcs[name], funcs) for name in re.findall(r"func\.call @([\w.]+)\(", body))


def loop_and_total_dots(mlir: str) -> tuple[list[int], int]:
  funcs = {m.group(1): _region(mlir, m.end())
           for m in re.finditer(r"func\.func (?:private|public) @([\w.]+)\(", mlir)}
  main = funcs["main"]
  loops = [_dots(mlir, _region(main, m.end() + main[m.end():].index("do {")), funcs)
           for m in re.finditer(r"stablehlo\.while", main)]
  return loops, _dots(mlir, main, funcs)


@pytest.mark.parametrize("train", [False, True])
def test_tpu_lowering_has_one_recurrent_dot_per_step_and_a_hoisted_projection(train):
  """Lowered for TPU (from this CPU host): each time loop holds exactly one matmul, h·W_h (or
  dh·W_h^T going backwards), and the input projections sit outside every loop."""
  model = GRU(8, 16, num_layers=2, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  x = jnp.zeros((16, 12, 8))
  fwd = lambda p, x: (nnx.merge(graphdef, p)(x)[0] ** 2).sum()
  fn = jax.jit(jax.grad(fwd) if train else fwd)
  mlir = jax.export.export(fn, platforms=["tpu"])(params, x).mlir_module()
  loops, total = loop_and_total_dots(mlir)
  loops = [n for n in loops if n]
  assert loops == [1] * (4 if train else 2)  # per layer: forward loop (+ backward loop)
  assert total - len(loops) >= 2  # the projections (and weight gradients) are outside the loops


SPLIT_BATCH = """
import re, jax, jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from gru_tpu.models import GRU
graphdef, params = nnx.split(GRU(8, 16, rngs=nnx.Rngs(0)))
loss = lambda p, x: (nnx.merge(graphdef, p)(x)[0] ** 2).sum()
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
x = jax.device_put(jnp.ones((16, 12, 8)), NamedSharding(mesh, P("data")))
def collectives(hlo):
  return sorted(set(re.findall(r"\\b(all-gather|collective-permute|all-to-all|all-reduce)", hlo)))
with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as the engine traces its steps
  print(collectives(jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()))
print(collectives(jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()))  # no mesh
"""


def test_a_batch_split_over_cpu_devices_is_not_gathered_or_permuted():
  """8 CPU devices, 16 rows on 'data': the CPU form's two half-batch chains and (T·B)-flat
  matmuls would make the partitioner gather the batch and permute rows inside the time loops
  (a tiny train step took 110–130 ms instead of 7); the gradient is one all-reduce."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", SPLIT_BATCH], capture_output=True, text=True, env=env,
                     timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split("\n")[-3:] == ["['all-reduce']", "['all-reduce']", ""], r.stdout
