"""Reading and writing Hugging Face safetensors checkpoint directories.

A checkpoint directory holds `config.json` and either one `model.safetensors` or shards
listed by `model.safetensors.index.json` (`{"weight_map": {tensor name: file name}}`).

* `CheckpointReader` opens the files lazily: `read(name, index)` returns only the slice a
  device needs, so a sharded load never materialises a full copy of a tensor per device.
* `write_checkpoint` writes into a temporary sibling directory and renames it into place
  when every file is complete, so an interrupted or failed export leaves the previous
  checkpoint (or nothing) behind, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.numpy import save_file

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint directory is missing, incomplete, corrupt or of an unsupported kind."""


def read_config(directory: str) -> dict:
  """The parsed `config.json` of a checkpoint directory."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory!r} does not exist")
  if not os.path.exists(path):
    raise CheckpointError(f"{path} is missing: a Hugging Face checkpoint directory needs "
                          "config.json beside its *.safetensors files")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def weight_map(directory: str) -> dict[str, str]:
  """{tensor name: file name} for a single-file or sharded checkpoint."""
  index = os.path.join(directory, INDEX_FILE)
  single = os.path.join(directory, SINGLE_FILE)
  if os.path.exists(index):
    try:
      with open(index) as f:
        mapping = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index} is not a safetensors index (needs a 'weight_map' "
                            f"object): {e!r}") from None
    missing = sorted({f for f in mapping.values()
                      if not os.path.exists(os.path.join(directory, f))})
    if missing:
      raise CheckpointError(f"{index} names shard(s) that are missing from {directory}: "
                            f"{missing}")
    return dict(mapping)
  if os.path.exists(single):
    with _open(single) as f:
      return {name: SINGLE_FILE for name in f.keys()}
  raise CheckpointError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")


@contextlib.contextmanager
def _open(path: str):
  try:
    with safe_open(path, framework="numpy") as f:
      yield f
  except SafetensorError as e:
    raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or "
                          f"truncated?): {e}") from None


class CheckpointReader:
  """Lazy, sliced access to the tensors of a checkpoint directory.

  Use as a context manager; files are opened on first use and closed on exit.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self.weight_map = weight_map(directory)
    self._stack = contextlib.ExitStack()
    self._files: dict[str, object] = {}

  def __enter__(self) -> CheckpointReader:
    return self

  def __exit__(self, *exc) -> None:
    self._stack.close()
    self._files.clear()

  def _file(self, name: str):
    if name not in self.weight_map:
      raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in "
                            f"{self.directory}")
    fname = self.weight_map[name]
    if fname not in self._files:
      self._files[fname] = self._stack.enter_context(
          _open(os.path.join(self.directory, fname)))
    return self._files[fname]

  def names(self) -> list[str]:
    return sorted(self.weight_map)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._file(name).get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    """The safetensors dtype tag, e.g. "BF16", "F32"."""
    return self._file(name).get_slice(name).get_dtype()

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The tensor (or the slice `index` of it) as a numpy array in its stored dtype."""
    f = self._file(name)
    try:
      if index is None:
        return f.get_tensor(name)
      return f.get_slice(name)[index]
    except SafetensorError as e:
      raise CheckpointError(f"reading {name!r} from {self.weight_map[name]} in "
                            f"{self.directory} failed (corrupt or truncated file?): "
                            f"{e}") from None


def _shards(tensors: Mapping[str, np.ndarray], max_shard_bytes: int | None
            ) -> list[list[str]]:
  names = list(tensors)
  if max_shard_bytes is None:
    return [names]
  groups, current, size = [], [], 0
  for name in names:
    nbytes = tensors[name].nbytes
    if current and size + nbytes > max_shard_bytes:
      groups.append(current)
      current, size = [], 0
    current.append(name)
    size += nbytes
  return groups + ([current] if current else [])


@contextlib.contextmanager
def atomic_directory(directory: str, *, overwrite: bool = False):
  """Yields a temporary sibling of `directory` to fill; renames it into place on success.

  On any error the temporary directory is removed and an existing `directory` is left
  as it was; with `overwrite`, it is replaced only once the new one is complete.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
  try:
    yield tmp
    _replace_dir(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_checkpoint(directory: str, config: dict, tensors: Mapping[str, np.ndarray], *,
                     max_shard_bytes: int | None = None, overwrite: bool = False) -> str:
  """Writes config.json + safetensors (sharded past `max_shard_bytes`), atomically.

  Args:
    directory: the checkpoint directory to create.
    config: the `config.json` contents.
    tensors: {name: array}; written in this order.
    max_shard_bytes: split into `model-0000i-of-0000n.safetensors` shards with an index
      when the tensors exceed this many bytes; None: one `model.safetensors`.
    overwrite: replace an existing directory (only once the new one is complete).

  Returns:
    `directory` (absolute).
  """
  with atomic_directory(directory, overwrite=overwrite) as tmp:
    groups = _shards(tensors, max_shard_bytes)
    if len(groups) == 1:
      save_file({n: np.ascontiguousarray(tensors[n]) for n in groups[0]},
                os.path.join(tmp, SINGLE_FILE), metadata={"format": "pt"})
    else:
      mapping = {}
      for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: np.ascontiguousarray(tensors[n]) for n in group},
                  os.path.join(tmp, fname), metadata={"format": "pt"})
        mapping.update({n: fname for n in group})
      total = int(sum(t.nbytes for t in tensors.values()))
      with open(os.path.join(tmp, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": mapping}, f, indent=2)
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
  return os.path.abspath(directory)


def _replace_dir(src: str, dst: str) -> None:
  """Renames `src` to `dst`; an existing `dst` is moved aside first and removed after."""
  if not os.path.exists(dst):
    os.rename(src, dst)
    return
  old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
  os.rmdir(old)
  os.rename(dst, old)
  try:
    os.rename(src, dst)
  except BaseException:
    os.rename(old, dst)  # put the previous checkpoint back
    raise
  shutil.rmtree(old, ignore_errors=True)

