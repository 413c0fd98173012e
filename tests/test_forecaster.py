"""The Forecaster: forecasts read only the context, masked targets leave the loss, every decoder
and head learns, the quantile head is monotone and samples from itself."""

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
