"""Seeded workloads: arrival statistics, Zipf popularity, lengths, sessions, shared prefixes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxsun.serving.request import Request
from jaxsun.serving.workload import (LengthDist, WorkloadSpec, arrival_times, make_workload,
                                     sample_models, sample_tokens, zipf_probs)


def rng(seed=0):
  return np.random.default_rng(seed)


def test_poisson_gaps_are_exponential_with_mean_one_over_rate():
  n, rate = 20_000, 5.0
  t = arrival_times(n, rate, rng(1))
  assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
  gaps = np.diff(t)
  se = (1 / rate) / math.sqrt(gaps.size)  # an exponential's std equals its mean
  assert abs(gaps.mean() - 1 / rate) < 4 * se
  assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.04)
  # P(gap < mean) of an exponential is 1 - 1/e.
  assert np.mean(gaps < 1 / rate) == pytest.approx(1 - math.exp(-1), abs=0.015)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_gaps_keep_the_mean_and_have_cv_one_over_sqrt_burstiness(burstiness):
  n, rate = 50_000, 2.0
  gaps = np.diff(arrival_times(n, rate, rng(2), burstiness=burstiness))
  cv = 1 / math.sqrt(burstiness)
  assert abs(gaps.mean() - 1 / rate) < 4 * cv * (1 / rate) / math.sqrt(gaps.size)
  assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_infinite_rate_sends_everything_at_once():
  np.testing.assert_array_equal(arrival_times(5, math.inf, rng()), np.zeros(5))
  items = make_workload(WorkloadSpec(models=("a",), num_requests=7))
  assert [it.send_time for it in items] == [0.0] * 7
  with pytest.raises(ValueError, match="rate"):
    arrival_times(3, 0.0, rng())


def test_zipf_pmf_and_sampled_frequencies():
  h4 = 1 + 1 / 2 + 1 / 3 + 1 / 4
  np.testing.assert_allclose(zipf_probs(4, 1.0), [1 / h4, 1 / 2 / h4, 1 / 3 / h4, 1 / 4 / h4])
  np.testing.assert_allclose(zipf_probs(3, 0.0), [1 / 3] * 3)
  models = ["m0", "m1", "m2", "m3"]
  n = 20_000
  drawn = sample_models(models, n, 1.2, rng(3))
  freq = np.array([drawn.count(m) / n for m in models])
  p = zipf_probs(4, 1.2)
  assert np.all(np.diff(freq) < 0)  # most popular first
  assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n))


def test_length_distributions():
  r = rng(4)
  np.testing.assert_array_equal(LengthDist.fixed(7).sample(5, r), [7] * 5)
  u = LengthDist.uniform(3, 6).sample(4000, r)
  assert set(u.tolist()) == {3, 4, 5, 6}  # both ends included
  assert u.mean() == pytest.approx(4.5, abs=0.1)
  # Wide bounds: the sample mean is the requested mean, the median exp(mu).
  mean, sigma = 50.0, 0.5
  x = LengthDist.lognormal(mean, sigma, lo=1, hi=100_000).sample(40_000, r)
  assert x.mean() == pytest.approx(mean, rel=0.02)
  assert np.median(x) == pytest.approx(mean * math.exp(-sigma ** 2 / 2), rel=0.02)
  clipped = LengthDist.lognormal(mean, sigma, lo=40, hi=60).sample(2000, r)
  assert clipped.min() == 40 and clipped.max() == 60
  with pytest.raises(ValueError, match="LengthDist.hi"):
    LengthDist.uniform(5, 4)
  with pytest.raises(ValueError, match="LengthDist.sigma"):
    LengthDist.lognormal(10, -1.0)


def test_tokens_stay_in_the_vocab_range():
  toks = sample_tokens(5000, (10, 20), rng(5))
  assert isinstance(toks, tuple) and all(type(t) is int for t in toks)
  assert min(toks) == 10 and max(toks) == 19


def spec(**kw) -> WorkloadSpec:
  base = dict(models=("a", "b", "c"), num_requests=40, rate=10.0,
              prompt_len=LengthDist.uniform(4, 12), output_len=LengthDist.uniform(1, 8),
              vocab=(1, 50), seed=0)
  return WorkloadSpec(**{**base, **kw})


@pytest.mark.parametrize("kind", ["independent", "sessions", "shared_prefix"])
def test_same_seed_same_workload_other_seed_other_workload(kind):
  a = make_workload(spec(kind=kind))
  assert a == make_workload(spec(kind=kind))
  b = make_workload(spec(kind=kind, seed=1))
  assert [it.prompt for it in a] != [it.prompt for it in b]
  assert [it.send_time for it in a] != [it.send_time for it in b]


def test_another_rate_moves_the_times_but_keeps_the_requests():
  slow, fast = make_workload(spec(rate=1.0)), make_workload(spec(rate=100.0))
  assert [(it.model, it.prompt, it.sampling) for it in slow] == \
         [(it.model, it.prompt, it.sampling) for it in fast]
  # Poisson gaps scale with 1/rate: the same draws, 100x apart.
  np.testing.assert_allclose([it.send_time for it in slow],
                             [100 * it.send_time for it in fast])


def test_independent_items():
  items = make_workload(spec(num_requests=300, zipf_s=1.0))
  assert len(items) == 300
  times = [it.send_time for it in items]
  assert times == sorted(times)
  for it in items:
    assert 4 <= len(it.prompt) <= 12 and all(1 <= t < 50 for t in it.prompt)
    assert 1 <= it.sampling.max_tokens <= 8
    assert it.sampling.ignore_eos and it.sampling.greedy
    assert it.session_id is None and it.depends_on is None and it.turn == 0
  counts = [sum(it.model == m for it in items) for m in ("a", "b", "c")]
  assert counts[0] > counts[1] > counts[2]
  r = items[0].request("r0")
  assert isinstance(r, Request) and r.request_id == "r0" and r.prompt == items[0].prompt
  assert r.sampling == items[0].sampling


def test_sessions_grow_one_context_turn_by_turn():
  s = spec(kind="sessions", num_sessions=5, turns=4, observation_len=LengthDist.uniform(0, 3))
  items = make_workload(s)
  assert len(items) == 20
  by_session = {}
  for i, it in enumerate(items):
    by_session.setdefault(it.session_id, []).append((i, it))
  assert sorted(by_session) == [f"session-{k}" for k in range(5)]
  for turns in by_session.values():
    assert [it.turn for _, it in turns] == [0, 1, 2, 3]
    assert [it.model for _, it in turns] == ["a", "b", "c", "a"]  # models[i % n]
    assert turns[0][1].depends_on is None
    assert len({it.send_time for _, it in turns}) == 1  # later turns wait on depends_on
    for (i, prev), (_, cur) in zip(turns, turns[1:]):
      assert cur.depends_on == i
      assert cur.prompt[:len(prev.prompt)] == prev.prompt  # the context only grows
      grown = len(cur.prompt) - len(prev.prompt)
      assert prev.sampling.max_tokens <= grown <= prev.sampling.max_tokens + 3
  # Sessions are independent contexts.
  firsts = [turns[0][1].prompt for turns in by_session.values()]
  assert len(set(firsts)) == 5


def test_sessions_random_turn_order_and_context_limit():
  items = make_workload(spec(kind="sessions", num_sessions=20, turns=3, turn_order="random",
                             zipf_s=0.0))
  first_models = {it.model for it in items if it.turn == 0}
  assert len(first_models) > 1  # not always models[0]
  capped = make_workload(spec(kind="sessions", num_sessions=6, turns=10, observation_len=2,
                              max_context_len=30))
  assert all(len(it.prompt) + it.sampling.max_tokens <= 30 for it in capped)
  assert 6 <= len(capped) < 60  # every session has its first turn, none all ten
  assert sorted({it.session_id for it in capped if it.turn == 0}) == \
         sorted({it.session_id for it in capped})
  for i, it in enumerate(capped):  # truncation keeps the chain intact
    if it.turn:
      assert capped[it.depends_on].session_id == it.session_id
      assert capped[it.depends_on].turn == it.turn - 1 and it.depends_on == i - 1


def test_shared_prefix_groups_share_exactly_the_system_prompt():
  s = spec(kind="shared_prefix", num_groups=3, prompts_per_group=5, shared_prefix_len=16,
           prompt_len=LengthDist.uniform(2, 6))
  items = make_workload(s)
  assert len(items) == 15
  groups = {}
  for it in items:
    groups.setdefault(it.group, []).append(it.prompt)
    assert 18 <= len(it.prompt) <= 22
  assert sorted(groups) == [0, 1, 2] and all(len(p) == 5 for p in groups.values())
  prefixes = {g: {p[:16] for p in ps} for g, ps in groups.items()}
  assert all(len(p) == 1 for p in prefixes.values())  # one system prompt per group
  assert len({next(iter(p)) for p in prefixes.values()}) == 3  # different per group
  in_order = make_workload(spec(kind="shared_prefix", num_groups=3, prompts_per_group=5,
                                shared_prefix_len=16, prompt_len=LengthDist.uniform(2, 6),
                                shuffle=False))
  assert [it.group for it in in_order] == [g for g in range(3) for _ in range(5)]
  assert [it.group for it in items] != [it.group for it in in_order]  # shuffled
  assert sorted(it.prompt for it in items) == sorted(it.prompt for it in in_order)


@pytest.mark.parametrize("kw,field", [
    (dict(models=()), "models"), (dict(models=("a", "a")), "models"),
    (dict(models="abc"), "models"), (dict(kind="trace"), "kind"),
    (dict(rate=0), "rate"), (dict(rate=-1.0), "rate"), (dict(burstiness=0.0), "burstiness"),
    (dict(zipf_s=-0.5), "zipf_s"), (dict(num_requests=0), "num_requests"),
    (dict(prompt_len=0), "prompt_len"), (dict(output_len=LengthDist.uniform(0, 3)), "output_len"),
    (dict(output_len="8"), "output_len"), (dict(vocab=(5, 5)), "vocab"),
    (dict(turn_order="zigzag"), "turn_order"), (dict(turns=0), "turns"),
    (dict(max_context_len=10), "max_context_len"), (dict(seed=1.5), "seed"),
])
def test_spec_errors_name_the_field(kw, field):
  with pytest.raises(ValueError, match=rf"WorkloadSpec\.{field}="):
    spec(**kw)
