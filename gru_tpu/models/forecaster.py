"""Forecasting network: recurrent encoder -> direct or autoregressive decoder -> distribution head.

A batch is a dict of windows of W = pad + horizon steps, pad = max(lags) + context_length:
  y_BxWxC         targets (C of them) in scaled units, missing values imputed
  observed_BxWxC  1 where the target was observed, else 0
  known_BxWxK     known in advance: calendar features, known-future covariates
  past_BxWxP      past-only covariates (imputed)
Window step j is time o - pad + j for the forecast origin o: steps [pad - context_length, pad)
are the context, [pad, W) the horizon. The input at step j holds the target and its observed
flag at j - l for every lag l ≥ 1 (normalised by the context's mean/std, `window_norm`), known
features at j, past covariates at j - 1 (zero once j - 1 is in the horizon, where they are not
known) and a flag for 'j - 1 is in the context'. So the input at step j never reads a target at
j or later.

decoder="direct": the encoder runs over steps (pad - context_length, pad]; its last output, a
learned embedding of the horizon step and that step's known features go through an MLP to the
distribution of every horizon step at once (MQ-RNN style).
decoder="autoregressive" (DeepAR): one network over context and horizon. Training is
teacher-forced over all steps [pad - context_length, W); forecasting runs the context through the
scanned stack, then carries the recurrent state with `step`, feeding back its own samples (the
median for the point head).

Heads, all location-scale families (so the window normalisation inverts exactly): point (MSE or
MAE), gaussian and student_t (negative log-likelihood), quantile (pinball loss at fixed levels,
monotone by construction).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gru_tpu.models.lm import CELLS, dense

NUM_PARAMS = {"point": 1, "gaussian": 2, "student_t": 3}
DECODERS = ("direct", "autoregressive")
WINDOW_NORMS = ("none", "mean", "standard")
MIN_WINDOW_STD = 0.1  # in scaled units (the series' std is ~1): a flat context is not blown up


class Forecaster(nnx.Module):

  def __init__(self, *, num_targets: int, num_known: int, num_past: int, lags, context_length: int,
               horizon: int, decoder: str = "direct", head: str = "gaussian",
               point_loss: str = "mse", quantiles=(0.1, 0.5, 0.9), cell: str = "gru",
               hidden: int = 64, num_layers: int = 1, embed_dim: int = 16, dropout: float = 0.0,
               recurrent_dropout: float = 0.0, window_norm: str = "mean", remat: bool = False,
               unroll: int = 1, dtype=None, impl: str = "auto", rngs: nnx.Rngs):
    for arg, value, allowed in (("decoder", decoder, DECODERS),
                                ("head", head, (*NUM_PARAMS, "quantile")),
                                ("point_loss", point_loss, ("mse", "mae")),
                                ("window_norm", window_norm, WINDOW_NORMS),
                                ("cell", cell, tuple(CELLS))):
      if value not in allowed:
        raise ValueError(f"{arg} must be one of {', '.join(allowed)}, got {value!r}")
    lags = tuple(int(l) for l in lags)
    if not lags or min(lags) < 1:
      raise ValueError(f"lags must be integers >= 1, got {lags}")
    if head == "quantile" and (not quantiles or list(quantiles) != sorted(set(quantiles)) or
                               not 0 < min(quantiles) <= max(quantiles) < 1):
      raise ValueError(f"quantiles must be increasing levels in (0, 1), got {quantiles}")
    self.C, self.lags = num_targets, lags
    self.context_length, self.horizon = context_length, horizon
    self.pad = max(lags) + context_length
    self.decoder, self.head = decoder, head
    self.point_loss, self.window_norm = point_loss, window_norm
    self.quantiles = tuple(float(q) for q in quantiles)
    self.num_params = len(self.quantiles) if head == "quantile" else NUM_PARAMS[head]
    features = 2 * num_targets * len(lags) + num_known + num_past + 1
    self.rnn = CELLS[cell](features, hidden, num_layers=num_layers, dropout=dropout,
                           recurrent_dropout=recurrent_dropout, remat=remat, unroll=unroll,
                           dtype=dtype, rngs=rngs, **({"impl": impl} if cell == "gru" else {}))
    out = num_targets * self.num_params
    if decoder == "direct":
      self.step_embed = nnx.Embed(horizon, embed_dim, rngs=rngs)
      self.mlp = nnx.Linear(hidden + embed_dim + num_known, hidden, dtype=dtype, rngs=rngs)
    # The distribution head computes in f32 whatever the compute dtype (HIGHEST: TPUs run f32
    # dots in bf16 passes by default): its output is the forecast, and it is only C·P columns
    # wide. With its kernel and input in bf16, a trained model's eval MAE was 3 % worse than
    # under f32 compute with the same parameters, and its gradients 26 % off f32's (6 % with
    # this head: the rest is the recurrence's own bf16 rounding).
    self.out = nnx.Linear(hidden, out, precision=jax.lax.Precision.HIGHEST, rngs=rngs)

  # -- inputs ---------------------------------------------------------------------------------

  def _norm(self, y_BxWxC, obs_BxWxC):
    """Location and scale of each window's observed context, (B, C) each."""
    B = y_BxWxC.shape[0]
    if self.window_norm == "none":
      return jnp.zeros((B, self.C), y_BxWxC.dtype), jnp.ones((B, self.C), y_BxWxC.dtype)
    ctx = slice(self.pad - self.context_length, self.pad)
    y, w = y_BxWxC[:, ctx], obs_BxWxC[:, ctx]
    n = jnp.maximum(w.sum(1), 1.0)
    mu = (y * w).sum(1) / n
    if self.window_norm == "mean":
      return mu, jnp.ones_like(mu)
    var = (jnp.square(y - mu[:, None]) * w).sum(1) / n
    return mu, jnp.maximum(jnp.sqrt(var), MIN_WINDOW_STD)

  def _features(self, b: dict, mu_BxC, s_BxC, pos_N: jax.Array) -> jax.Array:
    """Inputs at window steps pos_N: (B, N, F)."""
    B = b["y"].shape[0]
    lag_pos = pos_N[:, None] - jnp.asarray(self.lags)[None, :]            # (N, L)
    y = (jnp.take(b["y"], lag_pos, axis=1) - mu_BxC[:, None, None]) / s_BxC[:, None, None]
    obs = jnp.take(b["observed"], lag_pos, axis=1)
    N = pos_N.shape[0]
    in_context = (pos_N - 1 < self.pad).astype(jnp.float32)                # (N,)
    past = jnp.take(b["past"], pos_N - 1, axis=1) * in_context[None, :, None]
    return jnp.concatenate([y.reshape(B, N, -1), obs.reshape(B, N, -1),
                            jnp.take(b["known"], pos_N, axis=1), past,
                            jnp.broadcast_to(in_context[None, :, None], (B, N, 1))], -1)

  def _raw(self, out_BxTxH):
    raw = dense(self.out, out_BxTxH)
    return raw.reshape(*raw.shape[:-1], self.C, self.num_params)

  def _direct_raw(self, b, mu, s, rngs=None):
    pos = jnp.arange(self.pad - self.context_length + 1, self.pad + 1)
    y_BxTxH, _ = self.rnn(self._features(b, mu, s, pos), rngs=rngs)
    B, H = y_BxTxH.shape[0], self.horizon
    e_HxE = self.step_embed(jnp.arange(H))
    z = jnp.concatenate([jnp.broadcast_to(y_BxTxH[:, -1:], (B, H, y_BxTxH.shape[-1])),
                         jnp.broadcast_to(e_HxE[None], (B, *e_HxE.shape)).astype(y_BxTxH.dtype),
                         b["known"][:, self.pad:self.pad + H].astype(y_BxTxH.dtype)], -1)
    return self._raw(jax.nn.gelu(dense(self.mlp, z)))

  # -- distributions --------------------------------------------------------------------------

  def _dist(self, raw_x_xCxP, mu_BxC, s_BxC) -> dict:
    """Head outputs -> distribution parameters in scaled units (undoing the window norm)."""
    extra = raw_x_xCxP.ndim - 3  # time axes between batch and C
    mu = mu_BxC.reshape(mu_BxC.shape[0], *(1,) * extra, -1)
    s = s_BxC.reshape(mu.shape)
    r = raw_x_xCxP
    if self.head == "quantile":
      q = r[..., :1] + jnp.concatenate(
          [jnp.zeros_like(r[..., :1]), jnp.cumsum(jax.nn.softplus(r[..., 1:]), -1)], -1)
      return {"quantiles": q * s[..., None] + mu[..., None]}
    p = {"loc": r[..., 0] * s + mu}
    if self.head in ("gaussian", "student_t"):
      p["scale"] = (jax.nn.softplus(r[..., 1]) + 1e-3) * s
    if self.head == "student_t":
      p["df"] = 2.0 + jax.nn.softplus(r[..., 2])
    return p

  def _elementwise_loss(self, p: dict, y):
    if self.head == "point":
      e = y - p["loc"]
      return jnp.square(e) if self.point_loss == "mse" else jnp.abs(e)
    if self.head == "quantile":
      return pinball(p["quantiles"], y[..., None], self._levels()).mean(-1)
    z = (y - p["loc"]) / p["scale"]
    if self.head == "gaussian":
      return 0.5 * math.log(2 * math.pi) + jnp.log(p["scale"]) + 0.5 * jnp.square(z)
    df = p["df"]
    return (jax.scipy.special.gammaln(df / 2) - jax.scipy.special.gammaln((df + 1) / 2)
            + 0.5 * jnp.log(df * math.pi) + jnp.log(p["scale"])
            + (df + 1) / 2 * jnp.log1p(jnp.square(z) / df))

  def _levels(self) -> jax.Array:
    return jnp.asarray(self.quantiles, jnp.float32)  # not f64 under jax_enable_x64

  def _median(self, p: dict):
    if self.head == "quantile":
      return quantile_interp(p["quantiles"], self._levels(), jnp.float32(0.5))
    return p["loc"]

  def _sample(self, p: dict, key):
    if self.head == "point":
      return p["loc"]
    if self.head == "quantile":
      q = p["quantiles"]
      u = jax.random.uniform(key, q.shape[:-1], q.dtype)
      return quantile_interp(q, self._levels(), u)
    # The draws take the parameters' dtype: the default float is f64 under jax_enable_x64.
    shape, dtype = p["loc"].shape, p["loc"].dtype
    eps = (jax.random.normal(key, shape, dtype) if self.head == "gaussian"
           else jax.random.t(key, p["df"], shape, dtype))
    return p["loc"] + p["scale"] * eps

  # -- training and forecasting ---------------------------------------------------------------

  def loss(self, b: dict, rngs: nnx.Rngs | None = None):
    """Mean loss over the observed targets of the horizon (direct) or of context + horizon
    (autoregressive, teacher-forced), in scaled units; aux: `mae` of the median forecast and
    `weight`, the number of observed targets the means are over."""
    mu, s = self._norm(b["y"], b["observed"])
    if self.decoder == "direct":
      raw = self._direct_raw(b, mu, s, rngs)
      first = self.pad
    else:
      first = self.pad - self.context_length
      pos = jnp.arange(first, b["y"].shape[1])
      y_BxTxH, _ = self.rnn(self._features(b, mu, s, pos), rngs=rngs)
      raw = self._raw(y_BxTxH)
    p = self._dist(raw, mu, s)
    y, w = b["y"][:, first:], b["observed"][:, first:]
    if "weight" in b:  # eval: 0 for a window already read in this eval
      w = w * b["weight"].reshape(-1, *[1] * (w.ndim - 1))
    n = jnp.maximum(w.sum(), 1.0)
    loss = (self._elementwise_loss(p, y) * w).sum() / n
    # weight: what the engine's grad_accum weighs this batch's means by (dropped from metrics)
    return loss, {"mae": (jnp.abs(y - self._median(p)) * w).sum() / n, "weight": w.sum()}

  def predict(self, b: dict, key, num_samples: int) -> dict:
    """Forecasts for the horizon of each window, reading only the context (targets at steps
    >= pad are ignored). Returns, in scaled units, `median` (B, H, C), `samples` (S, B, H, C)
    unless the model is a point model, and `quantiles` (B, H, C, Q) for the direct quantile head.
    H is the window's horizon (any length for the autoregressive decoder)."""
    b = {k: jnp.asarray(v) for k, v in b.items()}
    context = lambda a: a.at[:, self.pad:].set(0.0)
    b = dict(b, y=context(b["y"]), observed=context(b["observed"]))
    mu, s = self._norm(b["y"], b["observed"])
    if self.decoder == "direct":
      p = self._dist(self._direct_raw(b, mu, s), mu, s)
      out = {"median": self._median(p)}
      if self.head != "point":
        keys = jax.random.split(key, num_samples)
        out["samples"] = jax.vmap(lambda k: self._sample(p, k))(keys)
      if self.head == "quantile":
        out["quantiles"] = p["quantiles"]
      return out
    S = 1 if self.head == "point" else num_samples
    B, W = b["y"].shape[:2]
    b = jax.tree.map(lambda a: jnp.tile(a, (S,) + (1,) * (a.ndim - 1)), b)   # (S·B, ...)
    mu, s = jnp.tile(mu, (S, 1)), jnp.tile(s, (S, 1))
    pos = jnp.arange(self.pad - self.context_length, self.pad + 1)
    y_BxTxH, carry = self.rnn(self._features(b, mu, s, pos))
    raw = self._raw(y_BxTxH[:, -1])

    def body(state, inp):
      carry, raw, y, obs = state
      j, k = inp
      p = self._dist(raw, mu, s)
      draw = self._sample(p, k) if S > 1 else self._median(p)
      y = jax.lax.dynamic_update_slice_in_dim(y, draw[:, None], j, axis=1)
      obs = jax.lax.dynamic_update_slice_in_dim(obs, jnp.ones_like(draw)[:, None], j, axis=1)
      nxt = jnp.minimum(j + 1, W - 1)[None]  # the last iteration's extra step is discarded
      x = self._features(dict(b, y=y, observed=obs), mu, s, nxt)[:, 0]
      carry, h = self.rnn.step(carry, x)
      return (carry, self._raw(h), y, obs), draw

    steps = jnp.arange(self.pad, W)
    keys = jax.random.split(key, W - self.pad)
    _, draws = jax.lax.scan(body, (carry, raw, b["y"], b["observed"]), (steps, keys))
    draws = jnp.moveaxis(draws, 0, 1).reshape(S, B, W - self.pad, self.C)
    if S == 1:
      return {"median": draws[0]}
    return {"median": jnp.median(draws, 0), "samples": draws}


def pinball(q_xQ, y_xQ, levels_Q):
  """Quantile (pinball) loss of each level."""
  e = y_xQ - q_xQ
  return jnp.maximum(levels_Q * e, (levels_Q - 1) * e)


def quantile_interp(q_xQ, levels_Q, u_x):
  """The piecewise-linear quantile function through (levels, q) at probabilities u, flat beyond
  the outermost levels."""
  u = jnp.broadcast_to(u_x, q_xQ.shape[:-1])
  Q = levels_Q.shape[0]
  if Q == 1:
    return q_xQ[..., 0]
  k = jnp.clip(jnp.searchsorted(levels_Q, u, side="right"), 1, Q - 1)
  lo_l, hi_l = levels_Q[k - 1], levels_Q[k]
  lo = jnp.take_along_axis(q_xQ, (k - 1)[..., None], -1)[..., 0]
  hi = jnp.take_along_axis(q_xQ, k[..., None], -1)[..., 0]
  t = jnp.clip((u - lo_l) / (hi_l - lo_l), 0.0, 1.0)
  return lo + t * (hi - lo)
