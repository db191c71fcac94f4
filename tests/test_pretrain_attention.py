"""The attention-variant pretraining study: configs/pretrain_attention.py and its job."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import jaxsun
from configs import pretrain_attention as pa_config
from jaxsun import jobs
from jaxsun.jobs import pretrain_attention as pa

# Tokenizer vocabularies the variants are built with (the paper-scale ones are the
# teachers' tokenizer.json files, which tests do not have).
VOCAB = {"tiny": 259, "gpu": 4096, "qwen1.5-0.5b": 151646, "llama-3.2-1b": 128256,
         "llama-3.2-3b": 128256}


@pytest.mark.parametrize("variant", pa_config.VARIANTS)
def test_every_variant_builds_and_validates(variant):
  c = pa_config.get_config(variant)
  assert tuple(c.kinds) == pa.KINDS and tuple(c.seeds) == (0, 1, 2)
  assert tuple(c.analysis.spike_ks) == (6, 9)
  with pytest.raises(AttributeError):
    c.train.learning_rate = 1.0  # locked: it lives in train.optimizer
  if variant in pa_config.PAPER_VARIANTS:
    c.teacher.hf_path = "/models/teacher"  # the user's; needed when distilling
    assert pa.tokenizer_name(c) == "file:/models/teacher/tokenizer.json"
  pa.check_config(c)
  for kind in c.kinds:
    cfg = pa.model_config(c.model, VOCAB[variant], kind)
    assert cfg.attention == kind and cfg.max_len >= c.train.seq_len
    assert cfg.vocab_size >= VOCAB[variant]
  if variant == "gpu":
    assert cfg.scan_layers and cfg.remat == "dots" and cfg.compute_dtype == "bfloat16"
    assert 20e6 < cfg.num_params() < 60e6
  if variant in pa_config.PAPER_VARIANTS:
    t, o = c.train, c.train.optimizer
    assert (t.seq_len, t.batch_size, t.steps) == (2048, 1024, 9000)
    assert t.batch_size % t.accum_steps == 0
    assert (o.learning_rate, o.weight_decay, o.schedule, o.warmup_steps) == (
        1e-3, 0.1, "wsd", 100)
    assert c.distill.weight > 0 and c.analysis.stability_stop == 501
    # The paper's Delta Params (Tables 1-2) follow from the shapes.
    delta = {k: pa.model_config(c.model, VOCAB[variant], k).attention_params() * cfg.n_layers
             / 1e6 for k in ("affine", "gated")}
    want = {"qwen1.5-0.5b": (0.4, None), "llama-3.2-1b": (1.0, 67.1),
            "llama-3.2-3b": (2.1, 264.2)}[variant]
    assert round(delta["affine"], 1) == want[0]
    if want[1] is not None:
      assert round(delta["gated"], 1) == want[1]
    shape = {"qwen1.5-0.5b": (24, 1024, 16), "llama-3.2-1b": (16, 2048, 32),
             "llama-3.2-3b": (28, 3072, 24)}[variant]
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads) == shape


def test_config_errors():
  with pytest.raises(ValueError, match="'huge'"):
    pa_config.get_config("huge")
  c = pa_config.get_config("tiny")
  c.kinds = ("softmax", "softmax_two")
  with pytest.raises(ValueError, match="config.kinds.*softmax_two"):
    pa.check_config(c)
  c = pa_config.get_config("tiny")
  c.distill.weight = 0.5
  with pytest.raises(ValueError, match="config.distill.weight=0.5 > 0 needs a teacher"):
    pa.check_config(c)
  c = pa_config.get_config("llama-3.2-1b")
  with pytest.raises(ValueError, match="config.tokenizer is empty"):
    pa.tokenizer_name(c)
  c = pa_config.get_config("tiny")
  c.model.n_heads = 3
  with pytest.raises(ValueError, match="n_heads"):
    pa.model_config(c.model, 259, "softmax")


def test_layer_attention_weights_in_both_layouts(cfg):
  from jaxsun.nn import decoder as decoder_lib  # pylint: disable=g-import-not-at-top
  model = jaxsun.Decoder(cfg.replace(attention="affine"), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
  flat = np.stack(list(pa.layer_attention_weights(model, tokens)))
  assert flat.shape == (cfg.n_layers, 2, cfg.n_heads, 10, 10)
  assert np.all(np.triu(flat[..., :, :], 1) == 0)  # causal
  scanned = np.stack(list(pa.layer_attention_weights(decoder_lib.with_layout(model, True),
                                                     tokens)))
  np.testing.assert_allclose(scanned, flat, rtol=1e-5, atol=1e-6)
  if hasattr(model, "attention_weights"):  # the Decoder's own, where it exists
    np.testing.assert_allclose(np.asarray(model.attention_weights(tokens)), flat,
                               rtol=1e-5, atol=1e-6)


def _micro(kinds=("softmax", "affine"), seeds=(0, 1), steps=5):
  c = pa_config.get_config("tiny")
  c.kinds, c.seeds = kinds, seeds
  c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_len=32)
  c.train.update(seq_len=32, batch_size=4, steps=steps, final_window=2, eval_batches=2,
                 progress_every=5)
  c.train.optimizer.update(warmup_steps=1)
  c.analysis.update(sequences=2, length=32, spike_window=3, detrend=2, map_len=16)
  return c


def test_micro_study_writes_results_and_plots(tmp_path):
  res = jobs.run(_micro(), tmp_path)
  assert json.loads((tmp_path / "results.json").read_text()) == res
  assert sorted(res["runs"]) == ["affine_s0", "affine_s1", "softmax_s0", "softmax_s1"]
  for kind in ("softmax", "affine"):
    agg = res["aggregate"][kind]
    assert agg["seeds"] == [0, 1]
    for key in ("final_train_loss", "validation_loss", "validation_perplexity",
                "grad_norm_variance", "spikes_k6", "spikes_k9", "entropy_mean",
                "first_token_mass_mean", "first_token_share_mean", "query_mass_mean_mean",
                "head_diversity_jsd_mean"):
      assert agg[key]["n"] == 2 and len(agg[key]["values"]) == 2, key
      assert np.isfinite(agg[key]["mean"]) and agg[key]["std"] >= 0, key
    vals = agg["final_train_loss"]["values"]
    assert agg["final_train_loss"]["mean"] == pytest.approx(np.mean(vals))
    assert agg["final_train_loss"]["std"] == pytest.approx(np.std(vals, ddof=1))
    assert len(agg["per_layer"]["entropy"]["mean"]) == 2
  assert res["aggregate"]["affine"]["attention_params"] == 2 * 32 * 2  # W_alpha per layer
  assert "vs_softmax" in res["aggregate"]["affine"]
  run = res["runs"]["affine_s1"]
  assert run["steps"] == 5
  assert run["validation_perplexity"] == pytest.approx(np.exp(run["validation_loss"]))
  assert run["stability"]["loss_spikes"]["6"]["detrend"] == 2
  # Softmax rows sum to 1; affine rows do not (alpha softmax + beta).
  assert res["runs"]["softmax_s0"]["attention"]["query_mass"]["std"][0] < 1e-5
  assert res["runs"]["affine_s0"]["attention"]["query_mass"]["std"][0] > 1e-4
  assert res["aggregate"]["softmax"]["query_mass_mean_mean"]["mean"] == pytest.approx(1.0)
  assert res["aggregate"]["softmax"]["first_token_share_mean"]["mean"] == pytest.approx(
      res["aggregate"]["softmax"]["first_token_mass_mean"]["mean"], rel=1e-5)
  assert "NOT measured here" in res["paper_reference"]["source"]
  assert res["paper_reference"]["c4_perplexity"]["1B"]["affine"] == 58.9
  for png in ("training_curves", "entropy_per_layer", "first_token_mass_per_layer",
              "head_diversity_per_layer", "query_mass_distribution", "attention_maps"):
    assert f"{png}.png" in res["plots"]
    assert (tmp_path / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
  md = (tmp_path / "results.md").read_text()
  assert "| softmax |" in md and "| affine |" in md and "paper's numbers" in md
  # Every step's loss and grad norm are kept for the stability measures.
  with np.load(tmp_path / "runs" / "softmax_s0.npz") as z:
    assert z["loss"].shape == z["grad_norm"].shape == (5,)

  # A rerun reads the finished runs back and gives the same aggregate.
  again = jobs.run(_micro(), tmp_path)
  assert again["aggregate"] == res["aggregate"]

  # A study's run is a teacher for a distilled one (config.teacher.workdir).
  c = _micro(kinds=("affine",), seeds=(0,), steps=3)
  c.distill.update(weight=0.5, temperature=2.0)
  c.teacher.update(workdir=str(tmp_path), run="softmax_s0")
  kd = jobs.run(c, tmp_path / "kd")
  assert kd["teacher"]["run"] == "softmax_s0" and kd["teacher"]["step"] == 5
  rec = kd["runs"]["affine_s0"]
  assert np.isfinite(rec["final_objective"]) and np.isfinite(rec["final_train_loss"])
  c.teacher.update(run="")
  with pytest.raises(ValueError, match="several runs"):
    jobs.run(c, tmp_path / "kd2")
