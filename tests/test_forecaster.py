"""The Forecaster: forecasts read only the context, masked targets leave the loss, every decoder
and head learns, the quantile head is monotone and samples from itself; the heads' losses and
draws against scipy, the window norm inverted exactly, the autoregressive forecast consistent
with teacher forcing, the direct decoder's known features aligned."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from forecast_data import seasonal_frame, task_for


@pytest.mark.parametrize("decoder", ["direct", "autoregressive"])
def test_forecasts_read_only_the_context(decoder):
  task = task_for(seasonal_frame(), **{"model.decoder": decoder})
  model = task.build_model(nnx.Rngs(1))
  model.eval()
  w = task.windows["train"][:4]
  b = task.store.gather(w[:, 0], w[:, 1], 6)
  future = dict(b, y=b["y"].copy(), observed=b["observed"].copy())
  future["y"][:, task.pad:] = 1e3
  future["observed"][:, task.pad:] = 0
  p, q = (model.predict(x, jax.random.key(0), 5) for x in (b, future))
  assert p["samples"].shape == (5, 4, 6, 1)
  for k in p:
    np.testing.assert_array_equal(p[k], q[k])
  with pytest.raises(AssertionError):  # a changed context does change the forecast
    ctx = dict(b, y=b["y"] + 1.0)
    np.testing.assert_array_equal(model.predict(ctx, jax.random.key(0), 5)["median"], p["median"])


def test_missing_values_are_masked_from_the_loss_and_imputed_for_inputs():
  df = seasonal_frame()
  task = task_for(df)
  store = task.store
  row = store.starts[0] + task.pad + 40
  assert store.observed[row, 0] == 0 and store.observed[row - 1, 0] == 1
  assert store.y[row, 0] == store.y[row - 1, 0] == store.y[row + 1, 0]  # carried forward
  model = task.build_model(nnx.Rngs(0))
  model.eval()
  w = task.windows["train"][:3]
  b = task.store.gather(w[:, 0], w[:, 1], 6)
  b["observed"][:, task.pad + 2] = 0          # drop one horizon step of every window
  loss, _ = model.loss(b)
  b2 = dict(b, y=b["y"].copy())
  b2["y"][:, task.pad + 2] = 1e6              # its value no longer matters
  np.testing.assert_allclose(model.loss(b2)[0], loss, rtol=1e-6)
  b3 = dict(b, y=b["y"].copy())
  b3["y"][:, task.pad + 3] = 1e6              # an observed step's does
  assert float(model.loss(b3)[0]) > float(loss) + 1.0


@pytest.mark.parametrize("decoder,head,point_loss", [
    ("direct", "point", "mse"), ("direct", "point", "mae"), ("direct", "gaussian", "mse"),
    ("direct", "student_t", "mse"), ("direct", "quantile", "mse"),
    ("autoregressive", "point", "mse"), ("autoregressive", "gaussian", "mse"),
    ("autoregressive", "student_t", "mse"), ("autoregressive", "quantile", "mse")])
def test_every_decoder_and_head_learns(decoder, head, point_loss):
  task = task_for(seasonal_frame(), **{"model.decoder": decoder, "model.head": head,
                                       "model.point_loss": point_loss, "batch_size": 16})
  model = task.build_model(nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, batch):
    loss, grads = nnx.value_and_grad(lambda m: m.loss(batch)[0])(model)
    opt.update(model, grads)
    return loss

  batches = task.batches("train", 0, 0, 1)
  losses = [float(step(model, opt, next(batches))) for _ in range(30)]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3 * abs(np.mean(losses[:5])) - 0.1, losses
  model.eval()
  w = task.windows["eval"]
  out = model.predict(task.store.gather(w[:, 0], w[:, 1], 6), jax.random.key(0), 7)
  assert out["median"].shape == (1, 6, 1)
  assert ("samples" in out) == (head != "point") and ("quantiles" in out) == (
      head == "quantile" and decoder == "direct")
  if "samples" in out:
    assert out["samples"].shape == (7, 1, 6, 1) and np.isfinite(out["samples"]).all()


def test_quantile_head_is_monotone_and_its_samples_follow_it():
  task = task_for(seasonal_frame(), **{"model.head": "quantile",
                                       "model.quantiles": (0.1, 0.5, 0.9)})
  model = task.build_model(nnx.Rngs(0))
  model.eval()
  w = task.windows["train"][:2]
  out = model.predict(task.store.gather(w[:, 0], w[:, 1], 6), jax.random.key(0), 4000)
  q = out["quantiles"]
  assert (jnp.diff(q, axis=-1) > 0).all()
  emp = np.quantile(out["samples"], [0.1, 0.5, 0.9], axis=0)
  np.testing.assert_allclose(np.moveaxis(emp, 0, -1), q, atol=0.05 * float(np.ptp(q)) + 1e-3)


def test_the_input_at_a_step_never_reads_that_step_or_later_targets():
  """Teacher forcing trains the prediction of step j from the input at j: that input holds the
  targets at j - lag only. Were it to read step j itself (lag 0), training would learn to copy a
  value that forecasting never has (predict's context-only test cannot see that)."""
  task = task_for(seasonal_frame(), **{"model.decoder": "autoregressive"})
  model = task.build_model(nnx.Rngs(1))
  w = task.windows["train"][:2]
  b = {k: jnp.asarray(v) for k, v in task.store.gather(w[:, 0], w[:, 1], 6).items()}
  mu, s = model._norm(b["y"], b["observed"])
  pos = jnp.arange(task.pad - model.context_length, b["y"].shape[1])
  base = np.asarray(model._features(b, mu, s, pos))
  for j in (task.pad - 3, task.pad, task.pad + 2):
    later = dict(b, y=b["y"].at[:, j:].add(100.0), observed=1.0 - b["observed"].at[:, j:].get())
    later["observed"] = b["observed"].at[:, j:].set(later["observed"])
    got = np.asarray(model._features(later, mu, s, pos))
    n = int(j - pos[0])
    np.testing.assert_array_equal(got[:, :n + 1], base[:, :n + 1], err_msg=f"step {j}")
    assert np.abs(got[:, n + 1] - base[:, n + 1]).max() > 1.0  # lag 1 reads step j at j + 1


def test_the_input_at_each_step_matches_a_reference_loop_with_past_covariates():
  """The input at step j, built one step at a time: targets and observed flags at j - lag
  (window-normalised by the observed context), known features at j, past-only covariates at
  j - 1 while j - 1 is in the context (else 0), and that flag. A past covariate is observed with
  the target, so the one at j is no more known than y_j: reading it teacher-forces a leak that
  forecasting never has (seasonal_frame has no past covariates, so no other test sees this)."""
  from gru_tpu.models.forecaster import Forecaster
  lags, L, H, C, K, P = (1, 3), 4, 3, 2, 2, 2
  model = Forecaster(num_targets=C, num_known=K, num_past=P, lags=lags, context_length=L,
                     horizon=H, decoder="autoregressive", window_norm="standard", hidden=8,
                     rngs=nnx.Rngs(0))
  pad = model.pad
  W, B = pad + H, 2
  rng = np.random.default_rng(0)
  b = {"y": rng.normal(size=(B, W, C)), "observed": (rng.random((B, W, C)) > 0.2) * 1.0,
       "known": rng.normal(size=(B, W, K)), "past": rng.normal(size=(B, W, P))}
  b["observed"][0, pad - 1] = 0.0  # a missing context value leaves the normalisation
  b["y"] = np.where(b["observed"] > 0, b["y"], 50.0)
  ctx = slice(pad - L, pad)
  w, y = b["observed"][:, ctx], b["y"][:, ctx]
  mu = (y * w).sum(1) / w.sum(1)
  s = np.maximum(np.sqrt((np.square(y - mu[:, None]) * w).sum(1) / w.sum(1)), 0.1)
  want = []
  for j in range(pad - L, W):
    in_ctx = float(j - 1 < pad)
    want.append(np.concatenate(
        [np.concatenate([(b["y"][:, j - l] - mu) / s for l in lags], -1),
         np.concatenate([b["observed"][:, j - l] for l in lags], -1),
         b["known"][:, j], b["past"][:, j - 1] * in_ctx, np.full((B, 1), in_ctx)], -1))
  want = np.stack(want, 1)
  jb = {k: jnp.asarray(v, jnp.float32) for k, v in b.items()}
  got_mu, got_s = model._norm(jb["y"], jb["observed"])
  np.testing.assert_allclose(got_mu, mu, rtol=1e-5)
  np.testing.assert_allclose(got_s, s, rtol=1e-5)
  got = model._features(jb, got_mu, got_s, jnp.arange(pad - L, W))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _forecaster(**kw):
  from gru_tpu.models.forecaster import Forecaster
  args = dict(num_targets=2, num_known=2, num_past=1, lags=(1, 3), context_length=5, horizon=4,
              window_norm="standard", hidden=8, rngs=nnx.Rngs(0)) | kw
  model = Forecaster(**args)
  model.eval()
  return model


def _window_batch(model, B=3, seed=0):
  rng = np.random.default_rng(seed)
  W, C = model.pad + model.horizon, model.C
  return {"y": rng.normal(size=(B, W, C)), "observed": np.ones((B, W, C)),
          "known": rng.normal(size=(B, W, 2)), "past": rng.normal(size=(B, W, 1))}


def test_head_losses_are_negative_log_likelihoods_and_pinball(rng):
  from scipy import stats
  y, loc, scale, df = (rng.normal(size=50), rng.normal(size=50), rng.uniform(0.2, 3, 50),
                       rng.uniform(2.1, 30, 50))
  nll = lambda head, **p: np.asarray(_forecaster(head=head)._elementwise_loss(
      {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}, jnp.asarray(y, jnp.float32)))
  np.testing.assert_allclose(nll("gaussian", loc=loc, scale=scale),
                             -stats.norm.logpdf(y, loc, scale), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(nll("student_t", loc=loc, scale=scale, df=df),
                             -stats.t.logpdf(y, df, loc, scale), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(nll("point", loc=loc), (y - loc) ** 2, rtol=1e-5)
  mae = _forecaster(head="point", point_loss="mae")._elementwise_loss(
      {"loc": jnp.asarray(loc, jnp.float32)}, jnp.asarray(y, jnp.float32))
  np.testing.assert_allclose(mae, np.abs(y - loc), rtol=1e-5)
  levels = np.array([0.1, 0.5, 0.9])
  q = np.sort(rng.normal(size=(50, 3)), -1)
  got = _forecaster(head="quantile", quantiles=tuple(levels))._elementwise_loss(
      {"quantiles": jnp.asarray(q, jnp.float32)}, jnp.asarray(y, jnp.float32))
  e = y[:, None] - q
  np.testing.assert_allclose(got, np.where(e >= 0, levels * e, (levels - 1) * e).mean(-1),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["gaussian", "student_t"])
def test_samples_follow_the_heads_distribution(head):
  from scipy import stats
  model = _forecaster(head=head)
  n = 20000
  p = {"loc": jnp.full((n,), 1.5), "scale": jnp.full((n,), 2.0), "df": jnp.full((n,), 3.0)}
  x = np.asarray(model._sample(p, jax.random.key(0)))
  ref = stats.norm(1.5, 2.0) if head == "gaussian" else stats.t(3.0, 1.5, 2.0)
  assert stats.kstest(x, ref.cdf).statistic < 0.015  # Gaussian draws for t(3): 0.05


def test_quantile_function_is_piecewise_linear_and_flat_beyond_the_levels():
  from gru_tpu.models.forecaster import quantile_interp
  u = jnp.asarray([0.0, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 1.0])
  got = quantile_interp(jnp.broadcast_to(jnp.asarray([1.0, 2.0, 4.0]), (9, 3)),
                        jnp.asarray([0.1, 0.5, 0.9]), u)
  np.testing.assert_allclose(got, [1, 1, 1, 1.5, 2, 3, 4, 4, 4], rtol=1e-6)


@pytest.mark.parametrize("decoder,head", [
    ("direct", "point"), ("direct", "gaussian"), ("direct", "student_t"), ("direct", "quantile"),
    ("autoregressive", "gaussian"), ("autoregressive", "student_t")])
def test_forecasts_follow_an_affine_change_of_the_window(decoder, head):
  """With the standard window norm the network sees y only as (y - mu)/s: a window a·y + c
  forecasts a·F + c, samples and quantiles included, so the head's scale is scaled back too."""
  model = _forecaster(decoder=decoder, head=head)
  b = _window_batch(model)
  a, c = 3.0, -7.0
  moved = dict(b, y=a * b["y"] + c)
  p, q = (model.predict(x, jax.random.key(1), 6) for x in (b, moved))
  for k in p:
    np.testing.assert_allclose(q[k], a * np.asarray(p[k]) + c, rtol=1e-4, atol=1e-4, err_msg=k)


def test_autoregressive_forecast_is_a_fixed_point_of_the_teacher_forced_network():
  """Forecasting feeds the model's own medians back as observed targets: put them in the
  horizon as observed values and the teacher-forced pass (training's) predicts them again."""
  model = _forecaster(decoder="autoregressive", head="point")
  b = _window_batch(model)
  m = np.asarray(model.predict(b, jax.random.key(0), 1)["median"])     # (B, H, C)
  pad = model.pad
  filled = dict(b, y=b["y"].copy(), observed=b["observed"].copy())
  filled["y"][:, pad:], filled["observed"][:, pad:] = m, 1.0
  jb = {k: jnp.asarray(v, jnp.float32) for k, v in filled.items()}
  mu, s = model._norm(jb["y"], jb["observed"])
  pos = jnp.arange(pad - model.context_length, pad + model.horizon)
  y, _ = model.rnn(model._features(jb, mu, s, pos))
  loc = np.asarray(model._dist(model._raw(y), mu, s)["loc"])[:, model.context_length:]
  np.testing.assert_allclose(loc, m, rtol=1e-5, atol=1e-5)


def test_direct_decoder_reads_each_horizon_steps_own_known_features():
  """Horizon step k's forecast reads the known features at pad + k, and only it does (the
  encoder reads up to pad, so steps after pad are each read by one forecast step)."""
  model = _forecaster(decoder="direct", head="point")
  b = _window_batch(model)
  base = np.asarray(model.predict(b, jax.random.key(0), 1)["median"])
  for k in range(1, model.horizon):
    known = b["known"].copy()
    known[:, model.pad + k] += 1.0
    got = np.asarray(model.predict(dict(b, known=known), jax.random.key(0), 1)["median"])
    changed = np.abs(got - base).max(axis=(0, 2)) > 1e-6
    assert changed.tolist() == [j == k for j in range(model.horizon)], (k, changed)
