"""Weights from PyTorch, Flax linen and Keras into gru_tpu models (numerically exact).

  gru_from_torch(torch.nn.GRU) / lstm_from_torch(torch.nn.LSTM)   any num_layers, bidirectional
  gru_from_linen(params)        linen GRUCell params (or nn.RNN's {'cell': ...}); a list = layers
  gru_from_keras(weights)       Keras GRU `layer.get_weights()`; a list of them = layers

torch is imported by the caller, never here, so this module loads without it.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gru_tpu.models import GRU, LSTM
from gru_tpu.models.stack import RecurrentStack


def _assign(model: RecurrentStack, layers: Sequence[Sequence[dict[str, np.ndarray]]]):
  """layers[l][d] = {'w_i': (I, G·H), 'w_h': (H, G·H), 'b_i': (G·H,), 'b_h': (G·H,)}."""
  for layer, dirs in zip(model.layers, layers, strict=True):
    for name in ("w_i", "w_h", "b_i", "b_h"):
      var = getattr(layer, name)
      value = np.stack([np.asarray(d[name], np.float32) for d in dirs])
      if value.shape != var.shape:
        raise ValueError(f"{name}: converted weights have shape {value.shape}, the model expects "
                         f"{var.shape}")
      var[...] = jnp.asarray(value, var.dtype)
  return model


def _torch_layers(module, num_layers: int, directions: int):
  def get(name):
    return getattr(module, name).detach().cpu().double().numpy()

  return [[{"w_i": get(f"weight_ih_l{l}{sfx}").T, "w_h": get(f"weight_hh_l{l}{sfx}").T,
            "b_i": get(f"bias_ih_l{l}{sfx}"), "b_h": get(f"bias_hh_l{l}{sfx}")}
           for sfx in ("", "_reverse")[:directions]] for l in range(num_layers)]


def _reset_after_only(source: str, kwargs: dict) -> None:
  """torch and linen GRUs apply r after the recurrent matmul: reset_after=False would build
  another function from the same weights."""
  flag = kwargs.get("reset_after", True)
  if not isinstance(flag, (bool, np.bool_)) or not flag:  # np.True_ from a config is True too
    raise ValueError(f"{source} GRUs are reset_after=True; reset_after="
                     f"{kwargs['reset_after']!r} would compute another function from its weights")


def _sizes_from_weights(source: str, kwargs: dict) -> None:
  """The converted weights fix these; passed again they were a raw 'multiple values' TypeError."""
  given = [k for k in ("in_features", "hidden_features", "num_layers", "bidirectional")
           if k in kwargs]
  if given:
    raise ValueError(f"{source}: {', '.join(given)} come(s) from the converted weights; drop "
                     f"the argument(s) (kwargs are for GRU options such as unroll, remat, dtype)")


def _from_torch(cls, module, kwargs):
  # batch_first only changes the call layout, not the weights; gru_tpu is always batch-major.
  if not module.bias or getattr(module, "proj_size", 0):
    raise ValueError(f"{type(module).__name__}: bias=False and proj_size are not supported")
  _sizes_from_weights(f"{cls.__name__.lower()}_from_torch", kwargs)
  if cls is GRU:
    _reset_after_only("torch", kwargs)
  model = cls(module.input_size, module.hidden_size, num_layers=module.num_layers,
              bidirectional=module.bidirectional, dropout=kwargs.pop("dropout", module.dropout),
              rngs=kwargs.pop("rngs", None) or nnx.Rngs(0), **kwargs)
  if not module.training:  # the same function as the module: an eval() module drops nothing
    model.eval()
  return _assign(model, _torch_layers(module, module.num_layers, model.num_directions))


def gru_from_torch(module: Any, **kwargs) -> GRU:
  """A GRU equal to `module` (torch.nn.GRU), in eval mode if the module is. kwargs go to GRU
  (e.g. unroll, remat, dtype, dropout: by default the module's)."""
  return _from_torch(GRU, module, kwargs)


def lstm_from_torch(module: Any, **kwargs) -> LSTM:
  """An LSTM equal to `module` (torch.nn.LSTM). kwargs go to LSTM."""
  return _from_torch(LSTM, module, kwargs)


def gru_from_linen(params: Any, **kwargs) -> GRU:
  """A unidirectional GRU from linen GRUCell params ({'ir','iz','in','hr','hz','hn'}).

  Accepts one cell's params, `nn.RNN`'s {'cell': ...}, either wrapped in {'params': ...}, or a
  list of those for a multi-layer stack. linen has no b_hr/b_hz (they are folded into b_ir/b_iz),
  so those become zeros.
  """
  _sizes_from_weights("gru_from_linen", kwargs)
  _reset_after_only("linen", kwargs)
  cells = params if isinstance(params, (list, tuple)) else [params]
  layers = []
  for p in cells:
    p = p.get("params", p)
    p = p.get("cell", p)
    kernel = lambda k: np.asarray(p[k]["kernel"])
    H = kernel("hr").shape[0]
    layers.append([{
        "w_i": np.concatenate([kernel("ir"), kernel("iz"), kernel("in")], axis=1),
        "w_h": np.concatenate([kernel("hr"), kernel("hz"), kernel("hn")], axis=1),
        "b_i": np.concatenate([np.asarray(p[k]["bias"]) for k in ("ir", "iz", "in")]),
        "b_h": np.concatenate([np.zeros(2 * H), np.asarray(p["hn"]["bias"])]),
    }])
  model = GRU(layers[0][0]["w_i"].shape[0], layers[0][0]["w_h"].shape[0], num_layers=len(layers),
              rngs=kwargs.pop("rngs", None) or nnx.Rngs(0), **kwargs)
  return _assign(model, layers)


def gru_from_keras(weights: Sequence[Any], *, reset_after: bool = True, **kwargs) -> GRU:
  """A unidirectional GRU from Keras GRU weights [kernel (I, 3H), recurrent_kernel (H, 3H), bias].

  Keras orders gates z|r|h; bias is (2, 3H) [input; recurrent] when reset_after=True, else (3H,)
  on the input side only. `weights` may also be a list of such lists, one per layer.
  """
  _sizes_from_weights("gru_from_keras", kwargs)
  stack = weights if isinstance(weights[0], (list, tuple)) else [weights]
  layers = []
  for w in stack:
    if len(w) != 3:
      # 2 arrays: use_bias=False; 6: a Bidirectional wrapper (forward then backward weights).
      raise ValueError(f"gru_from_keras: expected [kernel, recurrent_kernel, bias] per layer, got "
                       f"{len(w)} arrays; a Keras GRU with use_bias=False (2 arrays) or wrapped "
                       f"in Bidirectional (6 arrays) is not supported")
    kernel, rkernel, bias = w
    kernel, rkernel, bias = (np.asarray(a) for a in (kernel, rkernel, bias))
    H = rkernel.shape[0]
    zrh_to_rzn = lambda a: np.concatenate([a[..., H:2 * H], a[..., :H], a[..., 2 * H:]], axis=-1)
    if reset_after:
      if bias.shape != (2, 3 * H):
        raise ValueError(f"gru_from_keras: reset_after=True expects a (2, {3 * H}) bias, got "
                         f"{bias.shape}; pass reset_after=False for a Keras reset_after=False GRU")
      b_i, b_h = bias[0], bias[1]
    else:
      if bias.shape != (3 * H,):
        raise ValueError(f"gru_from_keras: reset_after=False expects a ({3 * H},) bias, got "
                         f"{bias.shape}")
      b_i, b_h = bias, np.zeros(3 * H)
    layers.append([{"w_i": zrh_to_rzn(kernel), "w_h": zrh_to_rzn(rkernel),
                    "b_i": zrh_to_rzn(b_i), "b_h": zrh_to_rzn(b_h)}])
  model = GRU(layers[0][0]["w_i"].shape[0], layers[0][0]["w_h"].shape[0], num_layers=len(layers),
              reset_after=reset_after, rngs=kwargs.pop("rngs", None) or nnx.Rngs(0), **kwargs)
  return _assign(model, layers)
