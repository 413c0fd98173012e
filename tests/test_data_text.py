"""Text corpora and tokenizers: splits, round trips, UTF-8 rules, bad sources."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from gru_tpu.data import text
from gru_tpu.errors import UserError

SHAKESPEARE = Path(__file__).parents[2] / "shared" / "data" / "tiny_shakespeare" / "input.txt"


def test_tiny_shakespeare_split_matches_tfds():
  assert hashlib.sha256(SHAKESPEARE.read_bytes()).hexdigest().startswith("86c4e6aa9db7c042")
  c = text.load_corpus(f"files:{SHAKESPEARE}")
  # TFDS tiny_shakespeare: 1003854 / 55770 / 55770 characters (the file is ASCII).
  assert (len(c.train), len(c.validation), len(c.test)) == (1003854, 55770, 55770)
  assert c.train + c.validation + c.test == SHAKESPEARE.read_bytes()


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


@pytest.mark.parametrize("source,message", [
    ("files:/nonexistent/*.txt", "the glob matches no files"),
    ("ftp:thing", "expected 'pystdlib' or 'files:GLOB'"),
])
def test_bad_sources(source, message):
  with pytest.raises(UserError, match=message):
    text.load_corpus(source)


def test_empty_corpus(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(UserError, match="the corpus is empty"):
    text.load_corpus(f"files:{tmp_path}/*.txt")
