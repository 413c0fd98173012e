"""Launch training on a Cloud TPU VM or pod slice with gcloud (prints the commands with --dry_run).

  python scripts/launch_tpu.py --name my-tpu --zone us-west4-a --accelerator v5litepod-16 \\
      --config configs/synthetic.py:size=small --workdir gs://BUCKET/runs/syn [--dry_run]

Steps: create the TPU VM (skipped with --skip_create), copy this checkout to every worker,
install it with the [tpu] extra, then start `gru-tpu train --distributed` on all workers at
once (--worker=all): jax.distributed.initialize() finds the coordinator on TPU pods. Extra
arguments after `--` go to `gru-tpu train` (e.g. -- --config.num_steps=1000).
Commands run without a shell; nothing from the arguments is interpreted as shell syntax
except inside the single remote command string, which is quoted with shlex.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys


def commands(a: argparse.Namespace, extra: list[str]) -> list[list[str]]:
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  where = [a.name, f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])
  cmds = []
  if not a.skip_create:
    cmds.append(tpu + ["create", *where, f"--accelerator-type={a.accelerator}",
                       f"--version={a.runtime_version}"])
  cmds.append(tpu + ["scp", "--recurse", ".", f"{a.name}:gru_tpu", *where[1:], "--worker=all"])
  remote = " && ".join([
      "cd gru_tpu",
      "pip install -q -e '.[tpu]'",
      shlex.join(["gru-tpu", "train", "--config", a.config, "--workdir", a.workdir,
                  "--distributed", *extra]),
  ])
  cmds.append(tpu + ["ssh", *where, "--worker=all", f"--command={remote}"])
  return cmds


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--name", required=True)
  p.add_argument("--zone", required=True)
  p.add_argument("--project")
  p.add_argument("--accelerator", default="v5litepod-8")
  p.add_argument("--runtime_version", default="v2-alpha-tpuv5-lite")
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True, help="gs://... so every worker sees it")
  p.add_argument("--skip_create", action="store_true")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  a = p.parse_args(argv)
  for cmd in commands(a, extra):
    print(shlex.join(cmd))
    if not a.dry_run:
      subprocess.run(cmd, check=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
