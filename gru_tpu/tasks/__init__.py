"""Tasks: what to learn. The engine loads one by name (`config.task`) with importlib.

A task module defines `make_task(config)` returning an object with
  build_model(rngs) -> nnx.Module
  loss_fn(model, batch, rng) -> (loss, {metric: scalar})            pure, jit-able; a loss that
                          is a mean over a varying number of terms also gives that number as
                          aux["weight"] (grad_accum weighs micro-batches, and eval averages
                          eval batches, by it; not logged); eval batches may carry a
                          per-row "weight" (order.first_pass_weights: 0 for a window already read)
  batches(split, start_step, shard, num_shards) -> iterator of rows [shard·B/num_shards,
                          (shard+1)·B/num_shards) of each global batch of B rows (numpy); the
                          engine passes this process's shard (sharding.data_shard)
  metadata() -> dict                                              JSON, saved with checkpoints
Batches are a pure function of (seed, split, step) or restartable from a step, so resuming at a
step continues the exact data order. Optional: finalize_eval(mean metrics) -> metrics,
sample_text(model, step) -> str (logged at each eval), and evaluate(model, split) -> metrics:
task-level evaluation (e.g. forecasts against baselines), merged into every eval line with
split "eval" and written once more on split "test" after the last step; model_metadata(model)
-> dict: JSON that depends on the parameters (e.g. the forecast task's interval calibration),
merged into metadata() for each checkpoint from the parameters saved in it;
resume_mismatch(saved metadata) -> str | None: why a checkpoint cannot resume this run although
its config matches (the data now gives another vocabulary or other features).
A module may also define data_defaults() -> ConfigDict, its config.data keys and their defaults:
a config lacking one is refused as one for another task, and a checkpoint whose config lacks one
(written before the key existed) resumes as if it had the default; default_config() -> ConfigDict
does the same for every key.
"""

import jax.numpy as jnp

from gru_tpu.errors import UserError
from gru_tpu.models.lm import SequenceLM


def sequence_lm(vocab_size: int, m, rngs) -> SequenceLM:
  """config.model -> SequenceLM, for every token task and for gru_tpu.load."""
  k = m.get("hidden_multiple", 1)
  if k > 1 and (m.hidden % k or m.embed_dim % k):
    raise UserError(f"config.model.hidden={m.hidden} and embed_dim={m.embed_dim} must be "
                    f"multiples of model.hidden_multiple={k} (the TPU MXU tile); round them up")
  impl = m.get("impl", "auto")  # checked with the cell by train.check_engine_config
  return SequenceLM(vocab_size, cell=m.cell, embed_dim=m.embed_dim, hidden=m.hidden,
                    num_layers=m.num_layers, dropout=m.dropout,
                    recurrent_dropout=m.recurrent_dropout, remat=m.remat,
                    unroll=m.get("unroll", 1),
                    dtype=jnp.dtype(m.dtype), tie_embeddings=m.get("tie_embeddings", False),
                    layer_norm=m.get("layer_norm", False), impl=impl, rngs=rngs)
