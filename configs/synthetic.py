"""Synthetic next-token task: the engine's smoke workload.

  gru-tpu train --config configs/synthetic.py:size=tiny --workdir /tmp/synthetic

arg: comma-separated presets, e.g. "size=tiny" (tests) or "size=small".
"""

from gru_tpu.config import engine_defaults, parse_arg
from gru_tpu.tasks.synthetic import data_defaults

SIZES = {
    "tiny": dict(batch_size=16, seq_len=16, hidden=32, embed_dim=16, num_layers=1, lag=1),
    "small": dict(batch_size=64, seq_len=64, hidden=256, embed_dim=64, num_layers=2, lag=3),
}


def get_config(arg: str | None = None):
  size = dict(SIZES[parse_arg(arg, size=SIZES).get("size", "tiny")])
  lag = size.pop("lag")
  c = engine_defaults(task="synthetic", num_steps=200, **size)
  c.log_every, c.eval_every, c.eval_steps, c.checkpoint_every = 10, 100, 2, 100
  c.data = data_defaults()  # vocab_size, lag, noise
  c.data.lag = lag  # x_t = (x_{t-1} + x_{t-lag}) mod vocab_size
  c.optimizer.learning_rate = 1e-2
  c.optimizer.warmup_steps = 10
  return c
