"""Launch training on a Cloud TPU VM or pod slice with gcloud (prints the commands with --dry_run).

  python scripts/launch_tpu.py --name my-tpu --zone us-west4-a --accelerator v5litepod-16 \\
      --config configs/synthetic.py:size=small --workdir gs://BUCKET/runs/syn [--dry_run]

Steps: create the TPU VM (skipped with --skip_create), copy this checkout to every worker,
install it with the [tpu] extra into a venv of Python --python (uv installs both: the images'
own Python 3.10 is too old for jax), then start `gru-tpu train --distributed` on all workers at
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

VENV = "../gru_tpu_venv"  # from the checkout's directory on the worker


def commands(a: argparse.Namespace, extra: list[str]) -> list[list[str]]:
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  where = [a.name, f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])
  cmds = []
  if not a.skip_create:
    cmds.append(tpu + ["create", *where, f"--accelerator-type={a.accelerator}",
                       f"--version={a.runtime_version}"])
  cmds.append(tpu + ["scp", "--recurse", ".", f"{a.name}:gru_tpu", *where[1:], "--worker=all"])
  # The TPU images' own Python is Ubuntu 22.04's 3.10, which jax >= 0.7 (and this package)
  # does not install on: uv fetches the Python asked for into a venv beside the checkout (not
  # in it: scp would bring a local .venv along).
  remote = " && ".join([
      "cd gru_tpu",
      "(command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)",
      'export PATH="$HOME/.local/bin:$PATH"',
      shlex.join(["uv", "venv", "--allow-existing", "--python", a.python, VENV]),
      f"uv pip install -q --python {VENV}/bin/python -e '.[tpu]'",
      shlex.join([f"{VENV}/bin/gru-tpu", "train", "--config", a.config, "--workdir", a.workdir,
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
  p.add_argument("--runtime_version", default="v2-alpha-tpuv5-lite",
                 help="v2-alpha-tpuv6e for v6e, v2-alpha-tpuv5 for v5p, tpu-ubuntu2204-base "
                      "for v4")
  p.add_argument("--python", default="3.12", help="the Python uv installs on the workers")
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
