"""Where the committed data lives, and readers that fail with the rebuild command.

The data files (corpora, tokenizers, generated tasks, a tiny checkpoint) are committed
under `jaxsun/data/files/` and ship inside the package (package data, found through
`importlib.resources`), so an installed jaxsun reads them from any directory.
`JAXSUN_DATA_ROOT` points elsewhere (tests use it to simulate missing or empty files). Nothing here downloads: only
`scripts/build_data.py` does, and it is the command every error message names.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import lzma
import os
import pathlib
from typing import Any

DATA_ROOT_ENV = "JAXSUN_DATA_ROOT"
REBUILD_COMMAND = "python scripts/build_data.py"


def data_root() -> pathlib.Path:
  """The data directory: `$JAXSUN_DATA_ROOT`, else the package's `jaxsun/data/files`."""
  env = os.environ.get(DATA_ROOT_ENV)
  if env:
    return pathlib.Path(env).expanduser()
  # A regular (unzipped) install: the resource is a directory on disk.
  return pathlib.Path(str(importlib.resources.files("jaxsun.data") / "files"))


def data_file(relative: str, *, rebuild: str = "") -> pathlib.Path:
  """The path of a committed data file, which must exist.

  Args:
    relative: path under the data root, e.g. "tasks/spell_backward.jsonl.gz".
    rebuild: arguments to add to the rebuild command in the error message.

  Raises:
    FileNotFoundError: naming the file and the command that rebuilds it.
  """
  path = data_root() / relative
  if not path.is_file():
    raise FileNotFoundError(f"data file {path} is missing; rebuild it with: "
                            f"{rebuild_command(rebuild)}")
  return path


def rebuild_command(args: str = "") -> str:
  return f"{REBUILD_COMMAND} {args}".strip()


def open_text(path: pathlib.Path):
  """Opens a `.gz`, `.xz` or plain file for reading UTF-8 text."""
  if path.suffix == ".gz":
    return gzip.open(path, "rt", encoding="utf-8")
  if path.suffix == ".xz":
    return lzma.open(path, "rt", encoding="utf-8")
  return open(path, encoding="utf-8")


def read_jsonl(relative: str, *, rebuild: str = "") -> list[dict[str, Any]]:
  """All records of a committed JSON-lines file (optionally compressed).

  Raises:
    FileNotFoundError: the file is missing.
    ValueError: the file is empty or a line is not a JSON object; names the file.
  """
  path = data_file(relative, rebuild=rebuild)
  records = []
  try:
    with open_text(path) as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        record = json.loads(line)
        if not isinstance(record, dict):
          raise ValueError(f"line {lineno} is not a JSON object")
        records.append(record)
  except (OSError, EOFError, lzma.LZMAError, ValueError) as e:  # bad compression or JSON
    raise ValueError(f"data file {path} is corrupt ({e}); rebuild it with: "
                     f"{rebuild_command(rebuild)}") from e
  if not records:
    raise ValueError(f"data file {path} is empty; rebuild it with: "
                     f"{rebuild_command(rebuild)}")
  return records
