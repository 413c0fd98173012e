"""Your own series from a CSV file (a template: copy it and set the columns).

  gru-tpu train --config configs/csv_forecast.py:size=small --workdir /tmp/mine \
      --config.data.source=csv:sales.csv --config.data.time_column=date \
      --config.data.target=sales [--config.data.id_column=store]
  gru-tpu forecast --workdir /tmp/mine --data csv:sales.csv --horizon 14 --output forecast.csv \
      --plot forecast.png

One row per time step (and series, with id_column), sorted by time; empty target cells are
missing values. Covariates: known_covariates (known in advance, e.g. prices or holidays: give
them for the forecast horizon as rows after the last target value, target empty) and
past_covariates (known only up to the forecast origin). The season length comes from the
sampling frequency (daily 7, weekly 52, monthly 12, quarterly 4, hourly 24) unless set.
arg: size=tiny (tests) | small (CPU, minutes; the default) | base (one TPU host).
"""

from gru_tpu.config import parse_arg
from gru_tpu.tasks.forecast import SIZES, default_config


def get_config(arg: str | None = None):
  c = default_config(parse_arg(arg, size=SIZES).get("size", "small"))
  c.data.source = "csv:data.csv"
  c.data.time_column = "date"
  c.data.time_format = ""          # "" = inferred; e.g. "%d/%m/%Y" for day-first dates
  c.data.target = "value"          # one or more columns: "sales,returns"
  c.data.id_column = ""            # e.g. "store" for a panel of series
  c.data.known_covariates = ""     # e.g. "price,holiday"
  c.data.past_covariates = ""      # e.g. "visits"
  c.data.transform = "none"        # "sqrt" or "log1p" for counts whose spread grows with level
  c.data.context_length = 56
  c.data.horizon = 14
  return c
