"""Compile the real train step for a TPU topology on any machine (libtpu; no TPU needed).

  python scripts/aot_compile.py --config configs/synthetic.py:size=tiny --topology v5e:2x2 \\
      [--config.key=value ...]

Builds the mesh on jax.experimental.topologies.get_topology_desc(topology, "tpu"), lowers and
compiles the jitted train step with its shardings, prints per-device HBM use (memory_analysis)
and FLOPs / bytes (cost_analysis), and checks the compiled HLO: every time loop holds exactly
one matmul (the recurrent one, per direction; LOOP_MATMULS for the LSTM and minGRU) or the
recurrence runs in Mosaic kernels (the Pallas GRU, config.model.impl), the input projections are
outside the loops, no collective but a parameter's all-gather runs inside a loop, under data
parallelism (dp or fsdp, on one slice) nothing but fsdp's parameters is all-gathered, and no
jnp.tile result is materialised outside the loops. Exit 1 if a check fails.

--compare_impls instead compiles the step with config.model.impl=scan and =pallas and prints,
for both, FLOPs and HBM bytes per step (hbm_traffic: every trip of every time loop, which
cost_analysis counts once) and a roofline step time per TPU generation at published peak bf16
FLOP/s and HBM bandwidth, and the ratio of the recurrence's HBM traffic (scan / kernels).
Needs the [tpu] extra (pip install -e ".[tpu]").
"""

from __future__ import annotations

import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from gru_tpu import sharding, train
from gru_tpu.errors import UserError
from gru_tpu.kernels import gru as kernel

config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:arg]", lock_config=True)
flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v5e:4x4, v6e:2x4, v4:2x2x2")
flags.DEFINE_integer("num_slices", 1, "slices of that topology joined over DCN (multi-slice)",
                     lower_bound=1)
flags.DEFINE_bool("compare_impls", False, "compile with config.model.impl=scan and =pallas and "
                  "print HBM traffic and roofline step times per TPU generation for both")
FLAGS = flags.FLAGS

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
MATMUL = re.compile(r"= [^=]*\b(dot|convolution)\(")
WHILE = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = .*\bwhile\(", re.M)  # tuple types hold "="
MOSAIC = re.compile(r'custom_call_target="tpu_custom_call"')


def computations(hlo: str) -> dict[str, str]:
  """HLO module text -> {computation name: its body}."""
  out, name, lines = {}, None, []
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      name, lines = m.group(1), []
    elif line.startswith("}") and name:
      out[name] = "\n".join(lines)
      name = None
    elif name:
      lines.append(line)
  return out


def _called(body: str) -> list[str]:
  return re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)",
                    body)


def count(comps: dict, name: str, pattern) -> int:
  """Matches of `pattern` in a computation and everything it calls."""
  body = comps.get(name, "")
  return len(pattern.findall(body)) + sum(count(comps, c, pattern) for c in _called(body))


def _collectives(comps: dict, name: str) -> list[tuple[str, tuple[int, ...]]]:
  """(opcode, result dims) of the collectives in a computation and its callees."""
  out = []
  for _, type_, op, _, _ in _instructions(comps.get(name, "")):
    op = op.removesuffix("-start")
    if op in COLLECTIVES:
      arrays = ARRAY.findall(type_)  # an async start's type holds operand and result
      dims = max((tuple(int(d) for d in a[1].split(",") if d) for a in arrays),
                 key=lambda d: int(np.prod(d)), default=())
      out.append((op, dims))
  body = comps.get(name, "")
  return out + [c for called in _called(body) for c in _collectives(comps, called)]


# Matmuls a time loop may hold, per cell: the GRU's custom VJP has one in each direction; the
# LSTM's autodiff backward also accumulates dW_h inside its loop; minGRU has no time loop (its
# recurrence is linear: jax.lax.associative_scan, log-depth and loop-free).
LOOP_MATMULS = {"gru": {1}, "lstm": {1, 2}, "mingru": set()}


def _outer_whiles(comps: dict, name: str) -> list[tuple[str, str]]:
  """(condition, body) of the whiles a computation reaches without entering another while."""
  body = comps.get(name, "")
  pairs = re.findall(r"while\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)", body)
  inner = {c for pair in pairs for c in pair}
  return pairs + [w for c in _called(body) if c not in inner for w in _outer_whiles(comps, c)]


def check_loops(hlo: str, data_parallel: bool, single_slice: bool = True,
                gatherable: frozenset = frozenset(), cell: str = "gru",
                grad_accum: int = 1) -> tuple[list[int], int, list[str]]:
  """Per time loop its matmuls, the matmuls outside loops, and what is wrong. A recurrence is
  either a while loop with one matmul (the GRU's scan; see LOOP_MATMULS for the other cells)
  or a Mosaic kernel (the Pallas GRU).
  gatherable: the parameter sizes (elements) that may be all-gathered (split by fsdp or a model
  axis), also inside loops (XLA overlaps the next layer's gather with a loop); XLA may gather a
  weight split into an extra (shards, rows / shards) dimension, so sizes, not shapes."""
  comps = computations(hlo)
  entry = re.search(r"^ENTRY %?([\w.\-]+)", hlo, re.M).group(1)
  # Time loops are the innermost whiles; one holding others is config.grad_accum's loop over
  # micro-batches, whose projections count as outside the time loops. With no time loop (the
  # Pallas kernels, minGRU) that loop is innermost itself: the outermost whiles that run
  # grad_accum times are it.
  accum = {b for c, b in _outer_whiles(comps, entry) if grad_accum > 1 and max(
      map(int, re.findall(r"constant\((\d+)\)", comps.get(c, ""))), default=0) == grad_accum}
  # A loop around Mosaic kernels is remat's chunk loop over the Pallas GRU (projections and
  # gradient matmuls of a chunk of steps), not a time loop: the kernels are the recurrence.
  loop_bodies = [b for b in re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo)
                 if not count(comps, b, WHILE) and b not in accum and not count(comps, b, MOSAIC)]
  per_loop = [count(comps, b, MATMUL) for b in loop_bodies]
  problems = []
  recurrent = [n for n in per_loop if n]
  allowed = LOOP_MATMULS[cell]
  if not allowed:
    if recurrent:
      problems.append(f"{cell} has no sequential time loop, found loops with matmuls {per_loop}")
  elif (not recurrent and not mosaic_kernels(hlo)) or any(n not in allowed for n in recurrent):
    problems.append(f"time loops must hold {' or '.join(map(str, sorted(allowed)))} matmul(s) "
                    f"each ({cell}), found {per_loop}")
  outside = count(comps, entry, MATMUL) - sum(per_loop)
  if outside < 1:
    problems.append("no matmul outside the loops: the input projection is not hoisted")
  # A jnp.tile of a (T, B, H) array across the gates is materialised and relaid out by TPU XLA
  # (the scan's backward once lost ~1.9 GB of HBM traffic per step to it): multiply per gate.
  # (Not a constant: tensor parallelism tiles the slice offsets of the gates into a literal.)
  tiles = [m.group(1) for m in re.finditer(
      r"^\s*(?:ROOT )?%([\w.\-]+) = (?![^\n]* constant\()[^\n]*op_name=\"[^\"]*/tile\"",
      comps.get(entry, ""), re.M)]
  if tiles:
    problems.append(f"{len(tiles)} jnp.tile result(s) materialised outside the time loops "
                    f"({', '.join(tiles[:3])}): multiply per gate instead")
  # The recurrence runs on whole weights and batch rows (models/stack.py _split_batch): no
  # time step waits for another device, whatever the mesh.
  weights = lambda c: c[0] == "all-gather" and math.prod(c[1]) in gatherable
  inside = [c for b in loop_bodies for c in _collectives(comps, b) if not weights(c)]
  if inside:
    problems.append(f"{len(inside)} collective(s) inside a time loop "
                    f"({', '.join(sorted({op for op, _ in inside}))})")
  if data_parallel:
    # Parameters need only gradient all-reduces (and, under fsdp, their own all-gathers); any
    # other all-gather or all-to-all means some batch-sharded activation was gathered whole onto
    # every device or resharded. (Across slices XLA splits the gradient all-reduce into
    # reduce-scatter, all-reduce over DCN and all-gather.)
    gathers = [c for c in _collectives(comps, entry)
               if c[0] in ("all-gather", "all-to-all") and not weights(c)]
    if gathers and single_slice:
      problems.append(f"{len(gathers)} all-gather(s) or all-to-all(s) of activations under data "
                      f"parallelism (e.g. {gathers[0][0]} to {list(gathers[0][1])}): a "
                      f"batch-sharded activation is gathered onto every device")
  return per_loop, outside, problems


def mosaic_kernels(hlo: str) -> int:
  return hlo.count('custom_call_target="tpu_custom_call"')


def roofline(flops: float, bytes_accessed: float, notes: dict | None = None) -> list[str]:
  """Step time per TPU generation at published peak bf16 FLOP/s and HBM bandwidth (per chip):
  max(FLOPs / peak, bytes / bandwidth), and which bound it is."""
  rows = []
  for chip, c in kernel.CHIPS.items():
    mxu, hbm = flops / c["flops"], bytes_accessed / c["hbm"]
    rows.append(f"  {chip:>4}: {max(mxu, hbm) * 1e3:9.3f} ms  "
                f"({'MXU' if mxu >= hbm else 'HBM'}-bound: compute {mxu * 1e3:.3f} ms, "
                f"memory {hbm * 1e3:.3f} ms){(notes or {}).get(chip, '')}")
  return rows


def compile_step(config, mesh):
  s = train.setup(config, mesh)
  state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                       s.abstract_state, s.state_shardings)
  host = next(s.task.batches("train", 0, 0, 1))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s.batch_sharding)
           for k, v in host.items()}
  compiled = s.train_step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  # The parameters' sizes: what fsdp may all-gather.
  params = frozenset(a.size for a in jax.tree.leaves(s.abstract_state["params"]))
  return compiled, cost[0] if isinstance(cost, (list, tuple)) else cost, params


def kernel_costs(hlo: str) -> tuple[float, float]:
  """FLOPs and bytes the Mosaic kernels declare (pl.CostEstimate, from their BlockSpecs)."""
  found = re.findall(r'"cost_estimate":\{"flops":"(\d+)","transcendentals":"\d+",'
                     r'"bytes_accessed":"(\d+)"', hlo)
  return sum(float(f) for f, _ in found), sum(float(b) for _, b in found)


def loop_weight_spaces(hlo: str, H: int) -> list[int]:
  """Memory space of the (H, 3H) recurrent weight inside each time loop (0 = HBM; TPU XLA
  annotates on-chip placements S(n) in the layout)."""
  comps = computations(hlo)
  spaces = []
  for body in re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo):
    m = re.search(rf"\[(?:{H},{3 * H}|{3 * H},{H})\]\{{[^}}]*?(?:S\((\d+)\))?\}}",
                  comps.get(body, ""))
    if m:
      spaces.append(int(m.group(1) or 0))
  return spaces


DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
               "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\](\{[^}]*\})?")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all",
              "partition-id", "replica-id"}  # and every *-done: counted at its *-start


def _arrays(type_str: str) -> list[tuple[int, bool]]:
  """(bytes, in HBM) of each array in an HLO type; on-chip buffers carry S(n>0) in the layout."""
  out = []
  for dt, dims, layout in ARRAY.findall(type_str):
    space = re.search(r"S\((\d+)\)", layout or "")
    out.append((int(np.prod([int(d) for d in dims.split(",") if d])) * DTYPE_BYTES[dt],
                not space or space.group(1) == "0"))
  return out


def _instructions(body: str) -> list[tuple[str, str, str, list[str], str]]:
  """(name, type, opcode, operand names, attributes) of a computation's instructions."""
  out = []
  for line in body.splitlines():
    m = INSTRUCTION.match(line)
    if m:
      name, type_, op, rest = m.groups()
      depth, i = 1, 0
      while i < len(rest) and depth:
        depth += {"(": 1, ")": -1}.get(rest[i], 0)
        i += 1
      out.append((name, type_, op, re.findall(r"%([\w.\-]+)", rest[:i - 1]), rest[i:]))
  return out


def _sliced(comps: dict, name: str) -> tuple[dict[int, int], dict[int, int]]:
  """A fusion's parameters it touches only through (dynamic-)slices or in-place
  dynamic-update-slices, also inside nested fusions ({index: bytes read}), and its outputs that
  update a parameter in place ({output index: bytes written})."""
  ins = _instructions(comps[name])
  params = {m.group(1): int(m.group(2)) for m in
            re.finditer(r"%([\w.\-]+) = [^=]* parameter\((\d+)\)", comps[name])}
  types = {n: t for n, t, *_ in ins}
  root = next(i for i in ins if re.search(rf"ROOT %{re.escape(i[0])} =", comps[name]))
  outputs = root[3] if root[2] == "tuple" else [root[0]]
  sliced, whole, updates = {}, set(), {}
  for n, t, op, ops, attrs in ins:
    inner = {}
    if op == "fusion":
      inner = _sliced(comps, re.search(r"calls=%?([\w.\-]+)", attrs).group(1))[0]
    for k, x in enumerate(ops):
      if x not in params:
        continue
      i = params[x]
      if op in ("slice", "dynamic-slice") and k == 0:
        sliced[i] = sliced.get(i, 0) + sum(b for b, _ in _arrays(t))
      elif op == "dynamic-update-slice" and k == 0 and n in outputs:
        updates[outputs.index(n)] = sum(b for b, _ in _arrays(types.get(ops[1], "")))
        sliced.setdefault(i, 0)  # the rest of the buffer is neither read nor written
      elif k in inner:
        sliced[i] = sliced.get(i, 0) + inner[k]
      else:
        whole.add(i)
  return {i: b for i, b in sliced.items() if i not in whole}, updates


def hbm_traffic(hlo: str, name: str | None = None, loops: list | None = None) -> float:
  """Bytes moved to and from HBM by a compiled (TPU) HLO module: every instruction's HBM
  operands and results, except that a fusion touching a buffer through dynamic-slice or an
  in-place dynamic-update-slice moves only the slice, buffers XLA placed on chip (S(n)) move
  nothing, a while loop costs its body times its trip count, and a Mosaic kernel what its
  pl.CostEstimate declares. cost_analysis counts a loop body once and every operand whole,
  which for a scan is wrong in both directions. `loops` collects (trip count, bytes per trip)."""
  comps = computations(hlo)
  name = name or re.search(r"^ENTRY %?([\w.\-]+)", hlo, re.M).group(1)
  ins = _instructions(comps[name])
  types = {n: t for n, t, *_ in ins}
  total = 0.0
  for n, t, op, ops, attrs in ins:
    if op in NO_TRAFFIC or op.endswith("-done"):
      continue
    if op == "while":
      body, cond = (re.search(rf"{k}=%?([\w.\-]+)", attrs).group(1) for k in ("body", "condition"))
      trips = max([int(c) for c in re.findall(r"constant\((\d+)\)", comps[cond])] or [1])
      per_trip = hbm_traffic(hlo, body)
      if loops is not None:
        loops.append((trips, per_trip))
      total += trips * per_trip
      continue
    if op == "custom-call" and "tpu_custom_call" in attrs:
      declared = re.search(r'"bytes_accessed":"(\d+)"', attrs)
      total += float(declared.group(1)) if declared else 0.0
      continue
    if op == "slice-start":  # ((source), slice, ...): the slice leaves the source once
      (_, src_hbm), (piece, dst_hbm) = _arrays(t)[:2]
      total += piece * (src_hbm + dst_hbm)
      continue
    if op in ("dynamic-slice", "dynamic-update-slice"):  # in place: only the slice moves
      piece = _arrays(t if op == "dynamic-slice" else types.get(ops[1], ""))
      total += 2 * sum(b for b, _ in piece) if any(h for _, h in _arrays(t)) or any(
          h for _, h in _arrays(types.get(ops[0], ""))) else 0
      continue
    reads, updates = ({}, {}) if op != "fusion" else _sliced(
        comps, re.search(r"calls=%?([\w.\-]+)", attrs).group(1))
    outs = _arrays(t)
    if op == "copy-start":  # (destination, source, context): one transfer
      outs = outs[:1]
    for k, x in enumerate(ops):
      arrs = _arrays(types.get(x, ""))
      total += sum(reads.get(k, b) for b, hbm in arrs if hbm)
    total += sum(updates.get(k, b) for k, (b, hbm) in enumerate(outs) if hbm)
  return total


def loop_matmul_flops(hlo: str) -> float:
  """The matmul FLOPs of the while-loop trips cost_analysis leaves out (it counts a body once):
  sum over loops of (trips - 1) x 2 sqrt(|lhs| |rhs| |out|) per dot, exact for unbatched dots."""
  comps = computations(hlo)

  def flops(name: str) -> float:
    ins = _instructions(comps[name])
    types = {n: t for n, t, *_ in ins}
    total = 0.0
    for n, t, op, ops, attrs in ins:
      if op in ("dot", "convolution"):
        sizes = [sum(b for b, _ in _arrays(x)) for x in (types.get(ops[0], ""),
                                                          types.get(ops[1], ""), t)]
        itemsizes = [DTYPE_BYTES[ARRAY.search(x).group(1)]
                     for x in (types.get(ops[0], ""), types.get(ops[1], ""), t)]
        total += 2 * float(np.sqrt(np.prod([b / i for b, i in zip(sizes, itemsizes)])))
      for called in re.findall(r"calls=%?([\w.\-]+)", attrs):
        total += flops(called)
    return total

  extra = 0.0
  for cond, body in re.findall(r"while\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)", hlo):
    trips = max([int(c) for c in re.findall(r"constant\((\d+)\)", comps[cond])] or [1])
    extra += (trips - 1) * flops(body)
  return extra


def compare_impls(config, mesh) -> None:
  """HBM traffic and roofline step time of the train step with the scan and the Pallas GRU."""
  m, dtype = config.model, jnp.dtype(config.model.dtype)
  if m.get("cell", "gru") != "gru":  # it said "impl='pallas' needs cell='gru'", set by us
    raise UserError(f"--compare_impls compares the GRU's scan with its Pallas kernels; "
                    f"config.model.cell={m.cell!r} has no kernel")
  if "seq_len" not in config:  # an AttributeError traceback on forecast configs
    raise UserError("--compare_impls needs config.seq_len (a text or synthetic config); a "
                    "forecast config's GRU length comes from its windows")
  if config.get("grad_accum", 1) > 1 or m.get("remat", False):
    # Inside those loops each kernel's declared cost counts once, not once per trip, while the
    # traffic count multiplies by trips: the table read -3x at grad_accum=4.
    raise UserError("--compare_impls counts one pass of the kernels: give "
                    "--config.grad_accum=1 --config.model.remat=False (the same total batch)")
  rows_per_device = kernel.local_rows(mesh.abstract_mesh, config.batch_size, dtype)[2]
  chip = kernel.DEVICE_KINDS.get(mesh.devices.flat[0].device_kind, kernel.DEFAULT_CHIP)
  p = kernel.plan(config.seq_len, rows_per_device, m.hidden, dtype, chip)
  if isinstance(p, str):  # impl=pallas would die in the kernel with a traceback
    raise UserError(f"--compare_impls: no Pallas GRU kernel on {chip} for this shape ({p}); "
                    f"compare on a chip where it fits (the roofline rows cover every generation)"
                    f" or with a smaller config.model.hidden or config.batch_size")
  out = {}
  for impl in ("scan", "pallas"):
    with config.unlocked():
      config.model.impl = impl
    compiled, cost, _ = compile_step(config, mesh)
    hlo = compiled.as_text()
    loops = []
    out[impl] = dict(flops=cost.get("flops", 0.0) + loop_matmul_flops(hlo),
                     bytes=hbm_traffic(hlo, loops=loops), loops=loops, hlo=hlo,
                     cost_bytes=cost.get("bytes accessed", 0.0))
  print("per-device cost of one train step and its roofline time per TPU generation. FLOPs: "
        "cost_analysis plus the loop trips it leaves out; HBM bytes: hbm_traffic() over the "
        "compiled HLO (every trip of a loop, slices as slices, on-chip buffers excluded; "
        "cost_analysis's count in brackets):")
  misfits = {}
  for chip in kernel.CHIPS:
    p = kernel.plan(config.seq_len, rows_per_device, m.hidden, dtype, chip)
    if isinstance(p, str):
      misfits[chip] = f"  [no kernel here: {p}; auto runs the scan]"
  k_flops, k_bytes = kernel_costs(out["pallas"]["hlo"])
  rows = [(impl, o["flops"], o["bytes"], None,
           f" [cost_analysis {o['cost_bytes']:.4g}]" + "".join(
               f"; time loop {trips} x {b / 1e6:.3g} MB" for trips, b in o["loops"]))
          for impl, o in out.items()]
  rows.append(("pallas GRU kernels alone (pl.CostEstimate from their BlockSpecs)", k_flops,
               k_bytes, misfits, ""))
  for name, flops, bytes_, notes, extra in rows:
    print(f"{name}: {flops:.4g} FLOPs, {bytes_:.4g} bytes{extra}")
    for row in roofline(flops, bytes_, notes):
      print(row)
  scan, pallas = out["scan"]["bytes"], out["pallas"]["bytes"]
  print(f"HBM traffic per train step, scan / pallas: {scan / max(pallas, 1):.1f}x")
  # What both steps share (projections, embedding, logits, optimizer) is what the pallas step
  # moves outside its kernels; the rest of the scan step is its recurrence.
  recurrence = scan - (pallas - k_bytes)
  print(f"HBM traffic of the GRU recurrence, scan / pallas kernels: "
        f"{recurrence / max(k_bytes, 1):.1f}x ({recurrence:.4g} bytes: the scan step minus what "
        f"the pallas step moves outside its kernels; {k_bytes:.4g} bytes)")
  spaces = loop_weight_spaces(out["scan"]["hlo"], config.model.hidden)
  print("W_h: the kernels read it from HBM once per direction and pass (constant block index); "
        "inside the scan's loops it is in memory space "
        f"{', '.join(f'S({n})' for n in spaces) or '-'} (0 = HBM"
        f"{'' if any(n == 0 for n in spaces) else ': XLA keeps it on chip across steps'}).")


def main(argv) -> int:
  try:
    return _main(argv)
  except UserError as e:
    print(f"aot_compile: {e}", file=sys.stderr)
    return 2


def _main(argv) -> int:
  if len(argv) > 1:
    raise UserError(f"unexpected argument {argv[1]!r}; overrides are --config.KEY=VALUE")
  from jax.experimental import topologies
  config = FLAGS.config
  if config is None:
    raise UserError("--config configs/NAME.py[:arg] is required")
  # v4/v5p pair two TensorCores per chip; meshes want one device per chip ("megacore").
  megacore = FLAGS.topology.split(":")[0] in ("v4", "v5p")
  try:
    topo = topologies.get_topology_desc(FLAGS.topology, "tpu", num_slices=FLAGS.num_slices,
                                        **({"chip_config_name": "megacore"} if megacore else {}))
  except jax.errors.JaxRuntimeError as e:  # libtpu's message names the bad part
    if "lockfile" in str(e):  # not the topology: another process on this machine holds libtpu
      raise UserError("another process on this machine holds libtpu (/tmp/libtpu_lockfile): "
                      "wait for it to end or, if it uses no TPU chips (another aot_compile), "
                      "rerun with ALLOW_MULTIPLE_LIBTPU_LOAD=1") from None
    raise UserError(f"--topology {FLAGS.topology} (x{FLAGS.num_slices} slices): "
                    f"{str(e).splitlines()[0]}; give one such as v5e:2x2, v6e:2x4 or v4:2x2x1"
                    ) from None
  devices = np.asarray(topo.devices)
  mesh = sharding.make_mesh(config.mesh, devices=list(devices.flat))
  if FLAGS.compare_impls:
    compare_impls(config, mesh)
    return 0
  try:
    compiled, cost, params = compile_step(config, mesh)
  except ValueError as e:  # impl=pallas on a shape no kernel block fits: was a traceback
    if not str(e).startswith("gru_sequence:"):
      raise
    raise UserError(f"config.model.impl=pallas: {str(e).splitlines()[0]}; use impl=auto (the "
                    f"scan where no kernel fits) or another config.model.hidden") from None
  mem = compiled.memory_analysis()
  hosts = len({d.process_index for d in devices.flat})
  print(f"topology {FLAGS.topology} x{FLAGS.num_slices} slice(s): {devices.size} chips on "
        f"{hosts} host(s), mesh "
        f"{dict(mesh.shape)}, sharding {config.sharding}")
  hbm = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
         - mem.alias_size_in_bytes)
  print(f"per-device HBM: {hbm / 2**20:.2f} MiB (arguments {mem.argument_size_in_bytes / 2**20:.2f}"
        f", outputs {mem.output_size_in_bytes / 2**20:.2f}, temp {mem.temp_size_in_bytes / 2**20:.2f}"
        f", aliased {mem.alias_size_in_bytes / 2**20:.2f})")
  print(f"per-device cost: {cost.get('flops', 0):.4g} FLOPs, "
        f"{cost.get('bytes accessed', 0):.4g} bytes accessed")
  hlo = compiled.as_text()
  per_loop, outside, problems = check_loops(hlo,
                                            data_parallel=mesh.shape.get("model", 1) == 1,
                                            single_slice=FLAGS.num_slices == 1,
                                            gatherable=params if config.sharding == "fsdp"
                                            or mesh.shape.get("model", 1) > 1 else frozenset(),
                                            cell=config.model.get("cell", "gru"),
                                            grad_accum=config.grad_accum)
  print(f"matmuls per time loop: {per_loop}; outside loops: {outside}")
  print(f"Mosaic kernels (Pallas GRU, forward and backward): {mosaic_kernels(hlo)}")
  for p in problems:
    print(f"CHECK FAILED: {p}")
  print("HLO checks: " + ("FAILED" if problems else "ok"))
  return 1 if problems else 0


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, but a bad config file, preset or override is one line (as for gru-tpu
  train), not a traceback."""
  try:
    rest = FLAGS(argv)
    if FLAGS.config is not None:
      FLAGS.config.to_dict()  # config files load lazily
  except (flags.Error, UserError, KeyError, AttributeError, TypeError, ValueError) as e:
    print("aot_compile: " + train._one_line(e), file=sys.stderr)
    sys.exit(2)
  return rest


if __name__ == "__main__":
  sys.exit(app.run(main, flags_parser=_parse_flags))
