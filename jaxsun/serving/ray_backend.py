"""The Ray runtime: every prefill / decode / colocated worker is a Ray actor with its loop.

`RaySystem` is a `ServingSystem` (so routing, admission, retries, token dedup and metrics
are the same code) whose workers live in Ray actors instead of driver threads:

    import ray
    from jaxsun.serving.ray_backend import RaySystem
    from jaxsun.serving.request import Request, SamplingParams
    from jaxsun.serving.system import DeploymentConfig

    ray.init(include_dashboard=False)          # or let RaySystem start / join one
    system = RaySystem(DeploymentConfig(kind="sun", prefill_workers=1, decode_workers=2),
                       {"math": math_split, "code": code_split}, eos_id=258,
                       env_vars={"JAX_PLATFORMS": "cpu"})
    handle = system.submit(Request(model="math", prompt=(1, 2, 3),
                                   sampling=SamplingParams(max_tokens=32)))
    record = handle.result(timeout=60)
    system.shutdown()                          # drains; never stops a cluster it joined

Design:

* Layout. `ServingSystem._build` lays out the deployment as usual (worker names, pools,
  which trees each worker runs, which producers a decode tree accepts), on engines that
  allocate nothing (`_SpecEngine`); each worker is then replaced by an actor built from
  that spec and a driver-side `_ActorProxy`. Every parameter tree is `ray.put` once;
  an actor fetches only the trees it runs. Actors build the very same `PrefillWorker` /
  `DecodeWorker` / `ColocatedWorker` (workers.py) and run `run_once()` in a thread.
* Events. Inside an actor the worker's sink (`_Outbox`) buffers what it reports
  (token, finished, prefilled, retry) plus the changes the worker made to the request's
  record (prefill times, cache hit, transfer seconds and bytes, worker names). The
  driver keeps one long poll outstanding per actor (`poll(timeout)` returns as soon as
  the loop has flushed events, or after `poll_timeout_s` as a heartbeat); one driver
  thread waits on all of them (`ray.wait`) and applies each batch to the ServingSystem
  sink methods in order. A decode actor flushes once per chunk it reads, so one reply
  carries up to `chunk` tokens of every row in the batch: never a Ray call per token.
* KV transfer. `RayTransfer.send` (prefill actor) copies the prefix's KV to host numpy
  once and `ray.put`s it; the "prefilled" event carries a `RemotePrefix` (the ObjectRef
  plus producer, model, length, tokens, digest, next token, first_emitted, convention).
  The driver emits the first token, routes decode and hands (job, ref) to the decode
  actor, whose `RayTransfer.receive` does `ray.get` + `jax.device_put`, timed; `insert`
  then re-checks the digest (the engine does). The prefill actor owns the object: if it
  dies before the decode actor fetched the KV, the fetch fails and the request is
  recomputed (`KVLost`, an `InsertError`).
* Load. Each poll reply carries the actor's `WorkerLoad`; a proxy's `load()` combines it
  with the driver's own assignments (jobs handed to the actor and not yet reported back
  count as queued), so a burst of requests spreads out without a Ray call per routing
  decision. `prefix_match` (read only by cache-aware prefill policies) is a synchronous
  remote call, one per candidate prefill worker per request, at prefill routing only.
* Death. The driver tracks which jobs it assigned to each actor. A dead actor's
  outstanding poll fails (`RayActorError`); an actor whose loop raised reports
  "crashed" and is killed. Either way the proxy is marked dead and `_worker_died`
  re-routes every job assigned to it through `on_retry` (recomputed from the prompt on
  live workers); tokens the client already has are checked, not resent (`on_token`).
  `kill_worker` is `ray.kill` and waits for the poller to notice.
* Cancel. `handle.cancel()` flags the driver's job (later hand-overs carry the flag) and
  sends one `cancel` call to the actor holding it, whose worker ends it with "abort".
* Clocks. Token times are stamped when the driver applies them (what a client sees);
  prefill start / end come from the actor, shifted by a clock offset measured at start.

Ray calls per request: one `submit` to a prefill actor, one `put` (prefill actor) and
one `get` (decode actor) of its KV, one `submit` to a decode actor (a colocated
deployment has one `submit` and no transfer); token, prefill and finish events ride on
polls shared by every request of an actor (about one reply per decode chunk, each
~0.6 ms on one host); a cache-aware prefill policy adds one `prefix_match` call per
candidate prefill actor. A retry repeats the lot.

Multi-host: the same code; pass `address=` ("auto", or "<head>:6379" from a cluster
node) to join an existing cluster when Ray is not initialised; actors are placed by
Ray (give them `num_gpus` on accelerator hosts) and KV moves between hosts through the
object store. The clock offsets then absorb host clock differences to within half a
round trip. RaySystem calls `ray.shutdown()` only if it called `ray.init` itself (for
a joined cluster that only disconnects this driver).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Mapping

import jax
import numpy as np
import ray

from jaxsun.serving.engine import Engine, InsertError, Params, Prefix
from jaxsun.serving.load import WorkerLoad
from jaxsun.serving.prefix_cache import PrefixCache
from jaxsun.serving.request import Overloaded, Request, RequestFailed, RequestRecord
from jaxsun.serving.system import DeploymentConfig, ServingSystem
from jaxsun.serving.transfer import Envelope, KVTransfer
from jaxsun.serving.workers import ColocatedWorker, DecodeWorker, Job, PrefillWorker
from jaxsun.split import SplitModel

log = logging.getLogger(__name__)

# Record fields a worker sets (copied back as they are) or accumulates (added).
_SET_FIELDS = ("prefill_start", "prefill_end", "cached_prompt_tokens", "prefill_worker",
               "decode_worker", "error")
_ADD_FIELDS = ("transfer_s", "transfer_bytes")
_ACTOR_CLOCK_FIELDS = ("prefill_start", "prefill_end")
_CACHE_KEYS = ("hits", "misses", "evictions", "hit_tokens", "lookup_tokens", "bytes")


# ----------------------------------------------------------------------------- transfer


class KVLost(InsertError):
  """The KV of a prefix could not be fetched from the object store (its owner died)."""


@dataclasses.dataclass(frozen=True)
class RemotePrefix:
  """A `Prefix` whose KV (host numpy arrays) waits in the Ray object store.

  The handle that travels prefill actor -> driver -> decode actor: the driver reads the
  first-token fields, the decode actor fetches `ref` and `insert` checks the rest.
  """

  ref: ray.ObjectRef
  length: int
  tokens: tuple[int, ...]
  producer: str
  model: str
  digest: int
  next_token: int | None
  first_emitted: bool
  last_prompt_token: str
  nbytes: int


class RayTransfer(KVTransfer):
  """KV through the Ray object store: `send` puts host arrays, `receive` gets and
  `device_put`s them.

  Args:
    device: where received KV goes (None: the default device).
    get_timeout_s: how long a fetch may take before the request is recomputed.
  """

  name = "ray"

  def __init__(self, device: jax.Device | None = None, get_timeout_s: float = 60.0):
    super().__init__(device)
    self.get_timeout_s = get_timeout_s

  def send(self, prefix) -> Envelope:
    """Puts `prefix`'s KV in the object store (a RemotePrefix is forwarded as is)."""
    if not isinstance(prefix, RemotePrefix):
      # One device -> host copy here; Ray then stores numpy buffers without pickling them.
      ref = ray.put(jax.tree.map(np.asarray, prefix.kv))
      prefix = RemotePrefix(ref=ref, length=prefix.length, tokens=prefix.tokens,
                            producer=prefix.producer, model=prefix.model,
                            digest=prefix.digest, next_token=prefix.next_token,
                            first_emitted=prefix.first_emitted,
                            last_prompt_token=prefix.last_prompt_token, nbytes=prefix.nbytes)
    return Envelope(prefix=prefix, sent_at=time.monotonic(), nbytes=prefix.nbytes)

  def _deliver(self, env: Envelope) -> Prefix:
    rp = env.prefix
    try:
      host = ray.get(rp.ref, timeout=self.get_timeout_s)
    except ray.exceptions.RayError as e:
      raise KVLost("prefix", f"KV of model {rp.model!r} could not be fetched from the Ray "
                   f"object store ({type(e).__name__}); recomputing") from e
    kv = jax.device_put(host, self.device)
    return Prefix(kv=kv, length=rp.length, tokens=rp.tokens, producer=rp.producer,
                  model=rp.model, digest=rp.digest, next_token=rp.next_token,
                  first_emitted=rp.first_emitted, last_prompt_token=rp.last_prompt_token)

  def account(self, seconds: float, nbytes: int) -> None:
    """Adds a transfer done in an actor to this (driver-side) transport's totals."""
    with self._lock:
      self.count += 1
      self.total_bytes += int(nbytes)
      self.total_seconds += float(seconds)


# ----------------------------------------------------------------------------- actor side


@dataclasses.dataclass(frozen=True)
class _WorkerSpec:
  """What an actor needs to build its worker (read off the in-process layout)."""

  worker_id: str
  pool: str  # "prefill", "decode" or "colocated"
  models: tuple[str, ...]
  prefill_trees: Mapping[str, str]  # model -> prefill tree id (prefill, colocated)
  prefill_id: str = ""  # the colocated worker's prefiller name
  decode_tree: str = ""  # decode, colocated
  valid_producers: tuple[str, ...] = ()

  @property
  def tree_ids(self) -> set[str]:
    return set(self.prefill_trees.values()) | ({self.decode_tree} if self.decode_tree else set())


@dataclasses.dataclass(frozen=True)
class _JobSpec:
  """A job as it travels to an actor: the request and the attempt's counters."""

  request: Request
  eos_id: int | None
  attempt: int
  produced: int
  cancelled: bool = False


@dataclasses.dataclass(eq=False)
class _ActorJob(Job):
  sent: dict = dataclasses.field(default_factory=dict)  # record fields as last reported


class _Outbox:
  """The worker's sink inside an actor: buffers events for the driver's polls.

  An event is (kind, request_id, attempt, record changes, args). The loop calls
  `flush` after every `run_once`, so a poll returns whole iterations (one decode chunk).
  """

  def __init__(self, transfer: RayTransfer):
    self.transfer = transfer
    self.cv = threading.Condition()
    self.buffer: list[tuple] = []
    self.ready: list[tuple] = []
    self.live: dict[str, _ActorJob] = {}  # jobs this actor holds, by request id
    # Cancels that arrived before their job (a threaded actor may run them out of order).
    self.early_cancels: collections.OrderedDict = collections.OrderedDict()

  def job(self, spec: _JobSpec) -> _ActorJob:
    req = spec.request
    record = RequestRecord(request_id=req.request_id, model=req.model,
                           prompt_len=len(req.prompt), arrival=req.arrival_time)
    job = _ActorJob(request=req, record=record, eos_id=spec.eos_id, attempt=spec.attempt,
                    produced=spec.produced, cancelled=spec.cancelled)
    job.sent = _snapshot(record)
    with self.cv:
      if self.early_cancels.pop((req.request_id, spec.attempt), False):
        job.cancelled = True
      self.live[req.request_id] = job
    return job

  def cancel(self, request_id: str, attempt: int) -> None:
    """Marks a job cancelled; its worker ends it with "abort" at its next look."""
    with self.cv:
      job = self.live.get(request_id)
      if job is not None and job.attempt == attempt:
        job.cancelled = True
        return
      self.early_cancels[(request_id, attempt)] = True
      while len(self.early_cancels) > 1024:  # cancels of jobs that never come: bounded
        self.early_cancels.popitem(last=False)

  @staticmethod
  def _changes(job: _ActorJob) -> dict:
    now = _snapshot(job.record)
    diff = {}
    for f in _SET_FIELDS:
      if now[f] != job.sent[f]:
        diff[f] = now[f]
    for f in _ADD_FIELDS:
      if now[f] != job.sent[f]:
        diff[f] = now[f] - job.sent[f]
    job.sent = now
    return diff

  def _emit(self, kind: str, job: _ActorJob, *args) -> None:
    rid = job.request.request_id
    with self.cv:
      self.buffer.append((kind, rid, job.attempt, self._changes(job), args))
      if kind != "token" and self.live.get(rid) is job:  # the job leaves this actor
        del self.live[rid]

  # -- Sink

  def on_token(self, job, token, index, now) -> None:
    self._emit("token", job, int(token), int(index))

  def on_finished(self, job, reason, now) -> None:
    self._emit("finished", job, reason)

  def on_prefilled(self, job, prefix, worker) -> None:
    self._emit("prefilled", job, self.transfer.send(prefix).prefix)

  def on_retry(self, job, why) -> None:
    self._emit("retry", job, why)

  # -- to the driver

  def crashed(self, why: str) -> None:
    with self.cv:
      self.buffer.append(("crashed", "", -1, {}, (why,)))

  def flush(self, held=()) -> None:
    """Publishes buffered events (plus record changes of jobs still held)."""
    with self.cv:
      for job in held:
        diff = self._changes(job)
        if diff:
          self.buffer.append(("record", job.request.request_id, job.attempt, diff, ()))
      if self.buffer:
        self.ready.extend(self.buffer)
        self.buffer.clear()
        self.cv.notify_all()

  def take(self, timeout: float) -> list[tuple]:
    with self.cv:
      if not self.ready:
        self.cv.wait(timeout)
      events, self.ready = self.ready, []
    return events


def _snapshot(record: RequestRecord) -> dict:
  return {f: getattr(record, f) for f in _SET_FIELDS + _ADD_FIELDS}


class _WorkerHost:
  """One worker inside a Ray actor: built from its spec, its loop in a thread.

  Args:
    spec: the worker's layout.
    config: the deployment (engine shape, prefix cache, queue bound).
    trees: tree id -> ObjectRef of its `Params` (only the trees this worker runs).
  """

  def __init__(self, spec: _WorkerSpec, config: DeploymentConfig,
               trees: dict[str, ray.ObjectRef]):
    ids = sorted(trees)
    params: dict[str, Params] = dict(zip(ids, ray.get([trees[i] for i in ids])))
    cfg = next(iter(params.values())).cfg
    self.spec, self.transfer = spec, RayTransfer()
    self.outbox = _Outbox(self.transfer)

    def engine() -> Engine:
      return Engine(cfg, slots=config.slots, capacity=config.capacity, chunk=config.chunk)

    def prefill_worker(name: str) -> PrefillWorker:
      cache = (PrefixCache(int(config.prefix_cache_mb * 2**20), block=config.prefix_block)
               if config.prefix_cache_mb > 0 else None)
      return PrefillWorker(name, engine(), {m: params[t] for m, t in spec.prefill_trees.items()},
                           cache=cache, transfer=self.transfer, sink=self.outbox,
                           max_queue=config.max_queue)

    kw = dict(valid_producers=set(spec.valid_producers), models=set(spec.models),
              transfer=self.transfer, sink=self.outbox)
    if spec.pool == "prefill":
      self.worker = prefill_worker(spec.worker_id)
      self.cache = self.worker.cache
    elif spec.pool == "decode":
      self.worker = DecodeWorker(spec.worker_id, engine(), params[spec.decode_tree], **kw)
      self.cache = None
    else:
      pre = prefill_worker(spec.prefill_id)
      self.worker = ColocatedWorker(spec.worker_id, engine(), params[spec.decode_tree],
                                    prefill=pre, **kw)
      self.cache = pre.cache
    self._occupancy_sent = 0
    self._last_load = self.worker.load()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name=spec.worker_id, daemon=True)
    self._thread.start()

  def _held(self):
    return list(getattr(self.worker, "slot_jobs", {}).values())

  def _loop(self) -> None:
    w = self.worker
    while not self._stop.is_set():
      try:
        if not w.run_once():
          w.wait_for_work(0.02)
      except Exception as e:  # noqa: BLE001 - reported; the driver re-routes its jobs
        log.exception("worker %s crashed", self.spec.worker_id)
        self.outbox.crashed(f"{type(e).__name__}: {e}")
        self.outbox.flush()
        return
      self.outbox.flush(self._held())

  # -- remote methods

  def ready(self) -> WorkerLoad:
    return self._last_load

  def clock(self) -> float:
    return time.monotonic()

  def submit(self, spec: _JobSpec, payload=None) -> None:
    job = self.outbox.job(spec)
    if self.spec.pool == "prefill":
      if not self.worker.submit(job):  # the driver bounds queues; this is a backstop
        self.outbox.on_retry(job, f"prefill queue of {self.spec.worker_id} is full")
        self.outbox.flush()
    else:
      self.worker.submit(job, payload)

  def prefix_match(self, request: Request) -> int:
    return self.worker.prefix_match(request) if self.spec.pool != "decode" else 0

  def cancel(self, request_id: str, attempt: int) -> None:
    self.outbox.cancel(request_id, attempt)
    with self.worker.cv:  # an idle loop looks again now
      self.worker.cv.notify_all()

  def poll(self, timeout: float) -> dict:
    """Events since the last poll (waits up to `timeout` for some), load and stats."""
    events = self.outbox.take(timeout)
    occ = getattr(self.worker, "occupancy", [])
    new_occ, self._occupancy_sent = occ[self._occupancy_sent:], len(occ)
    cache = self.cache.stats() if self.cache is not None else None
    return {"events": events, "load": self._load(), "occupancy": new_occ, "cache": cache}

  def _load(self) -> WorkerLoad:
    # The loop thread may mutate the prefix cache while it is summed; read again then.
    for _ in range(10):
      try:
        self._last_load = self.worker.load()
        break
      except RuntimeError:
        time.sleep(0.001)
    return self._last_load

  def stop(self) -> None:
    self._stop.set()
    with self.worker.cv:
      self.worker.cv.notify_all()
    self._thread.join(timeout=10)


# Threaded actor: `poll` waits while `submit` and `prefix_match` run.
_WorkerActor = ray.remote(max_concurrency=4, max_restarts=0)(_WorkerHost)


# ----------------------------------------------------------------------------- driver side


class _SpecEngine(Engine):
  """An Engine that allocates nothing: the driver lays workers out with it, never runs it."""

  def init_decode_state(self):
    return None


def _spec_of(w) -> _WorkerSpec:
  if isinstance(w, ColocatedWorker):
    return _WorkerSpec(w.worker_id, "colocated", tuple(sorted(w.models)),
                       {m: p.tree_id for m, p in w.prefiller.trees.items()},
                       prefill_id=w.prefiller.worker_id, decode_tree=w.params.tree_id,
                       valid_producers=tuple(sorted(w.valid_producers)))
  if isinstance(w, DecodeWorker):
    return _WorkerSpec(w.worker_id, "decode", tuple(sorted(w.models)), {},
                       decode_tree=w.params.tree_id,
                       valid_producers=tuple(sorted(w.valid_producers)))
  if isinstance(w, PrefillWorker):
    return _WorkerSpec(w.worker_id, "prefill", tuple(sorted(w.models)),
                       {m: p.tree_id for m, p in w.trees.items()})
  raise TypeError(f"unknown worker type {type(w).__name__}")


class _ActorProxy:
  """The driver's stand-in for a worker actor: what ServingSystem reads and calls.

  `load()` is the actor's last reported load corrected by the driver's assignments;
  `submit` records the assignment and sends the job (fire and forget); `drain_jobs`
  hands back every job assigned and not reported done, when the actor died.
  """

  def __init__(self, spec: _WorkerSpec, actor, first_load: WorkerLoad, max_queue: int):
    self.spec, self.actor = spec, actor
    self.worker_id, self.pool = spec.worker_id, spec.pool
    self.models = frozenset(spec.models)
    self.max_queue = max_queue
    self.cv = threading.Condition()  # guards assigned / reported / alive
    self.alive = True
    self.assigned: dict[str, Job] = {}
    self.reported = first_load
    self.occupancy: list[float] = []
    self.cache_stats: dict | None = None
    self.clock_offset = 0.0  # driver monotonic - actor monotonic
    self.died = threading.Event()
    self.rerouted = 0

  def load(self) -> WorkerLoad:
    with self.cv:
      r, n, alive = self.reported, len(self.assigned), self.alive
    running = min(r.running or 0, n)
    # Jobs handed over but not yet seen running count as queued.
    return dataclasses.replace(r, alive=alive and r.alive, queue_len=n - running,
                               running=running)

  def submit(self, job: Job, payload=None) -> bool:
    """Assigns `job` to the actor; False when its prefill queue is full."""
    rid = job.request.request_id
    with self.cv:
      if not self.alive:
        raise Overloaded(f"worker {self.worker_id} died", status=503)
      if self.pool == "prefill":
        n = len(self.assigned)
        if n - min(self.reported.running or 0, n) >= self.max_queue:
          return False
      self.assigned[rid] = job
    spec = _JobSpec(job.request, job.eos_id, job.attempt, job.produced, job.cancelled)
    if self.pool == "prefill":
      self.actor.submit.remote(spec)
    else:
      self.actor.submit.remote(spec, payload)
    return True

  def cancel(self, rid: str) -> bool:
    """Forwards a cancel to the actor if it holds the request; whether it did."""
    with self.cv:
      job = self.assigned.get(rid)
      if job is None or not self.alive:
        return False
    self.actor.cancel.remote(rid, job.attempt)
    return True

  def prefix_match(self, request: Request) -> int:
    """Cached prompt tokens for `request` at this worker: one remote call."""
    if not self.alive:
      return 0
    try:
      return int(ray.get(self.actor.prefix_match.remote(request), timeout=5.0))
    except (ray.exceptions.RayError, TimeoutError):
      return 0

  def take(self, rid: str, attempt: int, release: bool) -> Job | None:
    """The job an event names if it is still this actor's (same attempt)."""
    with self.cv:
      job = self.assigned.get(rid)
      if job is None or job.attempt != attempt:
        return None  # a stale attempt: the job was re-routed meanwhile
      if release:
        del self.assigned[rid]
      return job

  def drain_jobs(self) -> list[Job]:
    with self.cv:
      self.alive = False
      jobs = list(self.assigned.values())
      self.assigned.clear()
    return jobs


class RaySystem(ServingSystem):
  """A deployment whose workers are Ray actors; a `Backend`, like `ServingSystem`.

  Args:
    config: the DeploymentConfig (`transfer` must be "in_process": KV always moves
      through the object store).
    models: task model id -> SplitModel.
    eos_id: the end-of-sequence token of every model.
    tokenizer: tokenizer name reported to front ends.
    address: a Ray cluster to join when Ray is not initialised yet (None: start a local
      one). An already initialised Ray is used as it is.
    num_cpus, num_gpus: resources each actor reserves (small CPU shares let several
      actors share a host).
    env_vars: environment of the actors (e.g. {"JAX_PLATFORMS": "cpu"}).
    poll_timeout_s: how long an idle actor's poll waits (the heartbeat).
  """

  def __init__(self, config: DeploymentConfig, models: Mapping[str, SplitModel], *,
               eos_id: int | None = None, tokenizer: str = "byte", address: str | None = None,
               num_cpus: float = 0.5, num_gpus: float = 0, env_vars: Mapping | None = None,
               poll_timeout_s: float = 0.5):
    if isinstance(config, DeploymentConfig) and config.transfer != "in_process":
      raise ValueError(f"RaySystem moves KV through the Ray object store; "
                       f"DeploymentConfig.transfer={config.transfer!r} is for the in-process "
                       "runtime")
    self._address, self._poll_timeout_s = address, poll_timeout_s
    self._actor_options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if env_vars:
      self._actor_options["runtime_env"] = {"env_vars": {k: str(v) for k, v in
                                                         env_vars.items()}}
    self._owns_ray = False
    self._proxies: list[_ActorProxy] = []
    self._poller: threading.Thread | None = None
    self._closed = False
    super().__init__(config, models, eos_id=eos_id, tokenizer=tokenizer, start=False)
    self.transfer = RayTransfer()
    self.start()

  # -- construction

  def _engine(self, worker_id: str) -> Engine:
    c = self.config
    return _SpecEngine(self.cfg, slots=c.slots, capacity=c.capacity, chunk=c.chunk)

  def _build(self) -> None:
    super()._build()  # the in-process layout on spec engines: names, pools, trees
    specs = [_spec_of(w) for w in self.prefill_workers + self.decode_workers]
    if not ray.is_initialized():
      ray.init(address=self._address, include_dashboard=False, log_to_driver=False)
      self._owns_ray = True
    actors = []
    try:
      trees = {t: ray.put(self._params_cache[t]) for t in set().union(*(s.tree_ids
                                                                        for s in specs))}
      for s in specs:
        actors.append(_WorkerActor.options(**self._actor_options).remote(
            s, self.config, {t: trees[t] for t in s.tree_ids}))
      loads = ray.get([a.ready.remote() for a in actors])
      for s, a, load in zip(specs, actors, loads):
        proxy = _ActorProxy(s, a, load, self.config.max_queue)
        t0 = time.monotonic()
        actor_now = ray.get(a.clock.remote())
        proxy.clock_offset = (t0 + time.monotonic()) / 2 - actor_now
        self._proxies.append(proxy)
    except BaseException:
      for a in actors:
        ray.kill(a, no_restart=True)
      if self._owns_ray:
        ray.shutdown()
      raise
    self.prefill_workers = [p for p in self._proxies if p.pool == "prefill"]
    self.decode_workers = [p for p in self._proxies if p.pool != "prefill"]

  # -- runtime

  def start(self) -> None:
    """Starts the driver's poll thread (the actors' loops run from their creation)."""
    if self._poller is None:
      self._poller = threading.Thread(target=self._poll_loop, name="ray-poller", daemon=True)
      self._poller.start()

  def step(self) -> bool:
    raise NotImplementedError("RaySystem's workers run their own loops in their actors")

  def submit(self, request: Request):
    """Admits a request (see ServingSystem.submit); its handle's `cancel` reaches the
    actor that holds it."""
    handle = super().submit(request)
    mark = handle._on_cancel  # flags the driver's job: later hand-overs carry the flag

    def cancel():
      if mark is not None:
        mark()
      for p in self._proxies:
        if p.cancel(request.request_id):
          return

    handle._on_cancel = cancel
    return handle

  def _poll_loop(self) -> None:
    pending: dict[ray.ObjectRef, _ActorProxy] = {}
    polled: set[str] = set()
    while not self._stop.is_set():
      for p in self._proxies:
        if p.alive and p.worker_id not in polled:
          pending[p.actor.poll.remote(self._poll_timeout_s)] = p
          polled.add(p.worker_id)
      if not pending:
        self._stop.wait(0.05)
        continue
      try:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.1)
        if ready:  # take every reply that is in, in one sweep
          ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
      except Exception:  # noqa: BLE001 - e.g. Ray going down under us: keep trying
        log.exception("ray.wait failed")
        self._stop.wait(0.5)
        continue
      for ref in ready:
        p = pending.pop(ref)
        polled.discard(p.worker_id)
        try:
          reply = ray.get(ref)
        except ray.exceptions.RayTaskError:  # `poll` itself raised: the actor lives on
          log.exception("poll of %s failed", p.worker_id)
          continue
        except ray.exceptions.RayError as e:  # the actor died (killed, crashed, node lost)
          self._actor_died(p, type(e).__name__)
          continue
        try:
          self._apply(p, reply)
        except Exception:  # noqa: BLE001 - keep serving the other actors
          log.exception("applying events of %s failed", p.worker_id)

  def _apply(self, p: _ActorProxy, reply: dict) -> None:
    """Applies one poll reply to the system, in the order the actor reported."""
    now = time.monotonic()
    for kind, rid, attempt, diff, args in reply["events"]:
      if kind == "crashed":
        self._actor_died(p, f"crashed: {args[0]}")
        return
      job = p.take(rid, attempt, release=kind in ("finished", "prefilled", "retry"))
      if job is None or self.inflight.get(rid) is not job:
        continue  # a stale attempt, or a request that already failed (e.g. at shutdown)
      self._apply_record(p, job.record, diff)
      if kind == "token":
        self.on_token(job, args[0], args[1], now)
      elif kind == "finished":
        self.on_finished(job, args[0], now)
      elif kind == "prefilled":
        self.on_prefilled(job, args[0], p)
      elif kind == "retry":
        self.on_retry(job, args[0])
    with p.cv:
      p.reported = reply["load"]
    p.occupancy.extend(reply["occupancy"])
    if reply["cache"] is not None:
      p.cache_stats = reply["cache"]

  def _apply_record(self, p: _ActorProxy, record: RequestRecord, diff: dict) -> None:
    for f, v in diff.items():
      if f in _ADD_FIELDS:
        setattr(record, f, getattr(record, f) + v)
      elif f in _ACTOR_CLOCK_FIELDS and v is not None:
        setattr(record, f, v + p.clock_offset)
      else:
        setattr(record, f, v)
    if "transfer_s" in diff or "transfer_bytes" in diff:
      self.transfer.account(diff.get("transfer_s", 0.0), diff.get("transfer_bytes", 0))

  def _actor_died(self, p: _ActorProxy, why: str) -> None:
    if p.alive:
      self._worker_died(p, why)

  def _worker_died(self, worker, why: str) -> int:
    n = super()._worker_died(worker, why)  # marks it dead, re-routes its jobs
    try:
      ray.kill(worker.actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
      pass
    worker.rerouted += n
    worker.died.set()
    return n

  # -- failures

  def kill_worker(self, worker_id: str, timeout: float = 60.0) -> int:
    """Kills a worker's actor (`ray.kill`, a crash); waits until the driver noticed and
    re-routed its requests. Returns how many were re-routed."""
    p = next((p for p in self._proxies if p.worker_id == worker_id), None)
    if p is None:
      raise ValueError(f"no worker {worker_id!r}")
    ray.kill(p.actor, no_restart=True)
    poller = self._poller
    if poller is None or not poller.is_alive():
      self._actor_died(p, "killed")
    elif not p.died.wait(timeout):
      raise TimeoutError(f"the driver did not notice {worker_id}'s death in {timeout} s")
    return p.rerouted

  # -- status

  def prefix_cache_stats(self) -> dict:
    stats = [p.cache_stats for p in self._proxies if p.cache_stats is not None]
    return {k: sum(s[k] for s in stats) for k in _CACHE_KEYS}

  def shutdown(self, drain: bool = True, timeout: float | None = 60.0) -> None:
    """Stops admitting (503); with `drain`, waits for in-flight requests; then stops the
    actors' loops, kills the actors and fails what is left. Shuts Ray down only if this
    system started it."""
    with self._lock:
      self.draining = True
      if self._closed:
        return
      self._closed = True
    poller = self._poller
    if drain and poller is not None and poller.is_alive():
      deadline = None if timeout is None else time.monotonic() + timeout
      while self.inflight and (deadline is None or time.monotonic() < deadline):
        time.sleep(0.01)
    self._stop.set()
    if poller is not None:
      poller.join(timeout=10)
    live = [p for p in self._proxies if p.alive]
    try:
      ray.get([p.actor.stop.remote() for p in live], timeout=15)
    except ray.exceptions.RayError:
      pass
    for p in live:
      p.alive = False
      try:
        ray.kill(p.actor, no_restart=True)
      except Exception:  # noqa: BLE001
        pass
    for job in list(self.inflight.values()):
      self._fail(job, RequestFailed("server shut down before the request finished"))
    if self._owns_ray:
      ray.shutdown()
