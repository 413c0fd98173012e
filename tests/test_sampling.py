"""Sampling from a trained text model: determinism, greedy limits, priming, CLI."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parents[1] / "configs"))
import char_pystdlib  # noqa: E402

import gru_tpu  # noqa: E402
from gru_tpu import train  # noqa: E402
from gru_tpu.errors import UserError  # noqa: E402
from gru_tpu.models import lm  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("sampling")
  (root / "t.txt").write_text("to be or not to be, that is the question. " * 200)
  c = char_pystdlib.get_config("size=tiny")
  c.data.source = f"files:{root}/t.txt"
  c.num_steps, c.eval_every, c.checkpoint_every, c.log_every = 25, 25, 25, 25
  c.optimizer.warmup_steps = 5
  c.model.num_layers = 2
  train.train_and_evaluate(c, root / "run")
  return root / "run"


def test_same_seed_same_text_other_seed_other_text(workdir):
  m = gru_tpu.load(workdir)
  a = m.generate("to be", 80, temperature=1.5, seed=1)
  assert a == m.generate("to be", 80, temperature=1.5, seed=1)
  assert a != m.generate("to be", 80, temperature=1.5, seed=2)
  assert len(a) == 80


def test_top_k_1_and_tiny_top_p_are_greedy(workdir):
  m = gru_tpu.load(workdir)
  greedy = m.generate("not to", 60, temperature=0)
  assert m.generate("not to", 60, top_k=1, seed=7) == greedy
  assert m.generate("not to", 60, top_p=1e-6, seed=7) == greedy


def test_chunked_streaming_equals_one_chunk(workdir):
  m = gru_tpu.load(workdir)
  chunks = ["".join(p[0] for p in m.stream("that", 50, seed=3, chunk=c)) for c in (7, 64)]
  assert chunks[0] == chunks[1]


def test_priming_equals_feeding_the_prompt_through_step(workdir):
  m = gru_tpu.load(workdir)
  ids = jnp.asarray(m.tokenizer.encode("that is the"))[None]
  carry, logits = lm.prime(m.model, ids)
  c = m.model.rnn.initial_carry(1)
  for t in range(ids.shape[1]):
    c, y = m.model.rnn.step(c, m.model.embed(ids[:, t]))
  np.testing.assert_allclose(carry, c, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, m.model.logits(y), rtol=1e-5, atol=1e-5)


def test_priming_a_prompt_longer_than_a_piece_equals_one_pass(workdir):
  """prime_jit runs the prompt in right-padded pieces of PROMPT_CHUNK tokens."""
  m = gru_tpu.load(workdir)
  ids = jnp.asarray(m.tokenizer.encode("to be or not to be, " * 7))[None]  # 140: 3 pieces
  assert ids.shape[1] > 2 * lm.PROMPT_CHUNK
  carry, logits = lm.prime_jit(*nnx.split(m.model), ids)
  want_carry, want_logits = lm.prime(m.model, ids)
  np.testing.assert_allclose(carry, want_carry, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", sorted(lm.CELLS))
def test_pieced_priming_equals_one_pass_for_every_cell(cell, rng):
  """The padded last piece relies on each cell freezing its carry past seq_lengths."""
  model = lm.SequenceLM(11, cell=cell, embed_dim=8, hidden=16, num_layers=2,
                        rngs=nnx.Rngs(3))
  ids = rng.integers(0, 11, (2, lm.PROMPT_CHUNK + 9))
  carry, logits = lm.prime_jit(*nnx.split(model), ids)
  want_carry, want_logits = lm.prime(model, jnp.asarray(ids))
  for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(want_carry), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)


def tempered_filtered_softmax(logits, temperature, top_k, top_p):
  """Reference: logits / temperature, then the top_k largest kept, then the smallest
  most-likely-first prefix whose probability reaches top_p kept; softmax over what is kept."""
  z = np.asarray(logits, np.float64) / temperature
  keep = np.ones(len(z), bool)
  if top_k is not None:
    keep &= z >= np.sort(z)[-top_k]
  if top_p is not None:
    order = np.argsort(-np.where(keep, z, -np.inf), kind="stable")
    p = np.where(keep, np.exp(z - z.max()), 0.0)[order]
    p /= p.sum()
    keep[order[np.cumsum(p) - p >= top_p]] = False
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p,logits", [
    (0.5, None, None, [2.0, 1.0, 0.0, -1.0, 0.5]),
    (2.0, 3, None, [2.0, 1.0, 0.0, -1.0, 0.5]),
    (0.7, None, 0.8, [2.0, 1.0, 0.0, -1.0, 0.5]),
    (1.0, None, 0.5, [0.0, 0.0, 0.0, 0.0]),  # mass 0.5 exactly after 2: those 2 stay
    (1.5, 4, 0.7, [0.3, -2.0, 1.0, 0.9, 0.0])])
def test_sampled_tokens_follow_the_tempered_filtered_softmax(temperature, top_k, top_p, logits):
  """One token per row of 40000 identical rows: their frequencies against the reference."""
  V, B = len(logits), 40_000
  model = lm.SequenceLM(V, embed_dim=4, hidden=4, rngs=nnx.Rngs(0))
  _, _, toks_Bx1 = lm.sample_tokens(
      model, model.rnn.initial_carry(B), jnp.tile(jnp.asarray(logits, jnp.float32), (B, 1)),
      jax.random.split(jax.random.key(0), 1), temperature, top_k, top_p)
  freq = np.bincount(np.asarray(toks_Bx1[:, 0]), minlength=V) / B
  want = tempered_filtered_softmax(logits, temperature, top_k, top_p)
  np.testing.assert_array_equal(freq > 0, want > 0)
  np.testing.assert_allclose(freq, want, atol=0.012)  # 4.8 sigma of a frequency at p = 0.5


def test_a_tiny_temperature_is_the_most_likely_token():
  """logits / 1e-38 overflowed to +inf for every token, and the tie went to token 0."""
  model = lm.SequenceLM(3, embed_dim=4, hidden=4, rngs=nnx.Rngs(0))
  logits = jnp.array([[5.0, 6.0, 1.0]])
  for t, top_p in ((1e-38, None), (1e-38, 0.9), (1e-30, None)):  # top_p: softmax of inf, NaN
    _, _, toks = lm.sample_tokens(model, model.rnn.initial_carry(1), logits,
                                  jax.random.split(jax.random.key(0), 1), t, None, top_p)
    assert int(toks[0, 0]) == 1, (t, top_p)


def test_new_prompts_lengths_and_temperatures_compile_nothing_new(workdir, compiles):
  """A notebook calls generate with ever new prompts, lengths and temperatures. Each new prompt
  length, text length, temperature or top_p compiled anew (and kept the executable: ~3 MB of
  host memory each for the tiny model), so a session grew with every call."""
  m = gru_tpu.load(workdir)
  m.generate("to", 33, temperature=0.7, top_p=0.9)  # compiles the pieces used below
  with compiles() as seen:
    texts = [m.generate("to be" + " or not" * i, 40 + 3 * i, temperature=0.5 + i / 10,
                        top_p=0.8 + i / 50, seed=i) for i in range(5)]
  assert [len(t) for t in texts] == [40, 43, 46, 49, 52]
  assert seen == []


def test_bad_sampling_arguments(workdir, tmp_path, monkeypatch):
  m = gru_tpu.load(workdir)
  V = m.tokenizer.vocab_size
  for bad in (0, V + 1, 2.5):  # 2.5: a JAX TypeError inside the sampler
    with pytest.raises(UserError, match=rf"top_k must be an integer in \[1, {V}\], got {bad}"):
      m.generate("x", 5, top_k=bad)
  # A notebook's prompt outside the vocabulary is said, as the CLI says it.
  with pytest.warns(UserWarning, match=r"prompt characters not in the vocabulary become <unk>: "
                                       r"'Zx'"):
    m.generate("to Zx", 2)
  with pytest.warns(UserWarning, match=r"become <unk>: '\\n'"):  # "" primes with "\n"
    m.generate("", 2)
  # A lone surrogate (os.fsdecode's) warned of <unk>, then no encoder took it at the first piece.
  with pytest.raises(UserError, match=r"prompt is not text at index 3 \('\\udce9': surrogates"):
    m.stream("caf\udce9", 2)
  for bad in (None, b"to", ["to"]):  # TypeErrors
    with pytest.raises(UserError, match=f"prompt must be a str, got {type(bad).__name__}"):
      m.stream(bad, 2)
  # The step as text or float: "no checkpoint at step 20; it has steps [20, ...]" or "changed
  # while being loaded".
  for bad in ("25", 25.0):
    with pytest.raises(UserError, match=r"step must be an integer \(a checkpoint step\), got "):
      gru_tpu.load(workdir, step=bad)
  assert gru_tpu.load(workdir, step=np.int64(m.step)).step == m.step
  for bad in (0.0, 1.5, "0.9"):
    with pytest.raises(UserError, match=r"top_p must be a number in \(0, 1\]"):
      m.generate("x", 5, top_p=bad)
  # The closed ends are valid: every token, all the mass.
  assert len(m.generate("t", 3, top_k=V, top_p=1.0, seed=2**31 - 1)) == 3
  for bad in (-1.0, float("nan"), "1"):  # negative: the least likely tokens first
    with pytest.raises(UserError, match="temperature must be a number >= 0"):
      m.generate("x", 5, temperature=bad)
  # Counts that are not integers passed the checks and failed at the first piece (range(),
  # `<`): raised when called now, like the rest.
  for name, bad, low in (("num_samples", 0, 1), ("num_samples", 2.0, 1), ("length", 5.5, 0),
                         ("length", "5", 0), ("length", -1, 0), ("chunk", 2.5, 1),
                         ("chunk", True, 1)):
    kwargs = {"length": 5, name: bad}
    with pytest.raises(UserError, match=rf"{name} must be an integer >= {low}, got "):
      m.stream("x", **kwargs)
  # 2**70: an OverflowError traceback; 2**32: seed 0's samples (JAX wraps seeds mod 2**32).
  for bad in (2**70, 2**32, 2**31, -1):
    with pytest.raises(UserError, match=r"seed must be an integer in \[0, 2\*\*31\)"):
      m.stream("x", 5, seed=bad)  # raised when called, not at the first piece
  with pytest.raises(UserError, match="seed must be"):
    gru_tpu.load(workdir).generate("x", 5, seed=2**70)
  with pytest.raises(UserError, match="holds no checkpoint"):
    gru_tpu.load(tmp_path)
  assert not (tmp_path / "checkpoints").exists()
  # They said "holds no checkpoint; train first (gru-tpu train --workdir .../checkpoints ...)"
  # "." and two levels down were missed (".": "train first (gru-tpu train --workdir . ...)").
  step = gru_tpu.load(workdir).step
  monkeypatch.chdir(workdir / "checkpoints")
  for inside in (workdir / "checkpoints", workdir / "config.json", workdir / "checkpoints" / "25",
                 workdir / "checkpoints" / str(step) / "state", ".", f"{step}/meta"):
    with pytest.raises(UserError, match=f"is inside the run directory {workdir}; give that: "
                                        f"--workdir {workdir}$"):
      gru_tpu.load(inside)


def test_a_byte_models_characters_split_between_pieces_come_out_whole(monkeypatch):
  """A byte model streams a character whose UTF-8 bytes fall in two pieces (or three) as that
  character, at the piece that completes it, not as replacement characters; bytes of a
  character the text stops inside of come out as one at the end."""
  from gru_tpu import api
  text = "aé€!".encode() + "€".encode()[:2]  # 1, 2, 3 and 1 bytes, and a cut-off 3

  def advance(graphdef, state, carry, logits, key, start, n, *rest):  # the "sampled" bytes
    toks = np.frombuffer(text, np.uint8)[start:start + n]
    return carry, logits, np.pad(toks, (0, n - len(toks)))[None].astype(np.int32)

  monkeypatch.setattr(lm, "prime_jit", lambda graphdef, state, ids: (None, None))
  monkeypatch.setattr(lm, "advance_jit", advance)
  m = api.TextModel(Path("run"), None, nnx.Linear(1, 1, rngs=nnx.Rngs(0)),
                    {"tokenizer": {"kind": "byte"}}, 0)
  # The last piece flushes what the text ends inside of: one replacement character.
  assert [p[0] for p in m.stream("", len(text), chunk=1)] == [
      "a", "", "é", "", "", "€", "!", "", "\ufffd"]
  assert [p[0] for p in m.stream("", len(text), chunk=2)] == ["a", "é", "€", "!", "\ufffd"]
  assert m.generate("", len(text)) == "aé€!\ufffd"


def test_sample_cli_prints_nothing_for_bad_arguments(workdir, capsys):
  """The prompt went to stdout before a bad argument's error (checked at the first piece)."""
  from gru_tpu import api
  for flags in (["--top_p", "2"], ["--seed", str(2**70)]):
    assert api.main(["--workdir", str(workdir), "--prompt", "to Zx", "--length", "3",
                     *flags]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.splitlines()) == 1, out


def test_sample_cli_takes_a_prompt_from_a_non_utf8_terminal(workdir, capsys):
  from gru_tpu import api
  assert api.main(["--workdir", str(workdir), "--prompt", "caf\udce9", "--length", "3"]) == 0
  out = capsys.readouterr()
  assert out.out.startswith("caf\ufffd") and "\ufffd'" in out.err.splitlines()[-1]


def test_sample_cli(workdir, tmp_path):
  run = lambda *a: subprocess.run([sys.executable, "-m", "gru_tpu.cli", "sample", *a],
                                  capture_output=True, text=True, timeout=300)
  r = run("--workdir", str(workdir), "--prompt", "to Zx", "--length", "40", "--seed", "4")
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.startswith("to Zx") and len(r.stdout.rstrip("\n")) == 45
  assert "become <unk>: 'Zx'" in r.stderr
  assert run("--workdir", str(workdir), "--prompt", "to Zx", "--length", "40",
             "--seed", "4").stdout == r.stdout
  r = run("--workdir", str(tmp_path), "--length", "5")
  assert r.returncode == 2 and "holds no checkpoint" in r.stderr
  # `| head`: the reader leaves (more text than a pipe buffers, so a write must meet it gone);
  # it was a BrokenPipeError traceback.
  p = subprocess.Popen([sys.executable, "-m", "gru_tpu.cli", "sample", "--workdir", str(workdir),
                        "--length", "200000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  assert len(p.stdout.read(20)) == 20
  p.stdout.close()
  err = p.stderr.read().decode()
  assert p.wait(timeout=300) == 1 and "Traceback" not in err, err[-2000:]
