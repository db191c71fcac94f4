"""Tokenizers behind one small protocol, all offline.

    tok = get_tokenizer("bpe4k")
    ids = tok.encode("To be, or not to be")   # list[int], no special tokens added
    tok.decode(ids)                           # the text again
    tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id

    name     vocab_size  pad    bos    eos    what
    "byte"   259         256    257    258    UTF-8 bytes 0..255
    "bpe4k"  4096        0      1      2      byte-level BPE (HF tokenizers) trained on the
                                              Shakespeare train split:
                                              jaxsun/data/files/tokenizers/bpe4k_shakespeare.json
    "gpt2"   50259       50257  50258  50256  GPT-2's BPE (tiktoken r50k_base, from the
                                              openai-whisper sdist):
                                              jaxsun/data/files/tokenizers/gpt2.tiktoken.gz

The three special ids are distinct and inside the vocabulary. GPT-2 itself has only
`<|endoftext|>` (50256), used here as eos; pad (50257) and bos (50258) are two ids added
past GPT-2's 50257, so a model using this tokenizer needs an embedding of 50259 rows.

`encode` never produces special ids, even when the text spells one out ("<|eos|>" in
raw text is encoded as ordinary bytes); the pipelines add bos/eos/pad themselves.
`decode` drops special ids and replaces invalid UTF-8 with U+FFFD instead of raising.
Nothing here touches a network hub.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import os
import pathlib
from typing import Iterable, Protocol, runtime_checkable

from jaxsun.data import paths

TOKENIZERS = ("byte", "bpe4k", "gpt2")
BPE4K_FILE = "tokenizers/bpe4k_shakespeare.json"
GPT2_FILE = "tokenizers/gpt2.tiktoken.gz"
# sha256 of the uncompressed gpt2.tiktoken (= tiktoken's r50k_base file).
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PAT = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
BPE_SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")  # ids 0, 1, 2 of the BPE vocabulary


@runtime_checkable
class Tokenizer(Protocol):
  """What the pipelines need from a tokenizer."""

  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Iterable[int]) -> str:
    ...


def _ids(ids: Iterable[int], vocab_size: int, special: frozenset[int]) -> list[int]:
  """Plain ints without the special ids; out-of-vocabulary ids are an error."""
  out = []
  for i in ids:
    i = int(i)
    if not 0 <= i < vocab_size:
      raise ValueError(f"decode got token id {i} outside [0, {vocab_size})")
    if i not in special:
      out.append(i)
  return out


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; pad, bos, eos are 256, 257, 258."""

  name = "byte"
  vocab_size = 259
  pad_id, bos_id, eos_id = 256, 257, 258

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Iterable[int]) -> str:
    special = frozenset((self.pad_id, self.bos_id, self.eos_id))
    return bytes(_ids(ids, self.vocab_size, special)).decode("utf-8", errors="replace")


class HFTokenizer:
  """A `tokenizers.Tokenizer` JSON file whose vocabulary holds pad/bos/eos tokens."""

  def __init__(self, path: os.PathLike | str, *, name: str = "hf",
               specials: tuple[str, str, str] = BPE_SPECIALS):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: from_file is local
    import tokenizers  # pylint: disable=import-outside-toplevel
    self.name = name
    self._tok = tokenizers.Tokenizer.from_file(str(path))
    self._tok.encode_special_tokens = True  # "<|eos|>" in raw text is just text
    ids = [self._tok.token_to_id(s) for s in specials]
    if any(i is None for i in ids):
      raise ValueError(f"tokenizer file {path} lacks a special token of {specials}")
    self.pad_id, self.bos_id, self.eos_id = ids
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self._special = frozenset(ids)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode(_ids(ids, self.vocab_size, self._special),
                            skip_special_tokens=False)


def load_tiktoken_ranks(data: bytes) -> dict[bytes, int]:
  """Parses a `.tiktoken` file: one `base64(token) rank` pair per line."""
  ranks = {}
  for line in data.splitlines():
    if line:
      token, rank = line.split()
      ranks[base64.b64decode(token)] = int(rank)
  return ranks


class TiktokenGPT2:
  """GPT-2's byte-level BPE through tiktoken, built from the committed rank file."""

  name = "gpt2"
  eos_id = 50256  # <|endoftext|>
  pad_id = 50257
  bos_id = 50258
  vocab_size = 50259

  def __init__(self, path: os.PathLike | str | None = None):
    import tiktoken  # pylint: disable=import-outside-toplevel
    path = path or paths.data_file(GPT2_FILE, rebuild="--only tokenizers")
    with gzip.open(path, "rb") as f:
      data = f.read()
    if hashlib.sha256(data).hexdigest() != GPT2_SHA256:
      raise ValueError(f"tokenizer file {path} does not hold GPT-2's r50k_base ranks "
                       f"(sha256 mismatch); rebuild it with: "
                       f"{paths.rebuild_command('--only tokenizers')}")
    self._enc = tiktoken.Encoding(name="gpt2_jaxsun", pat_str=GPT2_PAT,
                                  mergeable_ranks=load_tiktoken_ranks(data),
                                  special_tokens={"<|endoftext|>": self.eos_id})
    self._special = frozenset((self.pad_id, self.bos_id, self.eos_id))

  def encode(self, text: str) -> list[int]:
    return self._enc.encode_ordinary(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self._enc.decode(_ids(ids, self.vocab_size, self._special), errors="replace")


@functools.cache
def _cached(name: str, root: str) -> Tokenizer:
  del root  # cache key only
  if name == "byte":
    return ByteTokenizer()
  if name == "bpe4k":
    path = paths.data_file(BPE4K_FILE, rebuild="--only tokenizers")
    return HFTokenizer(path, name="bpe4k")
  return TiktokenGPT2()


# (pad, bos, eos) of model families whose tokenizer.json a user may bring.
FILE_SPECIALS = (
    BPE_SPECIALS,
    ("<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|end_of_text|>"),  # Llama 3.x
    ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),  # Qwen 2.x
)
FILE_PREFIX = "file:"


def _from_file(path: str) -> Tokenizer:
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(f"tokenizer file {path!r} (from tokenizer='{FILE_PREFIX}{path}') "
                            "does not exist; give the path of a Hugging Face tokenizer.json")
  for specials in FILE_SPECIALS:
    try:
      return HFTokenizer(path, name=FILE_PREFIX + path, specials=specials)
    except ValueError:
      continue
  raise ValueError(f"tokenizer file {path} has none of the special-token sets "
                   f"{FILE_SPECIALS} (pad, bos, eos)")


def get_tokenizer(name: str) -> Tokenizer:
  """A tokenizer by name: "byte", "bpe4k" or "gpt2" (loaded once, then cached), or
  "file:<path>" for a Hugging Face `tokenizer.json` of the user's (Llama 3, Qwen 2 or a
  file with jaxsun's specials)."""
  if isinstance(name, str) and name.startswith(FILE_PREFIX):
    return _from_file(name[len(FILE_PREFIX):])
  if name not in TOKENIZERS:
    raise ValueError(f"unknown tokenizer {name!r}; available: {list(TOKENIZERS)} or "
                     f"'{FILE_PREFIX}<path to tokenizer.json>'")
  return _cached(name, str(paths.data_root()))
