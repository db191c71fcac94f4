"""Load signals that workers publish and router policies read.

A worker reports a `WorkerLoad` snapshot; a field a worker cannot measure is None, and a
policy that needs it refuses to run (`jaxsun.serving.router`), rather than routing blind.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class WorkerLoad:
  """One worker's load, as the router sees it.

  Attributes:
    worker_id: unique name, e.g. "decode-shared-0" or "prefill-math-1".
    pool: "prefill", "decode" or "colocated".
    models: task model ids this worker may serve.
    tree_id: the parameter tree it runs (prefill tree for a prefill worker, decode tree
      for a decode worker).
    alive: False once the worker died or is draining; routers skip it.
    queue_len: requests waiting at the worker (not yet running).
    running: requests running (occupied decode slots, or prefills in flight).
    slots: decode slots in all (None for a prefill worker).
    kv_used_tokens: KV tokens held (decode: valid slot lengths; prefill: prefix cache).
    kv_capacity_tokens: KV tokens it can hold.
  """

  worker_id: str
  pool: str
  models: frozenset[str]
  tree_id: str
  alive: bool = True
  queue_len: int | None = None
  running: int | None = None
  slots: int | None = None
  kv_used_tokens: int | None = None
  kv_capacity_tokens: int | None = None

  @property
  def kv_free_fraction(self) -> float | None:
    if self.kv_used_tokens is None or not self.kv_capacity_tokens:
      return None
    return 1.0 - self.kv_used_tokens / self.kv_capacity_tokens
