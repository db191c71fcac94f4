"""The interface between a serving system (any deployment, any runtime) and its front ends.

The HTTP API (`jaxsun.serving.api`), the benchmark client and the notebook talk to a
`Backend`; the in-process runtime and the Ray runtime both implement it.

    handle = backend.submit(Request(model="math", prompt=(1, 2, 3),
                                    sampling=SamplingParams(max_tokens=8)))
    for event in handle.events():      # blocking iterator of TokenEvents
      ...
    record = handle.record             # RequestRecord: timings, workers, transfer, ...

`submit` validates and admits synchronously: a bad request raises `RequestError`
(400/404) and a full system raises `Overloaded` (429/503) before anything is queued.
A request that fails later (e.g. its KV could not be transferred intact) ends its event
stream with `RequestFailed` raised from the iterator.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
from typing import AsyncIterator, Iterator, Protocol

from jaxsun.serving.request import Request, RequestFailed, RequestRecord, TokenEvent


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """A served task model.

  Attributes:
    id: the model id requests name.
    max_context: prompt + max_tokens must fit in this many tokens.
    tokenizer: the tokenizer name (`jaxsun.data.tokenizers`), e.g. "byte".
    eos_id: the model's end-of-sequence token.
    prefill_tree: id of its prefill parameter tree; decode_tree: of its decode tree.
  """

  id: str
  max_context: int
  tokenizer: str
  eos_id: int
  prefill_tree: str = ""
  decode_tree: str = ""


_END = object()


class RequestHandle:
  """A submitted request: its events as they arrive, and its record.

  The system thread calls `_push(event)` / `_fail(error)`; a consumer iterates either
  `events()` (blocking) or `aevents()` (asyncio: items are handed to the event loop with
  `call_soon_threadsafe`, so thousands of open streams hold no threads), once.
  """

  def __init__(self, request: Request, record: RequestRecord):
    self.request = request
    self.record = record
    self._q: queue.Queue = queue.Queue()
    self._lock = threading.Lock()
    self._loop: asyncio.AbstractEventLoop | None = None
    self._aq: asyncio.Queue | None = None
    self.done = threading.Event()
    self.error: Exception | None = None
    self._on_cancel = None  # set by the system: frees the request's slot

  def cancel(self) -> None:
    """Stops the request (client gone, stop string matched); it ends with "abort"."""
    if self._on_cancel is not None and not self.done.is_set():
      self._on_cancel()

  def _put(self, item) -> None:
    with self._lock:
      if self._aq is not None:
        self._loop.call_soon_threadsafe(self._aq.put_nowait, item)
      else:
        self._q.put(item)

  def _push(self, event: TokenEvent) -> None:
    self._put(event)
    if event.finished:
      self._put(_END)
      self.done.set()

  def _fail(self, error: Exception) -> None:
    if self.done.is_set():
      return
    self.error = error
    self._put(error)
    self._put(_END)
    self.done.set()

  def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
    """Blocking iterator over the request's TokenEvents; raises its failure, if any."""
    while True:
      item = self._q.get(timeout=timeout)
      if item is _END:
        return
      if isinstance(item, Exception):
        raise item
      yield item

  async def aevents(self) -> AsyncIterator[TokenEvent]:
    """The same events for asyncio code."""
    with self._lock:  # from now on the system thread hands items to this loop
      self._loop = asyncio.get_running_loop()
      self._aq = asyncio.Queue()
      while not self._q.empty():
        self._aq.put_nowait(self._q.get_nowait())
    while True:
      item = await self._aq.get()
      if item is _END:
        return
      if isinstance(item, Exception):
        raise item
      yield item

  def result(self, timeout: float | None = None) -> RequestRecord:
    """Waits for the end; returns the record or raises the failure."""
    if not self.done.wait(timeout):
      raise TimeoutError(f"request {self.request.request_id} did not finish in {timeout} s")
    if self.error is not None:
      raise self.error
    return self.record


class Backend(Protocol):
  """What front ends need from a serving system."""

  def models(self) -> list[ModelInfo]:
    """Every served task model."""

  def submit(self, request: Request) -> RequestHandle:
    """Validates and admits a request (raises RequestError / Overloaded), or queues it."""

  def health(self) -> dict:
    """{"status": "ok" | "draining" | "degraded", "workers": {...}}."""

  def metrics_text(self) -> str:
    """Prometheus text exposition of the system's counters and histograms."""

  def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
    """Stops admitting (new submits raise Overloaded(status=503)); with `drain`, waits
    for in-flight requests to finish first."""


__all__ = ["Backend", "ModelInfo", "RequestHandle", "RequestFailed"]
