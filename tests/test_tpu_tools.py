"""TPU readiness without a TPU: AOT compiles of the real train step, and the pod launcher."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gru_tpu.errors import UserError

ROOT = Path(__file__).parents[1]
CONFIG = f"{ROOT / 'configs' / 'synthetic.py'}:size=tiny"

if sys.platform != "linux":  # libtpu ships for Linux x86-64 only; CI is Linux and has it.
  pytest.skip("libtpu is Linux-only", allow_module_level=True)


# libtpu locks /tmp/libtpu_lockfile for the life of a process that opens a topology, and a
# second one fails: with two test workers, two compiles may overlap. No TPU chip is used.
# The TPU programs are compiled as a real run would (conftest lowers optimization for CPU ones).
TPU_ENV = {k: v for k, v in os.environ.items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}
LIBTPU_ENV = dict(TPU_ENV, ALLOW_MULTIPLE_LIBTPU_LOAD="1")


def aot(*args):
  return subprocess.run([sys.executable, str(ROOT / "scripts" / "aot_compile.py"), "--config",
                         CONFIG, *args], capture_output=True, text=True, timeout=600,
                        env=LIBTPU_ENV)


@pytest.mark.parametrize("topology,extra,hosts", [
    ("v5e:2x2", [], 1),
    ("v5e:4x4", ["--config.batch_size=64"], 4),  # a multi-host pod slice
    ("v5e:2x2", ["--num_slices=2"], 2),  # two slices over DCN
    # Tensor parallelism inside each slice: its model axis splits a physical axis of the torus
    # (NotImplementedError before), and the gate offsets it tiles are a constant, not a copy.
    ("v5e:4x4", ["--num_slices=2", "--config.batch_size=64",
                 "--config.mesh=(('data', -1), ('model', 2))"], 8),
    # Micro-batches split without gathering the data-sharded batch; the accumulation loop is
    # not a time loop (its projections are outside the recurrences).
    ("v5e:2x2", ["--config.grad_accum=2", "--config.batch_size=16"], 1),
])
def test_aot_compile_for_tpu_topologies(topology, extra, hosts):
  r = aot("--topology", topology, *extra)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert f"on {hosts} host(s)" in r.stdout
  # forward and backward recurrences; XLA sometimes leaves the GRU's lax.platform_dependent
  # cond unfolded (2 slices x model 2), so the CPU branch's two loops are compiled too
  assert re.search(r"matmuls per time loop: \[1, 1(, 1, 1)?\]", r.stdout), r.stdout[-2000:]
  assert "per-device HBM:" in r.stdout and "FLOPs" in r.stdout
  assert "HLO checks: ok" in r.stdout


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x4"])
def test_aot_compile_with_the_pallas_gru(topology):
  """The train step with the Pallas kernels compiles through Mosaic (which reports scoped-VMEM
  overflows, so a budget bug fails here); no time loop is left in XLA."""
  r = aot("--topology", topology, "--config.model.impl=pallas", "--config.model.hidden=128")
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "Mosaic kernels (Pallas GRU, forward and backward): 2" in r.stdout
  assert "matmuls per time loop: []" in r.stdout and "HLO checks: ok" in r.stdout


def test_aot_compare_impls_prints_traffic_and_roofline():
  r = aot("--topology", "v5e:2x2", "--config.model.hidden=128", "--compare_impls")
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  for line in ("scan: ", "pallas: ", "pallas GRU kernels alone", "v4: ", "v5e: ", "v5p: ", "v6e: ",
               "HBM traffic per train step, scan / pallas: ",
               "HBM traffic of the GRU recurrence, scan / pallas kernels: ", "time loop 16 x "):
    assert line in r.stdout, line
  assert "-bound" in r.stdout


def test_aot_compile_tensor_parallel_scan_has_no_collectives_in_its_loops():
  """A 'model'-split input kernel once split the scan's gates across devices: every time step
  all-gathered h, exchanged gate slices and (backwards) all-reduced. The layers now run on
  whole weights and batch rows split over data x model, as the Pallas kernel does."""
  r = aot("--topology", "v5e:2x2", "--config.model.impl=scan", "--config.model.hidden=128",
          "--config.mesh=(('data', -1), ('model', 2))")
  assert r.returncode == 0, r.stdout[-3000:]
  assert "'model': 2" in r.stdout and "HLO checks: ok" in r.stdout


@pytest.mark.parametrize("impl", ["auto", "scan"])
def test_aot_compile_with_fsdp_sharding(impl):
  """fsdp gathers the weights, not the batch: without the engine's gather of the parameters
  XLA met 'data'-split weights with the 'data'-split batch by all-gathering h inside every time
  step of the scan and the whole (T, B, I) inputs for the weight gradients."""
  r = aot("--topology", "v5e:2x2", "--config.sharding=fsdp", "--config.model.hidden=128",
          f"--config.model.impl={impl}")
  assert r.returncode == 0, r.stdout[-3000:]
  assert "sharding fsdp" in r.stdout and "HLO checks: ok" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--topology", "v9z:2x2"], "--topology v9z:2x2 (x1 slices): INVALID_ARGUMENT: Invalid TPU"),
    (["--config.model.hiden=8"], "unknown config key 'hiden' (did you mean 'hidden'?)"),
    # impl=pallas where the kernel does not fit died inside it with a traceback
    (["--topology", "v4:2x2x1", "--compare_impls", "--config.model.hidden=1024",
      "--config.seq_len=256"], "--compare_impls: no Pallas GRU kernel on v4 for this shape "
                               "(hidden size 1024 needs"),
])
def test_aot_compile_bad_input_is_one_line(args, message):
  r = aot(*args)
  assert r.returncode == 2 and message in r.stderr, r.stderr[-3000:]
  assert "Traceback" not in r.stderr


def test_aot_compile_while_another_process_holds_libtpu_says_so():
  """It said the topology was bad ("give one such as v5e:2x2") when libtpu's lock was held."""
  env = {k: v for k, v in TPU_ENV.items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
  holder = subprocess.Popen(
      [sys.executable, "-c", "from jax.experimental import topologies; "
       "topologies.get_topology_desc('v5e:2x2', 'tpu'); print('held', flush=True); input()"],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
  try:
    assert holder.stdout.readline() == "held\n"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "aot_compile.py"), "--config",
                        CONFIG, "--topology", "v5e:2x2"], capture_output=True, text=True,
                       timeout=600, env=env)
  finally:
    holder.communicate("\n", timeout=60)
  assert r.returncode == 2 and r.stderr.strip() == (
      "aot_compile: another process on this machine holds libtpu (/tmp/libtpu_lockfile): wait "
      "for it to end or, if it uses no TPU chips (another aot_compile), rerun with "
      "ALLOW_MULTIPLE_LIBTPU_LOAD=1"), r.stderr[-3000:]


# In a child process: libtpu holds a lock for the life of the process that opens a topology,
# which would fail every later aot_compile subprocess of this session.
SHARDS = """
import json, sys
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh
from gru_tpu import sharding
from gru_tpu.errors import UserError

def layout(mesh):
  held = {}
  for idx, d in np.ndenumerate(mesh.devices):
    held.setdefault(d.process_index, set()).add(idx[mesh.axis_names.index("data")])
  return {p: {"held": sorted(h), "shard": sharding.data_shard(mesh, p)} for p, h in held.items()}

out = {}
for topology, axes, kw in [("v4:2x2x4", (("data", -1), ("model", 1)), {"chip_config_name": "megacore"}),
                           ("v5e:8x8", (("data", -1), ("model", 4)), {}),
                           ("v5e:4x4", (("model", 2), ("data", -1)), {})]:
  devices = list(np.asarray(topologies.get_topology_desc(topology, "tpu", **kw).devices).flat)
  mesh = sharding.make_mesh(axes, devices=devices)
  out[topology] = {"data": mesh.shape["data"], "processes": layout(mesh)}
devices = sorted(devices, key=lambda d: (d.process_index, d.id))  # v5e:4x4's, 4 per host
odd = Mesh(np.array(devices[1:] + devices[:1]).reshape(8, 2), ("data", "model"))
try:
  sharding.data_shard(odd)
except UserError as e:
  out["odd"] = str(e)
print(json.dumps(out))
"""


def test_each_process_loads_the_rows_its_devices_hold():
  """sharding.data_shard on real pod layouts, where a host's 'data' positions are scattered
  (v4) or shared with another host (v5e 8x8 with a model axis of 4, 'model' written first)."""
  r = subprocess.run([sys.executable, "-c", SHARDS], capture_output=True, text=True, timeout=300,
                     env=LIBTPU_ENV)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.splitlines()[-1])
  for topology in ("v4:2x2x4", "v5e:8x8", "v5e:4x4"):
    data, procs = out[topology]["data"], out[topology]["processes"]
    # The rows of shard i go to its positions in sorted order (jax's rule): every position gets
    # exactly one block of rows, the same from every process that holds it, and all are used.
    blocks = {}
    for p in procs.values():
      i, n = p["shard"]
      for j, pos in enumerate(p["held"]):
        assert blocks.setdefault(pos, i * data // n + j) == i * data // n + j, (topology, pos)
    assert sorted(blocks.values()) == list(range(data)), topology
    assert {p["shard"][1] for p in procs.values()} == {len({tuple(p["held"])
                                                             for p in procs.values()})}
  scattered = [h for p in out["v4:2x2x4"]["processes"].values()
               if (h := p["held"]) != list(range(h[0], h[0] + len(h)))]
  assert scattered  # a v4 host's positions are not one block
  shared = [tuple(p["held"]) for p in out["v5e:8x8"]["processes"].values()]
  assert len(set(shared)) < len(shared)  # the case that used to load wrong rows
  # Hosts whose parts of 'data' overlap without being equal: no split of the batch fits.
  assert "overlapping, unequal parts of the 'data' axis" in out["odd"]


def test_hlo_checks_can_fail():
  sys.path.insert(0, str(ROOT / "scripts"))
  import aot_compile
  hlo = """HloModule m

%body (p: f32[2]) -> f32[2] {
  %a = f32[2,2]{1,0} dot(f32[2,2]{1,0} %x, f32[2,2]{1,0} %w)
  %b = f32[2,2]{1,0} dot(f32[2,2]{1,0} %a, f32[2,2]{1,0} %w)
  %c = f32[2]{0} all-reduce(f32[2]{0} %p), to_apply=%sum
}

ENTRY %main (p: f32[2]) -> f32[2] {
  %w = (f32[2]) while(%t), condition=%cond, body=%body
  %g = f32[8]{0} all-gather(f32[2]{0} %p), dimensions={0}
  %copy.7 = f32[4,6]{1,0} copy(f32[4,6]{0,1} %b), metadata={op_name="jit(f)/transpose(jvp())/tile"}
}
"""
  per_loop, outside, problems = aot_compile.check_loops(hlo, data_parallel=True)
  assert per_loop == [2] and outside == 0
  assert any("time loops must hold 1 matmul(s) each (gru), found [2]" in p for p in problems)
  # The LSTM's autodiff backward holds two (dh and dW_h); minGRU has no time loop at all.
  assert not any("matmul(s) each" in p for p in aot_compile.check_loops(
      hlo, data_parallel=True, cell="lstm")[2])
  assert any("mingru has no sequential time loop" in p for p in aot_compile.check_loops(
      hlo, data_parallel=True, cell="mingru")[2])
  assert any("not hoisted" in p for p in problems)
  assert any("collective" in p for p in problems)
  assert any("1 all-gather(s)" in p for p in problems)
  assert any("1 jnp.tile result(s) materialised outside the time loops (copy.7)" in p
             for p in problems)
  assert not any("all-gather" in p for p in aot_compile.check_loops(
      hlo, data_parallel=True, single_slice=False)[2])
  # fsdp: gathering a parameter (here of 8 elements) is what it should do
  assert not any("all-gather" in p for p in aot_compile.check_loops(
      hlo, data_parallel=True, gatherable=frozenset({8}))[2])
  # grad_accum's micro-batch loop around Pallas kernels (or minGRU): no time loop at all. It was
  # checked as one: "time loops must hold 1 matmul(s) each, found [1]", "not hoisted", and its
  # gradient all-reduce "inside a time loop".
  accum = """HloModule m

%cond (p: s32[]) -> pred[] {
  %n = s32[] constant(2)
  %lt = pred[] compare(s32[] %p, s32[] %n), direction=LT
}

%micro (p: f32[2]) -> f32[2] {
  %a = f32[2,2]{1,0} dot(f32[2,2]{1,0} %x, f32[2,2]{1,0} %w)
  %k = f32[2,2]{1,0} custom-call(f32[2,2]{1,0} %a), custom_call_target="tpu_custom_call"
  %c = f32[2]{0} all-reduce(f32[2]{0} %p), to_apply=%sum
}

ENTRY %main (p: f32[2]) -> f32[2] {
  %w = (f32[2]) while(%t), condition=%cond, body=%micro
}
"""
  assert aot_compile.check_loops(accum, data_parallel=True, grad_accum=2) == ([], 1, [])
  # remat's chunk loop around the kernels is no time loop either (it failed a correct
  # program: "time loops must hold 1 matmul(s) each (gru), found [1, 3]").
  assert aot_compile.check_loops(accum, data_parallel=True) == ([], 1, [])
  plain = accum.replace('custom_call_target="tpu_custom_call"', 'custom_call_target="x"')
  wrong = aot_compile.check_loops(plain, data_parallel=True)[2]  # a loop of 1 matmul, as a GRU's
  assert wrong == ["no matmul outside the loops: the input projection is not hoisted",
                   "1 collective(s) inside a time loop (all-reduce)"]
  assert "mingru has no sequential time loop" in aot_compile.check_loops(
      plain, data_parallel=True, grad_accum=3, cell="mingru")[2][0]  # runs twice: not it
  # --compare_impls on a config it cannot compare: tracebacks (forecast: no seq_len) or a
  # message about impl='pallas', which the user never set (LSTM).
  from gru_tpu.config import load_file
  # Inside grad_accum's or remat's loop each kernel's cost counted once, the traffic per trip:
  # the table read -3x at grad_accum=4.
  for name, cell, message, over in (
      ("co2_forecast", "gru", "needs config.seq_len", {}),
      ("synthetic", "lstm", "config.model.cell='lstm' has no kernel", {}),
      ("synthetic", "gru", "counts one pass of the kernels", {"grad_accum": 4}),
      ("synthetic", "gru", "counts one pass of the kernels", {"model.remat": True})):
    c = load_file(ROOT / "configs" / f"{name}.py", "size=tiny")
    c.model.cell = cell
    c.update_from_flattened_dict(over)
    with pytest.raises(UserError, match=message):
      aot_compile.compare_impls(c, None)


def test_launcher_dry_run_prints_the_pod_commands():
  r = subprocess.run([sys.executable, str(ROOT / "scripts" / "launch_tpu.py"), "--name", "t1",
                      "--zone", "us-west4-a", "--accelerator", "v5litepod-16", "--config",
                      "configs/synthetic.py:size=small", "--workdir", "gs://b/run; rm -rf /",
                      "--dry_run", "--", "--config.num_steps=10"],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert lines[0].startswith("gcloud compute tpus tpu-vm create t1 --zone=us-west4-a")
  assert "--accelerator-type=v5litepod-16" in lines[0]
  assert "--worker=all" in lines[1] and "--worker=all" in lines[2]
  # The images' Python 3.10 cannot install jax >= 0.7: a venv of uv's Python runs it.
  assert "uv venv --allow-existing --python 3.12 ../gru_tpu_venv" in lines[2]
  assert "../gru_tpu_venv/bin/gru-tpu train --config configs/synthetic.py:size=small" in lines[2]
  assert "--distributed --config.num_steps=10" in lines[2]
  assert "'gs://b/run; rm -rf /'" in lines[2]  # quoted: a path is never shell


def _aot_module():
  sys.path.insert(0, str(ROOT / "scripts"))
  import aot_compile
  return aot_compile


def test_hbm_traffic_counts_every_loop_trip():
  """The loop-aware count of a compiled scan equals what cost_analysis finds in the same
  recurrence unrolled into straight-line code, while cost_analysis of the loop (body counted
  once) is far lower."""
  import jax
  import jax.numpy as jnp
  aot_compile = _aot_module()
  T, B, H = 32, 8, 128

  def f(w, xs, unroll):
    def body(h, x):
      h = jnp.tanh(x + h @ w)
      return h, h
    return jax.lax.scan(body, jnp.zeros((B, H)), xs, unroll=unroll)[1]

  args = (jnp.ones((H, H)), jnp.ones((T, B, H)))
  looped, unrolled = (jax.jit(f, static_argnums=2).lower(*args, u).compile() for u in (1, T))
  loops = []
  counted = aot_compile.hbm_traffic(looped.as_text(), loops=loops)
  assert [trips for trips, _ in loops] == [T]
  per_step = 4 * (H * H + 3 * B * H)  # W, x_t, h read; h written (y_t aliases it or is slotted)
  assert per_step <= loops[0][1] <= 2 * per_step
  straight = unrolled.cost_analysis()["bytes accessed"]
  assert abs(counted - straight) / straight < 0.1, (counted, straight)
  assert looped.cost_analysis()["bytes accessed"] < counted / 5


def test_hbm_traffic_reads_the_layout():
  """On-chip buffers (S(1)) move nothing, an in-place dynamic-update-slice writes only its
  update, an async slice moves its slice once, and a Mosaic kernel costs what it declares."""
  aot_compile = _aot_module()
  hlo = """HloModule m

%fused (p0: f32[16,4], p1: f32[1,4], p2: s32[]) -> f32[16,4] {
  %p0 = f32[16,4]{1,0} parameter(0)
  %p1 = f32[1,4]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %d = f32[16,4]{1,0} dynamic-update-slice(f32[16,4]{1,0} %p0, f32[1,4]{1,0} %p1, s32[] %p2, s32[] %z)
}

ENTRY %main (a: f32[16,4], u: f32[1,4], i: s32[], v: f32[256], x: f32[64]) -> f32[16,4] {
  %a = f32[16,4]{1,0} parameter(0)
  %u = f32[1,4]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %v = f32[256]{0:S(1)} parameter(3)
  %x = f32[64]{0} parameter(4)
  %s = ((f32[64]{0}), f32[8]{0:S(1)}, u32[]) slice-start(f32[64]{0} %x), slice={[0:8]}
  %sd = f32[8]{0:S(1)} slice-done(((f32[64]{0}), f32[8]{0:S(1)}, u32[]) %s)
  %n = f32[256]{0:S(1)} negate(f32[256]{0:S(1)} %v)
  %k = f32[8]{0} custom-call(f32[256]{0:S(1)} %n), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"cost_estimate":{"flops":"10","transcendentals":"0","bytes_accessed":"1000"}}}
  ROOT %f = f32[16,4]{1,0} fusion(f32[16,4]{1,0} %a, f32[1,4]{1,0} %u, s32[] %i), kind=kLoop, calls=%fused
}
"""
  # the fusion reads its 16-byte update and the 4-byte index and writes 16 bytes in place; the
  # slice reads 32 bytes of x into on-chip memory
  assert aot_compile.hbm_traffic(hlo) == 1000 + 16 + 4 + 16 + 32
