"""Committed text corpora, their chunking, and the deterministic train/validation split.

A corpus is `jaxsun/data/files/corpora/<name>.jsonl.xz`: one JSON record `{"id", "title", "text"}`
per work, written by `scripts/build_data.py`. Works are cut into chunks of whole lines,
about `CHUNK_CHARS` characters, ending at a paragraph break where possible; every
`VALIDATION_EVERY`-th chunk (counting over the whole corpus in file order) is in the
validation split, the rest in train. The BPE tokenizer is trained on the train chunks
only, so the validation chunks are held out from it too.
"""

from __future__ import annotations

import dataclasses

from jaxsun.data import paths

CORPORA = ("shakespeare",)
SPLITS = ("train", "validation")
CHUNK_CHARS = 2048      # a chunk closes at the first paragraph break past this size
MAX_CHUNK_CHARS = 4096  # ... or at the first line end past this one
VALIDATION_EVERY = 20


@dataclasses.dataclass(frozen=True)
class Document:
  """One work of a corpus."""

  id: str
  title: str
  text: str


def check_corpus(name: str) -> None:
  if name not in CORPORA:
    raise ValueError(f"unknown corpus {name!r}; available: {list(CORPORA)}")


def corpus_path(name: str) -> str:
  """The corpus file, relative to the data root."""
  return f"corpora/{name}.jsonl.xz"


def load_corpus(name: str, max_documents: int | None = None) -> list[Document]:
  """The works of a committed corpus, in file order.

  Args:
    name: one of `CORPORA`.
    max_documents: keep only the first this many works (small test datasets).

  Raises:
    ValueError: unknown corpus, or an empty/corrupt file.
    FileNotFoundError: the file is missing (the message has the rebuild command).
  """
  check_corpus(name)
  path = corpus_path(name)
  records = paths.read_jsonl(path, rebuild=f"--only corpora --corpora {name}")
  if max_documents is not None:
    records = records[:max_documents]
  docs = []
  for r in records:
    if not isinstance(r.get("text"), str) or not r["text"]:
      raise ValueError(f"data file {paths.data_root() / path} has a record without "
                       f"text (id {r.get('id')!r}); rebuild it with: "
                       f"{paths.rebuild_command('--only corpora')}")
    docs.append(Document(id=str(r.get("id", "")), title=str(r.get("title", "")),
                         text=r["text"]))
  return docs


def chunk_text(text: str, chunk_chars: int = CHUNK_CHARS,
               max_chunk_chars: int = MAX_CHUNK_CHARS) -> list[str]:
  """Cuts text into chunks whose concatenation is exactly `text`.

  A chunk grows line by line; it closes at the first blank line once it holds at least
  `chunk_chars` characters, or at the first line end past `max_chunk_chars`. A line
  longer than `max_chunk_chars` is added in pieces of that size, as if they were lines.
  So every chunk but the last holds at least `chunk_chars` characters and fewer than
  `2 * max_chunk_chars`.
  """
  if not 0 < chunk_chars <= max_chunk_chars:
    raise ValueError(f"need 0 < chunk_chars={chunk_chars} <= "
                     f"max_chunk_chars={max_chunk_chars}")
  chunks, current, size = [], [], 0
  for line in text.splitlines(keepends=True):
    # A giant line goes in pieces of max_chunk_chars, each treated as a line.
    for start in range(0, len(line), max_chunk_chars):
      piece = line[start:start + max_chunk_chars]
      current.append(piece)
      size += len(piece)
      if (size >= chunk_chars and not piece.strip()) or size >= max_chunk_chars:
        chunks.append("".join(current))
        current, size = [], 0
  if current:
    chunks.append("".join(current))
  return chunks


def is_validation_chunk(index: int) -> bool:
  """Whether the corpus-wide chunk number `index` belongs to the validation split."""
  return index % VALIDATION_EVERY == VALIDATION_EVERY - 1


def split_chunks(docs: list[Document], split: str) -> list[str]:
  """The chunks of `docs` in one split, in corpus order."""
  if split not in SPLITS:
    raise ValueError(f"unknown corpus split {split!r}; available: {list(SPLITS)}")
  want_validation = split == "validation"
  out, index = [], 0
  for doc in docs:
    for chunk in chunk_text(doc.text):
      if is_validation_chunk(index) == want_validation:
        out.append(chunk)
      index += 1
  return out


def corpus_chunks(name: str, split: str, max_documents: int | None = None) -> list[str]:
  """The chunks of a committed corpus in one split ("train" or "validation")."""
  return split_chunks(load_corpus(name, max_documents), split)
