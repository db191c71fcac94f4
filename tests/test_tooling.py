"""Project tooling: the synthetic task, and the Makefile's Python finder."""

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxsun.data import synthetic

ROOT = pathlib.Path(__file__).parents[1]


@pytest.mark.parametrize("name", sorted(synthetic.TASKS))
def test_symbol_task_examples(name):
  task = synthetic.SymbolTask(n_symbols=10, max_symbols=5)
  tokens, boundary, answers = task.examples(np.random.default_rng(0), 50, name)
  assert tokens.shape == (50, task.seq_len) and tokens.max() < task.vocab_size
  mask = task.loss_mask(tokens, boundary)
  for row, b, ans, m in zip(tokens, boundary, answers, mask):
    syms = row[2:b - 1].tolist()
    assert row[0] == synthetic.BOS and row[b - 1] == synthetic.SEP
    assert ans == (syms if name == "copy" else syms[::-1]) + [synthetic.EOS]
    assert row[b:b + len(ans)].tolist() == ans
    assert m.sum() == len(ans) and m[b:b + len(ans)].all()
  again = task.examples(np.random.default_rng(0), 50, name)[0]
  np.testing.assert_array_equal(tokens, again)  # seeded: reproducible


def test_symbol_task_rejects_unknown_task():
  with pytest.raises(ValueError, match="unknown task 'sort'"):
    synthetic.SymbolTask().examples(np.random.default_rng(0), 2, "sort")


def _fake_path(tmp_path, python_version_ok: bool):
  """A PATH holding only the tools the finder uses and a fake python3."""
  bindir = tmp_path / "bin"
  bindir.mkdir()
  for tool in ("ls", "sort"):
    os.symlink(shutil.which(tool), bindir / tool)
  fake = bindir / "python3"
  fake.write_text(f"#!{shutil.which('bash')}\nexit {0 if python_version_ok else 1}\n")
  fake.chmod(0o755)
  return str(bindir)


def test_find_python_fails_clearly_without_python312(tmp_path):
  env = {"PATH": _fake_path(tmp_path, python_version_ok=False)}
  proc = subprocess.run([shutil.which("bash"), str(ROOT / "scripts" / "find_python.sh")],
                        env=env, capture_output=True, text=True)
  assert proc.returncode == 1
  assert "needs Python >= 3.12" in proc.stderr


def test_find_python_honours_PYTHON():
  env = dict(os.environ, PYTHON=sys.executable)
  proc = subprocess.run([str(ROOT / "scripts" / "find_python.sh")], env=env,
                        capture_output=True, text=True)
  assert proc.returncode == 0
  assert proc.stdout.strip() == sys.executable
