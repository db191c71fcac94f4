"""The serving simulator: the engine's own scheduler on a logical clock.

Engine and simulator replay the same trace through the same policy objects and route
alike; a request alone in the system gets exactly the step-time model's times; the
simulated engine computes the features the real engine logs; workloads are accounted
for (429s, sessions, prefix reuse) as on the engine.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from jaxsun.serving import router as router_lib
from jaxsun.serving.bench import run_workload
from jaxsun.serving.engine import Engine, Params, decode_work, prefill_work
from jaxsun.serving.request import SamplingParams
from jaxsun.serving.sim import calibrate
from jaxsun.serving.sim.engine import SimDevice, SimEngine, SimParams
from jaxsun.serving.sim.stepmodel import Calibration, ModuleModel, StepFeatures, TransportModel
from jaxsun.serving.sim.system import SimSystem, sim_models, sim_twins
from jaxsun.serving.system import DeploymentConfig, ServingSystem
from jaxsun.serving.workers import DecodeWorker, PrefillWorker
from jaxsun.serving.workload import LengthDist, WorkloadItem, WorkloadSpec, make_workload
from tests import serving_models as sm

# Known coefficients: every term matters, so a wrong feature shows in the times.
COEF_P = {"calls": 2e-3, "prefill_tokens": 3e-5, "prefill_attn": 5e-7}
COEF_D = {"calls": 4e-4, "steps": 1e-3, "decode_rows": 2e-5, "kv_tokens": 3e-7}
ALPHA, BW = 1.5e-3, 2e8


def calibration(scale: float = 1.0) -> Calibration:
  return Calibration(
      name="test", source="measured", device={"platform": "test"}, versions={},
      modules={"prefill": ModuleModel(coef=COEF_P), "decode": ModuleModel(coef=COEF_D)},
      transports={"in_process": TransportModel(alpha_s=ALPHA, bandwidth_Bps=BW)}).scaled(scale)


def lin(coef, **f):
  return sum(coef.get(k, 0.0) * v for k, v in f.items())


def test_a_request_alone_gets_the_step_time_models_exact_times():
  cfg = sm.CFG
  sim = SimSystem(DeploymentConfig(kind="sun", slots=4, capacity=96, chunk=4),
                  sim_models(cfg, {"math": "sun"}), calibration())
  # prompt 20 -> query bucket 32 over a 32-slot KV; 1 + 2 chunks of 4 decode steps.
  item = WorkloadItem(0.25, "math", tuple(range(1, 21)),
                      SamplingParams(max_tokens=9, ignore_eos=True))
  rec = sim.run([item]).records[0]
  assert rec.ok and len(rec.output_tokens) == 9
  t_pre = lin(COEF_P, calls=1, prefill_tokens=32, prefill_attn=32 * 32)
  assert rec.ttft == pytest.approx(t_pre, rel=1e-9)
  kv_bytes = 32 * 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
  arrive = t_pre + ALPHA + kv_bytes / BW  # the KV reaches the decode worker
  # KV windows: live 20 (+4 in flight) -> bucket 32; the engine's kv_window rule.
  w1, w2 = 32, 32
  c1 = lin(COEF_D, calls=1, steps=4, decode_rows=4, kv_tokens=4 * 4 * w1)
  c2 = lin(COEF_D, calls=1, steps=4, decode_rows=4, kv_tokens=4 * 4 * w2)
  empty = lin(COEF_D, calls=1)  # the chunk dispatched before the last one is read
  times = np.asarray(rec.token_times) - 0.25
  assert times[0] == pytest.approx(t_pre, rel=1e-9)
  np.testing.assert_allclose(times[1:5], arrive + c1, rtol=1e-9)
  np.testing.assert_allclose(times[5:], arrive + c1 + c2, rtol=1e-9)
  assert rec.end - 0.25 == pytest.approx(arrive + c1 + c2, rel=1e-9)
  assert rec.transfer_s == pytest.approx(ALPHA + kv_bytes / BW, rel=1e-9)
  del empty  # after the last read nothing is waited for


def test_the_simulator_runs_the_engines_own_router_and_workers():
  models = sm.sun_models()
  cfg = DeploymentConfig(kind="sun", slots=4, capacity=96, chunk=4, prefill_workers=2,
                         prefill_policy="cache_aware", decode_policy="power_of_two")
  real = ServingSystem(cfg, models, start=False)
  sim = SimSystem(cfg, sim_twins(real), calibration())
  assert type(sim.router) is router_lib.Router  # pylint: disable=unidiomatic-typecheck
  assert type(sim.router.prefill_policy) is type(real.router.prefill_policy)
  assert type(sim.router.decode_policy) is type(real.router.decode_policy)
  assert [type(w) for w in sim.prefill_workers] == [PrefillWorker] * 4
  assert [type(w) for w in sim.decode_workers] == [DecodeWorker]
  assert [w.worker_id for w in sim.prefill_workers + sim.decode_workers] == \
      [w.worker_id for w in real.prefill_workers + real.decode_workers]
  assert {m: (p.tree_id, sim.decode_params[m].tree_id) for m, p in sim.prefill_params.items()} \
      == {m: (p.tree_id, real.decode_params[m].tree_id) for m, p in real.prefill_params.items()}


def chained(items):
  """Each item after the previous one ended: routing then depends on state, not timing."""
  return [dataclasses.replace(it, send_time=0.0, depends_on=i - 1 if i else None)
          for i, it in enumerate(items)]


@pytest.mark.parametrize("prefill_policy", ["cache_aware", "round_robin"])
def test_engine_and_simulator_make_the_same_decisions_on_the_same_trace(prefill_policy):
  models = sm.prefillshare_models()
  cfg = DeploymentConfig(kind="prefillshare", slots=4, capacity=96, chunk=4,
                         prefill_workers=2, prefill_policy=prefill_policy,
                         decode_policy="round_robin", prefix_block=4)
  items = chained(make_workload(WorkloadSpec(
      models=("critic", "planner"), kind="shared_prefix", num_groups=3, prompts_per_group=4,
      shared_prefix_len=24, prompt_len=LengthDist.uniform(3, 9), output_len=5,
      vocab=(1, sm.CFG.vocab_size), seed=3)))
  real = ServingSystem(cfg, models)
  try:
    got = run_workload(real, items).records
    server = {r.request_id: r for r in real.records}
    eng = [server[r.request_id] for r in got]
  finally:
    real.shutdown()
  sim = SimSystem(cfg, sim_twins(real), calibration()).run(items).records
  assert all(r.ok for r in eng + sim)
  key = lambda r: (r.model, r.prefill_worker, r.decode_worker, r.cached_prompt_tokens,
                   len(r.output_tokens))
  assert [key(r) for r in eng] == [key(r) for r in sim]
  hits = sum(r.cached_prompt_tokens for r in sim)
  assert hits > 0 if prefill_policy == "cache_aware" else True


def test_simulated_engine_computes_the_features_the_engine_logs():
  split = sm.base()
  eng = Engine(sm.CFG, slots=4, capacity=96, chunk=4)
  pre, dec = Params.prefill_of(split), Params.decode_of(split)
  sim = SimEngine(sm.CFG, calibration=calibration(), device=SimDevice("d"), slots=4,
                  capacity=96, chunk=4)
  spre, sdec = SimParams.of(pre), SimParams.of(dec)
  eng.step_log, sim.step_log = [], []
  for engine, p, d in ((eng, pre, dec), (sim, spre, sdec)):
    r = np.random.default_rng(1)
    state = engine.init_decode_state()
    hit, _ = engine.prefill(p, tuple(int(t) for t in r.integers(1, 60, 13)))
    for slot, n in enumerate((5, 17, 40)):
      toks = hit.tokens + tuple(int(t) for t in r.integers(1, 60, n))
      prefix, _ = engine.prefill(p, toks, existing_prefix=hit if slot == 1 else None)
      state = engine.insert(prefix, state, slot, valid_producers={p.tree_id},
                            sampling=SamplingParams(max_tokens=3 + 4 * slot, ignore_eos=True))
    live = 13 + 40
    for _ in range(4):
      state, chunk = engine.generate(d, state, max_live_length=live)
      engine.fetch(chunk)
      live += 4
  assert [(e.module, e.work) for e in eng.step_log] == [(e.module, e.work) for e in sim.step_log]
  works = [e.work for e in eng.step_log]
  assert works[0] == prefill_work(16, 16, pre.nbytes)  # 13 tokens: query bucket 16
  assert works[2] == prefill_work(32, 64, pre.nbytes)  # 17 new after a 13-token hit
  # Budgets 2, 6, 10 after the prefill's token: chunks of 4 steps emit 10, 6, 2, 0.
  assert [w["decode_rows"] for w in works[4:]] == [10, 6, 2, 0]
  assert [w["steps"] for w in works[4:]] == [4, 4, 2, 0]
  # Live 53 + 4 -> a 64 bucket, not worth copying out of a 96-slot store: reads all 96.
  assert works[4] == decode_work(4, 10, 4 * 96, dec.nbytes, inserts=3)
  assert [w["inserts"] for w in works[4:]] == [3, 0, 0, 0]


def test_live_engine_logs_fit_a_calibration():
  models = sm.sun_models()
  cfg = DeploymentConfig(kind="sun", slots=4, capacity=96, chunk=4)
  system = ServingSystem(cfg, models)
  try:
    calibrate.enable_step_logs(system)
    items = make_workload(WorkloadSpec(models=("code", "math"), num_requests=24,
                                       prompt_len=LengthDist.uniform(4, 40), output_len=9,
                                       vocab=(1, 60), seed=4))
    run_workload(system, items)
    records = calibrate.collect_steps(system)
  finally:
    system.shutdown()
  modules = {r.module for r in records}
  assert modules == {"prefill", "decode"}
  assert sum(r.module == "prefill" for r in records) == 24
  assert sum(r.features.decode_rows for r in records) == 24 * 8  # tokens after the first
  cal = calibrate.calibrate(records, name="live-test",
                            transports={"in_process": TransportModel(1e-5, math.inf)})
  assert cal.source == "measured" and cal.versions["jax"]
  assert all(cal.predict(r.module, r.features) > 0 for r in records)


def test_workloads_are_accounted_for_as_on_the_engine():
  cfg = DeploymentConfig(kind="conventional", slots=4, capacity=128, chunk=4, max_inflight=6)
  sim = SimSystem(cfg, sim_models(sm.CFG, {"a": "full", "b": "full"}), calibration())
  items = make_workload(WorkloadSpec(models=("a", "b"), num_requests=200, rate=math.inf,
                                     zipf_s=1.2, prompt_len=LengthDist.uniform(4, 40),
                                     output_len=LengthDist.uniform(1, 30), vocab=(1, 60),
                                     seed=5))
  result = sim.run(items)
  acc = result.accounting()
  assert acc["balanced"] and acc["wrong_lengths"] == 0
  assert acc["rejected"] > 0 and acc["completed"] >= 6 and acc["failed"] == 0
  assert {r.status for r in result.records if not r.ok} == {429}
  # Sessions: a turn starts only after the previous turn of its session ended.
  sim = SimSystem(DeploymentConfig(kind="prefillshare", slots=4, capacity=128, chunk=4),
                  sim_models(sm.CFG, {"a": "prefillshare", "b": "prefillshare"}),
                  calibration())
  items = make_workload(WorkloadSpec(models=("a", "b"), kind="sessions", num_sessions=6,
                                     turns=4, rate=50.0, prompt_len=16, output_len=6,
                                     observation_len=4, max_context_len=128, vocab=(1, 60),
                                     seed=6))
  recs = sim.run(items).records
  for i, it in enumerate(items):
    if it.depends_on is not None:
      assert recs[i].arrival >= recs[it.depends_on].end
  s = sim.prefix_cache_stats()
  assert s["hit_tokens"] > 0  # later turns reuse earlier turns' KV (one shared tree)


def test_a_paged_layout_reads_only_live_kv():
  cfg = sm.CFG
  dev = SimDevice("d")
  eng = SimEngine(cfg, calibration=calibration(), device=dev, slots=4, capacity=96,
                  chunk=4, layout="paged")
  eng.step_log = []
  p = SimParams("t", cfg, 1000)
  state = eng.init_decode_state()
  prefix, _ = eng.prefill(p, tuple(range(1, 11)))
  state = eng.insert(prefix, state, 0, valid_producers={"t"},
                     sampling=SamplingParams(max_tokens=3, ignore_eos=True))
  state, chunk = eng.generate(p, state, max_live_length=10)
  work = eng.step_log[-1].work
  assert work["steps"] == 2 and work["decode_rows"] == 2
  assert work["kv_tokens"] == 11 + 12  # its own KV at each step, nothing padded
  assert eng.step_log[0].work == prefill_work(10, 10, 1000)
  assert StepFeatures(**work).weight_bytes == 2000


def test_a_simulated_engine_refuses_what_the_engine_refuses():
  from jaxsun.serving.engine import InsertError  # pylint: disable=import-outside-toplevel
  eng = SimEngine(sm.CFG, calibration=calibration(), device=SimDevice("d"), slots=2,
                  capacity=32, chunk=4)
  p = SimParams("t", sm.CFG, 1000)
  prefix, _ = eng.prefill(p, tuple(range(1, 21)))
  state = eng.init_decode_state()
  with pytest.raises(InsertError, match="max_tokens"):
    eng.insert(prefix, state, 0, valid_producers={"t"},
               sampling=SamplingParams(max_tokens=20))
  with pytest.raises(InsertError, match="not valid"):
    eng.insert(prefix, state, 0, valid_producers={"other"},
               sampling=SamplingParams(max_tokens=2))
  with pytest.raises(ValueError, match="unknown"):
    SimSystem(DeploymentConfig(kind="sun", slots=2, capacity=32),
              sim_models(sm.CFG, {"a": "sun"}), calibration(), transport="nvlink")


REPORT = "experiments/results/serving/validation/validation.json"


def test_the_committed_validation_replays_and_a_wrong_calibration_fails_it():
  """The committed report's engine measurements, re-simulated: the simulator reproduces
  the report exactly, ranks the policies as the engine did, and the same calibrations
  off by 1.6x are much further from the engine and fail (the check can fail)."""
  import json  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  from jaxsun.serving.sim import validate  # pylint: disable=import-outside-toplevel

  root = pathlib.Path(__file__).resolve().parents[1]
  report = json.loads((root / REPORT).read_text())
  folds = [Calibration.load(root / f) for f in report["fold_calibration_files"]]
  cases = [c for c in validate.default_cases() if c.name in
           {e["name"] for e in report["cases"]}]
  twins = {c.name: validate.sim_twins_of(c) for c in cases}
  again = validate.resimulate(report, folds, cases=cases, twins=twins)
  assert again["passed"] == report["passed"]
  for e_old, e_new in zip(report["cases"], again["cases"]):  # the simulator is deterministic
    for r_old, r_new in zip(e_old["runs"], e_new["runs"]):
      assert r_old["sim"] == pytest.approx(r_new["sim"], rel=1e-9)
    if "ranking" in e_new:
      assert e_new["ranking"]["same_best"]
  right = again["score"]
  for factor in (1.6, 1 / 1.6):
    wrong = validate.resimulate(report, [f.scaled(factor) for f in folds], cases=cases,
                                twins=twins)
    assert not wrong["passed"], factor
    assert wrong["score"]["median_abs_rel_err"] > 1.5 * right["median_abs_rel_err"], factor
    assert wrong["score"]["rows_ok"] < right["rows_ok"], factor
