"""The precision-stability study: the vmapped seed population and the job."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsun
from jaxsun.jobs import precision_stability as ps
from jaxsun.quant import masked_gemm as mg
from jaxsun.train.optim import OptimizerConfig
from jaxsun.train.population import Population
from jaxsun.train.trainer import TrainConfig, Trainer

CFG = jaxsun.ModelConfig.preset("tiny", d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                d_ff=64)


def _make(fmt):
  return lambda seed: jaxsun.SplitModel.from_model(
      mg.apply(jaxsun.Decoder(CFG, rngs=nnx.Rngs(seed)), mg.MaskedGemm.parse(fmt)))


def _batches(seeds, steps, b=4, t=12):
  rng = np.random.default_rng(0)
  return [{"tokens": rng.integers(0, CFG.vocab_size, (len(seeds), b, t)).astype(np.int32),
           "boundary": np.ones((len(seeds), b), np.int32),
           "loss_mask": np.ones((len(seeds), b, t), np.float32)} for _ in range(steps)]


@pytest.mark.parametrize("fmt", ["fp32", "fp8_delayed"])
def test_population_equals_one_trainer_per_seed(fmt):
  """The vmapped step is the Trainer's step: each seed's losses and parameters match a
  Trainer run alone on that seed's batches (FP8 delayed state included)."""
  seeds, tc = (3, 7), TrainConfig(steps=3, optimizer=OptimizerConfig(learning_rate=1e-2))
  pop = Population(_make(fmt), tc, seeds)
  batches = _batches(seeds, 3)
  got = np.stack([pop.train_step(b)["loss"] for b in batches], axis=1)  # [S, steps]
  for i, s in enumerate(seeds):
    tr = Trainer(_make(fmt)(s), dataclasses.replace(tc, seed=s))
    want = [tr.train_step({k: v[i] for k, v in b.items()})["loss"] for b in batches]
    np.testing.assert_allclose(got[i], want, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(tr.state.params), jax.tree.leaves(pop.state.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b[i]), rtol=1e-4, atol=1e-6)
  # Control: the seeds really differ (init and data).
  assert not np.allclose(got[0], got[1], rtol=1e-3)
  assert pop.step == 3 and pop.size == 2
  # map: any function of each seed's model, compiled once.
  tokens = jnp.asarray(batches[0]["tokens"][0])
  logits = pop.map(lambda split, x: split.prefill_module()(x)[0], tokens)
  assert logits.shape == (2, *tokens.shape, CFG.vocab_size)
  np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(
      pop.splits()[1].prefill_module()(tokens)[0]), rtol=1e-5, atol=1e-5)


def test_population_rejects_bad_arguments():
  tc = TrainConfig(steps=2)
  with pytest.raises(ValueError, match="seeds=.*distinct"):
    Population(_make("fp32"), tc, (1, 1))
  pop = Population(_make("fp32"), tc, (0, 1))
  with pytest.raises(ValueError, match=r"must be \[S=2, B, T\]"):
    pop.train_step({k: v[:1] for k, v in _batches((0, 1), 1)[0].items()})
  with pytest.raises(ValueError, match="missing"):
    pop.train_step({"tokens": np.zeros((2, 2, 4), np.int32)})


def test_sharpness_before_divergence_compares_against_the_control():
  steps = [1, 10, 20, 30, 40]
  rising = {"sharpness_steps": steps, "sharpness": [[1, 1, 2, 8, None]] * 3}
  flat = {"sharpness_steps": steps, "sharpness": [[1, 1, 1.1, 1.0, 1.05]] * 3}
  div = {"divergence": [{"diverged": True, "step": 35}, {"diverged": True, "step": 33},
                        {"diverged": True, "step": 31}]}
  ok = {"divergence": [{"diverged": False, "step": None}] * 3}
  # Jitter so the standard errors are not zero.
  rising["sharpness"] = [[1, 1, 2, 8 + i, None] for i in range(3)]
  flat["sharpness"] = [[1, 1, 1.1 + 0.01 * i, 1.0, 1.05] for i in range(3)]
  out = ps.sharpness_before_divergence({"a": rising, "b": flat}, {"a": div, "b": ok})
  assert out["n_diverged_measured"] == 3 and "beyond the control" in out["verdict"]
  assert out["diverged_log_rise"]["mean"] > 2.0 and abs(out["control_log_rise"]["mean"]) < 0.1
  # Control: when the diverging runs were flat too, there is no rise.
  out = ps.sharpness_before_divergence({"a": flat, "b": flat}, {"a": div, "b": ok})
  assert "no rise" in out["verdict"]


def test_summarize_cell_counts_divergences():
  loss_ok = list(np.linspace(5, 3, 40))
  loss_nan = loss_ok[:20] + [None] * 20
  loss_up = loss_ok[:20] + [6.0] * 20
  cell = {"loss": [loss_ok, loss_nan, loss_up], "grad_norm": [[1.0] * 40] * 3,
          "sharpness_steps": [1, 20, 40], "sharpness": [[1, 2, 3]] * 3,
          "final_eval_loss": [3.0, None, 6.1]}
  s = ps.summarize_cell(cell, margin=1.0, patience=5)
  assert s["diverged"] == 2 and s["runs"] == 3
  assert [d["reason"] for d in s["divergence"]] == [None, "nonfinite", "above_min"]
  assert s["final_eval_loss"] == {"mean": 3.0, "std": 0.0, "n": 1}


@pytest.mark.parametrize("key, value, match", [
    ("formats", ("fp32", "e9m1"), "config.formats"),
    ("lr_multipliers", (1.0, -3.0), "config.lr_multipliers"),
    ("seeds", (0, 0), "config.seeds"),
    ("steps", 0, "config.steps"),
])
def test_bad_config_names_the_key(key, value, match):
  from configs import precision_stability as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.get_config("smoke")
  with c.unlocked():
    c[key] = value
  with pytest.raises(ValueError, match=match):
    ps.check_config(c)


def test_smoke_job_writes_its_results(tmp_path):
  from configs import precision_stability as config_lib  # pylint: disable=g-import-not-at-top
  from jaxsun import jobs  # pylint: disable=g-import-not-at-top
  res = jobs.run(config_lib.get_config("smoke"), tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert set(saved["summary"]) == {"fp32@1x", "fp8_delayed@1x"}
  for name, cell in saved["cells"].items():
    assert len(cell["loss"]) == 2 and len(cell["loss"][0]) == 6, name
    assert np.isfinite(np.asarray(cell["final_eval_loss"], float)).all()
    assert cell["sharpness_steps"] == [1, 3, 6]
    assert all(v is not None and v >= 0 for row in cell["sharpness"] for v in row)
  assert saved["cells"]["fp8_delayed@1x"]["gemm"] == "E4M3/E4M3/E5M2-delayed"
  # The seeds differ; FP8 and FP32 differ (the masking is on), but not by much.
  a = np.asarray(saved["cells"]["fp32@1x"]["loss"])
  b = np.asarray(saved["cells"]["fp8_delayed@1x"]["loss"])
  assert not np.allclose(a[0], a[1]) and not np.array_equal(a, b)
  np.testing.assert_allclose(a, b, rtol=0.02)
  for f in ("table.md", "heatmap.png", "sharpness.png", "loss_curves.png", "COMMAND.md"):
    assert (tmp_path / f).stat().st_size > 0, f
  assert "precision_stability.py:smoke" in (tmp_path / "COMMAND.md").read_text()
  # A rerun reads the finished cells back instead of training again.
  again = jobs.run(config_lib.get_config("smoke"), tmp_path)
  assert again["cells"] == res["cells"]
