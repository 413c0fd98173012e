"""Text corpora and tokenizers for character/byte language modelling.

Sources (config.data.source):
  pystdlib     the running interpreter's standard-library .py files: sorted, split by file
               (of every 20 files, 18 train, 1 validation, 1 test); files that are not UTF-8
               (a handful of encoding tests) are left out. Offline everywhere.
  files:GLOB   local text files, sorted and concatenated, split 90/5/5 in order like TFDS's
               tiny_shakespeare (train first, then validation, then test).
  tfds:NAME    a TFDS text dataset (its `data.tfds_text_key` feature, examples of a split joined
               by newlines) read with tfds.data_source: ArrayRecord, no TensorFlow at read time.
               Prepared on first use into data.tfds_data_dir; data.tfds_manual_dir holding the
               original files (tiny_shakespeare's input.txt) prepares it offline. Preparing runs
               the dataset's TFDS builder, which for tiny_shakespeare needs TensorFlow: the
               `[tfds]` extra.
Corpora are bytes; the char tokenizer decodes them as UTF-8 (an error if they are not), the byte
tokenizer takes them as they are.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import sysconfig
from collections.abc import Callable
from pathlib import Path

import numpy as np
from etils import epath

from gru_tpu.data import order
from gru_tpu.errors import UserError

UNK = "<unk>"


@dataclasses.dataclass(frozen=True)
class Corpus:
  name: str
  train: bytes
  validation: bytes
  test: bytes

  def split(self, name: str) -> bytes:
    return {"train": self.train, "validation": self.validation, "eval": self.validation,
            "test": self.test}[name]


def split_90_5_5(name: str, data: bytes) -> Corpus:
  """TFDS tiny_shakespeare's split: the first 90 % train, the rest halved into validation, test.

  A cut that lands inside a UTF-8 character moves to its end (ASCII text splits as TFDS's)."""
  n_train = _char_end(data, int(0.9 * len(data)))
  n_val = _char_end(data, n_train + (len(data) - n_train) // 2) - n_train
  return Corpus(name, data[:n_train], data[n_train:n_train + n_val], data[n_train + n_val:])


def _char_end(data: bytes, i: int) -> int:
  """i moved past UTF-8 continuation bytes (0b10xxxxxx), so no character is split in two."""
  while i < len(data) and data[i] & 0xC0 == 0x80:
    i += 1
  return i


def _pystdlib() -> Corpus:
  root = Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in root.rglob("*.py")
                 if "site-packages" not in p.parts and "dist-packages" not in p.parts)
  parts: dict[str, list[bytes]] = {"train": [], "validation": [], "test": []}
  for i, path in enumerate(files):
    data = path.read_bytes()
    try:
      data.decode("utf-8")
    except UnicodeDecodeError:
      continue
    split = "validation" if i % 20 == 18 else "test" if i % 20 == 19 else "train"
    parts[split].append(data)
  return Corpus("pystdlib", *(b"\n".join(parts[s]) for s in ("train", "validation", "test")))


def data_config(source: str = "pystdlib", tokenizer: str = "char"):
  """The `config.data` keys of text tasks (documented in the README)."""
  import ml_collections

  return ml_collections.ConfigDict(dict(
      source=source, tokenizer=tokenizer, tfds_data_dir="", tfds_manual_dir="",
      tfds_text_key="text", sample_prompt="\n", sample_length=200))


def _tfds(name: str, data_dir: str, manual_dir: str, text_key: str) -> Corpus:
  import tensorflow_datasets as tfds

  source = f"config.data.source='tfds:{name}'"
  try:
    builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"{source}: TFDS has no dataset {name!r}; see "
                    f"https://www.tensorflow.org/datasets/catalog") from None
  except (ValueError, AssertionError) as e:  # a malformed name; a config or version it lacks
    raise UserError(f"{source}: {str(e).splitlines()[0] if str(e) else 'not a TFDS name'} "
                    f"(expected NAME, NAME/CONFIG or NAME:VERSION)") from None
  if not builder.is_prepared():
    if manual_dir and not Path(manual_dir).is_dir():
      raise UserError(f"config.data.tfds_manual_dir={manual_dir!r} is not a directory; point it "
                      f"at the folder holding the dataset's original files")
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir or None))
    except ImportError as e:
      raise UserError(f"{source}: preparing it needs {e.name or 'a missing package'}: "
                      f"pip install -e '.[tfds]' (or prepare it elsewhere and set "
                      f"config.data.tfds_data_dir)") from None
    except Exception as e:  # noqa: BLE001 - network/checksum errors of TFDS, reported as one line
      raise UserError(f"{source}: could not prepare it in {builder.data_dir} ({type(e).__name__}:"
                      f" {str(e).splitlines()[0] if str(e) else ''}); offline, set config.data."
                      f"tfds_manual_dir to a folder with the original files") from None
  if builder.info.features and text_key not in builder.info.features:
    raise UserError(f"config.data.tfds_text_key={text_key!r}: {name} has features "
                    f"{sorted(builder.info.features)}")
  splits = {}
  for split in ("train", "validation", "test"):
    try:
      examples = builder.as_data_source(split=split)
    except (ValueError, KeyError):
      raise UserError(f"{source} has no {split!r} split (it has "
                      f"{sorted(builder.info.splits)}); text tasks need train, validation "
                      f"and test") from None
    # Real ArrayRecord data gives bytes; tfds.testing.mock_data gives str.
    splits[split] = b"\n".join(
        t.encode("utf-8") if isinstance(t, str) else bytes(t)
        for t in (examples[i][text_key] for i in range(len(examples))))
  return Corpus(f"tfds:{name}", splits["train"], splits["validation"], splits["test"])


def _glob_files(source: str, pattern: str) -> list:
  """The files a local glob (`**` recursive) or a gs:// one matches, sorted by name."""
  if "://" not in pattern:
    return [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]
  if "**" in pattern:  # a recursive listing of a bucket is one request per object
    raise UserError(f"config.data.source={source!r}: a gs:// glob takes * and ? within one "
                    f"directory level, not **; list the directories")
  first = min((i for i, c in enumerate(pattern) if c in "*?["), default=len(pattern))
  cut = pattern.rfind("/", 0, first)
  return sorted((p for p in epath.Path(pattern[:cut]).glob(pattern[cut + 1:]) if p.is_file()),
                key=str)


def load_corpus(source: str, *, tfds_data_dir: str = "", tfds_manual_dir: str = "",
                tfds_text_key: str = "text") -> Corpus:
  """`pystdlib`, `files:GLOB` or `tfds:NAME`; UserError for an unknown source or an empty one."""
  if source == "pystdlib":
    corpus = _pystdlib()
  elif source.startswith("files:"):
    try:
      paths = _glob_files(source, source[len("files:"):])
      if not paths:
        raise UserError(f"config.data.source={source!r}: the glob matches no files; check the "
                        f"path (relative paths are from the current directory)")
      data = b"".join(p.read_bytes() for p in paths)
    except OSError as e:  # a missing bucket, no permission: train's OSError line spoke of disks
      raise UserError(f"config.data.source={source!r}: cannot read it ({type(e).__name__}: "
                      f"{' '.join(str(e).split()) or e.strerror}); check the path, and for gs:// "
                      f"the bucket and its read permission") from None
    corpus = split_90_5_5(source, data)
  elif source.startswith("tfds:"):
    corpus = _tfds(source[len("tfds:"):], tfds_data_dir, tfds_manual_dir, tfds_text_key)
  else:
    raise UserError(f"config.data.source={source!r}: expected 'pystdlib', 'files:GLOB' or "
                    f"'tfds:NAME'")
  if not corpus.train:
    raise UserError(f"config.data.source={source!r}: the corpus is empty")
  return corpus


class ByteTokenizer:
  """UTF-8 bytes, a fixed vocabulary of 256; any byte string is valid."""

  kind = "byte"
  vocab_size = 256

  def encode(self, data: bytes | str, source: str = "the text") -> np.ndarray:
    del source  # every byte string is valid: nothing to name in an error
    if isinstance(data, str):
      data = data.encode("utf-8")
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")

  def stream_decoder(self) -> Callable[..., str]:
    """decode for consecutive pieces of one text: a character whose bytes span two pieces
    comes out whole, not as two replacement characters (final=True flushes)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return lambda ids, final=False: decoder.decode(bytes(np.asarray(ids, np.uint8).tolist()),
                                                   final)

  def to_json(self) -> dict:
    return {"kind": "byte"}


class CharTokenizer:
  """Characters seen in the training split; id 0 is <unk> for anything else."""

  kind = "char"

  def __init__(self, chars: list[str]):
    self.chars = [UNK] + sorted(chars)
    self.index = {c: i for i, c in enumerate(self.chars)}
    self.index.pop(UNK)
    self.vocab_size = len(self.chars)

  @classmethod
  def fit(cls, train: bytes, source: str = "the corpus") -> CharTokenizer:
    return cls(sorted(set(_utf8(train, source))))

  def encode(self, data: bytes | str, source: str = "the text") -> np.ndarray:
    text = _utf8(data, source) if isinstance(data, bytes) else data
    # Vectorised lookup: code points against the sorted vocabulary (chars[1:] is sorted).
    points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    vocab = np.frombuffer("".join(self.chars[1:]).encode("utf-32-le"), np.uint32)
    at = np.searchsorted(vocab, points).clip(0, max(len(vocab) - 1, 0))
    found = vocab[at] == points if len(vocab) else np.zeros(len(points), bool)
    return np.where(found, at + 1, 0).astype(np.int32)

  def decode(self, ids) -> str:
    return "".join(self.chars[i] if i else "\ufffd" for i in np.asarray(ids).tolist())

  def stream_decoder(self) -> Callable[..., str]:
    return lambda ids, final=False: self.decode(ids)  # one token, one character

  def to_json(self) -> dict:
    return {"kind": "char", "chars": self.chars[1:]}


def _utf8(data: bytes, source: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{source} is not valid UTF-8 (byte {e.start}): use config.data.tokenizer="
                    f"'byte', or re-encode the text as UTF-8") from None


def make_tokenizer(kind: str, corpus: Corpus) -> ByteTokenizer | CharTokenizer:
  if kind == "byte":
    return ByteTokenizer()
  if kind == "char":
    return CharTokenizer.fit(corpus.train, f"config.data.source={corpus.name!r}")
  raise UserError(f"config.data.tokenizer={kind!r}: expected 'char' or 'byte'")


def tokenizer_from_json(meta: dict) -> ByteTokenizer | CharTokenizer:
  return ByteTokenizer() if meta["kind"] == "byte" else CharTokenizer(meta["chars"])


def no_window_message(seq_len: int, n_tokens: int, where: str) -> str:
  """A window is seq_len + 1 tokens (inputs and next-token targets): where has none."""
  fix = (f"lower config.seq_len to {n_tokens - 1} or less, or use more text" if n_tokens > 1
         else "use more text")
  return (f"config.seq_len={seq_len} leaves no window in {where} ({n_tokens} tokens; a window "
          f"is seq_len + 1 tokens): {fix}")


def window_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                   start_step: int = 0, shard: int = 0, num_shards: int = 1,
                   shuffle: bool = True, split: str = "train"):
  """Rows [shard·B/num_shards, (shard+1)·B/num_shards) of global batch start_step,
  start_step + 1, ... (endless); the engine passes this process's shard.

  Windows of seq_len + 1 tokens start every seq_len tokens; their order is shuffled with the
  seed, anew each epoch (`order.WindowOrder`). Batch k is a pure function of (seed, k), so
  resuming at a step needs only the step, and every process builds exactly its own rows.
  """
  n_windows = (len(tokens) - 1) // seq_len
  if n_windows < 1:
    raise UserError(no_window_message(seq_len, len(tokens), f"the {split} split"))
  offsets = np.arange(seq_len + 1)
  return order.endless(lambda idx_R: tokens[idx_R[:, None] * seq_len + offsets],
                       order.WindowOrder(n_windows, batch_size, seed, shuffle), start_step,
                       shard, num_shards)
