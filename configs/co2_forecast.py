"""Weekly Mauna Loa CO2 (statsmodels, 2,284 values with 59 missing): forecast the next year.

  gru-tpu train --config configs/co2_forecast.py:size=small --workdir /tmp/co2
  gru-tpu forecast --workdir /tmp/co2 --horizon 52 --output forecast.csv --plot forecast.png

arg: size=tiny (tests) | small (CPU, minutes; the default) | base (one TPU host).
"""

from gru_tpu.config import parse_arg
from gru_tpu.tasks.forecast import SIZES, default_config


def get_config(arg: str | None = None):
  size = parse_arg(arg, size=SIZES).get("size", "small")
  c = default_config(size)
  c.data.source = "statsmodels:co2"
  c.data.context_length = 104   # two years
  c.data.horizon = 52
  c.model.decoder = "direct"
  c.model.head = "student_t"
  if size == "small":
    c.num_steps = 1000          # ~30 s on 2 CPU cores; 2000 overfits (scripts/bench_forecast.py)
  return c
