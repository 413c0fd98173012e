"""gru_tpu: GRU models in JAX/Flax NNX for TPU, runnable on CPU/GPU."""

__version__ = "0.1.0"


def load(workdir, step=None):
  """A trained model from a workdir, for notebooks: see gru_tpu.api.load."""
  from gru_tpu.api import load as _load
  return _load(workdir, step)
