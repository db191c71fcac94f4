"""KV transfer between prefill and decode workers, behind one interface.

    payload, sent = transport.send(prefix)         # on the prefill side
    prefix, stats = transport.receive(payload)     # on the decode side

* `InProcessTransfer` (default): the device arrays themselves, `jax.device_put` onto the
  receiver's device (a no-op on one device).
* `FakeTransfer`: in-process plus an injectable delay and corruption (one KV element
  changed, or a flipped digest), for tests: the decode side must catch it by the digest.
* `RayTransfer` (`jaxsun.serving.ray_backend`): host arrays through the Ray object store.

Every receive returns `TransferStats` (seconds spent delivering the KV, bytes),
and a transport keeps running totals (`stats()`), so TTST can be broken down.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import jax
import jax.numpy as jnp

from jaxsun.serving.engine import Prefix


@dataclasses.dataclass(frozen=True)
class TransferStats:
  seconds: float
  nbytes: int


@dataclasses.dataclass
class Envelope:
  """What travels: the prefix (or a handle to it) and when it left."""

  prefix: object
  sent_at: float
  nbytes: int


class KVTransfer:
  """Base transport: in process, device arrays as they are."""

  name = "in_process"

  def __init__(self, device: jax.Device | None = None):
    self.device = device
    self._lock = threading.Lock()
    self.count = 0
    self.total_bytes = 0
    self.total_seconds = 0.0

  def send(self, prefix: Prefix) -> Envelope:
    return Envelope(prefix=prefix, sent_at=time.monotonic(), nbytes=prefix.nbytes)

  def _deliver(self, env: Envelope) -> Prefix:
    prefix = env.prefix
    if self.device is not None:
      prefix = dataclasses.replace(prefix, kv=jax.device_put(prefix.kv, self.device))
    return prefix

  def receive(self, env: Envelope) -> tuple[Prefix, TransferStats]:
    """The prefix on this side, and what moving it cost (time spent delivering it, not
    time it waited in the receiver's queue)."""
    t0 = time.monotonic()
    prefix = self._deliver(env)
    jax.block_until_ready(prefix.kv)
    stats = TransferStats(seconds=time.monotonic() - t0, nbytes=env.nbytes)
    with self._lock:
      self.count += 1
      self.total_bytes += stats.nbytes
      self.total_seconds += stats.seconds
    return prefix, stats

  def stats(self) -> dict:
    return {"transport": self.name, "transfers": self.count, "bytes": self.total_bytes,
            "seconds": self.total_seconds}


InProcessTransfer = KVTransfer


class FakeTransfer(KVTransfer):
  """In-process transport with injectable faults.

  Args:
    delay_s: added latency per transfer.
    corrupt_prob: probability that a transfer changes one KV element.
    corrupt_first: corrupt exactly the first n transfers (deterministic tests).
    seed: for `corrupt_prob`.
  """

  name = "fake"

  def __init__(self, *, delay_s: float = 0.0, corrupt_prob: float = 0.0,
               corrupt_first: int = 0, seed: int = 0):
    super().__init__()
    if delay_s < 0 or not 0 <= corrupt_prob <= 1 or corrupt_first < 0:
      raise ValueError("FakeTransfer: delay_s >= 0, corrupt_prob in [0, 1], "
                       "corrupt_first >= 0")
    self.delay_s, self.corrupt_prob, self.corrupt_left = delay_s, corrupt_prob, corrupt_first
    self._rng = random.Random(seed)
    self.corrupted = 0

  def _deliver(self, env: Envelope) -> Prefix:
    if self.delay_s:
      time.sleep(self.delay_s)
    prefix = env.prefix
    with self._lock:
      bad = self.corrupt_left > 0 or self._rng.random() < self.corrupt_prob
      if self.corrupt_left > 0:
        self.corrupt_left -= 1
    if bad and prefix.length > 0:
      self.corrupted += 1
      layer = prefix.kv.layers[0]
      k = layer.k.at[0, prefix.length - 1, 0, 0].add(jnp.asarray(1, layer.k.dtype))
      kv = prefix.kv.replace(layers=(layer.replace(k=k),) + prefix.kv.layers[1:])
      prefix = dataclasses.replace(prefix, kv=kv)
    return prefix


def make_transfer(name: str, **kwargs) -> KVTransfer:
  """A transport by name: "in_process" or "fake" (Ray's lives in the Ray backend)."""
  if name == "in_process":
    return KVTransfer(**kwargs)
  if name == "fake":
    return FakeTransfer(**kwargs)
  raise ValueError(f"transfer={name!r} is not one of ['in_process', 'fake'] (the Ray "
                   "backend uses the object store)")
