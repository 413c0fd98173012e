"""Compute dtypes side by side: float32, bfloat16 and float16 runs from the same init and batches.

  python scripts/bench_dtypes.py --json bench_dtypes.json [--steps 300]

Per task (text: tiny_shakespeare through `files:`, ../shared/data by default; forecast: the
statsmodels co2 series, bundled with statsmodels), each dtype trains --steps steps through the
engine's own train step (float16 with its loss scale, train.loss_scale), then reports the train
loss, the eval loss over the same eval batches, and every parameter's gradient relative to
float32's (relative norm, and the fraction of exact zeros) at the float32 run's final parameters,
where a trained model's gradients are smaller than at init. Then, for float16, the same gradient
comparison at init at B·T = 65536 with and without the loss scale.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from gru_tpu import config, sharding, train
from gru_tpu.bench import check_outputs
from gru_tpu.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tiny_shakespeare" / "input.txt"
DTYPES = ("float32", "bfloat16", "float16")


def text_config(data: Path, steps: int, batch_size=64, seq_len=128, hidden=128):
  c = config.load_file(ROOT / "configs" / "shakespeare_char.py", "size=tiny")
  c.data.source = f"files:{data}"
  c.batch_size, c.seq_len, c.model.hidden, c.model.embed_dim = batch_size, seq_len, hidden, 64
  c.num_steps = steps
  return c


def forecast_config(steps: int):
  c = config.load_file(ROOT / "configs" / "co2_forecast.py", "size=small")
  c.num_steps = steps
  return c


def grads(s: train.Setup, params, rest, batch, scale: float = 1.0) -> dict:
  loss = lambda p: s.task.loss_fn(nnx.merge(s.graphdef, p, rest), batch, jax.random.key(0))
  g = jax.jit(lambda p: train.value_and_grad(loss, scale)(p)[1])(params)
  return {jax.tree_util.keystr(k).replace(".value", ""): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(g)[0]}


def compare(got: dict, want: dict) -> dict:
  return {k: {"rel_err": float(np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k])),
              "zeros": float((got[k] == 0).mean()), "zeros_f32": float((want[k] == 0).mean())}
          for k in want}


def runs(make_config, steps: int, eval_split: str, mesh) -> dict:
  out, setups, final = {}, {}, {}
  for dt in DTYPES:
    c = make_config()
    c.model.dtype = dt
    s = setups[dt] = train.setup(c, mesh)
    state = jax.jit(s.init, out_shardings=s.state_shardings)()
    batches = s.task.batches("train", 0, 0, 1)
    losses = []
    for _ in range(steps):
      state, m = s.train_step(state, jax.device_put(next(batches), s.batch_sharding))
      losses.append(float(m["loss"]))
    evals = s.task.batches(eval_split, 0, 0, 1)
    # Weighed as the engine weighs eval batches (observed targets; windows read twice: 0).
    eval_loss = train._weighted_mean(jax.device_get([
        s.eval_step(state, jax.device_put(next(evals), s.batch_sharding)) for _ in range(4)]))[
        "loss"]
    final[dt] = state["params"]
    out[dt] = {"loss_scale": train.loss_scale(c),
               "train_loss_last10": float(np.mean(losses[-10:])), "eval_loss": float(eval_loss)}
    print(json.dumps({dt: out[dt]}), flush=True)
  batch = jax.device_put(next(setups["float32"].task.batches("train", steps, 0, 1)),
                         setups["float32"].batch_sharding)
  rest = jax.jit(setups["float32"].init)()["rest"]
  # Each dtype's own loss scale (float16's; 1 otherwise), as its train step used: the scale of
  # make_config(), a float32 config, was 1 for float16 too.
  g = {dt: grads(setups[dt], final["float32"], rest, batch, out[dt]["loss_scale"])
       for dt in DTYPES}
  for dt in DTYPES[1:]:
    out[dt]["grads_at_trained_vs_f32"] = compare(g[dt], g["float32"])
  return out


def large_batch_f16(data: Path, mesh) -> dict:
  """float16 gradients at init, B·T = 65536, with and without the loss scale."""
  out, g = {}, {}
  for dt in ("float32", "float16"):
    c = text_config(data, 1, batch_size=256, seq_len=256, hidden=256)
    c.model.dtype = dt
    s = train.setup(c, mesh)
    state = jax.jit(s.init)()
    batch = jax.device_put(next(s.task.batches("train", 0, 0, 1)), s.batch_sharding)
    for scale in {1.0, train.loss_scale(c)}:
      g[dt, scale] = grads(s, state["params"], state["rest"], batch, scale)
  for (dt, scale), v in g.items():
    if dt == "float16":
      out[f"scale={scale:g}"] = compare(v, g["float32", 1.0])
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", type=Path, required=True)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--data", type=Path, default=DEFAULT_DATA)
  a = p.parse_args(argv)
  if a.steps < 10:  # the train loss is the mean of the last 10
    p.error(f"--steps must be >= 10, got {a.steps}")
  if not a.data.is_file():
    p.error(f"--data {a.data} is not a file: pass tiny_shakespeare's input.txt")
  check_outputs(p, json=a.json)
  mesh = sharding.make_mesh((("data", -1), ("model", 1)))
  result = {"jax": jax.__version__, "backend": jax.default_backend(),
            "machine": platform.machine(), "steps": a.steps}
  try:
    result["text"] = runs(lambda: text_config(a.data, a.steps), a.steps, "validation", mesh)
    result["forecast"] = runs(lambda: forecast_config(a.steps), a.steps, "eval", mesh)
    result["text_f16_BxT_65536_at_init"] = large_batch_f16(a.data, mesh)
  except UserError as e:  # e.g. a --data file that is no text corpus
    print(f"bench_dtypes: {e}", file=sys.stderr)
    return 2
  a.json.write_text(json.dumps(result, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
