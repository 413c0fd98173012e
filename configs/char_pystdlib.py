"""Character-level GRU language model on the Python standard library (offline everywhere).

  gru-tpu train --config configs/char_pystdlib.py:size=small --workdir /tmp/char_pystdlib

arg: comma-separated presets: size=tiny (tests) | small (CPU, minutes) | base (one TPU v5e host:
batch 256 = 32 per chip on 8 chips, seq_len 256, hidden 1024 - multiples of 128 for the MXU).
"""

import ml_collections

SIZES = {
    "tiny": dict(batch_size=8, seq_len=32, hidden=64, embed_dim=32, num_layers=1, steps=200),
    "small": dict(batch_size=64, seq_len=128, hidden=512, embed_dim=128, num_layers=2,
                  steps=5000),
    "base": dict(batch_size=256, seq_len=256, hidden=1024, embed_dim=256, num_layers=2,
                 steps=50000),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  presets = dict(kv.split("=") for kv in arg.split(",")) if arg else {}
  size = SIZES[presets.get("size", "small")]
  c = ml_collections.ConfigDict()
  c.task = "text"
  c.seed = 0
  c.mesh = (("data", -1), ("model", 1))
  c.sharding = "dp"
  c.batch_size = size["batch_size"]
  c.seq_len = size["seq_len"]
  c.grad_accum = 1
  c.num_steps = size["steps"]
  c.log_every = 50
  c.eval_every = 500
  c.eval_steps = 10
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.profile_start = 0
  c.profile_steps = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "pystdlib"  # or files:GLOB
  c.data.tokenizer = "char"   # or byte
  c.data.sample_prompt = "def "  # a sample of sample_length tokens is logged at each eval
  c.data.sample_length = 32 if presets.get("size") == "tiny" else 200

  c.model = ml_collections.ConfigDict()
  c.model.cell = "gru"  # gru | lstm | mingru
  c.model.hidden = size["hidden"]
  c.model.embed_dim = size["embed_dim"]
  c.model.num_layers = size["num_layers"]
  c.model.dropout = 0.0
  c.model.recurrent_dropout = 0.0
  c.model.remat = False
  c.model.dtype = "float32"

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.final_lr_fraction = 0.1
  c.optimizer.weight_decay = 1e-4
  c.optimizer.grad_clip = 1.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  return c
