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


def test_tiny_has_one_control_and_paper_variants_none():
  c = pa_config.get_config("tiny")
  ctrls = pa.check_controls(c)
  assert len(ctrls) == 1 and ctrls[0].kind == "softmax"
  assert ctrls[0].name not in c.kinds and ctrls[0].overrides
  base = pa.model_config(c.model, 259, "softmax")
  cfg = pa.model_config(c.model, 259, ctrls[0].kind, overrides=ctrls[0].model_overrides)
  assert cfg != base and cfg.replace(**ctrls[0].model_overrides) == cfg
  for variant in ("gpu",) + pa_config.PAPER_VARIANTS:
    assert tuple(pa_config.get_config(variant).controls) == ()


_C0 = r"config.controls\[0\].*"


@pytest.mark.parametrize("controls, match", [
    ((("softmax", "softmax", {"n_layers": 2}),), _C0 + "collides"),
    ((("gated", "softmax", {"n_layers": 2}),), _C0 + "collides"),
    ((("c", "softmax", {"n_layers": 2}), ("c", "gated", {})),
     r"config.controls\[1\].*twice"),
    ((("c", "flash_softmax", {"n_layers": 2}),), _C0 + "unknown attention kind"),
    ((("c", "softmax", {"n_layer": 2}),), _C0 + "'n_layer' is not a ModelConfig field"),
    ((("c", "softmax", {"attention": "gated"}),), _C0 + "set by the control's kind"),
    ((("c", "softmax", {"n_heads": 3}),), _C0 + "n_heads"),
    ((("c", "softmax", {"affine": {"nope": 1}}),), _C0 + "nope"),
    ((("c", "softmax", {"max_len": 64}),), _C0 + "max_len=64"),
    ((("c", "softmax", {"train.batch_size": 8}),), _C0 + "cannot be overridden"),
    ((("c", "softmax", {"train.optimizer.lr": 1.0}),), _C0 + "unknown optimizer field"),
    ((("c", "softmax", {"train.steps": 5}),), _C0 + "train.steps=5"),
    ((("c/d", "softmax", {"n_layers": 2}),), _C0 + "name"),
    ((("c", "softmax"),), _C0 + "triple"),
    ((("c", "softmax", ("n_layers", 2)),), _C0 + "triple"),
])
def test_control_errors(controls, match):
  c = pa_config.get_config("tiny")
  c.controls = controls
  with pytest.raises(ValueError, match=match):
    pa.check_config(c)


def test_control_identity_leaves_the_kinds_unchanged():
  """Adding controls must not change the identity of a kind's run (a rerun reuses it)."""
  c = pa_config.get_config("tiny")
  c0 = pa_config.get_config("tiny")
  c0.controls = ()
  cfg = pa.model_config(c.model, 259, "softmax")
  assert pa.run_identity(c, "softmax", 0, cfg, {}) == pa.run_identity(c0, "softmax", 0,
                                                                     cfg, {})
  assert "control" not in pa.run_identity(c, "softmax", 0, cfg, {})
  ctrl = pa.Control("slow", "softmax", {"n_layers": 2, "train.steps": 100,
                                         "train.optimizer.learning_rate": 1e-3})
  ccfg = pa.model_config(c.model, 259, "softmax", overrides=ctrl.model_overrides)
  ident = pa.run_identity(c, "softmax", 0, ccfg, {}, ctrl)
  assert ident["control"]["name"] == "slow" and ident["model_config"]["n_layers"] == 2
  assert ident["train"]["steps"] == 100
  assert ident["train"]["optimizer"]["learning_rate"] == 1e-3
  assert c.train.steps == 300 and c.train.optimizer.learning_rate == 3e-3  # untouched
  tc = pa.train_config(c, 0, ctrl)
  assert tc.steps == 100 and tc.optimizer.learning_rate == 1e-3


def test_instrument_check_sentence():
  def cmp(diff, se):
    return {"diff": diff, "se": se, "beyond_2se": abs(diff) > 2 * se}
  agg = {"softmax": {}, "gated": {"vs_softmax": {"validation_loss": cmp(0.03, 0.02)},
                                  "validation_loss": {"std": 0.03}},
         "sink": {"vs_softmax": {"validation_loss": cmp(-0.01, 0.01)}}}
  ctrl = {"half": {"kind": "softmax", "overrides": {"n_layers": 2},
                   "vs_softmax": {"validation_loss": cmp(0.10, 0.02)},
                   "validation_loss": {"std": 0.01}}}
  check = pa.instrument_check(agg, ctrl)
  assert check["instrument_works"] and check["resolved"] == ["half"]
  assert check["largest_variant"]["kind"] == "gated"
  assert check["variant_bound"] == pytest.approx(0.07)
  assert check["controls"]["half"]["z"] == pytest.approx(5.0)
  s = check["sentence"]
  assert "half (softmax with n_layers=2)" in s and "+0.100 ± 0.020 (+5.0 SE)" in s
  assert "resolves differences of this size" in s and "gated's +0.030 ± 0.020" in s
  assert "smaller than about 0.07 nats (the largest |diff| + 2 SE, gated's)." in s
  assert check["variant_bound_kind"] == "gated"
  ctrl["half"]["vs_softmax"]["validation_loss"] = cmp(0.05, 0.01)  # below the bound
  s = pa.instrument_check(agg, ctrl)["sentence"]
  assert ("that bound exceeds the control's 0.050 because gated's seed spread (std "
          "0.030) is wider than the control's (0.010)") in s
  ctrl["half"]["vs_softmax"]["validation_loss"] = cmp(0.03, 0.02)
  check = pa.instrument_check(agg, ctrl)
  assert not check["instrument_works"] and "does NOT resolve" in check["sentence"]
  assert "smaller than about" not in check["sentence"]
  assert pa.instrument_check(agg, {}) is None


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


def _micro(kinds=("softmax", "affine"), seeds=(0, 1), steps=5, controls=()):
  c = pa_config.get_config("tiny")
  c.kinds, c.seeds, c.controls = kinds, seeds, controls
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

  assert res["controls"] == {} and res["instrument_check"] is None
  assert "## Controls" not in md

  # A rerun reads the finished runs back and gives the same aggregate.
  again = jobs.run(_micro(), tmp_path)
  assert again["aggregate"] == res["aggregate"]

  # Adding a control to the same workdir reuses every earlier run and trains only the
  # control's seeds (same batches, same measurements).
  c = _micro(controls=(("softmax_1_layer", "softmax", {"n_layers": 1}),))
  ctl = jobs.run(c, tmp_path)
  assert sorted(ctl["reused_runs"]) == sorted(res["runs"])
  assert sorted(ctl["runs"]) == sorted([*res["runs"], "softmax_1_layer_s0",
                                        "softmax_1_layer_s1"])
  assert ctl["aggregate"] == res["aggregate"]  # the kinds only
  run = ctl["runs"]["softmax_1_layer_s0"]
  assert run["kind"] == "softmax" and run["control"] == "softmax_1_layer"
  assert run["overrides"] == {"n_layers": 1} and run["steps"] == 5
  assert len(run["attention"]["entropy"]["per_layer"]) == 1
  assert run["num_params"] < res["runs"]["softmax_s0"]["num_params"]
  entry = ctl["controls"]["softmax_1_layer"]
  assert entry["kind"] == "softmax" and entry["overrides"] == {"n_layers": 1}
  assert entry["seeds"] == [0, 1] and entry["validation_loss"]["n"] == 2
  v = entry["vs_softmax"]["validation_loss"]
  want = entry["validation_loss"]["mean"] - res["aggregate"]["softmax"]["validation_loss"][
      "mean"]
  assert v["diff"] == pytest.approx(want)
  assert v["se"] == pytest.approx(np.sqrt(
      (entry["validation_loss"]["std"] ** 2 +
       res["aggregate"]["softmax"]["validation_loss"]["std"] ** 2) / 2))
  assert v["beyond_2se"] == (abs(v["diff"]) > 2 * v["se"])
  check = ctl["instrument_check"]
  assert check["measure"] == "validation_loss"
  assert check["controls"]["softmax_1_layer"]["diff"] == pytest.approx(v["diff"])
  assert check["largest_variant"]["kind"] == "affine"
  assert check["sentence"].startswith("Instrument check: the control softmax_1_layer "
                                      "(softmax with n_layers=1) differs from softmax by")
  md = (tmp_path / "results.md").read_text()
  assert "## Controls" in md and "| softmax_1_layer | softmax with n_layers=1 |" in md
  assert check["sentence"] in md
  assert (tmp_path / "checkpoints" / "softmax_1_layer_s1" / "run.json").exists()
  assert json.loads((tmp_path / "runs" / "softmax_1_layer_s0.json").read_text())[
      "identity"]["control"] == {"name": "softmax_1_layer", "overrides": {"n_layers": 1}}
  # ... and a rerun reuses the control's runs too.
  assert len(jobs.run(c, tmp_path)["reused_runs"]) == 6

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
