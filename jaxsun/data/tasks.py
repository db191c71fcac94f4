"""Prompt/answer tasks with exact-match accuracy, read from committed files.

The items come from reasoning-gym 0.1.25 generators, run once (seeded) by
`scripts/build_data.py` and committed as `jaxsun/data/files/tasks/<name>.jsonl.gz`: one JSON record
`{"split", "prompt", "answer"}` per line, prompts deduplicated before the split, so
`train` and `test` share no prompt. reasoning-gym is not needed at run time.

| task | generator settings (chosen so a ~1M-parameter model can learn some of them) |
| --- | --- |
| spell_backward | one word of 3-5 letters, reversed |
| basic_arithmetic | a + b or a - b with 0 <= a, b <= 100 |
| letter_counting | count one letter in a span of 1-3 words |
| word_sorting | sort 3-4 words of 3-6 letters (ascending or descending, by code point) |
| gsm_symbolic | GSM8K-style word problems; the answer is the final integer only |
| word_sequence_reversal | reverse a list of 2 words ("Reverse this list of words: the, aged" -> "aged, the") |
| rotate_matrix | rotate a 2x2 digit matrix by 90 degrees clockwise ("...clockwise:\\n5 8\\n8 1" -> "8 5\\n1 8") |

For the last two, the prompt is reasoning-gym's question paragraph without the
answer-format instructions above it (a tiny model learns the format from the examples,
and the shorter prompt makes fine-tuning on CPU about twice as cheap).

Splits: `train` (4000), `test` (500) and `validation` (500, for choosing learning rates
and other settings: never choose on `test`), disjoint by prompt.

Text template, fixed (tokenizers see the prompt and answer as two strings):

    format_prompt(ex) = "Q: " + ex.prompt + "\\nA:"
    format_answer(ex) = " " + ex.answer
    format_text(ex)   = format_prompt(ex) + format_answer(ex)

The answer carries the leading space so that BPE tokenizers see " 42" as they would
inside running text; `exact_match` strips it again.

Accuracy is `exact_match` (equality after stripping surrounding whitespace). Do not use
reasoning-gym's own scorers for accuracy: several give partial credit, e.g. 0.01 to any
wrong answer, so their mean is not an accuracy.
"""

from __future__ import annotations

import dataclasses
import functools

from jaxsun.data import paths

TASKS = ("spell_backward", "basic_arithmetic", "letter_counting", "word_sorting",
         "gsm_symbolic", "word_sequence_reversal", "rotate_matrix")
SPLITS = ("train", "validation", "test")
PROMPT_PREFIX, PROMPT_SUFFIX, ANSWER_PREFIX = "Q: ", "\nA:", " "


@dataclasses.dataclass(frozen=True)
class Example:
  """One task item: the question and its exact answer (both plain text)."""

  prompt: str
  answer: str


def check_task(name: str) -> None:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; available: {list(TASKS)}")


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"unknown task split {split!r}; available: {list(SPLITS)}")


def task_path(name: str) -> str:
  """The task file, relative to the data root."""
  return f"tasks/{name}.jsonl.gz"


def _rebuild(name: str) -> str:
  return f"--only tasks --tasks {name}"


@functools.cache
def _load(name: str, path: str, stamp: tuple) -> dict[str, tuple[Example, ...]]:
  del stamp  # cache key only: (data root, mtime, size) of the file read
  rebuild = _rebuild(name)
  out = {s: [] for s in SPLITS}
  for i, r in enumerate(paths.read_jsonl(path, rebuild=rebuild)):
    if r.get("split") not in SPLITS or not isinstance(r.get("prompt"), str) \
        or not isinstance(r.get("answer"), str):
      raise ValueError(f"data file {paths.data_root() / path} record {i} needs a split "
                       f"in {list(SPLITS)} and string prompt/answer, got {r!r:.200}; "
                       f"rebuild it with: {paths.rebuild_command(rebuild)}")
    out[r["split"]].append(Example(prompt=r["prompt"], answer=r["answer"]))
  for s, items in out.items():
    if not items:
      raise ValueError(f"data file {paths.data_root() / path} has no {s!r} examples; "
                       f"rebuild it with: {paths.rebuild_command(rebuild)}")
  return {s: tuple(v) for s, v in out.items()}


def load_task(name: str, split: str) -> list[Example]:
  """The examples of one task split, in file order (deterministic).

  Args:
    name: one of `TASKS`.
    split: "train", "validation" or "test".

  Raises:
    ValueError: unknown task or split, or an empty/corrupt file.
    FileNotFoundError: the task file is missing (the message has the rebuild command).
  """
  check_task(name)
  check_split(split)
  path = task_path(name)
  stat = paths.data_file(path, rebuild=_rebuild(name)).stat()
  stamp = (str(paths.data_root()), stat.st_mtime_ns, stat.st_size)
  return list(_load(name, path, stamp)[split])


def format_prompt(example: Example) -> str:
  """The model's input: `"Q: {prompt}\\nA:"`."""
  return f"{PROMPT_PREFIX}{example.prompt}{PROMPT_SUFFIX}"


def format_answer(example: Example) -> str:
  """The target continuation: `" {answer}"`."""
  return f"{ANSWER_PREFIX}{example.answer}"


def format_text(example: Example) -> str:
  """Prompt and answer as one text, for mixing task items into pretraining."""
  return format_prompt(example) + format_answer(example)


def exact_match(prediction: str, answer: str) -> bool:
  """Whether a prediction equals the answer after stripping surrounding whitespace.

  Case and inner whitespace count. (reasoning-gym's scorers give partial credit, e.g.
  0.01 to a wrong answer, so they are never used for accuracy.)
  """
  return prediction.strip() == answer.strip()
