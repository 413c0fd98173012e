"""gru_tpu: GRU models in JAX/Flax NNX for TPU, runnable on CPU/GPU."""

__version__ = "0.1.0"
