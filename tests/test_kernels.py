"""The Pallas GRU kernels (interpret mode on CPU) against the scan: outputs, final state and
every gradient, over several time and batch blocks; the block budget; impl selection."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gru_tpu import train
from gru_tpu.errors import UserError
from gru_tpu.kernels import gru as kernel
from gru_tpu.models import GRU
from gru_tpu.models.gru import gru_recurrence, pallas_fallback

ROOT = Path(__file__).parents[1]
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def small_blocks(monkeypatch):
  """Blocks of at most 3 steps and 16 rows: tiny shapes still span several of each."""
  monkeypatch.setattr(kernel, "MAX_BLOCK_T", 3)
  monkeypatch.setattr(kernel, "MAX_BLOCK_B", 16)


def random_layer(rng, T=7, D=2, B=16, H=8):
  G = 3 * H
  f = lambda *shape, scale=1.0: jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)
  return {"gi": f(T, D, B, G), "w_h": f(D, H, G, scale=0.3), "b_i": f(D, G), "b_h": f(D, G),
          "h0": f(D, B, H)}, (f(T, D, B, H), f(D, B, H))


@pytest.mark.parametrize("lengths,dropout,save_gates", [(True, True, False), (False, False, True)])
def test_kernel_matches_the_scan_recurrence(lengths, dropout, save_gates, rng):
  """T=7 in blocks of 3 (padded to 9), B=16 in blocks of 8, both directions: y, h_T and the
  gradients for gi, W_h, b_i, b_h, h0 equal the scan's (the scan's x W_i with W_i = I is gi)."""
  T, D, B, H = 7, 2, 16, 8
  args, (gy, gh) = random_layer(rng, T, D, B, H)
  L = jnp.asarray(rng.integers(0, T + 1, B), jnp.int32) if lengths else None
  rmask = (jnp.asarray(rng.random((D, B, H)) < 0.7, jnp.float32) / 0.7) if dropout else None
  mask = None if L is None else jnp.arange(T)[:, None] < L[None]
  eye = jnp.broadcast_to(jnp.eye(3 * H), (D, 3 * H, 3 * H))

  def scan(gi, w_h, b_i, b_h, h0):
    return gru_recurrence(gi, eye, b_i, w_h, b_h, h0, mask, rmask)

  def pallas(gi, w_h, b_i, b_h, h0):
    return kernel.gru_sequence(gi, w_h, b_i, b_h, h0, L, rmask, save_gates=save_gates,
                               block_b=8, block_t=3)

  def loss(fn):
    def f(*a):
      y, h_T = fn(*a)
      return (y * gy).sum() + (h_T * gh).sum(), (y, h_T)
    return jax.jit(jax.value_and_grad(f, argnums=range(5), has_aux=True))

  (_, want), dwant = loss(scan)(*args.values())
  (_, got), dgot = loss(pallas)(*args.values())
  for a, b in zip(got + dgot, want + dwant, strict=True):
    np.testing.assert_allclose(a, b, **TOL)
  if L is not None:  # past each row's end: y is zero and the carry froze
    assert all(float(jnp.abs(got[0][int(n):, :, b]).max(initial=0)) == 0 for b, n in enumerate(L))


def outputs_and_grads(model, x, lengths, h0, deterministic=True, seed=0):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def run(params, x, h0, lengths):
    def loss(params, x, h0):
      m = nnx.merge(graphdef, params, rest)
      y, h_n = m(x, lengths, h0, deterministic=deterministic, rngs=nnx.Rngs(dropout=seed))
      return (y.astype(jnp.float32) ** 2).sum() + (h_n ** 3).sum(), (y, h_n)
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, h0)

  (_, (y, h_n)), grads = run(params, x, h0, lengths)
  return [y.astype(jnp.float32), h_n] + jax.tree.leaves(grads)


def scan_and_pallas(rng, *, B=32, T=7, I=5, H=6, num_layers=2, bidirectional=True,
                    deterministic=True, **kw):
  x = jnp.asarray(rng.standard_normal((B, T, I)), jnp.float32)
  lengths = jnp.asarray(rng.integers(0, T + 1, B))
  D = 2 if bidirectional else 1
  h0 = jnp.asarray(rng.standard_normal((num_layers * D, B, H)), jnp.float32)
  return [outputs_and_grads(GRU(I, H, num_layers=num_layers, bidirectional=bidirectional,
                                impl=impl, rngs=nnx.Rngs(0), **kw), x, lengths, h0,
                            deterministic)
          for impl in ("scan", "pallas")]


def test_gru_pallas_equals_scan_bidirectional_multilayer_with_lengths(small_blocks, rng):
  """y, h_n and the gradients of every parameter, x and h0, ≤ 1e-5 (f32)."""
  want, got = scan_and_pallas(rng)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, **TOL)


def test_gru_pallas_equals_scan_with_dropout_and_remat(small_blocks, rng):
  """Training mode: the same dropout and recurrent-dropout masks, remat's chunked layers."""
  want, got = scan_and_pallas(rng, num_layers=2, bidirectional=False, dropout=0.3,
                              recurrent_dropout=0.3, remat=True, deterministic=False)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, **TOL)


def test_gru_pallas_gradient_of_gradient_is_one_clear_error():
  """JAX has no forward-mode rule for pallas_call: a bare AssertionError from inside JAX before."""
  graphdef, params = nnx.split(GRU(3, 4, impl="pallas", rngs=nnx.Rngs(0)))
  x = jnp.ones((2, 5, 3))
  f = lambda p, x: (nnx.merge(graphdef, p)(x)[0] ** 2).sum()
  assert jnp.isfinite(jax.grad(f, argnums=1)(params, x)).all()  # first order works
  with pytest.raises(ValueError, match=r"GRU\(impl='pallas'\) has first-order gradients only"):
    jax.grad(lambda x: jnp.vdot(jax.grad(f, argnums=1)(params, x), x))(x)


def test_gru_pallas_bf16_within_stated_tolerance(small_blocks, rng):
  """bf16 compute: gi, W_h, y, the saved gates and dgi are bf16 in the kernel (f32 in the scan
  except y), so outputs agree within 2e-2 and each gradient within 2e-2 of its largest entry."""
  want, got = scan_and_pallas(rng, dtype=jnp.bfloat16)
  for a, b in zip(got, want, strict=True):
    err = float(jnp.abs(a - b).max())
    assert err <= 2e-2 * max(1.0, float(jnp.abs(b).max())), err


def test_auto_runs_the_scan_off_tpu_and_impl_is_checked(rng):
  x = jnp.zeros((2, 3, 4))
  for impl, kernels in (("auto", 0), ("scan", 0), ("pallas", 2)):
    model = GRU(4, 8, bidirectional=True, impl=impl, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    loss = lambda p, g=graphdef: nnx.merge(g, p)(x)[0].sum()
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert jaxpr.count("pallas_call") == kernels, impl  # forward and backward kernels
  with pytest.raises(ValueError, match="impl must be one of"):
    GRU(4, 8, impl="cuda", rngs=nnx.Rngs(0))


def test_engine_checks_config_impl():
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).parents[1] / "configs"))
  import synthetic
  from gru_tpu.train import check_engine_config
  c = synthetic.get_config("size=tiny")
  c.model.cell, c.model.impl = "lstm", "pallas"
  with pytest.raises(UserError, match="impl='pallas' needs config.model.cell='gru'"):
    check_engine_config(c)
  c = synthetic.get_config("size=tiny")
  c.model.impl = "fast"
  with pytest.raises(UserError, match="config.model.impl='fast': expected one of auto, scan"):
    check_engine_config(c)


def test_plan_blocks_and_vmem_budget():
  p = kernel.plan(256, 64, 1024, jnp.bfloat16, "v5e")
  assert (p.block_b, p.block_t) == (64, 16)  # the whole batch: W_h is fetched once per direction
  assert p.vmem_bytes < p.vmem_limit_bytes <= 128 * 2 ** 20
  assert kernel.plan(33, 64, 256, jnp.float32, "v6e").block_t == 17  # 2 blocks, 1 padded step
  assert kernel.plan(256, 64, 512, jnp.bfloat16, "v5p").block_b == 32  # both cores of a chip
  assert kernel.plan(256, 64, 512, jnp.bfloat16, "v5p", D=2).block_b == 64  # one per direction
  # v4 has 16 MiB of VMEM: W_h (bf16) and its f32 gradient accumulator alone need 18 MiB.
  assert "needs" in kernel.plan(256, 64, 1024, jnp.bfloat16, "v4")
  assert isinstance(kernel.plan(256, 64, 768, jnp.bfloat16, "v4"), kernel.Plan)
  assert "not a multiple of 128" in kernel.plan(256, 64, 1000, jnp.bfloat16, "v5e")
  for chip in kernel.CHIPS:  # every plan stays inside the chip, forward and backward
    for H in (128, 512, 1024, 2048):
      p = kernel.plan(128, 32, H, jnp.bfloat16, chip)
      if isinstance(p, kernel.Plan):
        assert p.vmem_bytes <= kernel.VMEM_FRACTION * kernel.CHIPS[chip]["vmem"]


def test_save_gates_is_chosen_by_the_roofline():
  """Saving gh trades one recurrent matmul of the backward for 2·B·3H bytes per step."""
  for chip in kernel.CHIPS:
    plans = [kernel.plan(256, 64, 1024, jnp.bfloat16, chip, save_gates=s) for s in (False, True)]
    plans = [p for p in plans if isinstance(p, kernel.Plan)]
    if not plans:
      continue
    best = min(plans, key=lambda p: kernel.estimate(p, 256, 64, 1024, jnp.bfloat16)["seconds"])
    assert kernel.plan(256, 64, 1024, jnp.bfloat16, chip).save_gates == best.save_gates
  e = [kernel.estimate(kernel.plan(256, 64, 1024, jnp.bfloat16, "v5e", save_gates=s), 256, 64,
                       1024, jnp.bfloat16) for s in (False, True)]
  assert e[1]["bwd_flops"] * 3 == e[0]["bwd_flops"] * 2
  assert e[1]["fwd_bytes"] > e[0]["fwd_bytes"]


def test_fallback_on_a_tpu_that_cannot_fit(monkeypatch, caplog):
  """As if compiling for a v4: auto logs why and runs the scan; pallas raises a clear error."""
  monkeypatch.setattr(kernel, "target_chip", lambda: "v4")
  assert pallas_fallback(True, 16, 8, 1024, 1, jnp.bfloat16).startswith("hidden size 1024 needs")
  assert pallas_fallback(False, 16, 8, 128, 1, jnp.float32).startswith("reset_after=False")
  assert pallas_fallback(True, 16, 8, 128, 1, jnp.float32) is None
  x = jnp.zeros((8, 4, 16))
  with caplog.at_level(logging.WARNING, logger="gru_tpu"):
    y, _ = GRU(16, 1024, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(x)
  assert y.shape == (8, 4, 1024) and "runs the scan on this TPU: hidden size 1024" in caplog.text
  with pytest.raises(ValueError, match="no Pallas blocks fit: hidden size 1024 needs"):
    GRU(16, 1024, dtype=jnp.bfloat16, impl="pallas", rngs=nnx.Rngs(0))(x)


SHARDED = textwrap.dedent("""
  import json, jax, jax.numpy as jnp, numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P
  from gru_tpu.models import GRU
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((12, 5, 3)), jnp.float32)  # 12 rows: split on data only
  lengths = jnp.asarray(rng.integers(0, 6, 12))
  out = {}
  for impl in ("scan", "pallas"):
    graphdef, params = nnx.split(GRU(3, 8, bidirectional=True, impl=impl, rngs=nnx.Rngs(0)))
    def loss(params, x, lengths):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        y, h = nnx.merge(graphdef, params)(x, lengths)
        return (y ** 2).sum() + (h ** 3).sum()
    rows = NamedSharding(mesh, P("data"))
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), in_shardings=(
        NamedSharding(mesh, P()), rows, rows))
    out[impl] = [np.asarray(a).tolist() for a in jax.tree.leaves(f(params, x, lengths))]
  print(json.dumps(out))
""")


def test_pallas_under_a_device_mesh_matches_the_scan():
  """8 CPU devices, mesh data 4 x model 2, 12 rows: the kernels run in a shard_map over the
  batch (replicated over 'model'); loss and every gradient equal the scan's."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env,
                     timeout=300, cwd=ROOT, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  for a, b in zip(out["pallas"], out["scan"], strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)


def test_training_resumes_across_impls_with_the_same_losses(tmp_path):
  """config.model.impl and unroll change no parameter: a scan checkpoint (4 steps per loop
  iteration) resumes with the kernel, and the losses match a run that scanned throughout."""
  sys.path.insert(0, str(ROOT / "configs"))
  import synthetic

  def run(workdir, steps, impl, unroll=1):
    c = synthetic.get_config("size=tiny")
    c.num_steps, c.log_every, c.checkpoint_every, c.eval_every = steps, 1, 2, 100
    c.model.impl, c.model.unroll = impl, unroll
    train.train_and_evaluate(c, workdir)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}

  ref = run(tmp_path / "scan", 4, "scan")
  run(tmp_path / "mixed", 2, "scan", unroll=4)
  mixed = run(tmp_path / "mixed", 4, "pallas")
  np.testing.assert_allclose([mixed[s] for s in (3, 4)], [ref[s] for s in (3, 4)], rtol=1e-5)
