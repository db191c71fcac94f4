"""The benchmark client (`jaxsun.serving.bench`) against real deployments: in-process and
over the HTTP API, a multi-agent session workload answers what `jaxsun.generate` answers
with session turns sent only after the turn before ended; overload is counted, never
lost; the loopback load test accounts for every request. No wall-clock assertions."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import pytest

from experiments.benchmarks import serving_load
from jaxsun.serving import api, bench
from jaxsun.serving.system import DeploymentConfig, ServingSystem
from jaxsun.serving.workload import WorkloadSpec, make_workload
from tests import serving_models as sm

ENG = dict(slots=4, capacity=96, chunk=4)  # the engine shape of the other serving tests
OUT = 4  # output tokens (a max_new_tokens the system tests' references also use)


def deploy(**kw) -> ServingSystem:
  return ServingSystem(DeploymentConfig(kind="sun", **{**ENG, **kw}), sm.sun_models(),
                       eos_id=None)


@functools.lru_cache(maxsize=None)
def sessions():
  """4 sessions x 3 turns alternating math / code on a growing context (greedy); contexts
  of 6, 11 and 16 tokens keep to the engine shapes the load test compiles too."""
  spec = WorkloadSpec(models=("math", "code"), kind="sessions", num_sessions=4, turns=3,
                      rate=40.0, prompt_len=6, output_len=OUT, observation_len=1,
                      vocab=(1, sm.CFG.vocab_size), seed=3)
  return make_workload(spec)


@functools.lru_cache(maxsize=None)
def expected() -> tuple[tuple[int, ...], ...]:
  """`jaxsun.generate`'s greedy tokens per item (one batched call per model)."""
  items, models = sessions(), sm.sun_models()
  out: list = [None] * len(items)
  for m in models:
    idx = [i for i, it in enumerate(items) if it.model == m]
    for i, toks in zip(idx, sm.references(models[m], [items[i].prompt for i in idx], OUT)):
      out[i] = tuple(toks)
  return tuple(out)


def check_sessions(result: bench.BenchResult) -> None:
  items = sessions()
  acc = result.accounting()
  assert acc["balanced"] and acc["completed"] == len(items) and acc["wrong_lengths"] == 0
  assert len({r.request_id for r in result.records}) == len(items)
  for item, rec in zip(items, result.records):
    if item.depends_on is not None:  # sent only after the turn before it ended
      dep = result.records[item.depends_on]
      assert item.session_id == items[item.depends_on].session_id
      assert rec.arrival >= dep.end >= dep.token_times[-1]
    assert rec.arrival <= rec.token_times[0] <= rec.token_times[-1] <= rec.end
  assert [tuple(r.output_tokens) for r in result.records] == list(expected())


def test_in_process_sessions_respect_dependencies_and_answer_what_generate_answers():
  system = deploy()
  try:
    result = bench.run_workload(system, sessions(), timeout_s=600.0)
  finally:
    system.shutdown()
  check_sessions(result)
  assert all(r.decode_worker == "decode-shared-0" for r in result.records)  # server fields
  s = result.summary(occupancy=system.occupancy())
  assert s["completed"] == len(sessions()) and s["total_output_tokens"] == OUT * len(sessions())
  assert s["p99_ttft_ms"] is not None and s["mean_occupancy"] is not None


def test_the_same_sessions_over_http_and_the_cli(tmp_path):
  server = api.serve(deploy())
  try:
    result = bench.run_workload(server.url + "/v1", sessions(), tokenizer="byte",
                                timeout_s=600.0)
    check_sessions(result)  # token ids recovered from the streamed byte text
    assert all(r.request_id.startswith("cmpl-") for r in result.records)
    assert result.texts[0] is not None and len(result.texts[0]) == OUT
    # The CLI: a seeded workload, JSON with records, and the CDF plot.
    out, png = tmp_path / "r.json", tmp_path / "cdf.png"
    summary = bench.main(["--url", server.url, "--num-requests", "6", "--rate", "inf",
                          "--models", "math,code", "--vocab", "1:64", "--prompt-len", "6:10",
                          "--output-len", "4", "--seed", "1", "--tokenizer", "byte",
                          "--slo", "ttft:60000", "--out", str(out), "--plot", str(png)])
  finally:
    server.stop()
  saved = json.loads(out.read_text())
  assert saved["completed"] == summary["completed"] == 6 and saved["rejected"] == 0
  assert saved["total_output_tokens"] == 24 and len(saved["records"]) == 6
  assert saved["accounting"]["balanced"] and saved["good_requests"] == 6
  assert png.stat().st_size > 0


def test_overload_is_counted_as_rejected_never_lost():
  system = deploy(max_inflight=2)
  items = make_workload(WorkloadSpec(models=("math", "code"), num_requests=12, rate=math.inf,
                                     prompt_len=8, output_len=4, vocab=(1, 64), seed=4))
  try:
    result = bench.run_workload(system, items, timeout_s=600.0)
  finally:
    system.shutdown()
  acc = result.accounting()
  assert acc["balanced"] and acc["lost"] == 0 and acc["duplicate_ids"] == 0
  assert acc["rejected"] > 0 and acc["completed"] + acc["rejected"] == len(items)
  for r in result.records:
    assert r.ok or (r.status == 429 and "max_inflight" in r.error and not r.output_tokens)
  assert system.counters["rejected"] == acc["rejected"]
  assert result.summary()["status_counts"] == {"429": acc["rejected"]}


def test_bad_dependencies_are_refused():
  items = list(sessions()[:2])
  items[0] = dataclasses.replace(items[0], depends_on=1)  # 0 -> 1 -> 0
  with pytest.raises(ValueError, match="cycle"):
    bench.run_workload("http://127.0.0.1:9", items)


def test_tiny_load_test_loses_and_duplicates_nothing(tmp_path):
  result = serving_load.main(["--tiny", "--out", str(tmp_path)])
  saved = json.loads(next(tmp_path.glob("serving_load_tiny_*.json")).read_text())
  acc = saved["accounting"]
  assert acc["lost"] == 0 and acc["duplicate_ids"] == 0 and acc["items"] == 200
  assert acc["completed"] + acc["rejected"] + acc["failed"] == 200
  assert saved["checks"]["server_metrics_match_client"] and saved["passed"]
  assert saved["load"]["completed"] == acc["completed"] > 0
  assert saved["saturation"]["request_throughput"] > 0
  assert result["workload"]["rate"] == pytest.approx(
      2 * saved["saturation"]["request_throughput"])
  assert list(tmp_path.glob("serving_load_tiny_*.md"))
