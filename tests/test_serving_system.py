"""Deployments end to end in one process: outputs equal `jaxsun.generate` for every kind,
corrupt KV transfers are caught, bad requests are refused by field, overload is explicit,
a killed worker's requests complete elsewhere, shutdown drains, prefixes are reused
across PrefillShare models only."""

from __future__ import annotations

import time

import pytest

from jaxsun.serving.request import (ContextTooLong, ModelNotFound, Overloaded, Request,
                                    RequestError, RequestFailed, SamplingParams)
from jaxsun.serving.system import DeploymentConfig, ServingSystem
from tests import serving_models as sm

ENG = dict(slots=4, capacity=96, chunk=4)  # the engine shape of test_serving_engine


def deploy(kind, models, *, start=False, **kw):
  cfg = DeploymentConfig(kind=kind, **{**ENG, **kw})
  return ServingSystem(cfg, models, eos_id=None, start=start)


def check_outputs(system, models, prompts, max_tokens, *, threaded):
  names = sorted(models)
  reqs = [Request(model=names[i % len(names)], prompt=p,
                  sampling=SamplingParams(max_tokens=max_tokens))
          for i, p in enumerate(prompts)]
  handles = [system.submit(r) for r in reqs]
  if not threaded:
    system.run_until_idle()
  got = {r.request_id: h.result(timeout=300).output_tokens for r, h in zip(reqs, handles)}
  for m in names:
    mine = [r for r in reqs if r.model == m]
    if not mine:
      continue
    want = sm.references(models[m], [r.prompt for r in mine], max_tokens)
    assert [got[r.request_id] for r in mine] == want, m
  return [h.record for h in handles]


@pytest.mark.parametrize("family,kind", [
    ("sun", "sun"), ("sun", "conventional"), ("sun", "colocated"),
    ("prefillshare", "prefillshare"), ("prefillshare", "conventional"),
    ("prefillshare", "colocated")])
def test_every_deployment_answers_what_generate_answers(family, kind):
  models = sm.sun_models() if family == "sun" else sm.prefillshare_models()
  system = deploy(kind, models, prefill_policy="round_robin", decode_policy="round_robin")
  records = check_outputs(system, models, sm.prompts(6, seed=10), 9, threaded=False)
  decode_workers = {r.decode_worker for r in records}
  if kind == "sun":  # one shared decode pool served both task models
    assert decode_workers == {"decode-shared-0"}
  elif kind in ("conventional", "prefillshare"):
    assert len(decode_workers) == 2  # per-model decode pools
  if kind != "colocated":
    assert all(r.transfer_bytes > 0 and r.prefill_worker != r.decode_worker for r in records)


def test_threaded_runtime_sun_mixed_models():
  system = deploy("sun", sm.sun_models(), start=True, decode_workers=2)
  try:
    check_outputs(system, sm.sun_models(), sm.prompts(8, seed=11), 12, threaded=True)
    occ = system.occupancy()
    assert occ and max(occ) > 0.25  # rows of both models batched in one step at times
  finally:
    system.shutdown()


def test_a_corrupted_kv_transfer_is_caught_and_recomputed():
  models = sm.sun_models()
  system = deploy("sun", models, transfer="fake", transfer_options={"corrupt_first": 1})
  records = check_outputs(system, models, sm.prompts(2, seed=12), 8, threaded=False)
  assert system.transfer.corrupted == 1 and system.counters["corrupt_kv"] == 1
  assert sorted(r.retries for r in records) == [0, 1]


def test_a_corrupted_kv_transfer_without_retries_fails_loudly_never_wrong():
  models = sm.sun_models()
  system = deploy("sun", models, transfer="fake", transfer_options={"corrupt_first": 1},
                  max_retries=0)
  prompt = sm.prompts(1, seed=13)[0]
  handle = system.submit(Request(model="math", prompt=prompt,
                                 sampling=SamplingParams(max_tokens=8)))
  system.run_until_idle()
  with pytest.raises(RequestFailed, match="digest"):
    handle.result(timeout=10)
  want = sm.reference(models["math"], prompt, 8)
  got = handle.record.output_tokens  # only the prefill tree's first token went out
  assert got == want[:len(got)] and len(got) < len(want)


@pytest.mark.parametrize("make,exc,field", [
    (lambda: Request(model="nope", prompt=(1, 2)), ModelNotFound, "model"),
    (lambda: Request(model="math", prompt=tuple(range(1, 60)),
                     sampling=SamplingParams(max_tokens=50)), ContextTooLong, "max_tokens"),
    (lambda: Request(model="math", prompt=(1, 99)), RequestError, "prompt"),
    (lambda: Request(model="math", prompt=()), RequestError, "prompt"),
    (lambda: Request(model="math", prompt="12"), RequestError, "prompt"),
    (lambda: Request(model="math", prompt=(1,), sampling=SamplingParams(max_tokens=-1)),
     RequestError, "max_tokens"),
    (lambda: Request(model="math", prompt=(1,), sampling=SamplingParams(temperature=-0.5)),
     RequestError, "temperature"),
    (lambda: Request(model="math", prompt=(1,), sampling=SamplingParams(max_tokens="9")),
     RequestError, "max_tokens"),
])
def test_bad_requests_are_refused_by_field_and_the_system_keeps_serving(make, exc, field):
  system = deploy("sun", sm.sun_models())
  with pytest.raises(exc) as info:
    system.submit(make())
  assert info.value.field == field and info.value.status in (400, 404)
  assert not system.inflight
  check_outputs(system, sm.sun_models(), sm.prompts(1, seed=14), 4, threaded=False)


def test_overload_is_an_explicit_429_then_service_resumes():
  system = deploy("sun", sm.sun_models(), max_inflight=2)
  p = sm.prompts(3, seed=15)
  system.submit(Request(model="math", prompt=p[0]))
  system.submit(Request(model="code", prompt=p[1]))
  with pytest.raises(Overloaded) as info:
    system.submit(Request(model="math", prompt=p[2]))
  assert info.value.status == 429 and "max_inflight" in info.value.reason
  system.run_until_idle()
  check_outputs(system, sm.sun_models(), p[2:], 4, threaded=False)
  full = deploy("sun", sm.sun_models(), max_queue=1)  # a bounded prefill queue
  full.submit(Request(model="math", prompt=p[0]))
  with pytest.raises(Overloaded, match="queue"):
    full.submit(Request(model="math", prompt=p[1]))


def test_a_killed_decode_worker_has_its_requests_completed_elsewhere():
  models = sm.sun_models()
  system = deploy("sun", models, start=True, decode_workers=2, decode_policy="round_robin")
  try:
    prompts = sm.prompts(8, seed=16)
    names = sorted(models)
    reqs = [Request(model=names[i % 2], prompt=p, sampling=SamplingParams(max_tokens=40))
            for i, p in enumerate(prompts)]
    handles = [system.submit(r) for r in reqs]
    deadline = time.monotonic() + 120
    victim = system.decode_workers[0]
    while not any(len(h.record.output_tokens) > 2 and h.record.decode_worker == victim.worker_id
                  for h in handles):
      assert time.monotonic() < deadline, "no tokens streamed"
      time.sleep(0.005)
    moved = system.kill_worker(victim.worker_id)
    assert moved >= 1
    got = {r.request_id: h.result(timeout=300).output_tokens for r, h in zip(reqs, handles)}
    for m in names:
      mine = [r for r in reqs if r.model == m]
      assert [got[r.request_id] for r in mine] == sm.references(
          models[m], [r.prompt for r in mine], 40)
    assert any(h.record.retries >= 1 for h in handles)
    assert system.health()["status"] == "degraded"
  finally:
    system.shutdown()


def test_graceful_shutdown_drains_then_refuses_with_503():
  models = sm.sun_models()
  system = deploy("sun", models, start=True)
  prompts = sm.prompts(4, seed=17)
  handles = [system.submit(Request(model="code", prompt=p, sampling=SamplingParams(
      max_tokens=30))) for p in prompts]
  system.shutdown(drain=True, timeout=300)
  assert [h.result(timeout=1).output_tokens for h in handles] == sm.references(
      models["code"], prompts, 30)
  with pytest.raises(Overloaded) as info:
    system.submit(Request(model="code", prompt=prompts[0]))
  assert info.value.status == 503


def test_cancel_ends_a_request_with_abort_and_frees_its_slot():
  system = deploy("sun", sm.sun_models())
  h = system.submit(Request(model="math", prompt=(1, 2, 3),
                            sampling=SamplingParams(max_tokens=80)))
  for _ in range(3):
    system.step()
  h.cancel()
  system.run_until_idle()
  assert h.result(timeout=1).finish_reason == "abort" and len(h.record.output_tokens) < 80
  assert not system.decode_workers[0].slot_jobs


def multi_agent_turns(system, models, order):
  """Models take turns on one growing context; returns the records."""
  ctx = sm.prompts(1, seed=18, lo=30, hi=31)[0]
  records = []
  for i, name in enumerate(order):
    h = system.submit(Request(model=name, prompt=ctx, sampling=SamplingParams(max_tokens=6)))
    system.run_until_idle()
    rec = h.result(timeout=10)
    assert rec.output_tokens == sm.reference(models[name], ctx, 6)
    records.append(rec)
    ctx = ctx + tuple(rec.output_tokens) + (7 + i, 8 + i, 9 + i)  # + an observation
  return records


def test_prefillshare_models_reuse_each_others_prefix_kv():
  models = sm.prefillshare_models()
  order = ["planner", "critic", "planner", "critic"]
  shared = multi_agent_turns(deploy("prefillshare", models), models, order)
  # Each turn after the first finds the previous turn's prompt KV (made by the other
  # model's request: same shared prefill tree) and prefills only the new tokens.
  assert [r.cached_prompt_tokens for r in shared] == [0] + [
      r.prompt_len - 1 for r in shared[:-1]]
  # Control: per-model prefill pools (conventional) cannot share across models.
  conv = multi_agent_turns(deploy("conventional", models), models, order)
  assert [r.cached_prompt_tokens for r in conv[:2]] == [0, 0]
  assert conv[2].cached_prompt_tokens == conv[0].prompt_len - 1  # its own earlier turn


def test_metrics_text_is_prometheus():
  system = deploy("sun", sm.sun_models())
  check_outputs(system, sm.sun_models(), sm.prompts(2, seed=19), 3, threaded=False)
  text = system.metrics_text()
  assert 'jaxsun_requests_total{outcome="completed"} 2.0' in text
  assert "jaxsun_time_to_first_token_seconds_bucket" in text
  assert 'jaxsun_worker_running{pool="decode",worker="decode-shared-0"}' in text


def test_deployments_refuse_models_that_do_not_share_the_module():
  with pytest.raises(ValueError, match="one shared decode tree"):
    deploy("sun", sm.prefillshare_models())
  with pytest.raises(ValueError, match="one shared prefill tree"):
    deploy("prefillshare", sm.sun_models())
  with pytest.raises(ValueError, match="kind"):
    DeploymentConfig(kind="mystery")
  with pytest.raises(ValueError, match="decode_policy"):
    DeploymentConfig(decode_policy="fastest")
