"""The generate demo (`make quickstart`'s job) end to end on its :smoke config."""

import json
import os
import subprocess
import sys
import pathlib

import pytest

from configs import generate_demo as demo_config
from experiments import generate_demo

ROOT = pathlib.Path(__file__).parents[1]


def test_smoke_run_writes_results(tmp_path):
  results = generate_demo.run(demo_config.get_config("smoke"), tmp_path)
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk == results
  assert set(results["exact_match"]) == {"base", "sun_prefill_only"}
  for acc in results["exact_match"].values():
    assert set(acc) == {"copy", "reverse"} and all(0 <= a <= 1 for a in acc.values())
  assert results["decode_tree_bitwise_frozen"] is True


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="workdir .* cannot be written"):
    generate_demo.run(demo_config.get_config("smoke"), blocker / "sub")


def test_config_is_locked_and_checks_variants():
  cfg = demo_config.get_config()
  with pytest.raises(AttributeError):
    cfg.pretrain_stepz = 3
  with pytest.raises(ValueError, match="unknown variant"):
    demo_config.get_config("huge")


def test_command_line_with_override(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.generate_demo",
       "--config=configs/generate_demo.py:smoke", "--config.finetune_steps=5",
       f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "decode tree bitwise frozen: True" in proc.stdout
  assert (tmp_path / "results.json").exists()
  bad = subprocess.run(
      [sys.executable, "-m", "experiments.generate_demo", "--config.finetune_stepz=5",
       f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "finetune_stepz" in bad.stderr
