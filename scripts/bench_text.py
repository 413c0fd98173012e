"""Text quality benchmark: gru_tpu vs a PyTorch nn.GRU of the same size, side by side, one run.

  python scripts/bench_text.py --json bench_text.json --plot bench_text.png [--minutes 20]

tiny_shakespeare through `files:` (../shared/data by default), configs/shakespeare_char.py
size=small for gru_tpu: a 2-layer GRU, hidden 512, batch 64, seq_len 128, with its regularisation
(dropout, recurrent dropout, weight decay, warmup + cosine). PyTorch gets the same embedding,
2x512 nn.GRU and output layer, the same batches in the same order, the same step budget, and the
peer's recipe (Adam 2e-3, no dropout), grad clipping as ours. Both are evaluated on the same
windows: the config's eval_steps batches, 384 of the validation split's 435 windows (88 %).

The two models train in alternating chunks of eval_every steps, so a busy machine slows both
alike; each one's clock counts only its own training (compile included, evaluation excluded).
Each stops at --minutes of its own training or at the step budget.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from gru_tpu import sharding, train
from gru_tpu.bench import check_outputs
from gru_tpu.config import load_file

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tiny_shakespeare" / "input.txt"


def _config(data: Path, steps: int):
  c = load_file(ROOT / "configs" / "shakespeare_char.py", "size=small")
  c.data.source = f"files:{data}"
  c.num_steps = steps or c.num_steps
  return c


class Ours:
  name = "gru_tpu"

  def __init__(self, s: train.Setup, eval_batches):
    self.s = s
    self.state = jax.jit(self.s.init, out_shardings=self.s.state_shardings)()
    self.batches = self.s.task.batches("train", 0, 0, 1)
    self.eval_batches = [jax.device_put(b, self.s.batch_sharding) for b in eval_batches]

  def train(self, n: int) -> float:
    for _ in range(n):
      self.state, metrics = self.s.train_step(
          self.state, jax.device_put(next(self.batches), self.s.batch_sharding))
    return float(metrics["loss"])  # waits for the last step

  def evaluate(self) -> float:
    return float(np.mean([self.s.eval_step(self.state, b)["loss"] for b in self.eval_batches]))


class Torch:
  name = "pytorch"

  def __init__(self, config, vocab_size, batches, eval_batches, threads):
    import torch
    torch.manual_seed(config.seed)
    torch.set_num_threads(threads)
    m = config.model
    self.torch = torch
    self.model = torch.nn.ModuleDict(dict(
        embed=torch.nn.Embedding(vocab_size, m.embed_dim),
        gru=torch.nn.GRU(m.embed_dim, m.hidden, m.num_layers, batch_first=True),
        out=torch.nn.Linear(m.hidden, vocab_size)))
    self.opt = torch.optim.Adam(self.model.parameters(), lr=2e-3)
    self.clip = config.optimizer.grad_clip
    self.batches = batches
    self.eval_batches = [torch.from_numpy(np.asarray(b["tokens"], np.int64)) for b in eval_batches]

  def _loss(self, tokens):
    y, _ = self.model["gru"](self.model["embed"](tokens[:, :-1]))
    logits = self.model["out"](y)
    return self.torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

  def train(self, n: int) -> float:
    self.model.train()
    for _ in range(n):
      tokens = self.torch.from_numpy(np.asarray(next(self.batches)["tokens"], np.int64))
      loss = self._loss(tokens)
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
      self.opt.step()
    return float(loss)

  def evaluate(self) -> float:
    self.model.eval()
    with self.torch.no_grad():
      return float(np.mean([float(self._loss(b)) for b in self.eval_batches]))


def first_time_below(curve: list[dict], level: float) -> float | None:
  return next((p["train_seconds"] for p in curve if p["val_loss"] <= level), None)


def summarize(curves: dict[str, list[dict]]) -> dict:
  """Per model: best / final validation loss, speed, time to 1.45 nats, and the curve."""
  summary = {}
  for name, curve in curves.items():
    best = min(curve, key=lambda q: q["val_loss"])
    summary[name] = {"best_val_loss": best["val_loss"], "best_step": best["step"],
                     "best_train_seconds": best["train_seconds"],
                     "final_val_loss": curve[-1]["val_loss"],
                     "seconds_per_step": round(curve[-1]["train_seconds"] / curve[-1]["step"], 3),
                     "seconds_to_1.45": first_time_below(curve, 1.45),
                     "curve": curve}
  return summary


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", type=Path, default=DEFAULT_DATA)
  p.add_argument("--minutes", type=float, default=20.0, help="training-time budget per model")
  p.add_argument("--steps", type=int, default=None, help="step budget (default: the config's)")
  p.add_argument("--eval_every", type=int, default=None)
  p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  p.add_argument("--json", type=Path, default=None)
  p.add_argument("--plot", type=Path, default=None)
  args = p.parse_args(argv)
  if not args.data.is_file():
    p.error(f"--data {args.data} is not a file: pass tiny_shakespeare's input.txt")
  check_outputs(p, json=args.json, plot=args.plot)

  config = _config(args.data.resolve(), args.steps)
  if args.eval_every:
    config.eval_every = args.eval_every
  s = train.setup(config, sharding.make_mesh(config.mesh))
  task = s.task
  eval_batches = list(itertools.islice(task.batches("eval", 0, 0, 1), config.eval_steps))
  ours = Ours(s, eval_batches)
  ref = Torch(config, task.tokenizer.vocab_size, task.batches("train", 0, 0, 1), eval_batches,
              args.threads)

  runs = {r.name: {"curve": [], "train_seconds": 0.0, "step": 0, "done": False}
          for r in (ours, ref)}
  while not all(r["done"] for r in runs.values()):
    for model in (ours, ref):
      r = runs[model.name]
      if r["done"]:
        continue
      n = min(config.eval_every, config.num_steps - r["step"])
      t0 = time.perf_counter()
      train_loss = model.train(n)
      r["train_seconds"] += time.perf_counter() - t0
      r["step"] += n
      val = model.evaluate()
      point = {"step": r["step"], "train_seconds": round(r["train_seconds"], 1),
               "train_loss": round(train_loss, 4), "val_loss": round(val, 4),
               "val_bits_per_char": round(val / math.log(2), 4)}
      r["curve"].append(point)
      print(json.dumps({"model": model.name, **point}), flush=True)
      r["done"] = r["step"] >= config.num_steps or r["train_seconds"] >= 60 * args.minutes

  summary = summarize({name: r["curve"] for name, r in runs.items()})
  t_ours, t_ref = (summary[n]["seconds_to_1.45"] for n in ("gru_tpu", "pytorch"))
  result = {
      "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count(),
                  "jax": jax.__version__, "torch": ref.torch.__version__},
      "setup": {"data": str(args.data), "steps": config.num_steps, "minutes": args.minutes,
                "batch_size": config.batch_size, "seq_len": config.seq_len,
                "model": config.model.to_dict(), "optimizer": config.optimizer.to_dict(),
                "pytorch_optimizer": "Adam lr=2e-3, no dropout, same grad clip"},
      **summary,
      "ratios": {"step_speed_ours_vs_pytorch": round(
                     summary["pytorch"]["seconds_per_step"] / summary["gru_tpu"]["seconds_per_step"],
                     3),
                 "time_to_1.45_pytorch_over_ours": (round(t_ref / t_ours, 3)
                                                    if t_ours and t_ref else None)},
  }
  text = json.dumps(result, indent=2)
  if args.json:
    args.json.write_text(text + "\n")
  print(json.dumps({k: v for k, v in result.items() if k not in summary}, indent=2))
  for name in summary:
    print(name, {k: v for k, v in summary[name].items() if k != "curve"})
  if args.plot:
    plot(summary, args.plot)
  return 0


def plot(summary: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  for name, s in summary.items():
    ax.plot([p["train_seconds"] / 60 for p in s["curve"]], [p["val_loss"] for p in s["curve"]],
            marker=".", label=f"{name} (best {s['best_val_loss']:.3f})")
  ax.axhline(1.45, color="gray", lw=0.8, ls="--")
  ax.set(xlabel="training wall time (minutes)", ylabel="validation loss (nats/char)",
         title="tiny_shakespeare, 2x512 GRU, batch 64, seq_len 128")
  ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  sys.exit(main())
