"""Converters from torch, Flax linen and Keras: the converted model computes the same function."""

import os
import warnings

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import randomize_biases
from gru_tpu import convert

os.environ.setdefault("KERAS_BACKEND", "jax")
import keras  # noqa: E402

I, H, B, T = 4, 5, 3, 6
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,fn", [(torch.nn.GRU, convert.gru_from_torch),
                                    (torch.nn.LSTM, convert.lstm_from_torch)])
@pytest.mark.parametrize("L,bi", [(1, False), (3, True)])
def test_from_torch(cls, fn, L, bi, rng):
  ref = randomize_biases(cls(I, H, num_layers=L, bidirectional=bi, batch_first=True))
  model = fn(ref)
  assert (model.num_layers, model.bidirectional) == (L, bi)
  x = rng.standard_normal((B, T, I)).astype(np.float32)
  y_ref, h_ref = ref(torch.tensor(x))
  y, h = model(x)
  np.testing.assert_allclose(y, y_ref.detach().numpy(), **TOL)
  hs, hs_ref = (h, h_ref) if isinstance(h, tuple) else ((h,), (h_ref,))
  for a, b in zip(hs, hs_ref, strict=True):
    np.testing.assert_allclose(a, b.detach().numpy(), **TOL)


def test_torch_module_in_eval_mode_converts_to_the_same_function(rng):
  ref = randomize_biases(torch.nn.GRU(I, H, num_layers=2, dropout=0.5, batch_first=True)).eval()
  x = rng.standard_normal((B, T, I)).astype(np.float32)
  y_ref = ref(torch.tensor(x))[0].detach().numpy()
  np.testing.assert_allclose(convert.gru_from_torch(ref)(x)[0], y_ref, **TOL)  # no dropout
  train = convert.gru_from_torch(ref.train())
  assert not train.deterministic and train.dropout == 0.5
  assert convert.gru_from_torch(ref, dropout=0.0).dropout == 0.0   # kwargs override the module's


def test_dropout_warning_points_at_the_converter_call():
  """A 1-layer module with dropout: the no-effect warning names the user's line, not convert.py."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch's own warning about the same module
    ref = torch.nn.GRU(I, H, dropout=0.5)
  keras_weights = [np.zeros((I, 3 * H)), np.zeros((H, 3 * H)), np.zeros((2, 3 * H))]
  for build in (lambda: convert.gru_from_torch(ref),
                lambda: convert.gru_from_keras(keras_weights, dropout=0.5)):
    with pytest.warns(UserWarning, match="dropout=0.5 has no effect with num_layers=1") as w:
      build()
    assert [x.filename for x in w] == [__file__]


def test_torch_without_bias_is_rejected():
  with pytest.raises(ValueError, match="bias=False"):
    convert.gru_from_torch(torch.nn.GRU(I, H, bias=False))


def test_reset_after_false_is_refused_for_torch_and_linen():
  """It was passed on to GRU: a model 0.25 away from the module it was converted from."""
  with pytest.raises(ValueError, match=r"torch GRUs are reset_after=True; reset_after=False"):
    convert.gru_from_torch(torch.nn.GRU(I, H), reset_after=False)
  params = {"params": {k: {"kernel": np.ones((I if k[0] == "i" else H, H))} | (
      {"bias": np.ones(H)} if k in ("ir", "iz", "in", "hn") else {})
      for k in ("ir", "iz", "in", "hr", "hz", "hn")}}
  with pytest.raises(ValueError, match=r"linen GRUs are reset_after=True"):
    convert.gru_from_linen(params, reset_after=False)
  assert convert.gru_from_linen(params, reset_after=True).reset_after
  # A flag from a config or numpy (np.True_) is True too; it was refused as "another function".
  assert convert.gru_from_linen(params, reset_after=np.True_).reset_after
  assert convert.gru_from_torch(torch.nn.GRU(I, H), reset_after=np.True_).reset_after
  with pytest.raises(ValueError, match=r"torch GRUs are reset_after=True; reset_after=0"):
    convert.gru_from_torch(torch.nn.GRU(I, H), reset_after=0)
  # Sizes come from the weights ("GRU() got multiple values for keyword argument" before).
  with pytest.raises(ValueError, match=r"lstm_from_torch: num_layers, bidirectional come\(s\) "
                                       r"from the converted weights"):
    convert.lstm_from_torch(torch.nn.LSTM(I, H), num_layers=2, bidirectional=True)
  with pytest.raises(ValueError, match=r"gru_from_linen: hidden_features come"):
    convert.gru_from_linen(params, hidden_features=H)


def nonzero(tree, key):
  """linen initialises biases to zero; replace every leaf with random values."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([jax.random.normal(k, l.shape) * 0.5 for k, l in zip(keys, leaves)])


def test_from_linen_rnn_of_gru_cells(rng):
  x = jnp.asarray(rng.standard_normal((B, T, I)), jnp.float32)
  rnns = [linen.RNN(linen.GRUCell(H)), linen.RNN(linen.GRUCell(H))]
  params = [nonzero(rnns[0].init(jax.random.key(0), x), jax.random.key(1)),
            nonzero(rnns[1].init(jax.random.key(2), jnp.zeros((B, T, H))), jax.random.key(3))]
  y_ref = rnns[1].apply(params[1], rnns[0].apply(params[0], x))
  y, h_n = convert.gru_from_linen(params)(x)
  np.testing.assert_allclose(y, y_ref, **TOL)
  np.testing.assert_allclose(h_n[1], y_ref[:, -1], **TOL)


@pytest.mark.parametrize("reset_after", [True, False])
def test_from_keras(reset_after, rng):
  layer = keras.layers.GRU(H, return_sequences=True, reset_after=reset_after)
  x = rng.standard_normal((B, T, I)).astype(np.float32)
  layer.build((B, T, I))
  layer.set_weights([w + rng.uniform(-0.5, 0.5, w.shape).astype(np.float32)
                     for w in layer.get_weights()])  # keras biases start at zero
  y_ref = np.asarray(layer(x))
  model = convert.gru_from_keras(layer.get_weights(), reset_after=reset_after)
  np.testing.assert_allclose(model(x)[0], y_ref, **TOL)


def test_keras_bias_shape_mismatch_names_the_fix():
  w = [np.zeros((I, 3 * H)), np.zeros((H, 3 * H)), np.zeros(3 * H)]
  with pytest.raises(ValueError, match="pass reset_after=False"):
    convert.gru_from_keras(w, reset_after=True)
  with pytest.raises(ValueError, match="got 2 arrays; a Keras GRU with use_bias=False"):
    convert.gru_from_keras(w[:2])
  # Bidirectional(GRU).get_weights() is forward + backward: it blamed use_bias=False
  with pytest.raises(ValueError, match=r"got 6 arrays; .* Bidirectional \(6 arrays\)"):
    convert.gru_from_keras(w + w)
