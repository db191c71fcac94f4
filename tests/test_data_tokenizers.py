"""Tokenizers: round trips, special ids, GPT-2's published ids, BPE size and compression."""

import gzip

import numpy as np
import pytest

from jaxsun.data import corpora
from jaxsun.data import paths
from jaxsun.data import tokenizers as toks


def fresh_rng():
  seed = int(np.random.SeedSequence().entropy % 2**32)
  return np.random.default_rng(seed), seed


def random_unicode(rng, n: int) -> str:
  """ASCII, Latin, CJK, emoji and rare planes mixed; no surrogates."""
  ranges = [(0x20, 0x7F), (0x0A, 0x0B), (0xA0, 0x2FF), (0x4E00, 0x9FFF),
            (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)]
  picks = rng.integers(0, len(ranges), n)
  return "".join(chr(int(rng.integers(*ranges[p]))) for p in picks)


def test_byte_round_trip_on_random_unicode():
  tok = toks.ByteTokenizer()
  rng, seed = fresh_rng()
  for _ in range(20):
    text = random_unicode(rng, int(rng.integers(0, 200)))
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")), seed
    assert tok.decode(ids) == text, seed
    assert tok.decode(np.asarray(ids, np.int32)) == text, seed


def test_byte_decode_drops_specials_and_replaces_invalid_utf8():
  tok = toks.ByteTokenizer()
  assert tok.decode([tok.bos_id, 72, 105, tok.eos_id, tok.pad_id]) == "Hi"
  assert tok.decode([0xFF, 0x41, 0xE2, 0x82]) == "\ufffdA\ufffd"
  with pytest.raises(ValueError, match="token id 259 outside"):
    tok.decode([259])


@pytest.mark.parametrize("name", toks.TOKENIZERS)
def test_special_ids_distinct_and_inside_the_vocabulary(name):
  pytest.importorskip({"byte": "numpy", "bpe4k": "tokenizers", "gpt2": "tiktoken"}[name])
  tok = toks.get_tokenizer(name)
  assert isinstance(tok, toks.Tokenizer)
  specials = {tok.pad_id, tok.bos_id, tok.eos_id}
  assert len(specials) == 3
  assert all(0 <= i < tok.vocab_size for i in specials)
  # Raw text that spells out a special token is encoded as text, never as the id.
  for text in ("<|pad|><|bos|><|eos|>", "<|endoftext|>", "abc"):
    ids = tok.encode(text)
    assert not specials & set(ids)
    assert tok.decode(ids) == text
  assert toks.get_tokenizer(name) is tok  # cached


def test_unknown_tokenizer_lists_the_names():
  with pytest.raises(ValueError, match=r"unknown tokenizer 'bpe'; available: \['byte', "
                                       r"'bpe4k', 'gpt2'\]"):
    toks.get_tokenizer("bpe")


def test_bpe_vocabulary_and_round_trip():
  pytest.importorskip("tokenizers")
  tok = toks.get_tokenizer("bpe4k")
  assert tok.vocab_size == 4096
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  rng, seed = fresh_rng()
  chunks = corpora.corpus_chunks("shakespeare", "validation")
  for i in rng.choice(len(chunks), 10, replace=False):
    ids = tok.encode(chunks[i])
    assert all(0 <= t < tok.vocab_size for t in ids)
    assert tok.decode(ids) == chunks[i], (seed, i)
  for _ in range(10):  # byte-level: any text survives
    text = random_unicode(rng, 100)
    assert tok.decode(tok.encode(text)) == text, seed


def test_bpe_compresses_held_out_text():
  pytest.importorskip("tokenizers")
  tok = toks.get_tokenizer("bpe4k")
  text = "".join(corpora.corpus_chunks("shakespeare", "validation"))
  ratio = len(text) / len(tok.encode(text))
  assert ratio > 2.5, ratio
  assert ratio > 1.5 * len(text.encode()) / len(toks.ByteTokenizer().encode(text))


def test_gpt2_published_ids():
  pytest.importorskip("tiktoken")
  tok = toks.get_tokenizer("gpt2")
  assert tok.encode("Hello world") == [15496, 995]
  assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
  assert tok.encode("The quick brown fox") == [464, 2068, 7586, 21831]
  assert tok.encode(" Hello") == [18435]
  assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.vocab_size) == (50256, 50257, 50258, 50259)
  assert tok.decode([15496, tok.eos_id, 995, tok.pad_id, tok.bos_id]) == "Hello world"


def test_gpt2_round_trip_and_invalid_utf8():
  pytest.importorskip("tiktoken")
  tok = toks.get_tokenizer("gpt2")
  rng, seed = fresh_rng()
  for _ in range(10):
    text = random_unicode(rng, 100)
    assert tok.decode(tok.encode(text)) == text, seed
  with gzip.open(paths.data_file(toks.GPT2_FILE), "rb") as f:
    ranks = toks.load_tiktoken_ranks(f.read())
  assert len(ranks) == 50256
  lone = ranks["€".encode()[:1]]  # the first byte of a 3-byte character, alone
  assert tok.decode([lone, ranks[b"A"]]) == "\ufffdA"


def test_missing_tokenizer_file_names_the_file_and_command(tmp_path, monkeypatch):
  monkeypatch.setenv(paths.DATA_ROOT_ENV, str(tmp_path))
  for name in ("bpe4k", "gpt2"):
    with pytest.raises(FileNotFoundError) as e:
      toks.get_tokenizer(name)
    assert str(tmp_path) in str(e.value)
    assert "python scripts/build_data.py --only tokenizers" in str(e.value)


def test_corrupt_gpt2_file_is_refused(tmp_path, monkeypatch):
  pytest.importorskip("tiktoken")
  (tmp_path / "tokenizers").mkdir()
  with gzip.open(tmp_path / toks.GPT2_FILE, "wb") as f:
    f.write(b"IQ== 0\n")
  monkeypatch.setenv(paths.DATA_ROOT_ENV, str(tmp_path))
  with pytest.raises(ValueError, match="sha256 mismatch"):
    toks.get_tokenizer("gpt2")
