"""The Ray runtime (`jaxsun.serving.ray_backend`) on a local Ray cluster of this machine.

One "sun" deployment serves every test: two task models with their own prefill trees and
one shared decode tree, as 2 prefill actors and 2 decode actors (Ray worker start-up and
the JAX import per actor dominate the time, so the actors are shared). Greedy outputs must
equal `jaxsun.generate` token for token; KV must move through the object store; the
requests of a killed decode actor must complete on the other one, without a duplicated or
lost token. No test asserts on durations; waits have generous timeouts.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from flax import nnx

import jaxsun

ray = pytest.importorskip("ray")

# pylint: disable=g-import-not-at-top,wrong-import-position
from jaxsun.serving.backend import RequestHandle  # noqa: E402
from jaxsun.serving.ray_backend import RaySystem  # noqa: E402
from jaxsun.serving.request import Overloaded, Request, SamplingParams  # noqa: E402
from jaxsun.serving.system import DeploymentConfig  # noqa: E402

# Ray starts its processes with fork+exec, which JAX warns about; harmless here.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:os.fork")]

WAIT_S = 120.0  # upper bound on any wait
N_TOKENS = 40  # long enough to be mid-run when a worker is killed
PROMPTS_PER_MODEL = 4
MODELS = ("math", "code")


@pytest.fixture(scope="module")
def cluster():
  """A local Ray cluster for this module (reused if the caller already started one)."""
  started = not ray.is_initialized()
  if started:
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
  yield
  if started:
    ray.shutdown()


@pytest.fixture(scope="module")
def models():
  """SUN task models: each its own prefill tree, one shared (frozen) decode tree."""
  cfg = jaxsun.ModelConfig(name="t", vocab_size=64, d_model=32, n_layers=2, n_heads=2,
                           n_kv_heads=1, d_ff=64, max_len=128, init_std=0.2)
  base = jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))
  out = {}
  for i, name in enumerate(MODELS, start=1):
    other = jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(i)))
    out[name] = jaxsun.SplitModel(graphdef=base.graphdef, prefill=other.prefill,
                                  decode=base.prefill)
  return out


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  # One prompt length: every reference below is one compiled `generate` call shape.
  return {m: [tuple(int(t) for t in rng.integers(1, 64, 8)) for _ in range(PROMPTS_PER_MODEL)]
          for m in MODELS}


@pytest.fixture(scope="module")
def references(models, prompts):
  """model -> greedy continuations of its prompts by `jaxsun.generate`."""
  return {m: np.asarray(jaxsun.generate(models[m], [list(p) for p in prompts[m]],
                                        max_new_tokens=N_TOKENS).tokens).tolist()
          for m in MODELS}


@pytest.fixture(scope="module")
def system(cluster, models):
  # Two decode slots per actor: a decode actor holds queued work as well as running work.
  config = DeploymentConfig(kind="sun", prefill_workers=1, decode_workers=2, slots=2,
                            capacity=128, chunk=4)
  s = RaySystem(config, models, env_vars={"JAX_PLATFORMS": "cpu"})
  yield s
  s.shutdown(drain=False)


def submit(system, model: str, prompt) -> RequestHandle:
  return system.submit(Request(model=model, prompt=prompt,
                               sampling=SamplingParams(max_tokens=N_TOKENS)))


def check_stream(handle, expected: list[int]) -> None:
  """The record and the event stream both hold `expected`, each index exactly once."""
  record = handle.result(timeout=WAIT_S)
  assert record.output_tokens == expected
  assert record.finish_reason == "length"
  events = list(handle.events(timeout=1.0))
  assert [e.index for e in events[:-1]] == list(range(len(expected)))
  assert [e.token for e in events[:-1]] == expected
  assert events[-1].finished


def test_sun_outputs_equal_generate_and_kv_moves_through_object_store(system, prompts,
                                                                        references):
  jobs = [(m, i) for i in range(2) for m in MODELS]  # mixed models, interleaved
  handles = {(m, i): submit(system, m, prompts[m][i]) for m, i in jobs}
  for (m, i), h in handles.items():
    check_stream(h, references[m][i])
    record = h.record
    assert record.prefill_worker == f"prefill-{m}-0"
    assert record.decode_worker.startswith("decode-shared-")
    assert record.transfer_bytes > 0
    assert record.retries == 0
  stats = system.transfer.stats()
  assert stats["transport"] == "ray" and stats["bytes"] > 0 and stats["transfers"] >= 4
  text = system.metrics_text()
  assert "jaxsun_kv_transfer_bytes_total" in text
  assert 'worker="decode-shared-1"' in text  # per-actor gauges from the polled loads


def wait_for(cond, what: str) -> None:
  deadline = time.monotonic() + WAIT_S
  while not cond():
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.001)


def test_killed_decode_actor_requests_complete_elsewhere(system, prompts, references):
  jobs = [(m, i) for i in range(PROMPTS_PER_MODEL) for m in MODELS]
  handles = {(m, i): submit(system, m, prompts[m][i]) for m, i in jobs}
  victim = []

  def streaming():  # a request is mid-decode on some decode actor
    for h in handles.values():
      r = h.record
      if not h.done.is_set() and r.decode_worker and len(r.output_tokens) >= 2:
        victim.append(r.decode_worker)
        return True
    return False

  wait_for(streaming, "a request to stream decode tokens")
  rerouted = system.kill_worker(victim[0])
  assert rerouted >= 1
  assert system.health()["workers"][victim[0]] == "dead"
  for (m, i), h in handles.items():
    check_stream(h, references[m][i])  # no duplicate, no lost, no different token
  records = [h.record for h in handles.values()]
  assert any(r.retries >= 1 for r in records)
  assert all(r.decode_worker != victim[0] for r in records)  # every one finished elsewhere
  assert system.counters["failed"] == 0


def test_cancel_reaches_the_actor_and_frees_the_slot(system, prompts, references):
  h = submit(system, "code", prompts["code"][2])
  # The first token comes with the hand-over to decode: the cancel lands in decode.
  wait_for(lambda: len(h.record.output_tokens) >= 1, "the first token")
  h.cancel()
  record = h.result(timeout=WAIT_S)
  assert record.finish_reason == "abort"
  n = len(record.output_tokens)
  assert n < N_TOKENS and record.output_tokens == references["code"][2][:n]
  # The actors report their slots free (their own load, not the driver's bookkeeping).
  wait_for(lambda: all(w.reported.running == 0 for w in system.decode_workers if w.alive),
           "decode slots to be freed")
  check_stream(submit(system, "code", prompts["code"][2]), references["code"][2])


def test_shutdown_drains_then_refuses(system, prompts, references):
  # Runs last: it shuts the shared deployment down (not the caller's Ray cluster).
  handles = {m: submit(system, m, prompts[m][0]) for m in MODELS}
  system.shutdown(drain=True, timeout=WAIT_S)
  for m, h in handles.items():
    check_stream(h, references[m][0])
  with pytest.raises(Overloaded) as e:
    submit(system, "math", prompts["math"][0])
  assert e.value.status == 503
  assert system.health()["status"] == "draining"
  assert ray.is_initialized()
