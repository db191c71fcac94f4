"""The `lm` job (configs/lm.py) on a shrunk config: trains, evaluates, samples, resumes."""

import json

import numpy as np
import pytest

from configs import lm as lm_config
from jaxsun import jobs


def _tiny(steps):
  cfg = lm_config.get_config("tiny")
  cfg.tokenizer = "byte"
  cfg.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_len=64)
  cfg.train.update(seq_len=32, batch_size=4, steps=steps, eval_every=2, eval_batches=2,
                   log_every=1, checkpoint_every=2)
  cfg.sample_tokens = 8
  return cfg


def test_lm_job_trains_evaluates_and_resumes(tmp_path):
  res = jobs.run(_tiny(4), tmp_path)
  assert json.loads((tmp_path / "results.json").read_text()) == res
  assert np.isfinite(res["validation_loss"]) and res["steps"] == 4
  assert res["validation_perplexity"] == pytest.approx(np.exp(res["validation_loss"]))
  assert isinstance(res["sample"]["continuation"], str)
  assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
  # Asking for more steps with the same config is refused (a different run) ...
  with pytest.raises(ValueError, match="different run"):
    jobs.run(_tiny(6), tmp_path)
  # ... while the same config resumes from the last checkpoint and gives the same model.
  again = jobs.run(_tiny(4), tmp_path)
  assert again["validation_loss"] == res["validation_loss"]


def test_lm_config_checks():
  cfg = lm_config.get_config("tiny")
  with pytest.raises(AttributeError):
    cfg.train.learning_rate = 1.0  # locked: it lives in train.optimizer
  with pytest.raises(ValueError, match="unknown variant"):
    lm_config.get_config("huge")
