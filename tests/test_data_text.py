"""Text corpora and tokenizers: splits, round trips, UTF-8 rules, bad sources."""

import hashlib

import numpy as np
import pytest
from conftest import SHAKESPEARE

from gru_tpu.data import order, text
from gru_tpu.errors import UserError


def test_tiny_shakespeare_split_matches_tfds():
  assert hashlib.sha256(SHAKESPEARE.read_bytes()).hexdigest().startswith("86c4e6aa9db7c042")
  c = text.load_corpus(f"files:{SHAKESPEARE}")
  # TFDS tiny_shakespeare: 1003854 / 55770 / 55770 characters (the file is ASCII).
  assert (len(c.train), len(c.validation), len(c.test)) == (1003854, 55770, 55770)
  assert c.train + c.validation + c.test == SHAKESPEARE.read_bytes()


def test_split_never_cuts_a_utf8_character():
  data = "привет мир\n".encode() * 101  # 2-byte characters: byte cut points land inside one
  c = text.split_90_5_5("x", data)
  assert c.train + c.validation + c.test == data
  for part in (c.train, c.validation, c.test):
    part.decode("utf-8")  # raised UnicodeDecodeError before
  assert len(c.train) in (int(0.9 * len(data)), int(0.9 * len(data)) + 1)


def test_byte_stream_decoding_joins_characters_split_across_pieces():
  ids = text.ByteTokenizer().encode("aé€b")  # é: 2 bytes, €: 3
  decode = text.ByteTokenizer().stream_decoder()
  pieces = [decode(ids[i:i + 2], final=i + 2 >= len(ids)) for i in range(0, len(ids), 2)]
  assert "".join(pieces) == "aé€b" and "\ufffd" not in "".join(pieces)
  assert text.ByteTokenizer().stream_decoder()(ids[:2], final=True) == "a\ufffd"  # cut, flushed


def test_pystdlib_is_split_by_file_and_deterministic():
  a, b = text.load_corpus("pystdlib"), text.load_corpus("pystdlib")
  assert a == b
  assert len(a.train) > 10 * len(a.validation) > 0 and len(a.test) > 0
  assert b"def " in a.validation and a.validation not in a.train


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_tokenizers_round_trip_and_serialise(kind):
  corpus = text.split_90_5_5("t", "héllo wörld, ünïcode ✓\n".encode() * 20)
  tok = text.make_tokenizer(kind, corpus)
  ids = tok.encode(corpus.train)
  assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
  assert tok.decode(ids) == corpus.train.decode()
  again = text.tokenizer_from_json(tok.to_json())
  np.testing.assert_array_equal(again.encode(corpus.validation), tok.encode(corpus.validation))


def test_char_maps_unseen_characters_to_unk():
  tok = text.CharTokenizer.fit(b"abc")
  assert tok.encode("abz").tolist() == [tok.index["a"], tok.index["b"], 0]
  assert tok.decode([0]) == "\ufffd"


def test_invalid_utf8_is_an_error_for_char_only():
  corpus = text.split_90_5_5("bad", b"ok text \xff\xfe more" * 10)
  with pytest.raises(UserError, match="not valid UTF-8 .*config.data.tokenizer='byte'"):
    text.make_tokenizer("char", corpus)
  assert text.make_tokenizer("byte", corpus).encode(corpus.train)[8] == 0xFF


def test_files_are_concatenated_in_name_order(tmp_path):
  """A glob's files in name order, whatever order the directory lists them in (made here in
  reverse)."""
  names = [f"part{i:02d}.txt" for i in range(12)]
  for name in reversed(names):
    (tmp_path / name).write_text(name[4:6] * 50)
  c = text.load_corpus(f"files:{tmp_path}/*.txt")
  assert c.train + c.validation + c.test == "".join(n[4:6] * 50 for n in names).encode()


@pytest.mark.parametrize("source,message", [
    ("files:/nonexistent/*.txt", "the glob matches no files"),
    ("ftp:thing", "expected 'pystdlib', 'files:GLOB' or 'tfds:NAME'"),
])
def test_bad_sources(source, message):
  with pytest.raises(UserError, match=message):
    text.load_corpus(source)


def test_empty_corpus(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(UserError, match="the corpus is empty"):
    text.load_corpus(f"files:{tmp_path}/*.txt")


def test_windows_are_seeded_resumable_and_split_across_processes():
  tokens = np.arange(1000, dtype=np.int32)
  kw = dict(seq_len=10, batch_size=8, seed=1)
  full = text.window_batches(tokens, **kw)
  batches = [next(full) for _ in range(30)]  # 30 x 8 > 99 windows: crosses an epoch
  assert batches[0].shape == (8, 11)
  assert all((b[:, 1:] - b[:, :-1] == 1).all() for b in batches)  # contiguous windows
  assert all((b[:, 0] % 10 == 0).all() for b in batches)
  first_epoch = np.concatenate(batches)[:99, 0]
  assert sorted(first_epoch.tolist()) == list(range(0, 990, 10))  # each window once per epoch
  resumed = text.window_batches(tokens, start_step=17, **kw)
  np.testing.assert_array_equal(next(resumed), batches[17])
  halves = [next(text.window_batches(tokens, start_step=5, shard=p, num_shards=2,
                                     **kw)) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), batches[5])
  other_seed = next(text.window_batches(tokens, seq_len=10, batch_size=8, seed=2))
  assert not np.array_equal(other_seed, batches[0])


@pytest.mark.parametrize("n, batch_size", [(7, 3), (5, 12), (99, 8)])
def test_every_epoch_is_a_permutation_and_a_process_computes_only_its_rows(n, batch_size):
  o = order.WindowOrder(n, batch_size, seed=3)
  seen = np.concatenate([o.rows(k, 0, batch_size) for k in range(3 * n // batch_size + 2)])
  epochs = seen[:len(seen) // n * n].reshape(-1, n)
  assert all(sorted(e) == list(range(n)) for e in epochs)  # across batch boundaries too
  assert len({tuple(e) for e in epochs}) > 1  # reshuffled every epoch
  np.testing.assert_array_equal(o.rows(2, 1, batch_size),  # rows 1.. of batch 2
                                seen[2 * batch_size + 1:3 * batch_size])
  in_order = order.WindowOrder(n, batch_size, seed=3, shuffle=False)
  assert in_order.rows(2, 0, batch_size).tolist() == [(2 * batch_size + i) % n
                                                      for i in range(batch_size)]


def test_seq_len_longer_than_the_split_is_an_error():
  with pytest.raises(UserError, match="config.seq_len=64 leaves no window in the validation split"):
    text.window_batches(np.arange(50), seq_len=64, batch_size=4, seed=0, split="validation")


def test_tfds_tiny_shakespeare_prepares_offline_and_matches_files(tfds_dir):
  c = text.load_corpus("tfds:tiny_shakespeare", tfds_data_dir=str(tfds_dir))  # prepared: reads
  f = text.load_corpus(f"files:{SHAKESPEARE}")
  assert (c.train, c.validation, c.test) == (f.train, f.validation, f.test)
  assert c.name == "tfds:tiny_shakespeare"


def test_tfds_mock_data_gives_str_and_is_accepted():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
    c = text.load_corpus("tfds:tiny_shakespeare", tfds_data_dir="/nonexistent/tfds")
  assert isinstance(c.train, bytes) and len(c.train) > 0 and b"\n" in c.train
  assert text.make_tokenizer("char", c).decode(text.make_tokenizer("char", c).encode(c.train)) \
      == c.train.decode()


def test_tfds_bad_inputs(tmp_path, tfds_dir):
  with pytest.raises(UserError, match="TFDS has no dataset 'no_such_dataset'"):
    text.load_corpus("tfds:no_such_dataset", tfds_data_dir=str(tmp_path))
  for name, why in (("tiny shakespeare", "Parsing builder name"), ("", "Parsing builder name"),
                    ("tiny_shakespeare/nope", "BuilderConfig nope not found"),
                    ("tiny_shakespeare:9.9.9", "cannot be loaded at version 9.9.9")):
    with pytest.raises(UserError, match=f"'tfds:{name}': .*{why}.*expected NAME, NAME/CONFIG"):
      text.load_corpus(f"tfds:{name}", tfds_data_dir=str(tmp_path))
  with pytest.raises(UserError, match="tfds_manual_dir='/nonexistent/dir' is not a directory"):
    text.load_corpus("tfds:tiny_shakespeare", tfds_data_dir=str(tmp_path),
                     tfds_manual_dir="/nonexistent/dir")
  with pytest.raises(UserError, match="tfds_text_key='body': tiny_shakespeare has features"):
    text.load_corpus("tfds:tiny_shakespeare", tfds_data_dir=str(tfds_dir), tfds_text_key="body")
