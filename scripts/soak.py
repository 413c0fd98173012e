"""Soak: a long run in-process, with host RSS, live arrays, threads, open files, compiles and
time at every train row; JSON out (what should stay flat over thousands of steps).

  python scripts/soak.py --json soak.json --workdir /tmp/soak -- \
      --config configs/synthetic.py:size=tiny --config.num_steps=30000 --config.log_every=10 \
      --config.eval_every=200 --config.checkpoint_every=200

Prints, per sixth of the run, ms/step and the RSS, thread and file ranges, and the steps after
which something compiled (nothing should after the first eval and save).
"""

import argparse
import json
import os
import sys
import threading
import time

import jax


def rss_mb() -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--json", required=True)
  p.add_argument("--workdir", required=True)
  a, train_flags = p.parse_known_args()
  from absl import flags
  from ml_collections import config_flags

  from gru_tpu import metrics, train
  from gru_tpu.bench import check_outputs
  from gru_tpu.errors import UserError

  check_outputs(p, json=a.json)  # not after a 30000-step run
  fv = flags.FlagValues()
  argv = ["soak", *[f for f in train_flags if f != "--"]]
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  try:  # a bad config or override is one line, as for gru-tpu train
    if rest := fv(argv)[1:]:  # e.g. "config.num_steps=5" without dashes: silently ignored
      raise UserError(f"unexpected argument {rest[0]!r}; overrides are --config.KEY=VALUE")
    if fv.config is None:
      raise UserError("--config configs/NAME.py[:arg] is required (after --)")
    fv.config.to_dict()
  except (flags.Error, UserError, KeyError, AttributeError, TypeError, ValueError) as e:
    print("soak: " + train._one_line(e), file=sys.stderr)
    sys.exit(2)
  at, compiles, rows, t0 = [0], [], [], time.perf_counter()
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **_: compiles.append(at[0])
      if event == "/jax/core/compile/backend_compile_duration" else None)

  class Writer(metrics.MetricsWriter):
    def write(self, step, split, values):
      super().write(step, split, values)
      at[0] = step
      if split == "train":
        rows.append({"step": step, "t": time.perf_counter() - t0, "rss_mb": rss_mb(),
                     "live_arrays": len(jax.live_arrays()), "threads": threading.active_count(),
                     "fds": len(os.listdir("/proc/self/fd")), "compiles": len(compiles)})

  train.MetricsWriter = Writer
  try:
    train.train_and_evaluate(fv.config, a.workdir)
  except UserError as e:
    print(f"soak: {e}", file=sys.stderr)
    sys.exit(2)
  out = {"rows": rows, "compiled_after_step": sorted(set(compiles))}
  with open(a.json, "w") as f:
    json.dump(out, f)
  q = max(1, len(rows) // 6)
  for lo, hi in zip(rows[::q], rows[q::q]):
    part = [r for r in rows if lo["step"] <= r["step"] <= hi["step"]]
    print(f"steps {lo['step']:>7}-{hi['step']:<7} "
          f"{1000 * (hi['t'] - lo['t']) / (hi['step'] - lo['step']):6.2f} ms/step  "
          f"rss {lo['rss_mb']}->{hi['rss_mb']} MB  "
          f"threads <= {max(r['threads'] for r in part)}  fds <= {max(r['fds'] for r in part)}  "
          f"live arrays <= {max(r['live_arrays'] for r in part)}")
  print("compiled after steps:", out["compiled_after_step"])


if __name__ == "__main__":
  sys.exit(main())
