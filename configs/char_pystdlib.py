"""Character-level GRU language model on the Python standard library (offline everywhere).

  gru-tpu train --config configs/char_pystdlib.py:size=small --workdir /tmp/char_pystdlib

arg: comma-separated presets: size=tiny (tests) | small (CPU, minutes) | base (one TPU v5e host:
batch 256 = 32 per chip on 8 chips, seq_len 256, hidden 1024 - multiples of 128 for the MXU;
bfloat16 compute).
"""

from gru_tpu.config import engine_defaults, parse_arg
from gru_tpu.data.text import data_config

SIZES = {
    "tiny": dict(batch_size=8, seq_len=32, hidden=64, embed_dim=32, num_layers=1, num_steps=200),
    "small": dict(batch_size=64, seq_len=128, hidden=512, embed_dim=128, num_layers=2,
                  num_steps=5000),
    "base": dict(batch_size=256, seq_len=256, hidden=1024, embed_dim=256, num_layers=2,
                 num_steps=50000),
}


def get_config(arg: str | None = None):
  size = parse_arg(arg, size=SIZES).get("size", "small")
  c = engine_defaults(task="text", **SIZES[size])
  c.data = data_config(source="pystdlib", tokenizer="char")  # or files:GLOB, tfds:NAME; byte
  c.data.sample_prompt = "def "  # a sample of sample_length tokens is logged at each eval
  c.data.sample_length = 32 if size == "tiny" else 200
  if size == "base":
    c.model.hidden_multiple = 128  # MXU tiles
    # bf16 matmuls, f32 params, gates and carry: the MXU's native input type. At this preset on
    # v5e it nearly halves the step's HBM traffic (2.50 -> 1.38 GB, scripts/aot_compile.py).
    c.model.dtype = "bfloat16"
  return c
