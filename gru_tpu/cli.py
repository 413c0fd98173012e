"""The `gru-tpu` command: thin dispatch to each subcommand's main(argv)."""

from __future__ import annotations

import logging
import os
import sys

COMMANDS = {
    "train": ("gru_tpu.train", "train a model: --config configs/X.py[:arg] --workdir DIR"),
    "sample": ("gru_tpu.api", "stream text from a trained model: --workdir DIR --prompt ..."),
    "forecast": ("gru_tpu.api:forecast_main",
                 "forecast CSV/PNG from a trained forecaster: --workdir DIR --horizon N ..."),
    "bench": ("gru_tpu.bench", "GRU speed/memory vs PyTorch and Flax linen, side by side"),
}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
    usage = "\n".join(f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items())
    print(f"usage: gru-tpu COMMAND [ARGS]\n\ncommands:\n{usage}", file=sys.stderr)
    if argv and argv[0] in ("-h", "--help"):
      return 0
    print(f"gru-tpu: unknown command {argv[0]!r}" if argv else "gru-tpu: a COMMAND is needed",
          file=sys.stderr)
    return 2  # a script's missing command is a failure, not help it asked for
  import importlib
  module, _, function = COMMANDS[argv[0]][0].partition(":")
  try:
    code = getattr(importlib.import_module(module), function or "main")(argv[1:])
    sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
    if code:
      # The failure is reported, in one line. An unreadable checkpoint also fails orbax's other
      # pending reads, whose futures asyncio logs as tracebacks when they are garbage-collected,
      # often at exit: sometimes 80-150 lines after that one.
      logging.getLogger("asyncio").disabled = True
    return code
  except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (train saves on the first one)
    hint = "; run the same command to resume from the latest checkpoint" * (argv[0] == "train")
    print(f"gru-tpu {argv[0]}: interrupted{hint}", file=sys.stderr)
    return 130
  except BrokenPipeError:  # `gru-tpu ... --help | head`: the reader is gone; stop quietly
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
    return 1


if __name__ == "__main__":
  sys.exit(main())
