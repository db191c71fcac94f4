"""Step-time model: NNLS recovers known costs, the table fits what the line cannot,
transport fits, and calibration files round-trip."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest

from jaxsun.serving.sim import stepmodel as sm

W = 2e9  # weight bytes of the bf16 model; int8 / int4 variants read W/2, W/4
# Known costs, chosen so every used coefficient carries a good share of the time (an NNLS
# fit cannot pin down a coefficient whose term is lost in the 1% noise).
DECODE = {"calls": 2e-3, "steps": 8e-4, "decode_rows": 6e-5, "kv_tokens": 2e-8,
          "weight_bytes": 5e-13}
PREFILL = {"calls": 2e-3, "prefill_tokens": 1e-5, "prefill_attn": 5e-9, "weight_bytes": 1.5e-12}


def fresh_rng():
  seed = int(np.random.SeedSequence().entropy % 2**32)
  return np.random.default_rng(seed), seed


def decode_features(rng, n):
  out = []
  for _ in range(n):
    steps, slots = int(rng.integers(1, 17)), int(rng.integers(1, 33))
    # Weights of several dtypes in one module key: with one W, weight_bytes = steps * W
    # would be collinear with steps.
    w = W / rng.choice([1, 2, 4])
    context = int(np.exp(rng.uniform(np.log(16), np.log(8192))))
    out.append(sm.StepFeatures(steps=steps, decode_rows=steps * slots,
                               kv_tokens=steps * slots * context, weight_bytes=steps * w))
  return out


def prefill_features(rng, n):
  out = []
  for _ in range(n):
    tokens, cached = int(rng.integers(8, 513)), int(rng.integers(0, 4097))
    out.append(sm.StepFeatures(prefill_tokens=tokens, prefill_attn=tokens * (cached + tokens),
                               weight_bytes=W / rng.choice([1, 2, 4])))
  return out


def records(rng, module, features, truth, noise=0.01):
  c = np.array([truth.get(name, 0.0) for name in sm.FEATURES])
  return [sm.StepRecord(module, f, float(f.vector() @ c * (1 + noise * rng.standard_normal())))
          for f in features]


def within(coef, truth, rel):
  return all(abs(coef[name] / value - 1) <= rel for name, value in truth.items())


def test_fit_recovers_known_coefficients():
  rng, seed = fresh_rng()
  logs = (records(rng, "decode", decode_features(rng, 300), DECODE)
          + records(rng, "prefill", prefill_features(rng, 300), PREFILL))
  models = sm.fit(logs, seed=seed)
  assert sorted(models) == ["decode", "prefill"], seed
  for module, truth in (("decode", DECODE), ("prefill", PREFILL)):
    m = models[module]
    assert within(m.coef, truth, 0.03), (seed, module, m.coef)
    # Columns the module never uses stay at zero.
    assert all(m.coef[name] == 0 for name in sm.FEATURES if name not in truth), (seed, m.coef)
    assert m.heldout_mape is not None and m.heldout_mape < 3, (seed, module, m.heldout_mape)
    assert m.n_train == 300, seed


def test_fit_control_other_costs_are_not_recovered():
  # The check above can fail: times from other costs fit those costs, not DECODE's.
  rng, seed = fresh_rng()
  other = {name: c * rng.uniform(1.1, 1.3) for name, c in DECODE.items()}
  m = sm.fit_module(records(rng, "decode", decode_features(rng, 300), other), seed=seed)
  assert within(m.coef, other, 0.03), (seed, m.coef)
  assert not within(m.coef, DECODE, 0.03), (seed, m.coef)


def test_linear_prediction_is_the_dot_product():
  rng, seed = fresh_rng()
  coef = {name: float(rng.uniform(0, 1e-3)) for name in sm.FEATURES}
  m = sm.ModuleModel(coef=coef)
  c = np.array([coef[name] for name in sm.FEATURES])
  for f in decode_features(rng, 20) + prefill_features(rng, 20):
    assert m.predict(f) == pytest.approx(float(f.vector() @ c), rel=1e-12), seed
  # A missing name counts as zero; predictions stay positive.
  assert sm.ModuleModel(coef={"steps": 1e-3}).predict(sm.StepFeatures(steps=2)) == 2e-3
  assert sm.ModuleModel(coef={}).predict(sm.StepFeatures()) == sm.MIN_SECONDS


def test_table_exact_hit_returns_the_mean():
  rng, seed = fresh_rng()
  points = [sm.StepFeatures(steps=s, decode_rows=4 * s, weight_bytes=s * W) for s in (1, 2, 4, 8)]
  logs = [sm.StepRecord("decode", f, float(rng.uniform(1e-3, 2e-3)))
          for f in points for _ in range(int(rng.integers(1, 6)))]
  m = sm.fit_module(logs, seed=seed)
  assert len(m.table) == len(points), seed
  for f in points:
    times = [r.seconds for r in logs if r.features == f]
    assert m.from_table(f) == pytest.approx(np.mean(times), rel=1e-12), seed
  # Off the table, each neighbour's time is scaled by linear(f) / linear(point).
  one = sm.ModuleModel(coef={"steps": 1e-3}, table=(((1.0, 2.0) + (0.0,) * 6, 5e-3),))
  assert one.from_table(sm.StepFeatures(steps=6)) == pytest.approx(15e-3, rel=1e-12)
  assert sm.ModuleModel(coef={"steps": 1e-3}).from_table(sm.StepFeatures(steps=3)) == 3e-3


def test_table_beats_linear_on_a_nonlinear_truth():
  rng, seed = fresh_rng()
  logs = []
  for tokens in rng.integers(8, 513, 300):
    seconds = (1e-3 + 1e-4 * np.sqrt(tokens)) * (1 + 0.01 * rng.standard_normal())
    logs.append(sm.StepRecord("prefill", sm.StepFeatures(prefill_tokens=int(tokens)),
                              float(seconds)))
  m = sm.fit_module(logs, seed=seed)
  assert m.use == "table", (seed, m.linear_mape, m.table_mape)
  assert m.table_mape < m.linear_mape, seed
  assert m.heldout_mape == m.table_mape < 2, seed
  # Between table points, away from the steep low edge (one noisy neighbour can still
  # dominate a point).
  queries = rng.uniform(32, 512, 50)
  truth = 1e-3 + 1e-4 * np.sqrt(queries)
  pred = [m.predict(sm.StepFeatures(prefill_tokens=q)) for q in queries]
  assert np.all(np.abs(np.array(pred) / truth - 1) < 0.06), seed
  assert sm.mape(pred, truth) < 2, seed
  # Past the ends it follows the linear model's trend (it cannot know the curve there).
  ends = [m.predict(sm.StepFeatures(prefill_tokens=q)) for q in (1, 512, 2048)]
  assert 0 < ends[0] < ends[1] < ends[2], (seed, ends)


def test_few_records_fit_everything_without_heldout():
  rng, seed = fresh_rng()
  logs = records(rng, "decode", decode_features(rng, 7), DECODE, noise=0)
  m = sm.fit_module(logs, seed=seed)
  assert (m.use, m.heldout_mape, m.linear_mape, m.table_mape, m.n_train) == (
      "linear", None, None, None, 7)
  for r in logs:  # noiseless: every record is reproduced
    assert m.linear(r.features) == pytest.approx(r.seconds, rel=1e-6), seed


def test_fit_module_rejects_bad_arguments():
  rng, _ = fresh_rng()
  logs = records(rng, "decode", decode_features(rng, 10), DECODE)
  with pytest.raises(ValueError, match="modules"):
    sm.fit_module(logs + records(rng, "prefill", prefill_features(rng, 1), PREFILL))
  with pytest.raises(ValueError, match="heldout_fraction"):
    sm.fit_module(logs, heldout_fraction=1.0)
  with pytest.raises(ValueError, match="nonsense"):
    sm.fit_module(logs, features=["steps", "nonsense"])
  with pytest.raises(ValueError, match="empty"):
    sm.fit_module([])
  only = sm.fit_module(logs, features=["calls", "weight_bytes"])
  assert {name for name, c in only.coef.items() if c} <= {"calls", "weight_bytes"}


def test_transport_fit_and_formula():
  rng, seed = fresh_rng()
  alpha, bw = float(rng.uniform(1e-5, 1e-3)), float(rng.uniform(1e9, 1e11))
  nbytes = rng.integers(0, 1 << 30, 100)
  t = sm.TransportModel.fit(nbytes, alpha + nbytes / bw)
  assert t.alpha_s == pytest.approx(alpha, rel=1e-6), seed
  assert t.bandwidth_Bps == pytest.approx(bw, rel=1e-6), seed
  assert sm.TransportModel(2e-3, 1e9).seconds(5e8) == 2e-3 + 0.5
  flat = sm.TransportModel.fit([10, 1000, 10**6], [1e-3, 1e-3, 1e-3])
  assert flat.bandwidth_Bps == math.inf and flat.seconds(10**9) == pytest.approx(1e-3)
  assert sm.TransportModel.from_dict(json.loads(json.dumps(flat.to_dict()))) == flat
  with pytest.raises(ValueError, match="bandwidth_Bps"):
    sm.TransportModel(0.0, 0.0)
  with pytest.raises(ValueError, match="alpha_s"):
    sm.TransportModel(-1.0, 1e9)


def calibration(rng):
  logs = (records(rng, "decode", decode_features(rng, 40), DECODE)
          + records(rng, "prefill", prefill_features(rng, 40), PREFILL))
  models = sm.fit(logs)
  # One model predicts by its table, so tables are exercised end to end.
  models["decode:int8"] = dataclasses.replace(models["decode"], use="table")
  return sm.Calibration(
      name="cpu-test", modules=models,
      transports={"in_process": sm.TransportModel(1e-5, math.inf),
                  "nvlink": sm.TransportModel(5e-6, 4.5e11)},
      source="measured", device={"platform": "cpu", "device_kind": "cpu", "cores": 2},
      versions={"jaxsun": "abc123"}, engine={"layout": "paged", "chunk": 8},
      date="2025-01-01", notes="test")


def test_calibration_save_load_round_trip(tmp_path):
  rng, seed = fresh_rng()
  cal = calibration(rng)
  path = tmp_path / "cal.json"
  cal.save(path)
  assert os.listdir(tmp_path) == ["cal.json"]  # no temporary file left behind
  text = path.read_text()
  assert text == json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n"
  back = sm.Calibration.load(path)
  assert back == cal, seed
  assert back.modules["decode"].table == cal.modules["decode"].table
  f = decode_features(rng, 1)[0]
  for module in cal.modules:
    assert back.predict(module, f) == cal.predict(module, f), (seed, module)
  # A save that fails leaves the previous file whole, and no temporary file.
  bad = dataclasses.replace(cal, notes="x", device={"handle": object()})
  with pytest.raises(TypeError):
    bad.save(path)
  assert os.listdir(tmp_path) == ["cal.json"] and path.read_text() == text


def test_calibration_rejects_other_schemas(tmp_path):
  rng, _ = fresh_rng()
  d = calibration(rng).to_dict()
  d["schema"] = sm.SCHEMA_VERSION + 1
  path = tmp_path / "future.json"
  path.write_text(json.dumps(d))
  with pytest.raises(ValueError, match="schema"):
    sm.Calibration.load(path)
  with pytest.raises(ValueError, match="schema"):
    sm.Calibration.from_dict(d)


def test_calibration_unknown_names():
  rng, _ = fresh_rng()
  cal = calibration(rng)
  with pytest.raises(ValueError, match=r"'verify'.*decode"):
    cal.predict("verify", sm.StepFeatures())
  with pytest.raises(ValueError, match=r"'rdma'.*in_process"):
    cal.transfer_seconds("rdma", 1024)


def test_scaled_doubles_every_time():
  rng, seed = fresh_rng()
  cal = calibration(rng)
  double = cal.scaled(2.0)
  assert double.name != cal.name
  for f in decode_features(rng, 10) + prefill_features(rng, 10):
    for module in cal.modules:
      assert double.predict(module, f) == 2 * cal.predict(module, f), (seed, module)
  for transport in cal.transports:
    for nbytes in (0, 1, 12345, 1 << 30):
      assert double.transfer_seconds(transport, nbytes) == 2 * cal.transfer_seconds(
          transport, nbytes), (seed, transport)


@pytest.mark.parametrize("field", sm.FEATURES)
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, "x"])
def test_step_features_validation(field, value):
  with pytest.raises(ValueError, match=field):
    sm.StepFeatures(**{field: value})


def test_step_features_and_records_serialise():
  rng, seed = fresh_rng()
  f = decode_features(rng, 1)[0]
  assert sm.StepFeatures.from_dict(f.to_dict()) == f, seed
  assert list(f.vector()) == [getattr(f, name) for name in sm.FEATURES]
  r = sm.StepRecord("decode", f, 1e-3)
  assert sm.StepRecord.from_dict(json.loads(json.dumps(r.to_dict()))) == r
  with pytest.raises(ValueError, match="stepz"):
    sm.StepFeatures.from_dict({"stepz": 1})
  with pytest.raises(ValueError, match="seconds"):
    sm.StepRecord("decode", f, 0.0)
  with pytest.raises(ValueError, match="missing"):
    sm.StepRecord.from_dict({"module": "decode", "seconds": 1.0})


def test_mape():
  assert sm.mape([1.1, 1.8], [1.0, 2.0]) == pytest.approx(10.0)
  with pytest.raises(ValueError, match="true"):
    sm.mape([1.0], [0.0])
