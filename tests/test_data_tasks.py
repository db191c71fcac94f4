"""Committed tasks: splits, answers checked against independent solvers, errors, rebuild."""

import gzip
import importlib.util
import pathlib
import re
import sys

import pytest

from jaxsun.data import paths
from jaxsun.data import tasks

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_build_script():
  spec = importlib.util.spec_from_file_location("build_data", REPO / "scripts/build_data.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while executing
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", tasks.TASKS)
def test_splits_are_disjoint_and_sized(name):
  train, test = tasks.load_task(name, "train"), tasks.load_task(name, "test")
  validation = tasks.load_task(name, "validation")
  assert (len(train), len(test), len(validation)) == (4000, 500, 500)
  prompts = [{ex.prompt for ex in split} for split in (train, test, validation)]
  assert [len(p) for p in prompts] == [4000, 500, 500]  # no repeats within a split
  assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2]
  assert not prompts[1] & prompts[2]
  assert all(ex.answer.strip() and ex.answer == ex.answer.strip()
             for ex in train + test + validation)


def test_loading_is_deterministic_and_examples_are_frozen():
  a = tasks.load_task("letter_counting", "test")
  b = tasks.load_task("letter_counting", "test")
  assert a == b and a is not b
  a.pop()  # the caller's copy; the next load is unaffected
  assert tasks.load_task("letter_counting", "test") == b
  with pytest.raises(AttributeError):
    b[0].answer = "x"


def solve(name: str, prompt: str) -> str:
  """Independent solvers for the four algorithmic tasks."""
  if name == "spell_backward":
    return re.fullmatch(r"Spell this word backward \(example: sun -> nus\): (\w+)",
                        prompt).group(1)[::-1]
  if name == "basic_arithmetic":
    a, op, b = re.fullmatch(r"Calculate (\d+) ([+-]) (\d+)\.", prompt).groups()
    assert 0 <= int(a) <= 100 and 0 <= int(b) <= 100
    return str(int(a) + int(b) if op == "+" else int(a) - int(b))
  if name == "letter_counting":
    letter, span = re.fullmatch(r'How many times does the letter "(\w)" appear in the '
                                r'text: "([^"]*)"\?', prompt).groups()
    assert 1 <= len(span.split()) <= 3
    return str(span.lower().count(letter))
  if name == "word_sorting":
    direction, words = re.search(r"sort these words in (ascending|descending) order .*"
                                 r"list: (.*)\n$", prompt).groups()
    words = words.split(", ")
    assert 3 <= len(words) <= 4 and all(3 <= len(w) <= 6 for w in words)
    return ", ".join(sorted(words, reverse=direction == "descending"))
  if name == "word_sequence_reversal":
    words = re.fullmatch(r"Reverse this list of words: (.*)", prompt).group(1).split(", ")
    assert len(words) == 2
    return ", ".join(words[::-1])
  if name == "rotate_matrix":
    head, *rows = prompt.split("\n")
    assert head == "Rotate the matrix below by 90 degrees clockwise:" and len(rows) == 2
    m = [r.split() for r in rows]
    return "\n".join(" ".join(m[len(m) - 1 - i][j] for i in range(len(m)))
                     for j in range(len(m)))
  raise KeyError(name)


@pytest.mark.parametrize("name", ["spell_backward", "basic_arithmetic", "letter_counting",
                                  "word_sorting", "word_sequence_reversal", "rotate_matrix"])
def test_answers_match_an_independent_solver(name):
  for split in tasks.SPLITS:
    for ex in tasks.load_task(name, split):
      assert solve(name, ex.prompt) == ex.answer, ex


def test_gsm_symbolic_answers_are_integers():
  for ex in tasks.load_task("gsm_symbolic", "test"):
    assert re.fullmatch(r"-?\d+", ex.answer), ex
    assert ex.prompt.endswith("Give the result as your final answer. Do not include units.")


def test_templates():
  ex = tasks.Example(prompt="Calculate 2 + 3.", answer="5")
  assert tasks.format_prompt(ex) == "Q: Calculate 2 + 3.\nA:"
  assert tasks.format_answer(ex) == " 5"
  assert tasks.format_text(ex) == "Q: Calculate 2 + 3.\nA: 5"


def test_exact_match_semantics():
  assert tasks.exact_match(" 42\n", "42")
  assert tasks.exact_match("42", " 42 ")
  assert not tasks.exact_match("042", "42")
  assert not tasks.exact_match("42.", "42")
  assert not tasks.exact_match("Abc", "abc")          # case counts
  assert not tasks.exact_match("a,b", "a, b")         # inner whitespace counts
  assert not tasks.exact_match("", "0")
  assert tasks.exact_match("", "  ")


def test_unknown_task_or_split():
  with pytest.raises(ValueError, match=r"unknown task 'spell'; available: "
                                       r"\['spell_backward', 'basic_arithmetic'"):
    tasks.load_task("spell", "train")
  with pytest.raises(ValueError, match=r"unknown task split 'valid'; available: "
                                       r"\['train', 'validation', 'test'\]"):
    tasks.load_task("spell_backward", "valid")


def test_missing_empty_and_corrupt_files(tmp_path, monkeypatch):
  monkeypatch.setenv(paths.DATA_ROOT_ENV, str(tmp_path))
  path = tmp_path / "tasks" / "word_sorting.jsonl.gz"
  with pytest.raises(FileNotFoundError) as e:
    tasks.load_task("word_sorting", "train")
  assert str(path) in str(e.value)
  assert "python scripts/build_data.py --only tasks --tasks word_sorting" in str(e.value)

  path.parent.mkdir()
  path.write_bytes(b"")
  with pytest.raises(ValueError, match=rf"data file {re.escape(str(path))} is empty"):
    tasks.load_task("word_sorting", "train")
  path.write_bytes(gzip.compress(b"\n"))
  with pytest.raises(ValueError, match="is empty"):
    tasks.load_task("word_sorting", "train")
  path.write_bytes(b"not gzip")
  with pytest.raises(ValueError, match="is corrupt"):
    tasks.load_task("word_sorting", "train")
  path.write_bytes(gzip.compress(b'{"split": "train", "prompt": "p", "answer": "a"}\n'))
  with pytest.raises(ValueError, match="has no 'validation' examples"):
    tasks.load_task("word_sorting", "train")


def test_regenerating_gives_the_committed_items():
  pytest.importorskip("reasoning_gym")
  build = load_build_script()
  for name in tasks.TASKS:
    committed = tasks.load_task(name, "train")[:5]
    items = build.generate_task_items(name, 5)
    assert [tasks.Example(**it) for it in items] == committed, name
  # The validation split is the 500 items after train and test (appended later, so the
  # first 4500 items, and with them train and test, stayed what they were).
  items = build.generate_task_items("rotate_matrix", 5000)
  assert [tasks.Example(**it) for it in items[4500:]] == tasks.load_task("rotate_matrix",
                                                                           "validation")
  assert [tasks.Example(**it) for it in items[4000:4500]] == tasks.load_task("rotate_matrix",
                                                                             "test")
  # A different seed gives different items: the seed is what pins the files.
  assert build.generate_task_items("spell_backward", 5, seed=7) != \
      build.generate_task_items("spell_backward", 5)
