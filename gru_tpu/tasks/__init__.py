"""Tasks: what to learn. The engine loads one by name (`config.task`) with importlib.

A task module defines `make_task(config)` returning an object with
  build_model(rngs) -> nnx.Module
  loss_fn(model, batch, rng) -> (loss, {metric: scalar})            pure, jit-able
  batches(split, start_step, process_index, process_count) -> iterator of this process's rows
                                                                  of each global batch (numpy)
  metadata() -> dict                                              JSON, saved with checkpoints
Batches are a pure function of (seed, split, step) or restartable from a step, so resuming at a
step continues the exact data order.
"""
