"""The engine's config keys with their defaults; configs/*.py start from these.

Every key is documented in the README's Training section. Tasks add `data.*` (and their own
`model.*`); `seq_len` and the SequenceLM-only model keys (`embed_dim`, `tie_embeddings`,
`layer_norm`) are set only for the token tasks that pass `seq_len` / `embed_dim`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Iterable

import ml_collections

from gru_tpu.errors import UserError


def load_file(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
  """get_config(arg) of a configs/NAME.py file, as `--config PATH:ARG` gives it (for scripts)."""
  spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def parse_arg(arg: str | None, **choices: Iterable[str]) -> dict[str, str]:
  """'size=tiny,foo=bar' -> {'size': 'tiny', 'foo': 'bar'} (the `:arg` of --config).

  choices (e.g. size=("tiny", "small")) are the presets a config knows: any other key or value
  is a UserError, so a typo is not silently the default.
  """
  out = {}
  for kv in (arg or "").split(","):
    if not kv.strip():
      continue
    if "=" not in kv:
      raise UserError(f"--config presets are KEY=VALUE (e.g. :size=tiny); got {kv!r}")
    key, value = (p.strip() for p in kv.split("=", 1))
    if choices and key not in choices:
      raise UserError(f"--config preset {key!r} is unknown; this config knows "
                      f"{', '.join(choices)}")
    if key in choices and value not in choices[key]:
      raise UserError(f"--config preset {key}={value!r}: expected one of "
                      f"{', '.join(choices[key])}")
    out[key] = value
  return out


def engine_defaults(*, task: str, batch_size: int, num_steps: int, hidden: int, num_layers: int,
                    seq_len: int | None = None,
                    embed_dim: int | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task
  c.seed = 0
  c.mesh = (("data", -1), ("model", 1))
  c.sharding = "dp"
  c.batch_size = batch_size
  if seq_len is not None:
    c.seq_len = seq_len
  c.grad_accum = 1
  c.num_steps = num_steps
  c.log_every = 50
  c.eval_every = 500
  c.eval_steps = 10
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  # A jax.profiler trace of steps [profile_start, profile_start + profile_steps) -> workdir/profile
  c.profile_start = 0
  c.profile_steps = 0

  c.model = ml_collections.ConfigDict()
  c.model.cell = "gru"  # gru | lstm | mingru
  c.model.hidden = hidden
  c.model.num_layers = num_layers
  c.model.dropout = 0.0
  c.model.recurrent_dropout = 0.0
  c.model.remat = False
  c.model.unroll = 1  # time steps per scan-loop iteration (lax.scan unroll)
  c.model.dtype = "float32"  # compute dtype; "bfloat16" keeps f32 params, gates and carry
  c.model.hidden_multiple = 1  # hidden and embed_dim must be multiples of this (128 on TPU)
  if embed_dim is not None:  # SequenceLM
    c.model.embed_dim = embed_dim
    c.model.tie_embeddings = False  # logits through the embedding matrix (after a projection)
    c.model.layer_norm = False  # LayerNorm on the recurrent output, before the logits
  # GRU recurrence: auto (the Pallas kernel on TPU where it fits, else lax.scan) | scan | pallas
  c.model.impl = "auto"

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.final_lr_fraction = 0.1
  c.optimizer.weight_decay = 1e-4
  c.optimizer.grad_clip = 1.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99

  c.data = ml_collections.ConfigDict()
  return c
