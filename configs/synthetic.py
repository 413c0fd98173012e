"""Synthetic next-token task: the engine's smoke workload.

  gru-tpu train --config configs/synthetic.py:size=tiny --workdir /tmp/synthetic

arg: comma-separated presets, e.g. "size=tiny" (tests) or "size=small".
"""

import ml_collections

SIZES = {
    "tiny": dict(batch_size=16, seq_len=16, hidden=32, embed_dim=16, num_layers=1, lag=1),
    "small": dict(batch_size=64, seq_len=64, hidden=256, embed_dim=64, num_layers=2, lag=3),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  presets = dict(kv.split("=") for kv in arg.split(",")) if arg else {}
  size = SIZES[presets.get("size", "tiny")]
  c = ml_collections.ConfigDict()
  c.task = "synthetic"
  c.seed = 0
  c.mesh = (("data", -1), ("model", 1))
  c.sharding = "dp"
  c.batch_size = size["batch_size"]
  c.seq_len = size["seq_len"]
  c.grad_accum = 1
  c.num_steps = 200
  c.log_every = 10
  c.eval_every = 100
  c.eval_steps = 2
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  # A jax.profiler trace of steps [profile_start, profile_start + profile_steps) -> workdir/profile
  c.profile_start = 0
  c.profile_steps = 0

  c.model = ml_collections.ConfigDict()
  c.model.cell = "gru"
  c.model.hidden = size["hidden"]
  c.model.embed_dim = size["embed_dim"]
  c.model.num_layers = size["num_layers"]
  c.model.dropout = 0.0
  c.model.recurrent_dropout = 0.0
  c.model.remat = False
  c.model.dtype = "float32"  # compute dtype; "bfloat16" keeps f32 params, gates and carry

  c.data = ml_collections.ConfigDict()
  c.data.vocab_size = 16
  c.data.lag = size["lag"]
  c.data.noise = 0.05

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-2
  c.optimizer.warmup_steps = 10
  c.optimizer.final_lr_fraction = 0.1
  c.optimizer.weight_decay = 1e-4
  c.optimizer.grad_clip = 1.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  return c
