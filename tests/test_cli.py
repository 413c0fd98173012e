"""The gru-tpu entry point: dispatch, help, and a clear error for an unknown command."""

import subprocess
import sys


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "gru_tpu.cli", *args], capture_output=True,
                        text=True, timeout=120)


def test_unknown_command_exits_2_and_names_it():
  r = run_cli("trian")
  assert r.returncode == 2
  assert "unknown command 'trian'" in r.stderr and "bench" in r.stderr


def test_help_lists_commands():
  r = run_cli("--help")
  assert r.returncode == 0 and "bench" in r.stderr


def test_bench_help_reaches_the_subcommand():
  r = run_cli("bench", "--help")
  assert r.returncode == 0 and "--json" in r.stdout
