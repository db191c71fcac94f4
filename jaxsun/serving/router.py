"""Routing policies for the prefill pool and the decode pool, and the `Router` that holds them.

    router = Router(prefill_policy=make_policy("cache_aware", threshold=0.3),
                    decode_policy="least_loaded")
    worker = router.route_prefill(request, prefill_loads, prefix_match=cache.match_len)
    worker = router.route_decode(request, decode_loads)

A policy picks one worker id from `WorkerLoad` snapshots (`jaxsun.serving.load`). Before
choosing, every policy drops dead workers and workers that do not serve `request.model`;
if none is left it raises `Overloaded(status=503)`. A policy lists the load signals it
reads in `needs`; a live candidate that reports None for one of them is a configuration
error (ValueError naming the policy, the field and the worker), never a blind guess.

Policies (`POLICIES`, built by `make_policy(name, **kwargs)`):

    round_robin    cycles through the eligible workers in worker_id order
    least_loaded   lowest queue_len + running + kv_weight * KV fraction used; workers
                   whose free KV cannot hold the request rank last
    power_of_two   the less loaded of two workers drawn by a seeded `random.Random`
    model_pinned   the conventional baseline: only workers dedicated to the model
                   (`models == {request.model}`), then an inner policy among them
    cache_aware    PrefillShare: overlap_weight * matched prefix fraction - load_weight *
                   load; below `threshold` matched, falls back to least_loaded
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

from jaxsun.serving.load import WorkerLoad
from jaxsun.serving.request import Overloaded, Request

PrefixMatch = Callable[[str], int]

_LOAD_FIELDS = frozenset({"queue_len", "running", "kv_used_tokens", "kv_capacity_tokens"})
_FIELD_ORDER = tuple(f.name for f in dataclasses.fields(WorkerLoad))


def _load(w: WorkerLoad, kv_weight: float) -> float:
  """Requests waiting or running, plus the KV fraction in use (in units of requests)."""
  kv_frac = w.kv_used_tokens / w.kv_capacity_tokens if w.kv_capacity_tokens > 0 else 1.0
  return w.queue_len + w.running + kv_weight * kv_frac


def _fits(w: WorkerLoad, request: Request) -> bool:
  """Whether the worker's free KV holds the request.

  A prefill worker's KV is an evictable prefix cache, so it always fits; a decode (or
  colocated) worker must hold the prompt plus every token it may generate.
  """
  if w.pool == "prefill":
    return True
  need = len(request.prompt) + request.sampling.max_tokens
  return w.kv_capacity_tokens - w.kv_used_tokens >= need


def _rank(w: WorkerLoad, request: Request, kv_weight: float) -> tuple:
  """Sort key of least-loaded order: fitting workers first, then load, then worker_id."""
  return (not _fits(w, request), _load(w, kv_weight), w.worker_id)


class Policy:
  """Base routing policy.

  Subclasses set `name` and `needs` (the `WorkerLoad` fields they read) and implement
  `_choose`, which gets the eligible candidates sorted by worker_id, already checked.
  """

  name: str = "policy"
  needs: frozenset[str] = frozenset()

  def choose(self, request: Request, candidates: Sequence[WorkerLoad], *,
             prefix_match: PrefixMatch | None = None) -> str:
    """Picks the worker for `request`.

    Args:
      request: the request to place.
      candidates: load snapshots of the pool's workers.
      prefix_match: `prefix_match(worker_id)` -> prompt tokens that worker already holds
        in its prefix cache for this request (read by cache-aware policies only).

    Returns:
      The chosen worker_id.

    Raises:
      Overloaded: (503) no live candidate serves `request.model`.
      ValueError: a live candidate does not report a signal this policy needs.
    """
    return self._choose(request, self.eligible(request, candidates), prefix_match)

  def eligible(self, request: Request, candidates: Sequence[WorkerLoad]) -> list[WorkerLoad]:
    """Live candidates serving `request.model`, sorted by worker_id, signals checked."""
    if not candidates:
      raise Overloaded(f"no worker in the pool for model {request.model!r}", status=503)
    alive = [w for w in candidates if w.alive]
    if not alive:
      raise Overloaded(f"no live worker in the pool for model {request.model!r} "
                       f"({len(candidates)} dead)", status=503)
    serving = sorted((w for w in alive if request.model in w.models), key=lambda w: w.worker_id)
    if not serving:
      raise Overloaded(f"no live worker serves model {request.model!r}", status=503)
    self.check_signals(serving)
    return serving

  def check_signals(self, workers: Sequence[WorkerLoad]) -> None:
    """Raises ValueError if a worker reports None for a field in `needs`."""
    needed = [f for f in _FIELD_ORDER if f in self.needs]
    for w in workers:
      for field in needed:
        if getattr(w, field) is None:
          raise ValueError(f"policy {self.name!r} needs WorkerLoad.{field}, which worker "
                           f"{w.worker_id!r} does not report")

  def _choose(self, request: Request, workers: list[WorkerLoad],
              prefix_match: PrefixMatch | None) -> str:
    raise NotImplementedError

  def __repr__(self) -> str:
    return f"{type(self).__name__}()"


class RoundRobin(Policy):
  """Cycles through the eligible workers in worker_id order.

  One cursor (the last worker picked) per set of workers serving the model, dead ones
  included: dedicated pools cycle independently, a shared pool cycles across models,
  and a dead worker is skipped without restarting the cycle.
  """

  name = "round_robin"
  needs = frozenset()

  def __init__(self):
    self._last: dict[frozenset[str], str] = {}

  def choose(self, request: Request, candidates: Sequence[WorkerLoad], *,
             prefix_match: PrefixMatch | None = None) -> str:
    workers = self.eligible(request, candidates)
    key = frozenset(w.worker_id for w in candidates if request.model in w.models)
    last = self._last.get(key)
    ids = [w.worker_id for w in workers]
    pick = next((i for i in ids if last is not None and i > last), ids[0])
    self._last[key] = pick
    return pick


class LeastLoaded(Policy):
  """Lowest `queue_len + running + kv_weight * kv_used / kv_capacity`.

  Workers whose free KV cannot hold the request (prompt + max_tokens; decode workers
  only) rank after every worker that can. Ties go to the smallest worker_id.

  Args:
    kv_weight: how many queued requests a completely full KV cache is worth.
  """

  name = "least_loaded"
  needs = _LOAD_FIELDS

  def __init__(self, kv_weight: float = 1.0):
    if not kv_weight >= 0:
      raise ValueError(f"least_loaded: kv_weight={kv_weight!r} must be >= 0")
    self.kv_weight = kv_weight

  def _choose(self, request, workers, prefix_match):
    return min(workers, key=lambda w: _rank(w, request, self.kv_weight)).worker_id

  def __repr__(self) -> str:
    return f"LeastLoaded(kv_weight={self.kv_weight})"


class PowerOfTwo(Policy):
  """Draws two distinct eligible workers with a seeded `random.Random`; the less loaded
  (least_loaded order) wins. With one eligible worker, that one.

  Args:
    seed: seed of the policy's own generator (same seed, same calls -> same picks).
    kv_weight: as in `LeastLoaded`.
  """

  name = "power_of_two"
  needs = _LOAD_FIELDS

  def __init__(self, seed: int = 0, kv_weight: float = 1.0):
    if not kv_weight >= 0:
      raise ValueError(f"power_of_two: kv_weight={kv_weight!r} must be >= 0")
    self.seed = seed
    self.kv_weight = kv_weight
    self._rng = random.Random(seed)

  def _choose(self, request, workers, prefix_match):
    pair = workers if len(workers) < 2 else self._rng.sample(workers, 2)
    return min(pair, key=lambda w: _rank(w, request, self.kv_weight)).worker_id

  def __repr__(self) -> str:
    return f"PowerOfTwo(seed={self.seed}, kv_weight={self.kv_weight})"


class ModelPinned(Policy):
  """Conventional baseline: each model has its own pool.

  Only workers dedicated to the model (`models == {request.model}`) are eligible, so a
  model never lands on another model's workers, nor on a shared one; among them the
  `inner` policy chooses. No live dedicated worker -> `Overloaded` (503).

  Args:
    inner: the policy (or its name) used within the model's pool.
  """

  name = "model_pinned"
  needs = frozenset()  # the instance's `needs` are its inner policy's

  def __init__(self, inner: Policy | str = "round_robin"):
    self.inner = make_policy(inner) if isinstance(inner, str) else inner
    if isinstance(self.inner, (ModelPinned, CacheAware)):
      raise ValueError(f"model_pinned: inner policy {self.inner.name!r} is not supported; "
                       "use round_robin, least_loaded or power_of_two")
    self.needs = self.inner.needs

  def choose(self, request: Request, candidates: Sequence[WorkerLoad], *,
             prefix_match: PrefixMatch | None = None) -> str:
    pinned = [w for w in candidates if w.models == frozenset({request.model})]
    if candidates and not pinned:
      raise Overloaded(f"model_pinned: no worker in the pool is dedicated to model "
                       f"{request.model!r} (serves only that model)", status=503)
    self.eligible(request, pinned)  # 503 / signal errors under this policy's name
    # The inner policy gets the dead pinned workers too: a round-robin cursor is keyed by
    # the pool, which must not change when a worker dies.
    return self.inner.choose(request, pinned, prefix_match=prefix_match)

  def __repr__(self) -> str:
    return f"ModelPinned(inner={self.inner!r})"


class CacheAware(Policy):
  """Prefix-cache-aware routing (PrefillShare's shared prefill pool).

  With `frac(w) = min(prefix_match(w), len(prompt)) / len(prompt)`, picks the highest
  `overlap_weight * frac(w) - load_weight * load(w)` (load as in `LeastLoaded`; workers
  whose KV cannot hold the request rank last, ties to the smallest worker_id). When no
  worker matches at least `threshold` of the prompt, prefix reuse is not worth steering
  for and it falls back to least_loaded.

  Args:
    overlap_weight: value of a fully cached prompt.
    load_weight: cost of one unit of load (one queued or running request).
    threshold: matched fraction below which it falls back to least_loaded.
    kv_weight: as in `LeastLoaded`.
  """

  name = "cache_aware"
  needs = _LOAD_FIELDS

  def __init__(self, overlap_weight: float = 1.0, load_weight: float = 0.1,
               threshold: float = 0.1, kv_weight: float = 1.0):
    for field, value in (("overlap_weight", overlap_weight), ("load_weight", load_weight),
                         ("kv_weight", kv_weight)):
      if not value >= 0:
        raise ValueError(f"cache_aware: {field}={value!r} must be >= 0")
    if not 0 <= threshold <= 1:
      raise ValueError(f"cache_aware: threshold={threshold!r} must be in [0, 1]")
    self.overlap_weight = overlap_weight
    self.load_weight = load_weight
    self.threshold = threshold
    self.kv_weight = kv_weight

  def choose(self, request: Request, candidates: Sequence[WorkerLoad], *,
             prefix_match: PrefixMatch | None = None) -> str:
    if prefix_match is None:
      raise ValueError(f"policy {self.name!r} needs prefix_match(worker_id) -> cached prompt "
                       "tokens, and none was given")
    return super().choose(request, candidates, prefix_match=prefix_match)

  def _choose(self, request, workers, prefix_match):
    n = len(request.prompt)
    frac = {w.worker_id: min(max(int(prefix_match(w.worker_id)), 0), n) / n for w in workers}
    if max(frac.values()) < self.threshold or max(frac.values()) == 0:
      return min(workers, key=lambda w: _rank(w, request, self.kv_weight)).worker_id

    def key(w):
      score = (self.overlap_weight * frac[w.worker_id]
               - self.load_weight * _load(w, self.kv_weight))
      return (not _fits(w, request), -score, w.worker_id)

    return min(workers, key=key).worker_id

  def __repr__(self) -> str:
    return (f"CacheAware(overlap_weight={self.overlap_weight}, load_weight={self.load_weight}, "
            f"threshold={self.threshold}, kv_weight={self.kv_weight})")


POLICIES: dict[str, type[Policy]] = {
    "round_robin": RoundRobin,
    "least_loaded": LeastLoaded,
    "power_of_two": PowerOfTwo,
    "model_pinned": ModelPinned,
    "cache_aware": CacheAware,
}


def make_policy(name: str, **kwargs) -> Policy:
  """Builds the policy registered as `name` in `POLICIES`.

  Args:
    name: a key of `POLICIES`.
    **kwargs: the policy's constructor arguments (e.g. `seed` for power_of_two).

  Returns:
    A fresh policy (each has its own state: round-robin cursor, random generator).
  """
  if name not in POLICIES:
    raise ValueError(f"unknown routing policy {name!r}; known policies: {sorted(POLICIES)}")
  try:
    return POLICIES[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"policy {name!r} does not take {sorted(kwargs)}: {e}") from None


class Router:
  """Routes requests to a prefill worker and a decode worker, with a policy per pool.

  Args:
    prefill_policy: a `Policy` or a name for `make_policy`.
    decode_policy: likewise, for the decode pool.
  """

  def __init__(self, prefill_policy: Policy | str = "least_loaded",
               decode_policy: Policy | str = "least_loaded"):
    self.prefill_policy = (make_policy(prefill_policy) if isinstance(prefill_policy, str)
                           else prefill_policy)
    self.decode_policy = (make_policy(decode_policy) if isinstance(decode_policy, str)
                          else decode_policy)

  def route_prefill(self, request: Request, loads: Sequence[WorkerLoad],
                    prefix_match: PrefixMatch | None = None) -> str:
    """Picks a prefill worker among `loads` whose pool is "prefill" or "colocated".

    Args:
      request: the request.
      loads: worker snapshots (workers of other pools are ignored).
      prefix_match: passed to the policy (cache-aware routing).

    Returns:
      The worker_id.
    """
    loads = [w for w in loads if w.pool in ("prefill", "colocated")]
    return self.prefill_policy.choose(request, loads, prefix_match=prefix_match)

  def route_decode(self, request: Request, loads: Sequence[WorkerLoad]) -> str:
    """Picks a decode worker among `loads` whose pool is "decode" or "colocated".

    Args:
      request: the request.
      loads: worker snapshots (workers of other pools are ignored).

    Returns:
      The worker_id.
    """
    loads = [w for w in loads if w.pool in ("decode", "colocated")]
    return self.decode_policy.choose(request, loads)

  def __repr__(self) -> str:
    return f"Router(prefill={self.prefill_policy!r}, decode={self.decode_policy!r})"
