"""Prompt/answer tasks from files the user provides (the papers' fine-tuning sets).

    math = LocalTask("metamathqa", "/data/MetaMathQA-40K.json", prompt_fields=("query",),
                     answer_field="response")
    batches = task_batches(math, tok, seq_len=1024, batch_size=8)   # like a named task

The SUN and PrefillShare papers fine-tune on MetaMathQA-40K, EvolInstruct-Code-80K and
xLAM-function-calling-60K. jaxsun never downloads them: `PAPER_TASKS` describes where
their fields are, and a `LocalTask` reads a JSON list or JSON-lines file the user has.
Records are split deterministically by a hash of the prompt (so a record's split never
depends on file order): `test_fraction` to test, `validation_fraction` to validation,
the rest to train. A missing file is a FileNotFoundError naming the file and the config
key that points at it; a record without a field names the field and the record.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib

from jaxsun.data import tasks as tasks_lib

SPLITS = tasks_lib.SPLITS


@dataclasses.dataclass(frozen=True)
class LocalTask:
  """A prompt/answer task read from a user's JSON or JSON-lines file.

  Attributes:
    name: a label (results and run identities use it).
    path: the file: a JSON list of objects, or one JSON object per line.
    prompt_fields: fields joined with a blank line to make the prompt.
    answer_field: the answer's field (a list or object is JSON-encoded).
    test_fraction, validation_fraction: shares of the records in those splits.
    config_key: the config key that gave `path`, for error messages.
  """

  name: str
  path: str
  prompt_fields: tuple[str, ...] = ("prompt",)
  answer_field: str = "answer"
  test_fraction: float = 0.05
  validation_fraction: float = 0.05
  config_key: str = ""

  def __post_init__(self):
    if not self.prompt_fields:
      raise ValueError(f"LocalTask {self.name!r}: prompt_fields is empty")
    if not (0 < self.test_fraction < 1 and 0 < self.validation_fraction < 1
            and self.test_fraction + self.validation_fraction < 1):
      raise ValueError(f"LocalTask {self.name!r}: test_fraction and validation_fraction "
                       "must be in (0, 1) with a sum below 1")

  def load(self, split: str) -> list[tasks_lib.Example]:
    """The examples of one split, in file order."""
    tasks_lib.check_split(split)
    path = pathlib.Path(os.path.expanduser(self.path))
    if not path.is_file():
      where = f" (config key {self.config_key})" if self.config_key else ""
      raise FileNotFoundError(
          f"task {self.name!r}: data file {str(path)!r}{where} does not exist. jaxsun "
          "never downloads datasets; put the file there or point the key at it")
    stat = path.stat()
    return list(_load(self, str(path), stat.st_mtime_ns, stat.st_size)[split])


def task_name(task) -> str:
  """The label of a task: its name, or a `LocalTask`'s `name`."""
  return task if isinstance(task, str) else task.name


def _split_of(prompt: str, test: float, validation: float) -> str:
  u = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") / 2.0**64
  return "test" if u < test else "validation" if u < test + validation else "train"


def _records(path: str):
  text = pathlib.Path(path).read_text(encoding="utf-8")
  stripped = text.lstrip()
  if stripped.startswith("["):
    return json.loads(text)
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def _field_text(value) -> str:
  return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@functools.lru_cache(maxsize=16)
def _load(task: LocalTask, path: str, mtime: int, size: int):
  del mtime, size  # cache key: a changed file is read again
  out = {s: [] for s in SPLITS}
  for i, record in enumerate(_records(path)):
    if not isinstance(record, dict):
      raise ValueError(f"task {task.name!r}: record {i} of {path} is not a JSON object")
    missing = [f for f in (*task.prompt_fields, task.answer_field) if f not in record]
    if missing:
      raise ValueError(f"task {task.name!r}: record {i} of {path} has no field "
                       f"{missing[0]!r} (it has {sorted(record)})")
    prompt = "\n\n".join(_field_text(record[f]) for f in task.prompt_fields)
    ex = tasks_lib.Example(prompt=prompt, answer=_field_text(record[task.answer_field]))
    out[_split_of(prompt, task.test_fraction, task.validation_fraction)].append(ex)
  return {s: tuple(v) for s, v in out.items()}


# Where the papers' fine-tuning sets keep their fields (the Hugging Face releases'
# layouts): name -> (prompt fields, answer field).
PAPER_TASKS = {
    "metamathqa": (("query",), "response"),               # MetaMathQA-40K
    "evol_instruct_code": (("instruction",), "output"),   # Evol-Instruct-Code-80k-v1
    "xlam_function_calling": (("tools", "query"), "answers"),  # xlam-function-calling-60k
}


def paper_task(name: str, path: str, config_key: str = "") -> LocalTask:
  """A `LocalTask` for one of `PAPER_TASKS`, read from the user's copy at `path`."""
  if name not in PAPER_TASKS:
    raise ValueError(f"unknown paper task {name!r}; available: {list(PAPER_TASKS)}")
  prompt_fields, answer_field = PAPER_TASKS[name]
  return LocalTask(name=name, path=path, prompt_fields=prompt_fields,
                   answer_field=answer_field, config_key=config_key)
