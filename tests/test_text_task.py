"""The text task end to end through `gru-tpu train`: learning, metadata, metrics, errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "configs"))
import char_pystdlib  # noqa: E402

from gru_tpu.errors import UserError  # noqa: E402
from gru_tpu.metrics import read_metrics  # noqa: E402
from gru_tpu.tasks.text import TextTask  # noqa: E402

CONFIG = str(Path(__file__).parents[1] / "configs" / "char_pystdlib.py") + ":size=tiny"


def train(workdir, *flags):
  return subprocess.run([sys.executable, "-m", "gru_tpu.cli", "train", "--config", CONFIG,
                         "--workdir", str(workdir), "--config.log_every=1", *flags],
                        capture_output=True, text=True, timeout=600)


def test_learns_a_learnable_text_and_saves_the_tokenizer(tmp_path):
  (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
  r = train(tmp_path / "run", f"--config.data.source=files:{tmp_path}/*.txt",
            "--config.num_steps=80", "--config.eval_every=80", "--config.checkpoint_every=80",
            "--config.optimizer.warmup_steps=5", "--config.optimizer.learning_rate=1e-2")
  assert r.returncode == 0, r.stderr[-3000:]
  rows = read_metrics(tmp_path / "run")
  loss = {x["step"]: x["loss"] for x in rows if x["split"] == "train"}
  assert np.mean([loss[s] for s in range(71, 81)]) < 0.5 * loss[1]
  (ev,) = [x for x in rows if x["split"] == "eval"]
  assert abs(ev["bits_per_char"] - ev["loss"] / np.log(2)) < 1e-6
  assert abs(ev["perplexity"] - np.exp(ev["loss"])) < 1e-3 * ev["perplexity"]
  meta = json.loads((tmp_path / "run" / "checkpoints" / "80" / "meta" / "metadata").read_text())
  assert meta["task"]["tokenizer"]["kind"] == "char"
  assert "step 80 sample: 'def " in r.stderr  # the eval-time sample, in the log
  assert sorted(meta["task"]["tokenizer"]["chars"]) == sorted(set("the quick brown fox jumps "
                                                                   "over the lazy dog."))


def test_pystdlib_default_source_runs(tmp_path):
  r = train(tmp_path, "--config.num_steps=3", "--config.eval_every=3", "--config.eval_steps=1",
            "--config.checkpoint_every=3")
  assert r.returncode == 0, r.stderr[-3000:]
  assert [x["step"] for x in read_metrics(tmp_path) if x["split"] == "eval"] == [3]


def test_byte_tokenizer_trains_and_a_changed_corpus_is_refused_untouched(tmp_path):
  (tmp_path / "a.txt").write_text("abc abd " * 300)
  src = f"--config.data.source=files:{tmp_path}/*.txt"
  steps = ("--config.num_steps=4", "--config.eval_every=4", "--config.checkpoint_every=4",
           "--config.eval_steps=1")
  r = train(tmp_path / "bytes", src, "--config.data.tokenizer=byte", *steps)
  assert r.returncode == 0, r.stderr[-3000:]  # a TypeError in the tokenizer, before
  meta = json.loads((tmp_path / "bytes/checkpoints/4/meta/metadata").read_text())
  assert meta["task"]["tokenizer"] == {"kind": "byte"}
  r = train(tmp_path / "chars", src, *steps)
  assert r.returncode == 0, r.stderr[-3000:]
  before = {p: p.read_bytes() for p in (tmp_path / "chars").rglob("*") if p.is_file()}
  (tmp_path / "b.txt").write_text("xyz " * 300)  # new characters: another vocabulary
  r = train(tmp_path / "chars", src, "--config.num_steps=8")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "whose vocabulary differs from the one" in r.stderr and "(6 vs 9 symbols" in r.stderr
  assert {p: p.read_bytes() for p in (tmp_path / "chars").rglob("*") if p.is_file()} == before
  (tmp_path / "b.txt").unlink()
  (tmp_path / "a.txt").write_text("abd abc " * 300)  # other text, the same characters
  for run, flags in (("chars", ()), ("bytes", ("--config.data.tokenizer=byte",))):
    before = {p: p.read_bytes() for p in (tmp_path / run).rglob("*") if p.is_file()}
    r = train(tmp_path / run, src, *flags, "--config.num_steps=8")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "whose training text differs from the one" in r.stderr
    assert {p: p.read_bytes() for p in (tmp_path / run).rglob("*") if p.is_file()} == before


def test_bad_text_inputs_exit_2(tmp_path):
  r = train(tmp_path / "a", "--config.data.source=files:/nonexistent/*.txt")
  assert r.returncode == 2 and "the glob matches no files" in r.stderr
  (tmp_path / "short.txt").write_text("x" * 100)
  r = train(tmp_path / "b", f"--config.data.source=files:{tmp_path}/short.txt",
            "--config.num_steps=2")
  assert r.returncode == 2 and "leaves no window in the" in r.stderr
  c = char_pystdlib.get_config("size=tiny")  # it trained on, logging empty samples
  c.data.sample_length = -1
  with pytest.raises(UserError, match=r"config.data.sample_length=-1: expected an integer >= 0"):
    TextTask(c)


def test_seq_len_must_leave_a_window_in_the_validation_split(tmp_path):
  """A window is seq_len + 1 tokens: a validation split of exactly seq_len tokens holds none,
  refused before training (not at the first eval); one token more is enough, and the eval
  batches are that window of the validation split."""
  rng = np.random.default_rng(0)  # 2000 chars, no two windows alike: validation is 100
  (tmp_path / "t.txt").write_text("".join(rng.choice(list("abcdefghij"), 2000)))
  c = char_pystdlib.get_config("size=tiny")
  c.data.source = f"files:{tmp_path}/t.txt"
  c.seq_len = 100
  with pytest.raises(UserError, match=r"config.seq_len=100 leaves no window in the validation "
                                      r"split .* \(100 tokens; .*\): lower config.seq_len to 99 "):
    TextTask(c)
  c.seq_len = 99
  task = TextTask(c)  # the eval batches are the validation split's one window, every row
  rows = next(task.batches("eval", 0, 0, 1))["tokens"]
  np.testing.assert_array_equal(rows, np.broadcast_to(task.tokens("validation"), rows.shape))


def test_tied_embeddings_and_layer_norm_train_and_load(tmp_path):
  import gru_tpu
  (tmp_path / "a.txt").write_text("abcdefgh " * 500)
  r = train(tmp_path / "run", f"--config.data.source=files:{tmp_path}/a.txt",
            "--config.num_steps=40", "--config.eval_every=40", "--config.checkpoint_every=40",
            "--config.optimizer.warmup_steps=5", "--config.optimizer.learning_rate=1e-2",
            "--config.model.tie_embeddings=True", "--config.model.layer_norm=True")
  assert r.returncode == 0, r.stderr[-3000:]
  loss = {x["step"]: x["loss"] for x in read_metrics(tmp_path / "run") if x["split"] == "train"}
  assert loss[40] < 0.5 * loss[1]
  m = gru_tpu.load(tmp_path / "run")
  assert m.model.tied and not hasattr(m.model, "head") and m.model.norm is not None
  assert m.generate("abc", 6, temperature=0) == "defgh "


def test_tied_head_adds_its_output_bias_and_trains_it():
  """Tied logits are proj(y) @ embedding.T + out_bias (a numpy reference), and out_bias gets
  the cross entropy's gradient: without it in the logits, it would stay zero untrained."""
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from gru_tpu.models import lm
  V, E, H = 7, 4, 6
  model = lm.SequenceLM(V, embed_dim=E, hidden=H, tie_embeddings=True, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  model.out_bias[...] = jnp.asarray(rng.normal(size=V), jnp.float32)
  y_BxTxH = rng.normal(size=(2, 3, H)).astype(np.float32)
  labels = rng.integers(0, V, (2, 3))
  want = (y_BxTxH.astype(np.float64) @ np.asarray(model.proj.kernel[...], np.float64)
          @ np.asarray(model.embed.embedding[...], np.float64).T + np.asarray(model.out_bias[...]))
  np.testing.assert_allclose(model.logits(jnp.asarray(y_BxTxH)), want, rtol=1e-5, atol=1e-5)
  grads = nnx.jit(nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(
      m.logits(jnp.asarray(y_BxTxH)), labels).mean()))(model)  # jit: eager ops compile one by one
  p = np.exp(want - want.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want_grad = (p - np.eye(V)[labels]).reshape(-1, V).mean(0)  # d mean CE / d bias
  np.testing.assert_allclose(grads.out_bias[...], want_grad, rtol=1e-4, atol=1e-6)
  assert np.abs(want_grad).max() > 0.05


def test_hidden_multiple_is_enforced(tmp_path):
  r = train(tmp_path, "--config.model.hidden_multiple=128", "--config.num_steps=1")
  assert r.returncode == 2
  assert "config.model.hidden=64 and embed_dim=32 must be multiples of" in r.stderr


def test_shakespeare_tfds_config_trains_offline(tmp_path, tfds_dir):
  config = str(Path(__file__).parents[1] / "configs" / "shakespeare_char.py") + ":size=tiny"
  r = subprocess.run([sys.executable, "-m", "gru_tpu.cli", "train", "--config", config,
                      "--workdir", str(tmp_path), f"--config.data.tfds_data_dir={tfds_dir}",
                      "--config.num_steps=4", "--config.eval_every=4", "--config.eval_steps=1",
                      "--config.checkpoint_every=4", "--config.log_every=1"],
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  meta = json.loads((tmp_path / "checkpoints" / "4" / "meta" / "metadata").read_text())
  assert meta["task"]["source"] == "tfds:tiny_shakespeare"
  assert len(meta["task"]["tokenizer"]["chars"]) == 65  # tiny_shakespeare's training characters
  assert "step 4 sample: 'ROMEO:" in r.stderr


def test_loss_is_next_token_cross_entropy(tmp_path):
  """The loss scores the logits after tokens[:t+1] against tokens[t+1]: a reference from the
  prompt-priming path, one prefix at a time. (Scoring a position against its own input token
  also trains, and the learning test above passed with it.)"""
  import jax
  from flax import nnx
  from gru_tpu.models import lm
  (tmp_path / "a.txt").write_text("abcdefgh " * 50)
  c = char_pystdlib.get_config("size=tiny")
  c.data.source = f"files:{tmp_path}/a.txt"
  c.seq_len = 3
  task = TextTask(c)
  model = task.build_model(nnx.Rngs(0))
  model.eval()
  tokens = np.random.default_rng(0).integers(0, task.tokenizer.vocab_size, (2, c.seq_len + 1))
  loss, aux = task.loss_fn(model, {"tokens": tokens}, jax.random.key(0))
  want = []
  for t in range(c.seq_len):
    logits = np.asarray(lm.prime(model, tokens[:, :t + 1])[1], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want.append(-logp[np.arange(2), tokens[:, t + 1]])
  np.testing.assert_allclose(float(loss), np.mean(want), rtol=1e-5)
  np.testing.assert_allclose(float(aux["bits_per_char"]), np.mean(want) / np.log(2), rtol=1e-5)


def test_an_eval_that_wraps_around_the_split_counts_each_window_once(tmp_path):
  """eval_steps x batch_size past the validation windows read them again from the first, and
  the repeats counted: shakespeare's base preset scored its 217 windows 7-8 times each, the
  first 17 once more than the rest."""
  import jax
  from flax import nnx
  from gru_tpu import train
  (tmp_path / "a.txt").write_text("".join(chr(97 + i % 23) * (1 + i % 5) for i in range(900)))
  c = char_pystdlib.get_config("size=tiny")
  c.data.source = f"files:{tmp_path}/a.txt"
  c.seq_len, c.batch_size = 9, 4
  task = TextTask(c)
  n = (len(task.tokens("validation")) - 1) // c.seq_len
  assert n % c.batch_size and 2 * c.batch_size < n < 4 * c.batch_size  # wraps mid-batch
  model = task.build_model(nnx.Rngs(0))
  model.eval()
  it = task.batches("eval", 0, 0, 1)
  rows = [task.loss_fn(model, next(it), jax.random.key(0)) for _ in range(5)]  # 20 rows > n
  got = train._weighted_mean([dict(aux, loss=loss) for loss, aux in rows])["loss"]
  every = task.tokens("validation")[np.arange(n)[:, None] * c.seq_len + np.arange(c.seq_len + 1)]
  want = float(task.loss_fn(model, {"tokens": every}, jax.random.key(0))[0])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  halves = [task.batches("eval", 3, shard, 2) for shard in (0, 1)]  # the same rows, sharded
  whole = next(task.batches("eval", 3, 0, 1))
  np.testing.assert_array_equal(np.concatenate([next(h)["weight"] for h in halves]),
                                whole["weight"])
  assert whole["weight"].tolist() == [float(3 * c.batch_size + i < n) for i in range(4)]
