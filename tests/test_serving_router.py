"""Routing policies: what each picks, what each refuses, and the Router's pool split."""

from __future__ import annotations

import collections
import dataclasses

import pytest

from jaxsun.serving.load import WorkerLoad
from jaxsun.serving.request import Overloaded, Request, SamplingParams
from jaxsun.serving.router import POLICIES, Router, make_policy


def load(worker_id, models=("a", "b"), pool="decode", *, queue=0, running=0, kv_used=0,
         kv_cap=1000, alive=True, **kw) -> WorkerLoad:
  return WorkerLoad(worker_id=worker_id, pool=pool, models=frozenset(models), tree_id="t",
                    alive=alive, queue_len=queue, running=running, slots=8,
                    kv_used_tokens=kv_used, kv_capacity_tokens=kv_cap, **kw)


def req(model="a", prompt_len=10, max_tokens=5) -> Request:
  return Request(model=model, prompt=tuple(range(1, prompt_len + 1)),
                 sampling=SamplingParams(max_tokens=max_tokens))


def test_round_robin_cycles_in_worker_id_order_and_skips_dead_workers():
  policy = make_policy("round_robin")
  workers = [load("w2"), load("w0"), load("w1")]
  assert [policy.choose(req(), workers) for _ in range(6)] == ["w0", "w1", "w2"] * 2
  workers[2] = load("w1", alive=False)  # w1 dies: the cycle goes on without it
  assert [policy.choose(req(), workers) for _ in range(4)] == ["w0", "w2", "w0", "w2"]


def test_round_robin_keeps_one_cursor_per_pool():
  """Two dedicated pools alternate without disturbing each other's cycle."""
  policy = make_policy("round_robin")
  pool = [load("a0", ("a",)), load("a1", ("a",)), load("b0", ("b",)), load("b1", ("b",))]
  picks = [policy.choose(req(m), pool) for m in "abababab"]
  assert picks == ["a0", "b0", "a1", "b1"] * 2


def test_least_loaded_picks_the_smallest_queue_plus_running():
  policy = make_policy("least_loaded")
  workers = [load("w0", queue=3, running=2), load("w1", queue=0, running=4),
             load("w2", queue=1, running=1), load("w3", queue=5)]
  assert policy.choose(req(), workers) == "w2"


def test_least_loaded_ties_break_by_worker_id_then_kv_fraction_decides():
  policy = make_policy("least_loaded")
  assert policy.choose(req(), [load("w1", running=2), load("w0", running=2)]) == "w0"
  # Same requests; the KV fraction in use decides (w0 holds 90% of its KV).
  workers = [load("w0", running=2, kv_used=900), load("w1", running=2, kv_used=100)]
  assert policy.choose(req(), workers) == "w1"


def test_least_loaded_never_picks_a_worker_whose_kv_cannot_hold_the_request():
  policy = make_policy("least_loaded")
  # w0 is idle but has 12 free KV tokens; the request needs prompt 10 + 5 new tokens.
  workers = [load("w0", kv_used=988), load("w1", queue=3, running=5, kv_used=100)]
  assert policy.choose(req(prompt_len=10, max_tokens=5), workers) == "w1"
  assert policy.choose(req(prompt_len=5, max_tokens=5), workers) == "w0"  # 10 tokens fit
  # Nowhere fits: still routed (the worker queues it), to the least loaded.
  full = [load("w0", running=2, kv_used=999), load("w1", running=1, kv_used=999)]
  assert policy.choose(req(), full) == "w1"


def test_least_loaded_prefill_prefix_cache_is_not_a_fit_constraint():
  """A prefill worker's KV is an evictable prefix cache: a full one still takes work."""
  policy = make_policy("least_loaded", kv_weight=0.0)
  workers = [load("p0", pool="prefill", kv_used=1000), load("p1", pool="prefill", running=1)]
  assert policy.choose(req(), workers) == "p0"


def test_power_of_two_is_deterministic_by_seed_and_never_picks_the_worse_sample():
  workers = [load(f"w{i}", queue=i) for i in range(6)]  # w_i has load i
  a, b, c = (make_policy("power_of_two", seed=s) for s in (7, 7, 8))
  picks_a = [a.choose(req(), workers) for _ in range(50)]
  assert picks_a == [b.choose(req(), workers) for _ in range(50)]
  assert picks_a != [c.choose(req(), workers) for _ in range(50)]
  # Replay the policy's two draws with the same seeded generator: the lower load wins.
  import random  # pylint: disable=import-outside-toplevel
  rng = random.Random(7)
  by_id = sorted(workers, key=lambda w: w.worker_id)
  for pick in picks_a:
    x, y = rng.sample(by_id, 2)
    assert pick == min(x, y, key=lambda w: w.queue_len).worker_id
  assert "w5" not in picks_a  # the most loaded worker loses every pair it is drawn in
  assert len(set(picks_a)) > 1  # and it is not just least_loaded


def test_power_of_two_with_one_live_worker_picks_it():
  policy = make_policy("power_of_two", seed=0)
  assert policy.choose(req(), [load("w0", alive=False), load("w1", queue=9)]) == "w1"


def test_model_pinned_never_sends_a_model_to_another_models_pool():
  policy = make_policy("model_pinned")
  pool = [load("a0", ("a",)), load("a1", ("a",)), load("b0", ("b",)),
          load("shared", ("a", "b"))]
  picks = collections.Counter((m, policy.choose(req(m), pool)) for m in "ab" * 20)
  assert set(picks) == {("a", "a0"), ("a", "a1"), ("b", "b0")}
  assert picks[("a", "a0")] == picks[("a", "a1")] == 10  # round robin within the pool


def test_model_pinned_without_a_dedicated_live_worker_is_overloaded():
  policy = make_policy("model_pinned", inner="least_loaded")
  with pytest.raises(Overloaded, match="dedicated") as e:
    policy.choose(req("a"), [load("shared", ("a", "b")), load("b0", ("b",))])
  assert e.value.status == 503
  with pytest.raises(Overloaded) as e:
    policy.choose(req("a"), [load("a0", ("a",), alive=False), load("b0", ("b",))])
  assert e.value.status == 503
  # With an inner least_loaded policy, the less loaded dedicated worker wins.
  pool = [load("a0", ("a",), queue=2), load("a1", ("a",)), load("x", ("a", "b"))]
  assert policy.choose(req("a"), pool) == "a1"


def test_cache_aware_prefers_the_longest_prefix_match():
  policy = make_policy("cache_aware")
  workers = [load(f"p{i}", pool="prefill") for i in range(3)]
  matched = {"p0": 2, "p1": 8, "p2": 5}
  assert policy.choose(req(prompt_len=10), workers, prefix_match=matched.get) == "p1"


def test_cache_aware_trades_prefix_match_against_load():
  policy = make_policy("cache_aware", overlap_weight=1.0, load_weight=0.1)
  matched = {"p0": 10, "p1": 5}  # fractions 1.0 and 0.5
  light = [load("p0", pool="prefill", queue=4), load("p1", pool="prefill")]
  assert policy.choose(req(), light, prefix_match=matched.get) == "p0"  # 0.6 > 0.5
  heavy = [load("p0", pool="prefill", queue=6), load("p1", pool="prefill")]
  assert policy.choose(req(), heavy, prefix_match=matched.get) == "p1"  # 0.4 < 0.5


def test_cache_aware_falls_back_to_least_loaded_below_the_threshold():
  policy = make_policy("cache_aware", threshold=0.3)
  workers = [load("p0", pool="prefill", queue=5), load("p1", pool="prefill", queue=1),
             load("p2", pool="prefill", queue=3)]
  assert policy.choose(req(), workers, prefix_match=lambda w: 0) == "p1"
  matched = {"p0": 2, "p1": 0, "p2": 1}  # best 20% < 30%: load decides
  assert policy.choose(req(), workers, prefix_match=matched.get) == "p1"
  matched["p0"] = 6  # 60% >= 30%: 0.6 - 0.1 * 5 beats 0 - 0.1 * 1
  assert policy.choose(req(), workers, prefix_match=matched.get) == "p0"


def test_cache_aware_requires_prefix_match():
  policy = make_policy("cache_aware")
  workers = [load("p0", pool="prefill")]
  with pytest.raises(ValueError, match="cache_aware.*prefix_match"):
    policy.choose(req(), workers)
  assert policy.choose(req(), workers, prefix_match=lambda w: 3) == "p0"  # control


@pytest.mark.parametrize("name,field", [
    ("least_loaded", "queue_len"), ("least_loaded", "kv_capacity_tokens"),
    ("power_of_two", "running"), ("cache_aware", "kv_used_tokens"),
    ("model_pinned", "queue_len"),
])
def test_policies_refuse_to_run_without_their_signal(name, field):
  kwargs = {"inner": "least_loaded"} if name == "model_pinned" else {}
  policy = make_policy(name, **kwargs)
  assert field in policy.needs
  models = ("a",) if name == "model_pinned" else ("a", "b")
  complete = [load("w0", models), load("decode-0", models, queue=1)]
  blind = [complete[0], dataclasses.replace(complete[1], **{field: None})]
  with pytest.raises(ValueError) as e:
    policy.choose(req(), blind, prefix_match=lambda w: 0)
  assert str(e.value) == (f"policy {name!r} needs WorkerLoad.{field}, which worker "
                          "'decode-0' does not report")
  # Control: the same call with the signal reported routes.
  assert policy.choose(req(), complete, prefix_match=lambda w: 0) == "w0"


def test_round_robin_needs_no_signal():
  blind = WorkerLoad("w0", "decode", frozenset({"a"}), "t")
  assert make_policy("round_robin").needs == frozenset()
  assert make_policy("round_robin").choose(req(), [blind]) == "w0"


def test_a_dead_worker_may_omit_its_signals():
  dead = WorkerLoad("w0", "decode", frozenset({"a"}), "t", alive=False)
  assert make_policy("least_loaded").choose(req(), [dead, load("w1", queue=7)]) == "w1"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_skips_dead_and_non_serving_workers_and_503s_when_none_is_left(name):
  policy = make_policy(name)
  kw = {"prefix_match": lambda w: 10}
  workers = [load("w0", ("a",), alive=False), load("w1", ("b",)), load("w2", ("a",), queue=3)]
  assert {policy.choose(req("a"), workers, **kw) for _ in range(4)} == {"w2"}
  for pool in ([], [load("w0", ("a",), alive=False)], [load("w1", ("b",))]):
    with pytest.raises(Overloaded) as e:
      policy.choose(req("a"), pool, **kw)
    assert e.value.status == 503


def test_make_policy_names_the_known_policies():
  with pytest.raises(ValueError, match="unknown routing policy 'fastest'.*cache_aware"):
    make_policy("fastest")
  with pytest.raises(ValueError, match="power_of_two"):
    make_policy("power_of_two", temperature=1.0)
  with pytest.raises(ValueError, match="threshold"):
    make_policy("cache_aware", threshold=1.5)
  assert set(POLICIES) == {"round_robin", "least_loaded", "power_of_two", "model_pinned",
                           "cache_aware"}
  assert all(make_policy(n).name == n for n in POLICIES)


def test_router_routes_each_pool_with_its_own_policy():
  router = Router(prefill_policy=make_policy("cache_aware"), decode_policy="least_loaded")
  loads = [load("p0", pool="prefill"), load("p1", pool="prefill", queue=1),
           load("d0", pool="decode", queue=2), load("d1", pool="decode"),
           load("c0", pool="colocated", queue=9)]
  matched = {"p0": 0, "p1": 10, "c0": 0}
  assert router.route_prefill(req(), loads, prefix_match=matched.get) == "p1"
  assert router.route_decode(req(), loads) == "d1"
  # Each pool only sees its own workers (and colocated ones).
  assert router.route_decode(req(), [w for w in loads if w.worker_id != "d1"]) == "d0"
  with pytest.raises(Overloaded) as e:
    router.route_decode(req(), [w for w in loads if w.pool == "prefill"])
  assert e.value.status == 503


def test_model_pinned_round_robin_continues_its_cycle_when_a_worker_dies():
  policy = make_policy("model_pinned")
  pool = [load(f"a{i}", ("a",)) for i in range(3)] + [load("b0", ("b",))]
  assert [policy.choose(req("a"), pool) for _ in range(2)] == ["a0", "a1"]
  pool[0] = load("a0", ("a",), alive=False)
  assert [policy.choose(req("a"), pool) for _ in range(3)] == ["a2", "a1", "a2"]
