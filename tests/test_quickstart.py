"""The main job end to end (`make quickstart VARIANT=smoke`), its launcher and its errors."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import quickstart as qs_config
from jaxsun import jobs
from jaxsun.train.metrics import read_jsonl

ROOT = pathlib.Path(__file__).parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """`make quickstart VARIANT=smoke` once, with this interpreter's environment."""
  workdir = tmp_path_factory.mktemp("quickstart")
  venv = pathlib.Path(sys.prefix)
  (venv / ".installed").touch()  # this environment already has jaxsun[data] installed
  proc = subprocess.run(
      ["make", "-s", "quickstart", "VARIANT=smoke", f"WORKDIR={workdir}", f"VENV={venv}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(ENV, JAXSUN_TFDS_DIR=str(workdir / "tfds_env")))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return workdir, proc.stdout


def test_smoke_writes_results_curves_checkpoints_and_metrics(smoke_run):
  workdir, stdout = smoke_run
  results = json.loads((workdir / "results.json").read_text())
  cfg = qs_config.get_config("smoke")
  assert set(results["tasks"]) == set(cfg.tasks)
  for task, by_regime in results["tasks"].items():
    assert list(by_regime) == list(cfg.regimes)
    for regime, r in by_regime.items():
      assert 0.0 <= r["accuracy"] <= 1.0 and r["test_items"] == cfg.eval.test_items
      assert np.isfinite(r["test_loss"]) and r["test_loss"] > 0
      assert r["correct"] == round(r["accuracy"] * r["test_items"])
      if regime == "none":
        assert r["final_train_loss"] is None and r["trainable_params"] == 0
      else:
        assert np.isfinite(r["final_train_loss"]) and r["trainable_params"] > 0
        steps = [x["step"] for x in read_jsonl(
            workdir / "logs" / "finetune" / task / regime / "metrics.jsonl") if "step" in x]
        assert steps[-1] == cfg.finetune.steps
        assert (workdir / "checkpoints" / "finetune" / task / regime / "steps"
                / str(cfg.finetune.steps)).is_dir()
      # SUN keeps the decode tree, PrefillShare the prefill tree, bitwise as shared.
      if regime == "prefill":
        assert r["shared_decode_tree_unchanged"] is True
      if regime == "decode":
        assert r["shared_prefill_tree_unchanged"] is True
  base = results["base"]
  assert np.isfinite(base["validation_loss"]) and base["validation_loss"] < np.log(259)
  assert results["wall_time_s"] > 0
  png = (workdir / "loss_curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  assert (workdir / "checkpoints" / "pretrain" / "steps" / str(cfg.pretrain.steps)).is_dir()
  assert list((workdir / "logs" / "pretrain" / "tensorboard").glob("events.out.tfevents.*"))
  # The printed tables carry the numbers of results.json: exact match with the
  # constant-answer baseline and each shared-module regime's ratio to full, then loss.
  for task, by_regime in results["tasks"].items():
    rows = [line for line in stdout.splitlines() if line.startswith(task + " ")]
    assert len(rows) == 2
    baseline = results["baselines"][task]
    assert 0.0 <= baseline["accuracy"] <= 1.0 and isinstance(baseline["answer"], str)
    acc = {r: by_regime[r]["accuracy"] for r in cfg.regimes}
    ratio = lambda r: acc[r] / acc["full"] if acc["full"] else float("nan")
    want = [baseline["accuracy"], acc["full"], acc["prefill"], ratio("prefill"),
            acc["decode"], ratio("decode"), acc["none"]]
    assert [float(x) for x in rows[0].split()[1:]] == pytest.approx(want, abs=5e-4,
                                                                    nan_ok=True)
    assert [float(x) for x in rows[1].split()[1:]] == pytest.approx(
        [by_regime[r]["test_loss"] for r in cfg.regimes], abs=5e-4)
  # Regime "none" is the base model, so its test loss is the base's on the same batches;
  # every trained regime starts from it, and "full" trains every weight.
  for by_regime in results["tasks"].values():
    assert by_regime["full"]["test_loss"] != by_regime["none"]["test_loss"]


def test_rerun_resumes_from_checkpoints_with_the_same_results(smoke_run, tmp_path):
  workdir, _ = smoke_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  (copy / "results.json").unlink()
  first = json.loads((workdir / "results.json").read_text())
  again = jobs.run(qs_config.get_config("smoke"), copy)
  for task, by_regime in first["tasks"].items():
    for regime, r in by_regime.items():
      assert again["tasks"][task][regime]["accuracy"] == r["accuracy"]
      assert again["tasks"][task][regime]["final_train_loss"] == r["final_train_loss"]
  assert again["base"]["validation_loss"] == pytest.approx(first["base"]["validation_loss"],
                                                            rel=1e-6)


def test_a_different_config_in_the_same_workdir_is_refused(smoke_run, tmp_path):
  workdir, _ = smoke_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  before = (copy / "results.json").read_bytes()
  cfg = qs_config.get_config("smoke")
  cfg.pretrain.steps = 21
  with pytest.raises(ValueError, match="different run .*pretrain"):
    jobs.run(cfg, copy)
  assert (copy / "results.json").read_bytes() == before  # not touched


def test_launcher_rejects_a_misspelt_key(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.launch", "--config=configs/quickstart.py:smoke",
       "--config.finetune.stepz=3", f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
  assert proc.returncode != 0 and "stepz" in proc.stderr
  assert not (tmp_path / "results.json").exists()


def test_bad_names_and_workdirs_are_clear_errors(tmp_path):
  cfg = qs_config.get_config("smoke")
  cfg.tasks = ("spell_backwards",)
  with pytest.raises(ValueError, match="config.tasks: unknown task 'spell_backwards'"):
    jobs.run(cfg, tmp_path / "a")
  cfg = qs_config.get_config("smoke")
  cfg.regimes = ("sun",)
  with pytest.raises(ValueError, match="config.regimes: unknown regime 'sun'"):
    jobs.run(cfg, tmp_path / "b")
  cfg = qs_config.get_config("smoke")
  cfg.tokenizer = "bpe8k"
  with pytest.raises(ValueError, match="bpe8k"):
    jobs.run(cfg, tmp_path / "c")
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="workdir .* cannot be written"):
    jobs.run(qs_config.get_config("smoke"), blocker / "sub")
  with pytest.raises(ValueError, match="unknown job"):
    jobs.get_job("quickstrat")
  with pytest.raises(ValueError, match="unknown variant"):
    qs_config.get_config("huge")
  with pytest.raises(AttributeError):
    qs_config.get_config().finetune.stepz = 3  # locked
