"""Character-level GRU on TFDS tiny_shakespeare (what users on Cloud TPU VMs run).

  gru-tpu train --config configs/shakespeare_char.py:size=small --workdir /tmp/shakespeare
  # offline: prepare from the original input.txt (needs the [tfds] extra for TensorFlow)
  gru-tpu train --config configs/shakespeare_char.py:size=small --workdir /tmp/shakespeare \
      --config.data.tfds_manual_dir=../shared/data/tiny_shakespeare
  # or the same file without TFDS
  gru-tpu train --config configs/shakespeare_char.py:size=small --workdir /tmp/shakespeare \
      --config.data.source=files:../shared/data/tiny_shakespeare/input.txt

arg: comma-separated presets: size=tiny (tests) | small (2 CPU cores: scripts/bench_text.py
measures this one, ~1.4 nats in 20 minutes) | base (one TPU v5e host: batch 256 = 32 per chip on
8 chips, seq_len 256, hidden 1024 - multiples of 128 for the MXU;
bfloat16 compute).
"""

from gru_tpu.config import engine_defaults, parse_arg
from gru_tpu.data.text import data_config

SIZES = {
    "tiny": dict(batch_size=8, seq_len=32, hidden=64, embed_dim=32, num_layers=1, num_steps=200),
    "small": dict(batch_size=64, seq_len=128, hidden=512, embed_dim=128, num_layers=2,
                  num_steps=1400),
    "base": dict(batch_size=256, seq_len=256, hidden=1024, embed_dim=256, num_layers=2,
                 num_steps=20000),
}


def get_config(arg: str | None = None):
  size = parse_arg(arg, size=SIZES).get("size", "small")
  c = engine_defaults(task="text", **SIZES[size])
  c.data = data_config(source="tfds:tiny_shakespeare", tokenizer="char")
  c.data.sample_prompt = "ROMEO:"
  c.data.sample_length = 32 if size == "tiny" else 200
  # tiny_shakespeare is ~1M characters: a 2x512 GRU overfits it within a few epochs, so the
  # presets regularise (measured by scripts/bench_text.py; see the README).
  c.model.dropout = 0.2 if c.model.num_layers > 1 else 0.0  # it acts between layers
  c.model.recurrent_dropout = 0.0
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.1
  c.optimizer.final_lr_fraction = 0.05
  c.eval_every = 50
  c.eval_steps = 6  # 384 of the validation split's 435 windows (88 %) at batch 64, seq_len 128
  if size == "base":
    c.eval_steps = 1  # all 217 windows at seq_len 256 (batch 256: 39 repeats, weighted 0)
    c.model.hidden_multiple = 128  # MXU tiles
    # bf16 matmuls, f32 params, gates and carry: the MXU's native input type. At this preset on
    # v5e it nearly halves the step's HBM traffic (2.50 -> 1.38 GB, scripts/aot_compile.py).
    c.model.dtype = "bfloat16"
  return c
