"""Shared test setup: small shapes, CPU, and torch models with nonzero random biases."""

import contextlib
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KERAS_BACKEND", "jax")
# Tests use tiny shapes: compile time dominates, so trade run-time speed for compile speed. Set
# in the environment, so the processes tests start (CLI runs, restarts, multi-host pairs) get it
# too: a tiny train step with 8 CPU devices compiles in 2 s instead of 12.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture
def compiles():
  """`with compiles(label) as seen:` seen gets label() for each XLA compile inside the block."""

  @contextlib.contextmanager
  def watch(label=lambda: "compile"):
    seen = []

    def listener(event, duration, **kwargs):
      if event == "/jax/core/compile/backend_compile_duration":
        seen.append(label())

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
      yield seen
    finally:
      jax.monitoring.unregister_event_duration_listener(listener)

  return watch


@pytest.fixture
def killed_at(monkeypatch):
  """`with killed_at(n): train_and_evaluate(...)`: the run dies (KeyboardInterrupt) as its n-th
  batch is handed to the devices, like a process killed mid-run; the block expects that."""
  from gru_tpu import train

  @contextlib.contextmanager
  def at(n: int):
    real, calls = train._to_global, []

    def crash(batch, mesh):
      calls.append(1)
      if len(calls) == n:
        raise KeyboardInterrupt("simulated crash")
      return real(batch, mesh)

    monkeypatch.setattr(train, "_to_global", crash)
    try:
      with pytest.raises(KeyboardInterrupt):
        yield
    finally:
      monkeypatch.setattr(train, "_to_global", real)

  return at


def randomize_biases(module, seed=0):
  """torch's default init already has nonzero biases; make them larger so a missing one shows."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.startswith("bias"):
        p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
  return module


SHAKESPEARE = Path(__file__).parents[2] / "shared" / "data" / "tiny_shakespeare" / "input.txt"


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """tiny_shakespeare prepared by TFDS from shared/data's input.txt: offline, via manual_dir."""
  from gru_tpu.data import text
  d = tmp_path_factory.mktemp("tfds")
  text.load_corpus("tfds:tiny_shakespeare", tfds_data_dir=str(d),
                   tfds_manual_dir=str(SHAKESPEARE.parent))
  return d
