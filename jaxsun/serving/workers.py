"""Prefill and decode workers: the loops around the engine, independent of the runtime.

A worker is plain Python over an `Engine`; a runtime runs its `run_once()` in a loop (a
thread in `jaxsun.serving.system`, a Ray actor in `jaxsun.serving.ray_backend`) and
hands it work through `submit`. Workers report to a `Sink` (the system): tokens as they
are known, finished and failed jobs, and load (`WorkerLoad`).

* `PrefillWorker` holds one or more prefill trees and a `PrefixCache` keyed by tree id:
  it looks up the longest cached prefix, prefills only the rest, stores the new KV,
  emits the first token when its tree picks it, and passes the prefix on.
* `DecodeWorker` holds one decode tree and the set of prefill trees whose KV it accepts;
  continuous batching over the engine's slotted store: admit (receive + digest check +
  insert into free slots), dispatch a chunk of decode steps, and read the previous chunk
  while this one runs (stop checks one chunk behind). Rows of different task models run
  in the same step when they share this decode tree (SUN).
* `ColocatedWorker` is a decode worker that prefills its own requests between chunks
  (no transfer): the conventional non-disaggregated server.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Protocol

from jaxsun.serving.engine import Engine, InsertError, KVCorrupted, Params, Prefix
from jaxsun.serving.load import WorkerLoad
from jaxsun.serving.prefix_cache import PrefixCache
from jaxsun.serving.request import Request, RequestRecord
from jaxsun.serving.transfer import Envelope, KVTransfer


@dataclasses.dataclass(eq=False)
class Job:
  """A request on its way through the system (one attempt at a time).

  Attributes:
    request: the request.
    record: its timing record (shared by every attempt).
    eos_id: the model's EOS id.
    emitted: tokens already delivered to the client; a retry regenerates them (same
      per-request keys) and they are checked, not sent again.
    attempt: 0 for the first try, +1 per retry.
  """

  request: Request
  record: RequestRecord
  eos_id: int | None
  emitted: int = 0
  attempt: int = 0
  produced: int = 0  # tokens produced by the current attempt
  cancelled: bool = False

  @property
  def stops(self) -> set[int]:
    s = set(self.request.sampling.stop_token_ids)
    if self.eos_id is not None and not self.request.sampling.ignore_eos:
      s.add(self.eos_id)
    return s


class Sink(Protocol):
  """Where workers report (the system)."""

  def on_token(self, job: Job, token: int, index: int, now: float) -> None:
    ...

  def on_finished(self, job: Job, reason: str, now: float) -> None:
    ...

  def on_prefilled(self, job: Job, prefix: Prefix, worker: PrefillWorker) -> None:
    ...

  def on_retry(self, job: Job, why: str) -> None:
    ...


def _finish_reason(job: Job, token: int) -> str | None:
  """"stop" / "length" if `token` (the job's `produced`-th) ends the request, else None."""
  if token in job.stops:
    return "stop"
  if job.produced >= job.request.sampling.max_tokens:
    return "length"
  return None


class PrefillWorker:
  """Prefill with a prefix cache over one or more prefill trees.

  Args:
    worker_id: its name.
    engine: the engine (architecture, capacity).
    trees: model id -> the prefill Params that serves it.
    cache: the prefix cache (None: no reuse).
    transfer: the transport its prefixes leave by.
    sink: where results go.
    max_queue: bound on waiting jobs (the system refuses beyond it).
  """

  pool = "prefill"

  def __init__(self, worker_id: str, engine: Engine, trees: dict[str, Params], *,
               cache: PrefixCache | None, transfer: KVTransfer, sink: Sink,
               max_queue: int = 64):
    self.worker_id, self.engine, self.trees = worker_id, engine, dict(trees)
    self.cache, self.transfer, self.sink, self.max_queue = cache, transfer, sink, max_queue
    self.inbox: collections.deque[Job] = collections.deque()
    self.cv = threading.Condition()
    self.alive = True
    self.busy = 0
    self.tree_ids = sorted({p.tree_id for p in self.trees.values()})

  @property
  def models(self) -> frozenset[str]:
    return frozenset(self.trees)

  def submit(self, job: Job) -> bool:
    """Queues a job; False when the queue is full (the caller refuses the request)."""
    with self.cv:
      if len(self.inbox) >= self.max_queue:
        return False
      self.inbox.append(job)
      self.cv.notify()
      return True

  def load(self) -> WorkerLoad:
    cfg = self.engine.cfg
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cfg.dtype.itemsize
    used, cap = 0, self.engine.capacity  # no cache: room for the prefill in flight
    if self.cache is not None:
      used, cap = self.cache.tokens, max(1, self.cache.budget_bytes // per_token)
    return WorkerLoad(worker_id=self.worker_id, pool=self.pool, models=self.models,
                      tree_id=",".join(self.tree_ids), alive=self.alive,
                      queue_len=len(self.inbox), running=self.busy, slots=None,
                      kv_used_tokens=used, kv_capacity_tokens=cap)

  def prefix_match(self, request: Request) -> int:
    """Prompt tokens this worker already caches for `request` (routers' signal)."""
    params = self.trees.get(request.model)
    if self.cache is None or params is None:
      return 0
    return self.cache.match_length(params.tree_id, request.prompt)

  def wait_for_work(self, timeout: float) -> bool:
    with self.cv:
      if not self.inbox and self.alive:
        self.cv.wait(timeout)
      return bool(self.inbox)

  def prefill(self, job: Job) -> Prefix:
    """Prefills one job's prompt (reusing the cache) and records its timings."""
    req = job.request
    params = self.trees[req.model]
    n_cache = len(req.prompt) - (1 if params.last_prompt_token == "decode" else 0)
    hit = None if self.cache is None or n_cache == 0 else self.cache.lookup(
        params.tree_id, req.prompt, max_length=n_cache)
    job.record.prefill_start = self.engine.clock()
    log = self.engine.step_log
    n_logged = None if log is None else len(log)
    prefix, _ = self.engine.prefill(params, req.prompt, existing_prefix=hit, model=req.model,
                                    sampling=req.sampling)
    if self.cache is not None:
      self.cache.put(prefix)
    job.record.prefill_end = self.engine.clock()
    if log is not None and len(log) == n_logged + 1:  # the step as this worker spent it
      log[-1].seconds = job.record.prefill_end - job.record.prefill_start
      log[-1].start = job.record.prefill_start
    job.record.cached_prompt_tokens = 0 if hit is None else hit.length
    job.record.prefill_worker = self.worker_id
    return prefix

  def run_once(self) -> bool:
    """Prefills the next queued job, if any. Returns whether it did work."""
    with self.cv:
      if not self.inbox:
        return False
      job = self.inbox.popleft()
      self.busy += 1
    try:
      if job.cancelled:
        self.sink.on_finished(job, "abort", self.engine.clock())
        return True
      prefix = self.prefill(job)
      self.sink.on_prefilled(job, prefix, self)
    except Exception as e:  # noqa: BLE001 - reported to the request, the worker lives on
      job.record.error = f"{type(e).__name__}: {e}"
      self.sink.on_retry(job, f"prefill failed: {e}")
    finally:
      self.busy -= 1
    return True

  def drain_jobs(self) -> list[Job]:
    """Takes every queued job (when the worker dies)."""
    with self.cv:
      jobs = list(self.inbox)
      self.inbox.clear()
    return jobs


def emit_first_token(sink: Sink, job: Job, prefix: Prefix, now: float) -> bool:
  """Emits the prefill tree's first token (known at `now`); returns True if that already
  ends the job."""
  if not prefix.first_emitted:
    return False
  job.produced = 1
  sink.on_token(job, prefix.next_token, 0, now)
  reason = _finish_reason(job, prefix.next_token)
  if reason is not None:
    sink.on_finished(job, reason, now)
    return True
  return False


class DecodeWorker:
  """Continuous batching over one decode tree.

  Args:
    worker_id: its name.
    engine: the engine (slots, capacity, chunk).
    params: the decode tree.
    valid_producers: prefill tree ids whose KV this tree may consume.
    models: task model ids it serves.
    transfer: the transport prefixes arrive by.
    sink: where tokens and ends go.
  """

  pool = "decode"

  def __init__(self, worker_id: str, engine: Engine, params: Params, *,
               valid_producers: set[str], models: set[str], transfer: KVTransfer,
               sink: Sink):
    self.worker_id, self.engine, self.params = worker_id, engine, params
    self.valid_producers, self._models = set(valid_producers), frozenset(models)
    self.transfer, self.sink = transfer, sink
    self.inbox: collections.deque[tuple[Job, Envelope | Prefix]] = collections.deque()
    self.cv = threading.Condition()
    self.alive = True
    self.state = engine.init_decode_state()
    self.slot_jobs: dict[int, Job] = {}
    self.slot_len: dict[int, int] = {}  # known KV length of each occupied row
    self.pending = None  # (chunk, {slot: job}) dispatched, not yet read
    self.occupancy: list[float] = []  # occupied fraction of slots per dispatched chunk
    self.steps = 0

  @property
  def models(self) -> frozenset[str]:
    return self._models

  def submit(self, job: Job, payload) -> None:
    with self.cv:
      self.inbox.append((job, payload))
      self.cv.notify()

  def load(self) -> WorkerLoad:
    return WorkerLoad(worker_id=self.worker_id, pool=self.pool, models=self.models,
                      tree_id=self.params.tree_id, alive=self.alive,
                      queue_len=len(self.inbox), running=len(self.slot_jobs),
                      slots=self.engine.slots, kv_used_tokens=sum(self.slot_len.values()),
                      kv_capacity_tokens=self.engine.slots * self.engine.capacity)

  @property
  def has_work(self) -> bool:
    return bool(self.inbox or self.slot_jobs or self.pending)

  def wait_for_work(self, timeout: float) -> bool:
    with self.cv:
      if not self.has_work and self.alive:
        self.cv.wait(timeout)
      return self.has_work

  def _free_slots(self) -> list[int]:
    return [s for s in range(self.engine.slots) if s not in self.slot_jobs]

  def _prefix_for(self, job: Job, payload) -> Prefix | None:
    """The prefix of an arriving job (a colocated worker prefills it here)."""
    prefix, stats = self.transfer.receive(payload)
    job.record.transfer_s += stats.seconds
    job.record.transfer_bytes += stats.nbytes
    return prefix

  def _admit(self) -> None:
    free = self._free_slots()
    while free:
      with self.cv:
        if not self.inbox:
          return
        job, payload = self.inbox.popleft()
      if job.cancelled:
        self.sink.on_finished(job, "abort", self.engine.clock())
        continue
      try:
        prefix = self._prefix_for(job, payload)
        if prefix is None:  # finished at prefill
          continue
        slot = free.pop(0)
        self.state = self.engine.insert(prefix, self.state, slot, sampling=job.request.sampling,
                                        valid_producers=self.valid_producers,
                                        eos_id=job.eos_id)
      except KVCorrupted as e:
        self.sink.on_retry(job, str(e))
        continue
      except InsertError as e:
        job.record.error = str(e)
        self.sink.on_retry(job, str(e))
        continue
      job.record.decode_worker = self.worker_id
      self.slot_jobs[slot] = job
      self.slot_len[slot] = prefix.length

  def _read(self, pending) -> None:
    """Emits the tokens of a finished chunk and frees the rows that ended."""
    chunk, jobs = pending
    tokens = self.engine.fetch(chunk)  # the host sync: one per chunk
    now = self.engine.clock()
    for slot, job in jobs.items():
      if self.slot_jobs.get(slot) is not job:
        continue  # re-routed meanwhile
      if job.cancelled:
        self.state = self.engine.free(self.state, slot)
        del self.slot_jobs[slot], self.slot_len[slot]
        self.sink.on_finished(job, "abort", now)
        continue
      for t in tokens[slot]:
        if t < 0:
          continue
        t = int(t)
        self.slot_len[slot] += 1
        job.produced += 1
        self.sink.on_token(job, t, job.produced - 1, now)
        reason = _finish_reason(job, t)
        if reason is not None:
          self.sink.on_finished(job, reason, now)
          del self.slot_jobs[slot], self.slot_len[slot]
          break

  def run_once(self) -> bool:
    """Admit, dispatch one chunk, read the previous one. Returns whether it did work."""
    self._admit()
    dispatched = None
    if self.slot_jobs:
      live = max(self.slot_len[s] for s in self.slot_jobs)
      # The chunk in flight may add up to `chunk` tokens to each row before this one runs.
      bound = live + (self.engine.chunk if self.pending else 0)
      self.state, chunk = self.engine.generate(self.params, self.state, max_live_length=bound)
      dispatched = (chunk, dict(self.slot_jobs))
      self.occupancy.append(len(self.slot_jobs) / self.engine.slots)
      self.steps += 1
    if self.pending is not None:
      self._read(self.pending)
    self.pending = dispatched
    return dispatched is not None

  def drain_jobs(self) -> list[Job]:
    """Every job it holds (queued or running), for re-routing when it dies."""
    with self.cv:
      jobs = [j for j, _ in self.inbox]
      self.inbox.clear()
    jobs += list(self.slot_jobs.values())
    self.slot_jobs.clear()
    self.slot_len.clear()
    self.pending = None
    return jobs


class ColocatedWorker(DecodeWorker):
  """Prefill and decode on one worker: prefills arriving jobs between decode chunks."""

  pool = "colocated"

  def __init__(self, worker_id: str, engine: Engine, params: Params, *,
               prefill: PrefillWorker, **kwargs):
    super().__init__(worker_id, engine, params, **kwargs)
    self.prefiller = prefill

  def prefix_match(self, request: Request) -> int:
    return self.prefiller.prefix_match(request)

  def _prefix_for(self, job: Job, payload) -> Prefix | None:
    prefix = self.prefiller.prefill(job)
    if emit_first_token(self.sink, job, prefix, self.engine.clock()):
      return None
    return prefix

  def load(self) -> WorkerLoad:
    return dataclasses.replace(super().load(), pool=self.pool)
