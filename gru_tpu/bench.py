"""Side-by-side GRU benchmark: gru_tpu vs torch.nn.GRU vs Flax linen nn.RNN(nn.GRUCell).

  python scripts/bench.py --json bench.json          (also: gru-tpu bench ...)

All three run the same function: linen and gru_tpu get torch's weights (nonzero biases), and the
largest output difference is recorded so a speed-up can never come from computing something else.
Reports tokens/s for a train step (forward + backward to parameter gradients, loss = mean(y²)) and
a forward pass, T-scaling (T=256 -> 1024), and compiled activation memory with and without remat.
Each shape also times the XLA matmul floor: the five matmuls any GRU train step must run, as bulk
dots, which bounds what a JAX train step can reach against torch on this machine.
Ratios are what to quote: absolute numbers move with the machine's load.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gru_tpu.models import GRU, compiler_options

SHAPES = [(32, 256, 256), (64, 128, 512)]  # (B, T, H = I)
QUICK_SHAPES = [(4, 16, 32)]


def _timeit(fns: dict, repeats: int) -> dict[str, float]:
  """Median seconds per call of each function, timed in interleaved rounds (one call of each per
  round, in rotating order) so that load on a shared machine hits all of them alike."""
  for fn in fns.values():
    fn()
    fn()  # compile + warm caches
  times = {name: [] for name in fns}
  names = list(fns)
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def _torch_gru(H: int, seed: int = 0):
  import torch
  torch.manual_seed(seed)
  return torch.nn.GRU(H, H, batch_first=True)


def _linen_params(ref, H: int):
  """torch weights as linen GRUCell params (linen folds b_hr, b_hz into the input biases)."""
  w = lambda n: ref.state_dict()[n].numpy()
  W_i, W_h, b_i, b_h = w("weight_ih_l0"), w("weight_hh_l0"), w("bias_ih_l0"), w("bias_hh_l0")
  cell = {}
  for k, name in enumerate("rzn"):
    rows = slice(k * H, (k + 1) * H)
    cell[f"i{name}"] = {"kernel": W_i[rows].T,
                        "bias": b_i[rows] + (b_h[rows] if name != "n" else 0)}
    cell[f"h{name}"] = {"kernel": W_h[rows].T}
  cell["hn"]["bias"] = b_h[2 * H:]
  return {"params": {"cell": jax.tree.map(jnp.asarray, cell)}}


def matmul_floor(B: int, T: int, H: int, jit=jax.jit):
  """The five matmuls of every GRU train step to parameter gradients, each as one bulk dot.

  Forward x W_i and h W_h, backward dg_h W_h^T (the carry's gradient), x^T dg_i and h^T dg_h
  (dW_i, dW_h); each 2·B·T·H·3H FLOPs (I = H). A train step also runs the gates, their
  gradients and a sequential loop, so its time over this one's is what the loop and the
  elementwise work cost above XLA's GEMM, and torch's time over this one's is the largest train
  ratio against torch any JAX implementation could reach here.
  """
  rng = np.random.default_rng(1)
  a = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  x_MxH, g_Mx3H, w_Hx3H, wt_3HxH = a(B * T, H), a(B * T, 3 * H), a(H, 3 * H), a(3 * H, H)
  # Distinct operands per product so that XLA cannot merge or share any of them.
  five = jit(lambda x, g, w, wt: (x @ w, (x + 1) @ w, g @ wt, x.T @ g, (x + 1).T @ g))
  return five, (x_MxH, g_Mx3H, w_Hx3H, wt_3HxH)


def bench_shape(B: int, T: int, H: int, repeats: int) -> dict:
  import flax.linen as linen
  import torch

  from gru_tpu.convert import gru_from_torch

  ref = _torch_gru(H)
  x_np = np.random.default_rng(0).standard_normal((B, T, H)).astype(np.float32)
  x_t, x_j = torch.tensor(x_np), jnp.asarray(x_np)
  tokens = B * T

  def torch_fwd():
    with torch.no_grad():
      return ref(x_t)[0]

  def torch_train():
    ref.zero_grad(set_to_none=True)
    y, _ = ref(x_t)
    (y * y).mean().backward()

  ours = gru_from_torch(ref)
  graphdef, params = nnx.split(ours)
  # Both JAX implementations get the same XLA options (they help linen's scan too).
  jit = functools.partial(jax.jit, compiler_options=compiler_options())
  ours_fwd = jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])
  ours_train = jit(jax.grad(lambda p, x: jnp.mean(nnx.merge(graphdef, p)(x)[0] ** 2)))

  rnn = linen.RNN(linen.GRUCell(H))
  lparams = _linen_params(ref, H)
  linen_fwd = jit(rnn.apply)
  linen_train = jit(jax.grad(lambda p, x: jnp.mean(rnn.apply(p, x) ** 2)))

  y_ref = torch_fwd().numpy()
  max_diff = {"gru_tpu": float(np.abs(np.asarray(ours_fwd(params, x_j)) - y_ref).max()),
              "flax_linen": float(np.abs(np.asarray(linen_fwd(lparams, x_j)) - y_ref).max())}
  block = jax.block_until_ready
  rows = {
      "torch": (torch_train, torch_fwd),
      "gru_tpu": (lambda: block(ours_train(params, x_j)), lambda: block(ours_fwd(params, x_j))),
      "flax_linen": (lambda: block(linen_train(lparams, x_j)),
                     lambda: block(linen_fwd(lparams, x_j))),
  }
  out = {"B": B, "T": T, "H": H, "max_abs_diff_vs_torch": max_diff}
  floor, floor_args = matmul_floor(B, T, H, jit)
  # The floor is timed in the train rounds: the same load hits it and the train steps.
  train_s = _timeit({**{name: train for name, (train, _) in rows.items()},
                     "matmul_floor": lambda: block(floor(*floor_args))}, repeats)
  fwd_s = _timeit({name: fwd for name, (_, fwd) in rows.items()}, repeats)
  for name in rows:
    out[name] = {"train_tok_s": tokens / train_s[name], "fwd_tok_s": tokens / fwd_s[name]}
  for name in ("torch", "flax_linen"):
    out[f"train_vs_{name}"] = out["gru_tpu"]["train_tok_s"] / out[name]["train_tok_s"]
    out[f"fwd_vs_{name}"] = out["gru_tpu"]["fwd_tok_s"] / out[name]["fwd_tok_s"]
  floor_s, gflop = train_s["matmul_floor"], 5 * 2 * tokens * H * 3 * H / 1e9
  out["xla_matmul_floor"] = {
      "gflop": gflop, "seconds": floor_s, "gflop_s": gflop / floor_s,
      # What the train ratios would be if everything but these matmuls cost nothing.
      "train_vs_torch_ceiling": train_s["torch"] / floor_s,
      "train_vs_flax_linen_ceiling": train_s["flax_linen"] / floor_s,
      # Share of gru_tpu's train step that these matmuls account for.
      "gru_tpu_fraction": floor_s / train_s["gru_tpu"]}
  return out


def _train_fn(B: int, T: int, H: int, remat: bool):
  graphdef, params = nnx.split(GRU(H, H, remat=remat, rngs=nnx.Rngs(0)))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, H)), jnp.float32)
  loss = lambda p, x: jnp.mean(nnx.merge(graphdef, p)(x)[0] ** 2)
  train = jax.jit(jax.grad(loss), compiler_options=compiler_options())
  return train, params, x


def bench_scaling(B: int, H: int, Ts: tuple[int, int], repeats: int) -> dict:
  """Time per token must stay flat in T; quadratic output stacking (jax#40101) would show here."""
  fns = {}
  for T in Ts:
    train, params, x = _train_fn(B, T, H, remat=False)
    fns[T] = functools.partial(lambda f, p, x: jax.block_until_ready(f(p, x)), train, params, x)
  secs = _timeit(fns, repeats)
  return {"B": B, "H": H, "T": list(Ts), "train_s": [secs[T] for T in Ts],
          "time_ratio": secs[Ts[1]] / secs[Ts[0]], "length_ratio": Ts[1] / Ts[0]}


def bench_remat(B: int, T: int, H: int, repeats: int) -> dict:
  """Activation memory = compiled temp buffers of the train step (params/inputs excluded)."""
  out, fns = {"B": B, "T": T, "H": H}, {}
  for remat in (False, True):
    train, params, x = _train_fn(B, T, H, remat)
    mem = train.lower(params, x).compile().memory_analysis()
    key = "remat" if remat else "no_remat"
    out[key] = {"temp_bytes": int(mem.temp_size_in_bytes)}
    fns[key] = functools.partial(lambda f, p, x: jax.block_until_ready(f(p, x)), train, params, x)
  for key, secs in _timeit(fns, repeats).items():
    out[key]["train_s"] = secs
  out["memory_cut"] = out["no_remat"]["temp_bytes"] / out["remat"]["temp_bytes"]
  out["time_cost"] = out["remat"]["train_s"] / out["no_remat"]["train_s"]
  return out


def run(quick: bool = False, repeats: int = 5) -> dict:
  import torch
  shapes = QUICK_SHAPES if quick else SHAPES
  result = {
      "machine": {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
                  "processor": platform.processor() or platform.machine(),
                  "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
                  "torch": torch.__version__},
      "shapes": [bench_shape(*s, repeats=repeats) for s in shapes],
      "t_scaling": bench_scaling(*((4, 16) if quick else (32, 256)),
                                 Ts=(16, 64) if quick else (256, 1024), repeats=repeats),
      "remat": bench_remat(*((4, 64, 16) if quick else (32, 1024, 256)), repeats=repeats),
  }
  return result


def format_table(r: dict) -> str:
  lines = [f"{'B,T,H':>14} | {'impl':>10} | {'train ktok/s':>12} | {'fwd ktok/s':>10}"]
  for s in r["shapes"]:
    for name in ("gru_tpu", "torch", "flax_linen"):
      lines.append(f"{s['B']:>4},{s['T']:>4},{s['H']:>4} | {name:>10} | "
                   f"{s[name]['train_tok_s'] / 1e3:12.1f} | {s[name]['fwd_tok_s'] / 1e3:10.1f}")
    lines.append(f"{'':>14} | {'ratios':>10} | train {s['train_vs_torch']:.2f}x torch, "
                 f"{s['train_vs_flax_linen']:.2f}x linen; fwd {s['fwd_vs_torch']:.2f}x torch, "
                 f"{s['fwd_vs_flax_linen']:.2f}x linen")
    fl = s["xla_matmul_floor"]
    lines.append(f"{'':>14} | {'XLA floor':>10} | its 5 train matmuls alone: {fl['gflop_s']:.0f} "
                 f"GFLOP/s, {fl['gru_tpu_fraction']:.0%} of gru_tpu's step; train ratios "
                 f"above {fl['train_vs_torch_ceiling']:.2f}x torch, "
                 f"{fl['train_vs_flax_linen_ceiling']:.2f}x linen are out of reach")
  sc, rm = r["t_scaling"], r["remat"]
  lines.append(f"T-scaling train time T={sc['T'][1]}/T={sc['T'][0]}: {sc['time_ratio']:.2f} "
               f"(linear = {sc['length_ratio']:.0f})")
  mib = lambda key: rm[key]["temp_bytes"] / 2**20
  lines.append(f"remat at (B,T,H)=({rm['B']},{rm['T']},{rm['H']}): activation memory "
               f"{mib('no_remat'):.1f} -> {mib('remat'):.1f} MiB ({rm['memory_cut']:.1f}x less) "
               f"at {rm['time_cost']:.2f}x time")
  return "\n".join(lines)


def check_outputs(parser: argparse.ArgumentParser, **paths) -> None:
  """parser.error for an output file that cannot be written (a directory, or in a directory that
  does not exist): before minutes of benchmarking, not after them. Used by scripts/*.py too."""
  for flag, path in paths.items():
    if path is None:
      continue
    if os.path.isdir(path):
      parser.error(f"--{flag} {path} is a directory; give a file name")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
      parser.error(f"--{flag} {path}: its directory does not exist")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="gru-tpu bench", description=__doc__.splitlines()[0])
  parser.add_argument("--json", default="bench.json", help="where to write the results")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
  parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run, for tests)")
  args = parser.parse_args(argv)
  if args.repeats < 1:  # a StatisticsError traceback after the compiles and warm-ups
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  check_outputs(parser, json=args.json)
  result = run(quick=args.quick, repeats=args.repeats)
  print(format_table(result))
  with open(args.json, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.json}", file=sys.stderr)
  return 0
