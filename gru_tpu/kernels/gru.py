"""Pallas TPU kernels: one GRU layer (reset_after=True, PyTorch gates) over a whole sequence.

The recurrence is fused into two kernels that keep everything a step needs on chip: W_h is
copied into VMEM once per (direction, batch block) and stays there while the kernel walks the
whole sequence ("persistent RNN"), the carry never leaves VMEM, and per step only the step's
slices of gi, y (and the saved gates) move between HBM and VMEM, in the compute dtype.

  forward:  grid (D·B/bb, T/tt) = (parallel, arbitrary): one row per (direction, batch block)
            (two-core chips split the rows), time blocks in order. W_h, b_i, b_h have a block
            index constant along batch and time (one VMEM buffer, fetched once per direction).
            h lives in an f32 VMEM scratch across time blocks; a fori_loop runs the tt steps of
            a block: one (bb, H)·(H, 3H) matmul, compute-dtype (bf16) operands with f32
            accumulation, then the gates in f32.
  backward: the same grid, time blocks in reverse. d loss/d h is carried in f32 VMEM; per step
            one (bb, 3H)·(H, 3H)^T matmul, plus one recomputing gh = h·W_h + b_h unless the
            forward saved gh (in the compute dtype; `plan` picks per chip by a roofline model).
            A time block's h_{t-1} and recurrent gate gradients stay in VMEM, and
            dW_h += h_{t-1}^T dgh is one (H, tt·bb)·(tt·bb, 3H) matmul per block into an f32
            accumulator (an output block resident across time, one buffer); db_i and db_h are
            summed per step in f32.

Gates (r, z, n order along 3H, as PyTorch):
  r = σ(gi_r + b_ir + gh_r), z = σ(gi_z + b_iz + gh_z), n = tanh(gi_n + b_in + r ⊙ gh_n),
  gh = (h ⊙ rmask) W_h + b_h,  h' = (1 - z) ⊙ n + z ⊙ h
with gi = x W_i precomputed for all steps (in the compute dtype), b_i added in the kernel in
f32. Right-padded batches: `lengths` (B,) freezes each row's carry after its end and zeroes y
there. Time reversal (the reverse direction) is the caller's business, as in the scan.

On TPU the kernels compile through Mosaic; elsewhere they run in Pallas interpret mode (slow:
for tests and debugging). Under a context mesh (`jax.set_mesh` / `use_abstract_mesh`; the
engine sets one) `gru_sequence` runs in a shard_map that splits the batch over the devices:
XLA cannot partition a Mosaic kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

f32 = jnp.float32

# Per-chip VMEM per TensorCore (the jax.experimental.pallas.tpu tables) and published peak bf16
# FLOP/s and HBM bandwidth per chip, for the block budget and the roofline estimates.
MiB = 2 ** 20
CHIPS = {
    "v4": {"vmem": 16 * MiB, "flops": 275e12, "hbm": 1.2e12, "cores": 2},
    "v5e": {"vmem": 128 * MiB, "flops": 197e12, "hbm": 0.82e12, "cores": 1},
    "v5p": {"vmem": 64 * MiB, "flops": 459e12, "hbm": 2.76e12, "cores": 2},
    "v6e": {"vmem": 128 * MiB, "flops": 918e12, "hbm": 1.64e12, "cores": 1},
}
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p",
                "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
# A TPU whose kind is not in the table gets the smallest budget; interpret mode (no VMEM) plans
# blocks as on v5e.
DEFAULT_CHIP = "v4"
INTERPRET_CHIP = "v5e"
# Fraction of VMEM the kernel may plan for; the rest is Mosaic's internal scratch and slack.
VMEM_FRACTION = 0.8
# Largest blocks tried. Tests lower these to get several blocks on tiny shapes.
MAX_BLOCK_T = 32
MAX_BLOCK_B = 256


def _sigmoid(x):
  # One EUP op (tanh) instead of exp + reciprocal; the same form as the scan (models/gru.py).
  return 0.5 * jnp.tanh(0.5 * x) + 0.5


# -- block budget ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
  """Block sizes of one kernel launch and the VMEM it needs (bytes, the larger of fwd / bwd)."""
  chip: str
  block_b: int
  block_t: int
  save_gates: bool
  vmem_bytes: int

  @property
  def vmem_limit_bytes(self) -> int:
    # The kernel's scoped-VMEM limit: what the plan needs plus room for Mosaic's temporaries,
    # never more than the chip has.
    return min(int(CHIPS[self.chip]["vmem"] * 0.95), int(self.vmem_bytes * 1.25) + 4 * MiB)


def sublanes(dtype) -> int:
  """Rows of a VMEM tile: 8 for 32-bit, 16 for bf16. Batch blocks are multiples of it."""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _tile(rows: int, cols: int, itemsize: int) -> int:
  """Bytes of a (rows, cols) VMEM buffer: (8·packing, 128) tiles."""
  sub = 8 * max(1, 4 // itemsize)
  return -(-rows // sub) * sub * (-(-cols // 128) * 128) * itemsize


def vmem_bytes(H: int, bb: int, tt: int, cdt, *, save_gates: bool, backward: bool,
               masked: bool = True, dropout: bool = True) -> int:
  """VMEM of one kernel launch: pipelined blocks (two buffers), resident weights (one),
  scratch, and the live values of one step (gh and the gate temporaries, f32)."""
  c = jnp.dtype(cdt).itemsize
  G = 3 * H
  w = _tile(H, G, c) + 2 * _tile(1, G, 4)             # W_h, b_i, b_h (fetched once)
  rows = 2 * (_tile(bb, H, 4) * (2 + dropout) + masked * _tile(bb, 1, 4))  # h0, h_T/dh, rmask, len
  step = 6 * _tile(bb, G, 4)                           # gh, gate pre-activations, temporaries
  if not backward:
    blocks = 2 * tt * ((1 + save_gates) * _tile(bb, G, c) + _tile(bb, H, c))
    return w + rows + blocks + _tile(bb, H, 4) + step
  blocks = 2 * tt * ((2 + save_gates) * _tile(bb, G, c) + 2 * _tile(bb, H, c))
  blocks += 2 * _tile(bb, H, c) + 2 * _tile(bb, H, 4)  # y at t0 - 1, dh_T / dh0
  acc = _tile(H, G, 4) + 4 * _tile(1, G, 4)            # dW_h, db_i, db_h (f32, resident)
  scratch = _tile(bb, H, 4) + tt * (_tile(bb, H, c) + _tile(bb, G, c))  # dh; h_{t-1}, dgh
  return w + rows + blocks + acc + scratch + step


def _vmem(H: int, bb: int, tt: int, cdt, save_gates: bool) -> int:
  return max(vmem_bytes(H, bb, tt, cdt, save_gates=save_gates, backward=bw)
             for bw in (False, True))


def target_chip() -> str | None:
  """The TPU generation this trace compiles for: the context mesh's devices (also ahead of time,
  e.g. jax.experimental.topologies), else the default device; None when not a TPU."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None) or jax.devices()[0]
  if device.platform != "tpu":
    return None
  return DEVICE_KINDS.get(device.device_kind, DEFAULT_CHIP)


def roofline_seconds(chip: str, flops: float, bytes_: float) -> float:
  """max(compute, memory) time on one chip at published peaks."""
  return max(flops / CHIPS[chip]["flops"], bytes_ / CHIPS[chip]["hbm"])


def plan(T: int, B: int, H: int, cdt, chip: str | None, *, D: int = 1,
         save_gates: bool | None = None, block_b: int | None = None,
         block_t: int | None = None) -> Plan | str:
  """Blocks for a (T, D, B, H) layer on `chip` (None: interpret mode, planned as INTERPRET_CHIP).

  Returns a Plan, or a string saying why the shape does not fit (the caller falls back or
  raises). Batch blocks: the whole (local) batch when it fits (fewest W_h fetches, most MXU
  rows), halved on two-core chips so both cores work; time blocks: as long as fits, up to
  MAX_BLOCK_T, sized so padding T is minimal. save_gates=None picks, per chip, the faster of
  saving gh in the forward or recomputing it in the backward by the roofline model below.
  """
  name = chip or INTERPRET_CHIP
  if chip is not None and H % 128:
    return f"hidden size {H} is not a multiple of 128 (the TPU lane width)"
  sub = sublanes(cdt)
  if block_b is None:
    cores = CHIPS[name]["cores"] if D == 1 else 1
    cands = [b for b in range(min(B, MAX_BLOCK_B), 0, -1) if B % b == 0 and b % sub == 0]
    if cores > 1 and B // cores in cands:
      cands = [b for b in cands if b <= B // cores]
  else:
    cands = [block_b] if B % block_b == 0 else []
  if not cands or any(b % sub for b in cands):
    return (f"batch {B} has no block of at most {MAX_BLOCK_B} rows that divides it and is a "
            f"multiple of {sub} (the {jnp.dtype(cdt).name} sublane tile); pad the batch")
  budget = CHIPS[name]["vmem"] * VMEM_FRACTION
  options = [save_gates] if save_gates is not None else [False, True]
  best = None
  for bb in cands:
    for sg in options:
      tmax = min(T, block_t or MAX_BLOCK_T)
      while tmax > 1 and _vmem(H, bb, tmax, cdt, sg) > budget:
        tmax //= 2
      if _vmem(H, bb, tmax, cdt, sg) > budget:
        continue
      tt = -(-T // -(-T // tmax))  # as many blocks as tmax needs, evenly sized: least padding
      p = Plan(name, bb, tt, sg, _vmem(H, bb, tt, cdt, sg))
      t = estimate(p, T, B, H, cdt, D=D)["seconds"]
      if best is None or t < best[0]:
        best = (t, p)
    if best is not None:
      return best[1]
  need = vmem_bytes(H, min(cands), 1, cdt, save_gates=False, backward=True)
  return (f"hidden size {H} needs {need / MiB:.1f} MiB of VMEM even with the smallest blocks; "
          f"{name} has {CHIPS[name]['vmem'] / MiB:.0f} MiB ({VMEM_FRACTION:.0%} usable)")


def estimate(p: Plan, T: int, B: int, H: int, cdt, *, D: int = 1,
             masked: bool = False, dropout: bool = False) -> dict:
  """HBM bytes and FLOPs of the forward and backward kernels, from their BlockSpecs (what
  each grid step reads and writes), and the roofline time of both on p.chip."""
  c = jnp.dtype(cdt).itemsize
  G = 3 * H
  Tp = -(-T // p.block_t) * p.block_t
  nb = B // p.block_b
  w = D * nb * (H * G * c + 2 * G * 4)                      # W_h, b_i, b_h per (d, batch block)
  rows = D * B * H * 4 * (2 + dropout) + masked * B * 4     # h0 and h_T / dh_T and dh0, rmask
  gates = Tp * D * B * G * c if p.save_gates else 0
  fwd_bytes = w + rows + Tp * D * B * (G + H) * c + gates
  bwd_bytes = (w + rows + D * B * H * 4 + Tp * D * B * (2 * G + 2 * H) * c + gates
               + D * B * H * c * (Tp // p.block_t)          # y at each block's t0 - 1
               + D * nb * (H * G + 2 * G) * 4)              # dW_h, db_i, db_h per batch block
  mm = 2 * Tp * D * B * H * G
  fwd_flops, bwd_flops = mm, mm * (2 if p.save_gates else 3)
  seconds = (roofline_seconds(p.chip, fwd_flops, fwd_bytes)
             + roofline_seconds(p.chip, bwd_flops, bwd_bytes))
  return {"fwd_bytes": fwd_bytes, "bwd_bytes": bwd_bytes, "fwd_flops": fwd_flops,
          "bwd_flops": bwd_flops, "transcendentals": 3 * Tp * D * B * H, "seconds": seconds}


# -- kernels ----------------------------------------------------------------------------------


def _gates(g, gh, H):
  r = _sigmoid(g[:, :H] + gh[:, :H])
  z = _sigmoid(g[:, H:2 * H] + gh[:, H:2 * H])
  n = jnp.tanh(g[:, 2 * H:] + r * gh[:, 2 * H:])
  return r, z, n


def _fwd_kernel(*refs, H, tt, masked, dropout, save_gates):
  refs = list(refs)
  len_ref = refs.pop(0) if masked else None
  gi_ref, w_ref, bi_ref, bh_ref, h0_ref = refs[:5]
  refs = refs[5:]
  rm_ref = refs.pop(0) if dropout else None
  y_ref, hT_ref = refs[:2]
  gh_ref = refs[2] if save_gates else None
  h_scr = refs[-1]
  tb = pl.program_id(1)

  @pl.when(tb == 0)
  def _():
    h_scr[...] = h0_ref[...]

  b_i, b_h = bi_ref[...], bh_ref[...]
  rm = rm_ref[...] if dropout else None
  lengths = len_ref[...] if masked else None

  def step(s, carry):
    h = h_scr[...]
    hm = h if rm is None else h * rm
    gh = jnp.dot(hm.astype(w_ref.dtype), w_ref[...], preferred_element_type=f32) + b_h
    _, z, n = _gates(gi_ref[s].astype(f32) + b_i, gh, H)
    h_new = n + z * (h - n)
    y = h_new
    if masked:
      keep = tb * tt + s < lengths  # (bb, 1)
      h_new, y = jnp.where(keep, h_new, h), jnp.where(keep, h_new, 0.0)
    h_scr[...] = h_new
    y_ref[s] = y.astype(y_ref.dtype)
    if save_gates:
      gh_ref[s] = gh.astype(gh_ref.dtype)
    return carry

  jax.lax.fori_loop(0, tt, step, 0)

  @pl.when(tb == pl.num_programs(1) - 1)
  def _():
    hT_ref[...] = h_scr[...]


def _bwd_kernel(*refs, H, tt, bb, masked, dropout, save_gates):
  refs = list(refs)
  len_ref = refs.pop(0) if masked else None
  gi_ref, w_ref, bi_ref, bh_ref, h0_ref = refs[:5]
  refs = refs[5:]
  rm_ref = refs.pop(0) if dropout else None
  y_ref, yb_ref, dy_ref, dhT_ref = refs[:4]
  refs = refs[4:]
  gh_ref = refs.pop(0) if save_gates else None
  dgi_ref, dw_ref, dbi_ref, dbh_ref, dh0_ref, dh_scr, hm_scr, dgh_scr = refs
  i = pl.program_id(1)
  tb = pl.num_programs(1) - 1 - i  # the time block this grid step works on
  cdt = w_ref.dtype

  @pl.when(i == 0)
  def _():
    dh_scr[...] = dhT_ref[...]
    dw_ref[...] = jnp.zeros_like(dw_ref)
    dbi_ref[...] = jnp.zeros_like(dbi_ref)
    dbh_ref[...] = jnp.zeros_like(dbh_ref)

  b_i, b_h = bi_ref[...], bh_ref[...]
  rm = rm_ref[...] if dropout else None
  lengths = len_ref[...] if masked else None

  def step(s, h_prev):
    """Step tb·tt + s backwards, given h_{t-1} (f32)."""
    hm = h_prev if rm is None else h_prev * rm
    hm_c = hm.astype(cdt)
    if save_gates:
      gh = gh_ref[s].astype(f32)
    else:
      gh = jnp.dot(hm_c, w_ref[...], preferred_element_type=f32) + b_h
    r, z, n = _gates(gi_ref[s].astype(f32) + b_i, gh, H)
    dy = dy_ref[s].astype(f32)
    if masked:
      keep = tb * tt + s < lengths
      dy = jnp.where(keep, dy, 0.0)
    d = dh_scr[...] + dy
    dn = d * (1.0 - z) * (1.0 - n * n)
    dz = d * (h_prev - n) * z * (1.0 - z)
    dr = dn * gh[:, 2 * H:] * r * (1.0 - r)
    if masked:  # past a row's end nothing flows into the gates and the carry passes through
      dn, dz, dr = (jnp.where(keep, v, 0.0) for v in (dn, dz, dr))
      z = jnp.where(keep, z, 1.0)
    dgi = jnp.concatenate([dr, dz, dn], axis=1)
    dgh = jnp.concatenate([dr, dz, dn * r], axis=1)
    dgi_ref[s] = dgi.astype(dgi_ref.dtype)
    dbi_ref[...] += jnp.sum(dgi, axis=0, keepdims=True)
    dbh_ref[...] += jnp.sum(dgh, axis=0, keepdims=True)
    dgh_c = dgh.astype(cdt)
    rows = pl.ds(pl.multiple_of(s * bb, bb), bb)
    hm_scr[rows, :] = hm_c
    dgh_scr[rows, :] = dgh_c
    dhm = jax.lax.dot_general(dgh_c, w_ref[...], (((1,), (1,)), ((), ())),
                              preferred_element_type=f32)
    dh_scr[...] = d * z + (dhm if rm is None else dhm * rm)

  def body(j, carry):
    s = tt - 1 - j
    step(s, y_ref[s - 1].astype(f32))
    return carry

  jax.lax.fori_loop(0, tt - 1, body, 0)
  # Step 0 of the block: h_{t-1} is the previous block's last output, or h0 at t = 0.
  step(0, jnp.where(tb == 0, h0_ref[...], yb_ref[0].astype(f32)))
  # dW_h += h_{t-1}^T dgh over the block's tt·bb rows: one MXU-shaped matmul.
  dw_ref[...] += jax.lax.dot_general(hm_scr[...], dgh_scr[...], (((0,), (0,)), ((), ())),
                                     preferred_element_type=f32)

  @pl.when(i == pl.num_programs(1) - 1)
  def _():
    dh0_ref[...] = dh_scr[...]


class _Grid:
  """Grid (D·nb, nt) = (parallel, arbitrary): one row per (direction, batch block), so two-core
  chips split rows, and W_h's block index changes only with the direction. BlockSpecs are
  written in (d, b, t) block coordinates; t counts from the end when the kernel runs backwards.
  """

  def __init__(self, p: Plan, D: int, B: int, T: int, reverse: bool):
    self.p, self.nb, self.reverse = p, B // p.block_b, reverse
    self.shape = (D * self.nb, T // p.block_t)

  def spec(self, block, f, buffers: int | None = None):
    nb, nt, reverse = self.nb, self.shape[1], self.reverse

    def index(j, i):
      return f(j // nb, j % nb, nt - 1 - i if reverse else i)

    mode = {} if buffers is None else {"pipeline_mode": pl.Buffered(buffers)}
    return pl.BlockSpec(block, index, **mode)

  def steps(self, n: int):
    """(tt, bb, n) blocks of a (T, D, B, n) array."""
    return self.spec((self.p.block_t, None, self.p.block_b, n), lambda d, b, t: (t, d, b, 0))

  def rows(self, n: int):
    """(bb, n) blocks of a (D, B, n) array, resident across time."""
    return self.spec((None, self.p.block_b, n), lambda d, b, t: (d, b, 0))

  def inputs(self, H: int, masked: bool, dropout: bool) -> list:
    """lengths?, gi, W_h, b_i, b_h, h0, rmask?: what both kernels read first."""
    G = 3 * H
    # Fetched once per direction (constant index along batch and time): one buffer.
    weight = lambda r: self.spec((None, r, G), lambda d, b, t: (d, 0, 0), buffers=1)
    return (([self.spec((self.p.block_b, 1), lambda d, b, t: (b, 0))] if masked else [])
            + [self.steps(G), weight(H), weight(1), weight(1), self.rows(H)]
            + ([self.rows(H)] if dropout else []))

  def call(self, kernel, in_specs, out_specs, out_shape, scratch, interpret, cost):
    return pl.pallas_call(
        kernel, grid=self.shape, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=scratch, interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=self.p.vmem_limit_bytes),
        cost_estimate=cost)


def _bias_rows(b_i, b_h):
  return [b_i[:, None].astype(f32), b_h[:, None].astype(f32)]  # (D, 1, 3H)


def _forward(p: Plan, interpret: bool, gi, w_h, b_i, b_h, h0, lengths, rmask):
  T, D, B, G = gi.shape
  H = G // 3
  masked, dropout = lengths is not None, rmask is not None
  grid = _Grid(p, D, B, T, reverse=False)
  out_specs = [grid.steps(H), grid.rows(H)] + ([grid.steps(G)] if p.save_gates else [])
  out_shape = [jax.ShapeDtypeStruct((T, D, B, H), gi.dtype),
               jax.ShapeDtypeStruct((D, B, H), f32)]
  if p.save_gates:
    out_shape.append(jax.ShapeDtypeStruct((T, D, B, G), gi.dtype))
  e = estimate(p, T, B, H, gi.dtype, D=D, masked=masked, dropout=dropout)
  kernel = functools.partial(_fwd_kernel, H=H, tt=p.block_t, masked=masked, dropout=dropout,
                             save_gates=p.save_gates)
  args = (([lengths[:, None]] if masked else []) + [gi, w_h] + _bias_rows(b_i, b_h) + [h0]
          + ([rmask] if dropout else []))
  return grid.call(kernel, grid.inputs(H, masked, dropout), out_specs, out_shape,
                   [pltpu.VMEM((p.block_b, H), f32)], interpret,
                   pl.CostEstimate(flops=e["fwd_flops"], transcendentals=e["transcendentals"],
                                   bytes_accessed=e["fwd_bytes"]))(*args)


def _backward(p: Plan, interpret: bool, gi, w_h, b_i, b_h, h0, lengths, rmask, y, gh, dy,
              dh_T):
  T, D, B, G = gi.shape
  H = G // 3
  bb, tt = p.block_b, p.block_t
  masked, dropout = lengths is not None, rmask is not None
  grid = _Grid(p, D, B, T, reverse=True)
  nb = grid.nb
  # y at the step before each block (block size 1 along time: the block index is the step).
  before = grid.spec((1, None, bb, H), lambda d, b, t: (jnp.maximum(t * tt - 1, 0), d, b, 0))
  in_specs = (grid.inputs(H, masked, dropout) + [grid.steps(H), before, grid.steps(H),
                                                 grid.rows(H)]
              + ([grid.steps(G)] if p.save_gates else []))
  # Accumulators resident across time, one buffer each: written back once, after the last block.
  acc = lambda r: grid.spec((None, None, r, G), lambda d, b, t: (d, b, 0, 0), buffers=1)
  out_specs = [grid.steps(G), acc(H), acc(1), acc(1), grid.rows(H)]
  out_shape = [jax.ShapeDtypeStruct((T, D, B, G), gi.dtype),
               jax.ShapeDtypeStruct((D, nb, H, G), f32),
               jax.ShapeDtypeStruct((D, nb, 1, G), f32),
               jax.ShapeDtypeStruct((D, nb, 1, G), f32),
               jax.ShapeDtypeStruct((D, B, H), f32)]
  cdt = w_h.dtype
  scratch = [pltpu.VMEM((bb, H), f32), pltpu.VMEM((tt * bb, H), cdt),
             pltpu.VMEM((tt * bb, G), cdt)]
  e = estimate(p, T, B, H, gi.dtype, D=D, masked=masked, dropout=dropout)
  kernel = functools.partial(_bwd_kernel, H=H, tt=tt, bb=bb, masked=masked, dropout=dropout,
                             save_gates=p.save_gates)
  args = (([lengths[:, None]] if masked else []) + [gi, w_h] + _bias_rows(b_i, b_h) + [h0]
          + ([rmask] if dropout else []) + [y, y, dy, dh_T] + ([gh] if p.save_gates else []))
  dgi, dw, dbi, dbh, dh0 = grid.call(
      kernel, in_specs, out_specs, out_shape, scratch, interpret,
      pl.CostEstimate(flops=e["bwd_flops"], transcendentals=e["transcendentals"],
                      bytes_accessed=e["bwd_bytes"]))(*args)
  return dgi, dw.sum(1), dbi.sum((1, 2)), dbh.sum((1, 2)), dh0


def _first_order_only(kernel_call):
  """pallas_call has no usable forward-mode rule (JAX fails with a bare AssertionError), so a
  jvp, a hessian or a gradient of a gradient through the kernels gets this error instead."""
  call = jax.custom_jvp(kernel_call, nondiff_argnums=(0, 1))

  @call.defjvp
  def _no_jvp(p, interpret, primals, tangents):
    raise ValueError("GRU(impl='pallas') has first-order gradients only (its TPU kernels have "
                     "no forward-mode rule); use impl='scan' for jax.jvp, hessians or "
                     "gradients of gradients")

  return call


_forward, _backward = _first_order_only(_forward), _first_order_only(_backward)


# -- differentiable entry point -----------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sequence(p, interpret, gi, w_h, b_i, b_h, h0, lengths, rmask):
  # Not differentiated: nothing to save for a backward pass.
  p = dataclasses.replace(p, save_gates=False)
  return tuple(_forward(p, interpret, gi, w_h.astype(gi.dtype), b_i, b_h, h0, lengths, rmask))


def _sequence_fwd(p, interpret, gi, w_h, b_i, b_h, h0, lengths, rmask):
  out = _forward(p, interpret, gi, w_h.astype(gi.dtype), b_i, b_h, h0, lengths, rmask)
  gh = out[2] if p.save_gates else None
  return (out[0], out[1]), (gi, w_h, b_i, b_h, h0, lengths, rmask, out[0], gh)


def _sequence_bwd(p, interpret, res, cts):
  gi, w_h, b_i, b_h, h0, lengths, rmask, y, gh = res
  dy, dh_T = cts
  dgi, dw, dbi, dbh, dh0 = _backward(p, interpret, gi, w_h.astype(gi.dtype), b_i, b_h, h0,
                                     lengths, rmask, y, gh, dy.astype(y.dtype), dh_T)
  # dW_h stays f32 until it meets W_h's own dtype (and the sum over devices happens in it).
  return (dgi, dw.astype(w_h.dtype), dbi.astype(b_i.dtype), dbh.astype(b_h.dtype), dh0, None,
          None)


_sequence.defvjp(_sequence_fwd, _sequence_bwd)


def batch_axes(mesh, B: int) -> tuple[str, ...]:
  """Mesh axes to split the batch over: every axis (of size > 1, not already manual) in mesh
  order, while their product divides B."""
  axes, size = [], 1
  for name in mesh.axis_names:
    if name in mesh.manual_axes or mesh.shape[name] == 1:
      continue
    if B % (size * mesh.shape[name]):
      break
    axes.append(name)
    size *= mesh.shape[name]
  return tuple(axes)


def local_rows(mesh, B: int, dtype) -> tuple[tuple[str, ...], int, int]:
  """(mesh axes splitting the batch, rows per device, rows per device padded to whole VMEM
  tiles). Padded rows are sliced off again (and get no gradient); padded steps are masked."""
  axes = () if mesh.empty else batch_axes(mesh, B)
  B_local = B // math.prod(mesh.shape[a] for a in axes)
  return axes, B_local, -(-B_local // sublanes(dtype)) * sublanes(dtype)


def gru_sequence(gi_TxDxBx3H: jax.Array, w_h_DxHx3H: jax.Array, b_i_Dx3H: jax.Array,
                 b_h_Dx3H: jax.Array, h0_DxBxH: jax.Array, lengths_B: jax.Array | None = None,
                 rmask_DxBxH: jax.Array | None = None, *, interpret: bool | None = None,
                 save_gates: bool | None = None, block_b: int | None = None,
                 block_t: int | None = None) -> tuple[jax.Array, jax.Array]:
  """One GRU layer, every direction, as two Pallas kernels (forward, and backward via
  jax.custom_vjp): y (T, D, B, H) in gi's dtype, h_T (D, B, H) f32.

  gi = x W_i without b_i, in the compute dtype (bf16 or f32); W_h is cast to it; biases and h0
  are f32. Differentiable in gi, W_h, b_i, b_h and h0. interpret=None: Mosaic when compiling for
  a TPU, interpret mode otherwise. Raises ValueError when the shape cannot fit the chip's VMEM
  (see `plan`).
  """
  T, D, B, G = gi_TxDxBx3H.shape
  H = G // 3
  chip = target_chip()
  if interpret is None:
    interpret = chip is None
  mesh = jax.sharding.get_abstract_mesh()
  axes, B_local, Bp = local_rows(mesh, B, gi_TxDxBx3H.dtype)
  p = plan(T, Bp, H, gi_TxDxBx3H.dtype, None if interpret else chip, D=D,
           save_gates=save_gates, block_b=block_b, block_t=block_t)
  if not isinstance(p, Plan):
    raise ValueError(f"gru_sequence: no Pallas blocks fit: {p}")  # noqa: TRY004 (a shape)
  Tp = -(-T // p.block_t) * p.block_t
  if Tp != T and lengths_B is None:
    lengths_B = jnp.full((B,), T, jnp.int32)
  lengths_B = None if lengths_B is None else lengths_B.astype(jnp.int32)

  def local(gi, w_h, b_i, b_h, h0, lengths, rmask):
    pad = lambda a, axis, n: jnp.pad(a, [(0, n if i == axis else 0) for i in range(a.ndim)])
    gi, h0 = pad(gi, 0, Tp - T), pad(h0, 1, Bp - B_local)
    gi = pad(gi, 2, Bp - B_local)
    lengths = None if lengths is None else pad(lengths, 0, Bp - B_local)
    rmask = None if rmask is None else pad(rmask, 1, Bp - B_local)
    y, h_T = _sequence(p, interpret, gi, w_h, b_i.astype(f32), b_h.astype(f32), h0, lengths,
                       rmask)
    return y[:T, :, :B_local], h_T[:, :B_local]

  auto = () if mesh.empty else tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
  if not auto:
    return local(gi_TxDxBx3H, w_h_DxHx3H, b_i_Dx3H, b_h_Dx3H, h0_DxBxH, lengths_B, rmask_DxBxH)
  # Mosaic kernels cannot be partitioned by XLA, so they run in a shard_map manual over every
  # mesh axis: each device runs its rows of the batch (replicated over axes that do not split
  # it). Without vma checks (the kernels' outputs carry none), AD psums the cotangents of W_h,
  # b_i and b_h over the devices.
  rows = P(None, axes)
  specs = (P(None, None, axes), P(), P(), P(), rows, P(axes) if lengths_B is not None else None,
           rows if rmask_DxBxH is not None else None)
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(None, None, axes), rows),
                       axis_names=set(auto), check_vma=False)(
      gi_TxDxBx3H, w_h_DxHx3H, b_i_Dx3H, b_h_Dx3H, h0_DxBxH, lengths_B, rmask_DxBxH)
