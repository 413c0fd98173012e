"""Meshes and partition rules: pjit semantics through jax.jit in/out shardings.

config.mesh is a tuple of (axis name, size) pairs, size -1 meaning "the rest of the devices",
e.g. (("data", -1), ("model", 1)). config.sharding picks how parameters are laid out:
  dp    parameters replicated, batch split on "data"
  fsdp  each parameter's largest "data"-divisible dimension split on "data" (ZeRO-3 style)
and a "model" axis larger than 1 adds tensor parallelism on top of either: input kernels w_i/b_i
split on their gate dimension (3H for a GRU), embeddings and the logits head on the vocabulary.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gru_tpu.errors import UserError

STRATEGIES = ("dp", "fsdp")


def _check_axes(axes) -> None:
  """config.mesh must be ((name, size), ...) over 'data' (required) and 'model', each once."""
  pairs = isinstance(axes, (list, tuple)) and all(
      isinstance(a, (list, tuple)) and len(a) == 2 and isinstance(a[0], str)
      and isinstance(a[1], int) and not isinstance(a[1], bool) for a in axes)
  names = [a[0] for a in axes] if pairs else []
  if (not pairs or "data" not in names or len(set(names)) != len(names)
      or not set(names) <= {"data", "model"} or any(a[1] == 0 or a[1] < -1 for a in axes)):
    raise UserError(f"config.mesh={axes!r}: expected axes ('data', N) and optionally "
                    f"('model', M), each once, sizes positive or -1 (the rest of the devices), "
                    f"e.g. --config.mesh=\"(('data', -1), ('model', 1))\"")


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over all (or the given) devices, laid out so ICI and DCN axes are right."""
  devices = list(devices) if devices is not None else jax.devices()
  _check_axes(axes)
  names = tuple(str(name) for name, _ in axes)
  sizes = [int(size) for _, size in axes]
  if sizes.count(-1) > 1:
    raise UserError(f"config.mesh={tuple(axes)}: at most one axis may be -1 (the rest)")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if fixed <= 0 or len(devices) % fixed:
      raise UserError(f"config.mesh={tuple(axes)}: {len(devices)} devices are not divisible by "
                      f"the fixed axes' product {fixed}; change config.mesh")
    sizes[sizes.index(-1)] = len(devices) // fixed
  if math.prod(sizes) != len(devices):
    raise UserError(f"config.mesh={tuple(axes)} needs {math.prod(sizes)} devices but "
                    f"{len(devices)} are available; set config.mesh to match (e.g. "
                    f"(('data', -1), ('model', 1)))")
  auto = (AxisType.Auto,) * len(names)  # pjit semantics, not sharding-in-types
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices == 1:
    return jax.make_mesh(tuple(sizes), names, axis_types=auto, devices=devices)
  # Several TPU slices talk over DCN: only "data" (gradient all-reduce once per step) spans
  # slices; every other axis stays inside a slice on ICI.
  data = names.index("data") if "data" in names else 0
  if sizes[data] % slices:
    raise UserError(f"config.mesh={tuple(axes)}: the '{names[data]}' axis ({sizes[data]}) must "
                    f"be a multiple of the number of TPU slices ({slices})")
  ici, dcn = list(sizes), [1] * len(sizes)
  ici[data], dcn[data] = sizes[data] // slices, slices
  # Splitting a physical axis is what jax.make_mesh also allows for one slice; without it a
  # model axis that does not tile the slice's torus raised NotImplementedError.
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  return Mesh(grid, names, axis_types=auto)


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh, strategy: str) -> P:
  """The PartitionSpec of one parameter (or optimizer moment shaped like one)."""
  spec: list[Any] = [None] * len(shape)
  model = mesh.shape.get("model", 1)
  name = path[-1] if path else ""
  if model > 1 and shape:
    if name in ("w_i", "b_i") and shape[-1] % model == 0:
      spec[-1] = "model"  # the gate dimension (G·H) of the hoisted input projection
    elif name == "embedding" and shape[0] % model == 0:
      spec[0] = "model"  # vocabulary rows
    elif "head" in path and name in ("kernel", "bias") and shape[-1] % model == 0:
      spec[-1] = "model"  # vocabulary columns of the logits
  data = mesh.shape.get("data", 1)
  if strategy == "fsdp" and data > 1:
    free = [i for i, s in enumerate(spec) if s is None and shape[i] % data == 0]
    if free:
      spec[max(free, key=lambda i: shape[i])] = "data"
  return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, strategy: str) -> Any:
  """NamedShardings for a pytree of (abstract) arrays, from each leaf's path and shape."""
  if strategy not in STRATEGIES:
    raise UserError(f"config.sharding={strategy!r} is not one of {STRATEGIES}")

  def one(path, leaf):
    names = tuple(n for n in (_key_name(p) for p in path) if n != "value")  # nnx Variable
    return NamedSharding(mesh, param_spec(names, tuple(getattr(leaf, "shape", ())), mesh, strategy))

  return jax.tree_util.tree_map_with_path(one, tree)


def gathered(shardings: Any, strategy: str) -> Any:
  """The parameters' shardings for compute: under fsdp their 'data' split undone (None for dp).

  fsdp stores parameters split on 'data' and gathers each whole where it is used, so its
  gradient is reduced back onto the split. Left to itself, XLA's partitioner met a 'data'-split
  weight and the 'data'-split batch by gathering the activations instead: the scan all-gathered
  h across the batch inside every time step, and the weight gradients x^T dg gathered whole
  (T, B, I) inputs onto every device (scripts/aot_compile.py checks for both).
  """
  if strategy != "fsdp":
    return None
  return jax.tree.map(lambda sh: NamedSharding(sh.mesh, P(
      *(None if axis == "data" else axis for axis in sh.spec))), shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split on their leading (batch) axis over "data", replicated over "model"."""
  return NamedSharding(mesh, P("data"))


@functools.lru_cache(maxsize=16)  # read for every batch; a pod's mesh has thousands of devices
def data_shard(mesh: Mesh, process_index: int | None = None) -> tuple[int, int]:
  """(index, count): the process loads rows [index·B/count, (index+1)·B/count) of each global
  batch of B rows.

  A process needs the rows of the 'data' positions its devices hold, whatever the mesh's axis
  order or the topology's device order: processes holding the same positions (a model axis
  across hosts, or 'model' written first) are one shard and load the same rows, and a shard's
  rows go to its positions in sorted order (jax.make_array_from_process_local_data's rule), so
  the positions need not be contiguous.
  """
  axis = mesh.axis_names.index("data")
  held: dict[int, set] = {}
  for idx, d in np.ndenumerate(mesh.devices):
    held.setdefault(d.process_index, set()).add(idx[axis])
  shards = sorted({frozenset(h) for h in held.values()}, key=min)
  if len({len(g) for g in shards}) > 1 or sum(map(len, shards)) != mesh.shape["data"]:
    raise UserError(
        f"mesh {dict(mesh.shape)}: the processes' devices hold overlapping, unequal parts of "
        f"the 'data' axis ({sorted(sorted(h) for h in held.values())}), so no split of the "
        f"batch between processes fits; use config.mesh=(('data', -1), ('model', M)) with M "
        f"dividing the devices per process")
  p = jax.process_index() if process_index is None else process_index
  return shards.index(frozenset(held[p])), len(shards)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
