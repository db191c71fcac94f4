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


def test_codebook_quant_job(tmp_path):
  from configs import codebook_quant as cq_config  # pylint: disable=g-import-not-at-top
  cfg = cq_config.get_config("tiny")
  cfg.model.update(n_layers=1, max_len=64)
  cfg.train.update(seq_len=32, batch_size=4, steps=6, eval_every=3, eval_batches=2,
                   log_every=3, checkpoint_every=3)
  cfg.quant.update(formats=("m1v4g128",), iterations=1, adam_steps=3, kmeans_iterations=3,
                   calibration_rows=2, eval_batches=2)
  res = jobs.run(cfg, tmp_path)
  assert json.loads((tmp_path / "results.json").read_text()) == res
  entry = res["formats"]["m1v4g128"]
  assert entry["bits_per_weight"] == 2.125 and entry["rtn_bits"] == 2
  for key in ("perplexity", "rtn_perplexity"):
    assert np.isfinite(entry[key]) and entry[key] > 1
  assert sorted(entry["layers"]) == [f"layers/0/{m}" for m in (
      "attn/k_proj", "attn/o_proj", "attn/q_proj", "attn/v_proj",
      "mlp/down_proj", "mlp/gate_proj", "mlp/up_proj")]
  for layer in entry["layers"].values():
    assert layer["error_final"] <= layer["error_init"] * (1 + 1e-6)
  bad = cq_config.get_config("tiny")
  bad.quant.formats = ("m1v4x128",)
  with pytest.raises(ValueError, match="m1v4x128"):
    jobs.run(bad, tmp_path / "bad")
