"""Compute dtypes end to end: bf16 and f16 runs' gradients, jax_enable_x64, and compute knobs
that change when a run resumes."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from forecast_data import seasonal_frame, task_for

sys.path.insert(0, str(Path(__file__).parents[1] / "configs"))
import synthetic

import gru_tpu
from gru_tpu import train
from gru_tpu.tasks.synthetic import SyntheticTask


def grads(task, batch, scale=1.0):
  """Every parameter's gradient, through the engine's loss scaling (train.value_and_grad)."""
  model = task.build_model(nnx.Rngs(params=0, dropout=1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss = lambda p: task.loss_fn(nnx.merge(graphdef, p, rest), batch, jax.random.key(0))
  grad = jax.jit(lambda p: train.value_and_grad(loss, scale)(p)[1])
  return {jax.tree_util.keystr(k): np.asarray(g) for k, g in
          jax.tree_util.tree_flatten_with_path(grad(params))[0]}


def assert_bf16_grads_close(make_task):
  """Every parameter's gradient under bf16 compute within 2e-2 (relative norm) of f32's."""
  tasks = {dt: make_task(dt) for dt in ("float32", "bfloat16")}
  batch = {k: jnp.asarray(v) for k, v in next(tasks["float32"].batches("train", 0, 0, 1)).items()}
  want, got = grads(tasks["float32"], batch), grads(tasks["bfloat16"], batch)
  for k in want:
    err = np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k])
    assert err < 2e-2, f"{k}: bf16 gradient {err:.1%} off f32's"


@pytest.mark.parametrize("tie_embeddings,layer_norm", [(False, False), (True, True)])
def test_bf16_gradients_of_a_language_model_head_bias_are_f32_sums(tie_embeddings, layer_norm):
  # B·T = 8192 rows: the head bias's gradient summed in bf16 was 67 % off; on jaxlib 0.12's
  # XLA:CPU the head's (untied) or hidden -> embed_dim projection's (tied) kernel gradient, a
  # bf16-output dot's transpose, was 8 % off. The LayerNorm's scale and bias gradients are such
  # sums too (flax computes its statistics, scale and bias in f32: 0.3 % off at hidden 256/512).
  def make(dtype):
    c = synthetic.get_config("size=tiny")
    c.batch_size, c.seq_len, c.model.dtype = 64, 128, dtype
    c.model.tie_embeddings = tie_embeddings  # tiny: hidden 32 != embed_dim 16, so a projection
    c.model.layer_norm = layer_norm
    return SyntheticTask(c)
  assert_bf16_grads_close(make)


def test_f16_gradients_at_a_large_batch_are_loss_scaled():
  """B·T = 65536 rows: a mean loss gives each row a cotangent ~1/65536, and the f16 ones between
  the layers fell below f16's normal range (6e-5): unscaled, the GRU's recurrent kernel's
  gradient was 1.6 % off f32's (3.7 % at hidden 256). train.loss_scale puts it at 0.04 %."""
  def make(dtype):
    c = synthetic.get_config("size=tiny")
    c.batch_size, c.seq_len, c.model.dtype = 512, 128, dtype
    return c
  c16 = make("float16")
  assert train.loss_scale(make("float32")) == 1.0 and train.loss_scale(c16) == 65536.0
  # A power of two (unscaling is exact) at or below the micro-batch's rows: 40·50/2 = 1000.
  odd = make("float16")
  odd.batch_size, odd.seq_len, odd.grad_accum = 40, 50, 2
  assert train.loss_scale(odd) == 512.0
  task = SyntheticTask(c16)
  batch = {k: jnp.asarray(v) for k, v in next(task.batches("train", 0, 0, 1)).items()}
  want = grads(SyntheticTask(make("float32")), batch)
  got = grads(task, batch, train.loss_scale(c16))
  for k in want:
    err = np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k])
    assert err < 2e-3, f"{k}: f16 gradient {err:.2%} off f32's"


@pytest.mark.parametrize("decoder", ["direct", "autoregressive"])
def test_bf16_gradients_of_the_forecaster(decoder):
  # autoregressive: the output bias's gradient sums B·(context + horizon) rows (13 % off).
  assert_bf16_grads_close(lambda dtype: task_for(
      seasonal_frame(), batch_size=256, **{"model.dtype": dtype, "model.decoder": decoder}))


def test_the_forecasters_distribution_head_computes_in_f32_under_bf16():
  """Its output is the forecast and it is C·P columns wide: a bf16 kernel put a trained model's
  eval MAE 3 % above f32 compute's with the same parameters (scripts/bench_dtypes.py)."""
  models = {dt: task_for(seasonal_frame(), **{"model.dtype": dt}).build_model(nnx.Rngs(0))
            for dt in ("float32", "bfloat16")}
  h = jax.random.normal(jax.random.key(1), (4, 7, models["float32"].out.in_features))
  want = models["float32"]._raw(h)
  got = models["bfloat16"]._raw(h)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head", ["gaussian", "student_t", "quantile"])
def test_forecasts_under_x64_stay_float32(head):
  """jax_enable_x64 (a notebook may turn it on) makes the default float f64: the sampled draws
  fed back into the f32 window crashed the autoregressive decoder (dynamic_update_slice)."""
  task = task_for(seasonal_frame(), **{"model.decoder": "autoregressive", "model.head": head,
                                       "model.window_norm": "none"})
  model = task.build_model(nnx.Rngs(0))
  model.eval()
  w = task.windows["eval"][:2]
  want = model.predict(task.store.gather(w[:, 0], w[:, 1], 6), jax.random.key(0), 3)
  with jax.enable_x64(True):
    got = model.predict(task.store.gather(w[:, 0], w[:, 1], 6), jax.random.key(0), 3)
  for k in want:
    assert got[k].dtype == jnp.float32, k
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_a_bf16_run_resumes_with_other_compute_knobs(tmp_path):
  """dtype, remat, unroll and impl change no parameter (f32 in every case): a bf16 run resumes
  in f32 with remat on, and its checkpoint stays f32."""
  from gru_tpu.metrics import read_metrics

  def run(steps, **model):
    c = synthetic.get_config("size=tiny")
    c.num_steps, c.log_every, c.checkpoint_every, c.eval_every = steps, 1, 2, 100
    c.model.update(model)
    train.train_and_evaluate(c, tmp_path)

  run(2, dtype="bfloat16")
  run(3, dtype="float32", remat=True, unroll=2)
  assert sorted(r["step"] for r in read_metrics(tmp_path) if r["split"] == "train") == [1, 2, 3]
  m = gru_tpu.load(tmp_path)
  assert m.step == 3 and m.model.rnn.remat and m.model.rnn.dtype == jnp.float32
  assert {a.dtype for a in jax.tree.leaves(nnx.state(m.model, nnx.Param))} == {jnp.dtype("float32")}
