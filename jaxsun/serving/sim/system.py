"""The serving simulator: the real `ServingSystem`, with simulated engines, on a logical clock.

    sim = SimSystem(DeploymentConfig(kind="sun", decode_workers=2),
                    sim_models(cfg, {"math": "sun", "code": "sun"}), calibration)
    result = sim.run(make_workload(spec))          # a BenchResult, as the real benchmark's
    summary = result.summary(slo={"tpot_ms": 50}, n_devices=sim.n_devices())

Nothing of the scheduling is reimplemented: the deployment, the router and its policies,
admission control (`max_inflight`, `max_queue`, 429s), the prefill workers' prefix
caches, the decode workers' continuous batching (admit, dispatch a chunk, read the
previous one) and retries are the objects and code paths the real system runs. Only
the device work is replaced (`SimEngine`: a `Calibration` says how long each call takes)
and time is logical: a discrete-event loop runs each worker's `run_once` at its own
clock and delivers what a worker hands to the rest of the system (a prefilled request,
a finished one, a retry) at the time it happened, so no worker ever sees the future.

KV transfers are asynchronous: a prefix reaches its decode worker's queue
`alpha + bytes / bandwidth` after it was sent (the calibration's transport), while both
workers go on (NIXL / Mooncake-style transfer engines).
"""

from __future__ import annotations

import collections
import heapq
import itertools
from typing import Callable, Mapping, Sequence

from jaxsun.serving.bench import BenchResult, _check_dependencies
from jaxsun.serving.request import RequestRecord, ServingError
from jaxsun.serving.sim.engine import SimDevice, SimEngine, SimParams
from jaxsun.serving.sim.stepmodel import Calibration
from jaxsun.serving.system import DeploymentConfig, ServingSystem, TaskTrees
from jaxsun.serving.transfer import Envelope, KVTransfer, TransferStats
from jaxsun.serving.workers import DecodeWorker, Job, PrefillWorker
from jaxsun.serving.workload import WorkloadItem


class SimTransfer(KVTransfer):
  """A transport whose latency is the calibration's `alpha + bytes / bandwidth`."""

  name = "sim"

  def __init__(self, calibration: Calibration, transport: str, clock: Callable[[], float]):
    super().__init__()
    calibration.transfer_seconds(transport, 0)  # fails early on an unknown transport
    self.calibration, self.transport, self._clock = calibration, transport, clock

  def send(self, prefix) -> Envelope:
    return Envelope(prefix=prefix, sent_at=self._clock(), nbytes=prefix.nbytes)

  def delay(self, env: Envelope) -> float:
    return self.calibration.transfer_seconds(self.transport, env.nbytes)

  def receive(self, env: Envelope):
    stats = TransferStats(seconds=self.delay(env), nbytes=env.nbytes)
    self.count += 1
    self.total_bytes += stats.nbytes
    self.total_seconds += stats.seconds
    return env.prefix, stats


class _DeferredSink:
  """A worker's view of the system: what it reports happens at its own clock's time."""

  def __init__(self, sim: SimSystem, worker):
    self.sim, self.worker = sim, worker

  def on_token(self, job: Job, token: int, index: int, now: float) -> None:
    self.sim.on_token(job, token, index, now)  # records only: nothing else depends on it

  def on_finished(self, job: Job, reason: str, now: float) -> None:
    self.sim.at(now, lambda: self.sim.on_finished(job, reason, now))

  def on_prefilled(self, job: Job, prefix, worker) -> None:
    self.sim.at(self.worker.engine.clock(),
                lambda: self.sim.on_prefilled(job, prefix, worker))

  def on_retry(self, job: Job, why: str) -> None:
    self.sim.at(self.worker.engine.clock(), lambda: self.sim.on_retry(job, why))


class SimSystem(ServingSystem):
  """A `ServingSystem` on simulated devices; `run` replays a workload in logical time.

  Args:
    config: the DeploymentConfig (as the real system's).
    models: task model id -> TaskTrees of `SimParams` (`sim_models`) or of real Params
      (their ids and sizes are used), or SplitModels.
    calibration: step-time and transport model.
    layout: "static" (this engine's decode work) or "paged" (`SimEngine`).
    transport: which of the calibration's transports KV moves over.
    eos_id: as ServingSystem (simulated outputs never stop early).
    host_cores: the devices share this many processors (`SimDevice.contention`); default
      the calibration's `engine["host_cores"]` (a CPU engine's), None for accelerators.
  """

  def __init__(self, config: DeploymentConfig, models: Mapping[str, object],
               calibration: Calibration, *, layout: str = "static",
               transport: str = "in_process", eos_id: int | None = None,
               tokenizer: str = "byte", host_cores: int | None = -1):
    self.calibration, self.layout, self.transport = calibration, layout, transport
    if host_cores == -1:
      host_cores = calibration.engine.get("host_cores")
    self.host_cores = host_cores
    self._shared: list = []
    self.now = 0.0
    self.devices: dict[str, SimDevice] = {}
    self._heap: list = []
    self._seq = itertools.count()
    self._scheduled: set[str] = set()
    self._item_of: dict[str, int] = {}
    self._on_done: Callable[[int, RequestRecord], None] | None = None
    self.events = 0
    super().__init__(config, models, eos_id=eos_id, tokenizer=tokenizer, start=False)
    for w in self.prefill_workers + self.decode_workers:
      self._instrument(w)

  # -- construction hooks

  def clock(self) -> float:
    return self.now

  def _make_transfer(self) -> KVTransfer:
    return SimTransfer(self.calibration, self.transport, self.clock)

  def _engine(self, worker_id: str) -> SimEngine:
    name = worker_id.split("/")[0]  # a colocated worker's prefill engine shares its device
    if name not in self.devices:
      self.devices[name] = SimDevice(name, shared=self._shared if self.host_cores else None,
                                     cores=self.host_cores or 0)
      self._shared.append(self.devices[name])
    device = self.devices[name]
    c = self.config
    return SimEngine(self.cfg, calibration=self.calibration, device=device, slots=c.slots,
                     capacity=c.capacity, chunk=c.chunk, layout=self.layout)

  def start(self) -> None:
    raise RuntimeError("SimSystem runs in logical time: call run(items), not start()")

  def _instrument(self, w) -> None:
    w.sink = _DeferredSink(self, w)
    submit = w.submit
    if isinstance(w, PrefillWorker):
      def submit_prefill(job, _submit=submit, _w=w):
        ok = _submit(job)
        if ok:
          self._wake(_w)
        return ok
      w.submit = submit_prefill
    else:
      def submit_decode(job, payload, _submit=submit, _w=w):
        delay = self.transfer.delay(payload) if isinstance(payload, Envelope) else 0.0

        def deliver():
          _submit(job, payload)
          self._wake(_w)
        self.at(self.now + delay, deliver)
      w.submit = submit_decode

  # -- the event loop

  def at(self, t: float, fn: Callable[[], None]) -> None:
    """Runs `fn` at logical time `t` (never before now)."""
    heapq.heappush(self._heap, (max(t, self.now), next(self._seq), fn))

  def _wake(self, w) -> None:
    if w.worker_id not in self._scheduled:
      self._scheduled.add(w.worker_id)
      self.at(max(self.now, w.engine.device.host), lambda: self._run_worker(w))

  def _run_worker(self, w) -> None:
    self._scheduled.discard(w.worker_id)
    if not w.alive:
      return
    dev = w.engine.device
    dev.host = max(dev.host, self.now)
    w.run_once()
    busy = w.has_work if isinstance(w, DecodeWorker) else bool(w.inbox)
    if busy:
      self._wake(w)

  def run_events(self, until: float | None = None) -> None:
    """Processes events in time order (up to `until`)."""
    while self._heap and (until is None or self._heap[0][0] <= until):
      t, _, fn = heapq.heappop(self._heap)
      self.now = t
      self.events += 1
      fn()

  # -- replaying a workload

  def run(self, items: Sequence[WorkloadItem],
          on_record: Callable[[int, RequestRecord], None] | None = None) -> BenchResult:
    """Replays a workload (`make_workload`) as the benchmark client would send it.

    Items are sent at `send_time` (dependent ones at the later of that and the end of
    the item they depend on); each ends completed, rejected (429/503) or failed.

    Returns:
      A BenchResult in logical seconds (start 0), one record per item.
    """
    items = list(items)
    if not all(isinstance(it, WorkloadItem) for it in items):
      raise TypeError("items must be WorkloadItems (jaxsun.serving.workload.make_workload)")
    _check_dependencies(items)
    start = self.now
    records: list[RequestRecord | None] = [None] * len(items)
    dependents = collections.defaultdict(list)
    for i, it in enumerate(items):
      if it.depends_on is None:
        self.at(start + it.send_time, lambda i=i: arrive(i))
      else:
        dependents[it.depends_on].append(i)

    def arrive(i: int) -> None:
      request = items[i].request(request_id=f"sim-{i}-{next(self._seq)}")
      request.arrival_time = self.now
      self._item_of[request.request_id] = i
      try:
        self.submit(request)
      except ServingError as e:
        rec = RequestRecord(request_id=request.request_id, model=request.model,
                            prompt_len=len(request.prompt), arrival=self.now,
                            error=str(e), status=int(getattr(e, "status", 500)),
                            end=self.now)
        done(i, rec)
        return
      self.handles.pop(request.request_id, None)  # nobody reads events in a simulation

    def done(i: int, rec: RequestRecord) -> None:
      records[i] = rec
      if on_record is not None:
        on_record(i, rec)
      for j in dependents.pop(i, ()):
        self.at(max(self.now, start + items[j].send_time), lambda j=j: arrive(j))

    self._on_done = done
    try:
      self.run_events()
    finally:
      self._on_done = None
    missing = [i for i, r in enumerate(records) if r is None]
    if missing:
      raise AssertionError(f"items {missing[:10]} never ended (simulation deadlock?)")
    end = max((r.end for r in records if r.end is not None), default=start)
    return BenchResult(records=records, duration_s=max(end - start, 1e-9), items=items,
                       start=start)

  def _finished_item(self, job: Job) -> None:
    i = self._item_of.pop(job.request.request_id, None)
    if i is not None and self._on_done is not None and job.record.end is not None:
      self._on_done(i, job.record)

  def on_finished(self, job: Job, reason: str, now: float) -> None:
    super().on_finished(job, reason, now)
    self._finished_item(job)

  def _fail(self, job: Job, error: Exception) -> None:
    super()._fail(job, error)
    self._finished_item(job)

  # -- reporting

  def n_devices(self) -> dict[str, int]:
    """Devices per pool (a colocated worker counts once)."""
    pools = collections.Counter(w.pool for w in self.prefill_workers + self.decode_workers)
    return dict(pools)

  def utilisation(self) -> dict[str, float]:
    """Busy fraction of each device over the simulated time so far."""
    return {n: d.busy_s / self.now if self.now > 0 else 0.0 for n, d in self.devices.items()}


def sim_twins(system: ServingSystem) -> dict[str, TaskTrees]:
  """The task models of a real system as the simulator sees them: the same tree ids,
  sizes, conventions and formats, no arrays."""
  return {m: TaskTrees(SimParams.of(system.prefill_params[m]),
                       SimParams.of(system.decode_params[m])) for m in system.task_models}


def sim_models(cfg, kinds: Mapping[str, str], *, weight_bytes: int | None = None,
               decode_variant: str = "", decode_weight_bytes: int | None = None,
               last_prompt_token: str | None = None) -> dict[str, TaskTrees]:
  """Task models as the simulator needs them: tree ids that encode who shares what.

  Args:
    cfg: the architecture (ModelConfig).
    kinds: model id -> "sun" (own prefill tree, the shared base decode tree),
      "prefillshare" (the shared base prefill tree, own decode tree), "full" (both own)
      or "base" (both shared).
    weight_bytes: bytes of one tree (default: parameters x the config's dtype size).
    decode_variant, decode_weight_bytes: the shared decode tree in another format
      (QSUN: e.g. "int8" and half the bytes); applies to the base decode tree.
    last_prompt_token: the convention of every model (default: "decode" when a model is
      "prefillshare", as `jaxsun.serving.launch` builds them, else "prefill").

  Returns:
    model id -> TaskTrees of SimParams.
  """
  if weight_bytes is None:
    weight_bytes = cfg.num_params() * cfg.params_dtype.itemsize
  dbytes = weight_bytes if decode_weight_bytes is None else decode_weight_bytes
  if last_prompt_token is None:
    last_prompt_token = "decode" if "prefillshare" in kinds.values() else "prefill"

  def tree(tid, nbytes=weight_bytes, variant=""):
    return SimParams(tid, cfg, int(nbytes), last_prompt_token, variant)

  base_prefill = tree("base")
  base_decode = tree("base" if not decode_variant else f"base-{decode_variant}", dbytes,
                     decode_variant)
  out = {}
  for m, kind in kinds.items():
    own = tree(f"task-{m}")
    if kind == "sun":
      out[m] = TaskTrees(own, base_decode)
    elif kind == "prefillshare":
      out[m] = TaskTrees(base_prefill, own)
    elif kind == "full":
      out[m] = TaskTrees(own, tree(f"task-{m}"))
    elif kind == "base":
      out[m] = TaskTrees(base_prefill, base_decode)
    else:
      raise ValueError(f"kinds[{m!r}]={kind!r} is not one of sun, prefillshare, full, base")
  return out
