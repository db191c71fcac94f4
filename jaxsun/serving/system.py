"""Deployments built from one config, run in one process (a thread per worker).

    system = ServingSystem(DeploymentConfig(kind="sun", decode_workers=1), models={
        "math": math_split, "code": code_split}, eos_id=258, tokenizer="byte")
    handle = system.submit(Request(model="math", prompt=(1, 2, 3)))
    record = handle.result(timeout=60)
    system.shutdown()

Deployment kinds (how pools are formed from the task models' parameter trees):

  * "conventional": per-model prefill and decode pools (the disaggregated baseline).
  * "sun": per-model prefill pools, one shared decode pool (every model must have the
    same decode tree); decode requests of all models batch together.
  * "prefillshare": one shared prefill pool with a prefix cache keyed by the shared tree,
    so models reuse each other's KV; per-model decode pools (every model must share the
    prefill tree).
  * "colocated": per-model workers doing prefill and decode on one device.

The system implements `jaxsun.serving.backend.Backend` (the HTTP API's interface):
admission control with bounded queues (429), draining shutdown (503 for new work),
retries when a KV transfer fails its digest check or a worker dies (the request is
recomputed; tokens already streamed are checked, not resent), and Prometheus metrics.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from typing import Mapping

import numpy as np

from jaxsun.serving import router as router_lib
from jaxsun.serving.backend import ModelInfo, RequestHandle
from jaxsun.serving.engine import Engine, Params
from jaxsun.serving.prefix_cache import PrefixCache
from jaxsun.serving.request import (ContextTooLong, ModelNotFound, Overloaded, Request,
                                    RequestError, RequestFailed, RequestRecord, TokenEvent)
from jaxsun.serving.transfer import KVTransfer, make_transfer
from jaxsun.serving.workers import (ColocatedWorker, DecodeWorker, Job, PrefillWorker,
                                    emit_first_token)
from jaxsun.split import SplitModel, check_split

KINDS = ("conventional", "sun", "prefillshare", "colocated")
SWITCH_INTERVAL_S = 0.0005  # GIL switch interval while worker threads run (see start)


@dataclasses.dataclass(frozen=True)
class DeploymentConfig:
  """One serving deployment.

  Attributes:
    kind: one of KINDS.
    prefill_workers: workers per prefill pool.
    decode_workers: workers per decode pool (or colocated workers per model).
    slots: decode rows per decode worker.
    capacity: KV tokens per row (prompt + max_tokens must fit).
    chunk: decode steps per device call.
    prefix_cache_mb: prefix-cache budget per prefill worker (0: no cache).
    prefix_block: prefix-cache match granularity in tokens.
    prefill_policy, decode_policy: router policy names (`jaxsun.serving.router`).
    max_queue: waiting jobs per prefill worker before new requests get 429.
    max_inflight: requests in the system (queued + running) before 429.
    max_retries: recomputations after a corrupt transfer or a dead worker.
    transfer: "in_process" or "fake".
    transfer_options: keyword arguments of the transport (e.g. FakeTransfer's delay_s).
    seed: for randomised policies.
  """

  kind: str = "sun"
  prefill_workers: int = 1
  decode_workers: int = 1
  slots: int = 8
  capacity: int = 256
  chunk: int = 16
  prefix_cache_mb: float = 64.0
  prefix_block: int = 16
  prefill_policy: str = "least_loaded"
  decode_policy: str = "least_loaded"
  max_queue: int = 256
  max_inflight: int = 1024
  max_retries: int = 2
  transfer: str = "in_process"
  transfer_options: Mapping = dataclasses.field(default_factory=dict)
  seed: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"DeploymentConfig.kind={self.kind!r} is not one of {KINDS}")
    for f in ("prefill_workers", "decode_workers", "slots", "capacity", "chunk", "max_queue",
              "max_inflight", "prefix_block"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"DeploymentConfig.{f}={v!r} must be a positive integer")
    if self.max_retries < 0 or self.prefix_cache_mb < 0:
      raise ValueError("DeploymentConfig.max_retries and prefix_cache_mb must be >= 0")
    for f in ("prefill_policy", "decode_policy"):
      if getattr(self, f) not in router_lib.POLICIES:
        raise ValueError(f"DeploymentConfig.{f}={getattr(self, f)!r} is not one of "
                         f"{sorted(router_lib.POLICIES)}")


@dataclasses.dataclass(frozen=True)
class TaskTrees:
  """A task model given by its two engine trees rather than a SplitModel: e.g. a SUN
  model whose shared decode tree is quantized (QSUN), or simulated trees.

  Attributes:
    prefill: the tree that prefills its prompts.
    decode: the tree that decodes them.
  """

  prefill: Params
  decode: Params

  @property
  def cfg(self):
    return self.prefill.cfg

  @property
  def last_prompt_token(self) -> str:
    return self.prefill.last_prompt_token


def _policy(name: str, seed: int) -> router_lib.Policy:
  return router_lib.make_policy(name, **({"seed": seed} if name == "power_of_two" else {}))


class ServingSystem:
  """A deployment of task models, run in this process; a `Backend`.

  Args:
    config: the DeploymentConfig.
    models: task model id -> SplitModel or TaskTrees (same architecture for all).
    eos_id: the end-of-sequence token of every model (None: none).
    tokenizer: tokenizer name reported to front ends.
    start: start the worker threads now (False: call `start()`, or drive `step()`
      yourself in tests).
  """

  def __init__(self, config: DeploymentConfig, models: Mapping[str, SplitModel | TaskTrees], *,
               eos_id: int | None = None, tokenizer: str = "byte", start: bool = True):
    if not isinstance(config, DeploymentConfig):
      raise TypeError(f"config must be a DeploymentConfig, got {type(config).__name__}")
    if not models:
      raise ValueError("models is empty: a deployment serves at least one task model")
    self.config, self.eos_id, self.tokenizer = config, eos_id, tokenizer
    self.task_models = {m: s if isinstance(s, TaskTrees) else check_split(s, f"models[{m!r}]")
                        for m, s in models.items()}
    cfgs = {s.cfg for s in self.task_models.values()}
    if len(cfgs) != 1:
      raise ValueError("every task model must have the same ModelConfig (one architecture)")
    self.cfg = cfgs.pop()
    if config.capacity > self.cfg.max_len:
      raise ValueError(f"DeploymentConfig.capacity={config.capacity} exceeds "
                       f"ModelConfig.max_len={self.cfg.max_len}")
    conventions = {s.last_prompt_token for s in self.task_models.values()}
    if len(conventions) != 1 and config.kind in ("sun", "prefillshare"):
      raise ValueError("task models disagree on last_prompt_token; a shared module needs "
                       "one convention")
    self.transfer: KVTransfer = self._make_transfer()
    self._params_cache: dict[str, Params] = {}
    self.prefill_params = {m: self._dedup(s.prefill if isinstance(s, TaskTrees)
                                          else Params.prefill_of(s))
                           for m, s in self.task_models.items()}
    self.decode_params = {m: self._dedup(s.decode if isinstance(s, TaskTrees)
                                         else Params.decode_of(s))
                          for m, s in self.task_models.items()}
    self.router = router_lib.Router(prefill_policy=_policy(config.prefill_policy, config.seed),
                                    decode_policy=_policy(config.decode_policy, config.seed + 1))
    self.prefill_workers: list[PrefillWorker] = []
    self.decode_workers: list[DecodeWorker] = []
    self._build()
    self._lock = threading.RLock()
    self._counter_lock = threading.Lock()
    self.inflight: dict[str, Job] = {}
    self.records: list[RequestRecord] = []
    self.handles: dict[str, RequestHandle] = {}
    self.draining = False
    self.counters = {"admitted": 0, "rejected": 0, "failed": 0, "completed": 0,
                     "retries": 0, "corrupt_kv": 0, "tokens": 0}
    self._threads: list[threading.Thread] = []
    self._stop = threading.Event()
    self._switch_interval: float | None = None
    if start:
      self.start()

  # -- construction

  def _dedup(self, p: Params) -> Params:
    return self._params_cache.setdefault(p.tree_id, p)

  def _make_transfer(self) -> KVTransfer:
    c = self.config
    return make_transfer(c.transfer, **dict(c.transfer_options))

  def _engine(self, worker_id: str) -> Engine:  # pylint: disable=unused-argument
    """The engine of worker `worker_id` (a simulator hands out simulated ones)."""
    c = self.config
    return Engine(self.cfg, slots=c.slots, capacity=c.capacity, chunk=c.chunk)

  def warm_up(self) -> int:
    """Compiles every shape the workers can meet (`Engine.warm_up`) before serving.
    Compilations are shared by trees of one structure, so one engine and one tree of
    each structure warm them all. Returns the calls made."""
    workers = self.prefill_workers + self.decode_workers
    if not workers:
      return 0

    def distinct(trees):
      out = {}
      for t in trees:
        out.setdefault(getattr(getattr(t, "split", None), "graphdef", t.tree_id), t)
      return list(out.values())

    return workers[0].engine.warm_up(distinct(self.prefill_params.values()),
                                     distinct(self.decode_params.values()))

  def clock(self) -> float:
    """The time the system stamps its own events with."""
    return time.monotonic()

  def _prefill_worker(self, name: str, models: list[str]) -> PrefillWorker:
    c = self.config
    cache = (PrefixCache(int(c.prefix_cache_mb * 2**20), block=c.prefix_block)
             if c.prefix_cache_mb > 0 else None)
    return PrefillWorker(name, self._engine(name), {m: self.prefill_params[m] for m in models},
                         cache=cache, transfer=self.transfer, sink=self, max_queue=c.max_queue)

  def _build(self) -> None:
    c, names = self.config, sorted(self.task_models)
    if c.kind == "sun" and len({self.decode_params[m].tree_id for m in names}) != 1:
      raise ValueError("kind='sun' needs one shared decode tree, but the task models have "
                       f"{len({self.decode_params[m].tree_id for m in names})} different ones "
                       "(train SUN task models with trainability='prefill' from one base)")
    if c.kind == "prefillshare" and len({self.prefill_params[m].tree_id for m in names}) != 1:
      raise ValueError("kind='prefillshare' needs one shared prefill tree (train task models "
                       "with trainability='decode' from one base)")
    # Which prefill trees each decode tree accepts: those it is paired with in some model.
    accepts: dict[str, set[str]] = {}
    for m in names:
      accepts.setdefault(self.decode_params[m].tree_id, set()).add(
          self.prefill_params[m].tree_id)
    if c.kind == "colocated":
      for m in names:
        for i in range(c.decode_workers):
          pre = self._prefill_worker(f"colocated-{m}-{i}/prefill", [m])
          dp = self.decode_params[m]
          self.decode_workers.append(ColocatedWorker(
              f"colocated-{m}-{i}", self._engine(f"colocated-{m}-{i}"), dp, prefill=pre,
              valid_producers={self.prefill_params[m].tree_id}, models={m},
              transfer=self.transfer, sink=self))
      return
    prefill_groups = [names] if c.kind == "prefillshare" else [[m] for m in names]
    for group in prefill_groups:
      tag = "shared" if len(group) > 1 else group[0]
      for i in range(c.prefill_workers):
        self.prefill_workers.append(self._prefill_worker(f"prefill-{tag}-{i}", group))
    decode_groups = [names] if c.kind == "sun" else [[m] for m in names]
    for group in decode_groups:
      tag = "shared" if len(group) > 1 else group[0]
      dp = self.decode_params[group[0]]
      valid = set().union(*(accepts[self.decode_params[m].tree_id] for m in group))
      if c.kind == "conventional":  # a model's pool takes only its own prefill tree's KV
        valid = {self.prefill_params[group[0]].tree_id}
      for i in range(c.decode_workers):
        self.decode_workers.append(DecodeWorker(
            f"decode-{tag}-{i}", self._engine(f"decode-{tag}-{i}"), dp, valid_producers=valid,
            models=set(group), transfer=self.transfer, sink=self))

  # -- runtime

  def start(self) -> None:
    """Starts one thread per worker.

    Worker threads hand requests to each other and to the caller's event loop; with
    CPython's default 5 ms GIL switch interval every handoff can wait that long (a decode
    chunk of a small model takes about as much), so the interval is lowered to
    SWITCH_INTERVAL_S while the system runs (restored by `shutdown`).
    """
    if self._switch_interval is None:
      self._switch_interval = sys.getswitchinterval()
      sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL_S))
    for w in self.prefill_workers + self.decode_workers:
      t = threading.Thread(target=self._loop, args=(w,), name=w.worker_id, daemon=True)
      t.start()
      self._threads.append(t)

  def _loop(self, worker) -> None:
    while not self._stop.is_set() and worker.alive:
      if getattr(worker, "kill_requested", False):  # dies here, between two iterations
        worker.rerouted = self._worker_died(worker, "killed")
        return
      try:
        if not worker.run_once():
          worker.wait_for_work(0.02)
      except Exception as e:  # noqa: BLE001 - a crashed worker is treated as dead
        self._worker_died(worker, f"{type(e).__name__}: {e}")
        return

  def step(self) -> bool:
    """Runs every worker once (a deterministic single-threaded schedule for tests)."""
    did = False
    for w in self.prefill_workers + self.decode_workers:
      if w.alive:
        did |= bool(w.run_once())
    return did

  def run_until_idle(self, max_steps: int = 100_000) -> None:
    """Steps until nothing is in flight (without threads)."""
    for _ in range(max_steps):
      self.step()
      if not self.inflight:
        return
    raise RuntimeError("run_until_idle: requests still in flight")

  # -- Backend

  def models_info(self) -> list[ModelInfo]:
    return [ModelInfo(id=m, max_context=self.config.capacity, tokenizer=self.tokenizer,
                      eos_id=-1 if self.eos_id is None else self.eos_id,
                      prefill_tree=self.prefill_params[m].tree_id,
                      decode_tree=self.decode_params[m].tree_id) for m in sorted(self.task_models)]

  def models(self) -> list[ModelInfo]:
    return self.models_info()

  def validate(self, request: Request) -> None:
    """Raises a RequestError naming the field if the request cannot be served."""
    if request.model not in self.task_models:
      raise ModelNotFound(request.model, list(self.task_models))
    if max(request.prompt) >= self.cfg.vocab_size:
      raise RequestError("prompt", f"token id {max(request.prompt)} is outside the vocabulary "
                         f"[0, {self.cfg.vocab_size})")
    n, m = len(request.prompt), request.sampling.max_tokens
    if n + m > self.config.capacity:
      raise ContextTooLong("max_tokens", f"prompt ({n} tokens) + max_tokens ({m}) exceeds "
                           f"the context limit {self.config.capacity}")
    if len(request.sampling.stop_token_ids) > 3:
      raise RequestError("stop_token_ids", "at most 3 stop tokens")

  def admission(self) -> Overloaded | None:
    """Refuses a request early, before it is read (the HTTP API asks this before it
    parses a body): the Overloaded to answer with, counted as a rejected request, or
    None when the system takes requests."""
    refused = self._refusal()
    if refused is not None:
      with self._counter_lock:
        self.counters["rejected"] += 1
    return refused

  def _refusal(self) -> Overloaded | None:
    if self.draining:
      return Overloaded("server is shutting down", status=503)
    if len(self.inflight) >= self.config.max_inflight:
      return Overloaded(f"{len(self.inflight)} requests in flight (max_inflight="
                        f"{self.config.max_inflight})", status=429)
    return None

  def submit(self, request: Request) -> RequestHandle:
    """Admits a request (RequestError / Overloaded if it cannot be), returns its handle."""
    self.validate(request)
    record = RequestRecord(request_id=request.request_id, model=request.model,
                           prompt_len=len(request.prompt), arrival=request.arrival_time)
    handle = RequestHandle(request, record)
    job = Job(request=request, record=record, eos_id=self.eos_id)
    handle._on_cancel = lambda: setattr(job, "cancelled", True)
    with self._lock:
      refused = self._refusal()
      if refused is not None:
        raise self._reject(record, refused)
      if request.request_id in self.inflight:
        raise RequestError("request_id", f"{request.request_id!r} is already in flight")
      self.inflight[request.request_id] = job
      self.handles[request.request_id] = handle
      self.counters["admitted"] += 1
    try:
      self._dispatch(job)
    except Exception as e:  # roll the admission back whatever went wrong
      with self._lock:
        self.inflight.pop(request.request_id, None)
        self.handles.pop(request.request_id, None)
        self.counters["admitted"] -= 1
      if isinstance(e, Overloaded):
        raise self._reject(record, e) from None
      raise
    return handle

  def _reject(self, record: RequestRecord, e: Overloaded) -> Overloaded:
    record.error, record.status = e.reason, e.status
    with self._counter_lock:
      self.counters["rejected"] += 1
    self.records.append(record)
    return e

  def _dispatch(self, job: Job) -> None:
    """Routes a job to its first stop: a prefill worker (or a colocated worker)."""
    req = job.request
    if self.config.kind == "colocated":
      target = self._route(self.router.route_decode, req, self.decode_workers)
      target.submit(job, None)
      return
    workers = {w.worker_id: w for w in self.prefill_workers}
    target = self._route(self.router.route_prefill, req, self.prefill_workers,
                         prefix_match=lambda wid: workers[wid].prefix_match(req))
    if not target.submit(job):
      raise Overloaded(f"prefill queue of {target.worker_id} is full "
                       f"(max_queue={self.config.max_queue})", status=429)

  def _route(self, fn, request, workers, **kw):
    loads = [w.load() for w in workers if request.model in w.models]
    wid = fn(request, loads, **kw)
    return next(w for w in workers if w.worker_id == wid)

  # -- Sink (called by workers)

  def on_prefilled(self, job: Job, prefix, worker: PrefillWorker) -> None:
    if emit_first_token(self, job, prefix, self.clock()):
      return
    try:
      target = self._route(self.router.route_decode, job.request, self.decode_workers)
    except Overloaded as e:
      self._fail(job, RequestFailed(f"no decode worker: {e.reason}"))
      return
    target.submit(job, self.transfer.send(prefix))

  def on_token(self, job: Job, token: int, index: int, now: float) -> None:
    rec = job.record
    if self.inflight.get(job.request.request_id) is not job:
      return  # failed or finished meanwhile: a worker still generating for it is ignored
    if index < job.emitted:  # a retry regenerating what the client already has
      if rec.output_tokens[index] != token:
        self._fail(job, RequestFailed(f"retry of {job.request.request_id} diverged at token "
                                      f"{index}; not answering with different tokens"))
      return
    job.emitted = index + 1
    rec.output_tokens.append(token)
    rec.token_times.append(now)
    with self._counter_lock:
      self.counters["tokens"] += 1
    handle = self.handles.get(job.request.request_id)
    if handle is not None:
      handle._push(TokenEvent(job.request.request_id, token, index, now))

  def _retire(self, job: Job, outcome: str) -> tuple[bool, RequestHandle | None]:
    """Takes a job out of flight once (counted under `outcome`); returns (whether this
    call retired it, its handle)."""
    rid = job.request.request_id
    with self._lock:
      if self.inflight.get(rid) is not job:
        return False, None
      del self.inflight[rid]
      self.counters[outcome] += 1
      return True, self.handles.pop(rid, None)

  def on_finished(self, job: Job, reason: str, now: float) -> None:
    rid = job.request.request_id
    retired, handle = self._retire(job, "completed")
    if not retired:
      return
    job.record.finish_reason, job.record.end = reason, now
    self.records.append(job.record)
    if handle is not None:
      handle._push(TokenEvent(rid, None, job.emitted, now, finished=True,
                              finish_reason=reason))

  def on_retry(self, job: Job, why: str) -> None:
    """Recomputes a job from its prompt (corrupt KV, a worker died), or fails it."""
    with self._counter_lock:
      self.counters["retries"] += 1
      if "digest" in why:
        self.counters["corrupt_kv"] += 1
    if job.attempt >= self.config.max_retries:
      self._fail(job, RequestFailed(f"request {job.request.request_id} failed after "
                                    f"{job.attempt + 1} attempts: {why}"))
      return
    job.attempt += 1
    job.produced = 0
    job.record.retries = job.attempt
    job.record.error = None
    try:
      self._dispatch(job)
    except Exception as e:  # noqa: BLE001
      self._fail(job, RequestFailed(f"could not re-route {job.request.request_id}: {e}"))

  def _fail(self, job: Job, error: Exception) -> None:
    retired, handle = self._retire(job, "failed")
    if not retired:
      return
    job.record.error, job.record.status = str(error), getattr(error, "status", 500)
    job.record.end = self.clock()
    self.records.append(job.record)
    if handle is not None:
      handle._fail(error)

  # -- failures

  def kill_worker(self, worker_id: str, timeout: float = 60.0) -> int:
    """Kills a worker (a crash): it stops at its next iteration boundary, losing the
    chunk in flight; its requests are recomputed elsewhere. Returns how many were
    re-routed."""
    w = next((w for w in self.prefill_workers + self.decode_workers
              if w.worker_id == worker_id), None)
    if w is None:
      raise ValueError(f"no worker {worker_id!r}")
    if not self._threads or self._stop.is_set():
      return self._worker_died(w, "killed")
    w.kill_requested = True  # its own thread hands its jobs over: no race with its loop
    with w.cv:
      w.cv.notify_all()
    deadline = time.monotonic() + timeout
    while w.alive:
      if time.monotonic() > deadline:
        raise TimeoutError(f"worker {worker_id} did not stop in {timeout} s")
      time.sleep(0.001)
    while not hasattr(w, "rerouted"):
      time.sleep(0.001)
    return w.rerouted

  def _worker_died(self, worker, why: str) -> int:
    worker.alive = False
    with worker.cv:
      worker.cv.notify_all()
    jobs = worker.drain_jobs()
    for job in jobs:
      self.on_retry(job, f"worker {worker.worker_id} died ({why})")
    return len(jobs)

  # -- status

  def health(self) -> dict:
    workers = {w.worker_id: ("alive" if w.alive else "dead")
               for w in self.prefill_workers + self.decode_workers}
    status = "draining" if self.draining else (
        "ok" if all(v == "alive" for v in workers.values()) else "degraded")
    return {"status": status, "workers": workers, "inflight": len(self.inflight)}

  def occupancy(self) -> list[float]:
    return [o for w in self.decode_workers for o in w.occupancy]

  def prefix_cache_stats(self) -> dict:
    caches = [w.cache for w in self.prefill_workers if w.cache is not None]
    caches += [w.prefiller.cache for w in self.decode_workers
               if isinstance(w, ColocatedWorker) and w.prefiller.cache is not None]
    keys = ("hits", "misses", "evictions", "hit_tokens", "lookup_tokens", "bytes")
    return {k: sum(c.stats()[k] for c in caches) for k in keys}

  def metrics_text(self) -> str:
    """Prometheus text exposition (counters, per-worker gauges, latency histograms)."""
    from jaxsun.serving import prometheus  # pylint: disable=import-outside-toplevel

    return prometheus.render(self)

  def shutdown(self, drain: bool = True, timeout: float | None = 60.0) -> None:
    """Stops admitting; with `drain`, waits for in-flight requests; then stops workers."""
    with self._lock:
      self.draining = True
    if drain and self._threads:
      deadline = None if timeout is None else time.monotonic() + timeout
      while self.inflight and (deadline is None or time.monotonic() < deadline):
        time.sleep(0.01)
    self._stop.set()
    for w in self.prefill_workers + self.decode_workers:
      with w.cv:
        w.cv.notify_all()
    for t in self._threads:
      t.join(timeout=5)
    if self._switch_interval is not None:
      sys.setswitchinterval(self._switch_interval)
      self._switch_interval = None
    for job in list(self.inflight.values()):
      self._fail(job, RequestFailed("server shut down before the request finished"))

  def summary(self) -> dict:
    occ = self.occupancy()
    return {"counters": dict(self.counters), "transfer": self.transfer.stats(),
            "prefix_cache": self.prefix_cache_stats(),
            "decode_occupancy_mean": float(np.mean(occ)) if occ else None}
