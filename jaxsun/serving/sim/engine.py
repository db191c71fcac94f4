"""A simulated engine: the real engine's API and bookkeeping, a step-time model's clock.

`SimEngine` subclasses `jaxsun.serving.engine.Engine` and keeps everything but the
device work: the same shapes (`prefill_plan`, `kv_window`), the same admission checks
(`Engine.check_insert`), the same step-time features (`prefill_work`, `decode_work`) the
real engine logs. Instead of running a tree it asks a `Calibration` how long the call
takes and advances a logical clock:

* a `SimDevice` is one accelerator: `host` is its worker's clock (what `clock()` reads),
  `free_at` when the work queued on it ends;
* `prefill` is synchronous (the real one ends in a host sync): the host waits for it;
* `generate` dispatches asynchronously: the chunk starts when the device is free and
  the host moves on; `fetch` waits for it (the real engine's one sync per chunk).

Simulated requests carry no text: every output token is `SIM_TOKEN` and a request ends at
`max_tokens` (benchmarks replay traces with `ignore_eos`, so the real engine's outputs
have the same lengths).

Two layouts say what a decode step reads, i.e. which features the model sees:
"static" (this engine: every slot, over a power-of-two KV window) and "paged" (vLLM-style
paged attention: live rows, their own KV lengths) for cluster-scale studies.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxsun.config import ModelConfig
from jaxsun.serving.engine import (Engine, LoggedStep, decode_work, module_key,
                                   prefill_plan, prefill_work)
from jaxsun.serving.request import SamplingParams
from jaxsun.serving.sim.stepmodel import Calibration, StepFeatures

SIM_TOKEN = 1
LAYOUTS = ("static", "paged")


@dataclasses.dataclass(frozen=True, eq=False)
class SimParams:
  """A parameter tree the simulator knows by id and size only.

  Attributes:
    tree_id: its id (equal ids: one shared tree, as `Params.tree_id`).
    cfg: the architecture.
    nbytes: weight bytes one forward pass reads.
    last_prompt_token: "prefill" or "decode" (`SplitModel.last_prompt_token`).
    variant: weight format when not the model's own ("int8", "fp8", ...): a separate
      step-time model (`module_key`).
  """

  tree_id: str
  cfg: ModelConfig
  nbytes: int
  last_prompt_token: str = "prefill"
  variant: str = ""

  @classmethod
  def of(cls, params, nbytes: int | None = None, variant: str | None = None) -> SimParams:
    """The simulated twin of a real `Params` (same id, size, convention)."""
    return cls(params.tree_id, params.cfg, params.nbytes if nbytes is None else nbytes,
               params.last_prompt_token, params.variant if variant is None else variant)


def kv_bytes_per_token(cfg: ModelConfig) -> int:
  return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cfg.dtype.itemsize


@dataclasses.dataclass(frozen=True, eq=False)
class SimPrefix:
  """A prefix without KV: what the real `Prefix` tells routers, caches and `insert`."""

  length: int
  tokens: tuple[int, ...]
  producer: str
  model: str
  next_token: int | None
  first_emitted: bool
  last_prompt_token: str
  nbytes: int
  corrupted: bool = False

  def verify(self) -> bool:
    return not self.corrupted

  def truncated(self, n: int) -> SimPrefix:
    if not 0 < n <= self.length:
      raise ValueError(f"n={n} must be in (0, {self.length}]")
    return dataclasses.replace(self, length=n, tokens=self.tokens[:n], next_token=None,
                               first_emitted=False,
                               nbytes=self.nbytes * n // max(self.length, 1))


@dataclasses.dataclass
class SimDevice:
  """One simulated accelerator: its worker's host clock and when its queue drains.

  `shared` lists every device on one host when they share `cores` processors (the CPU
  engine: each worker is a thread): work starting while more devices are busy than there
  are cores is stretched by busy / cores (processor sharing at the start of the call).
  """

  name: str
  host: float = 0.0
  free_at: float = 0.0
  busy_s: float = 0.0  # device time spent (utilisation = busy_s / elapsed)
  shared: list | None = None
  cores: int = 0

  def contention(self, start: float) -> float:
    if not self.shared or not self.cores:
      return 1.0
    busy = 1 + sum(d is not self and d.free_at > start for d in self.shared)
    return max(1.0, busy / self.cores)


@dataclasses.dataclass
class SimChunk:
  tokens: np.ndarray  # i32[slots, chunk], -1 where a row emitted nothing
  end: float  # when the device finishes it
  any_active: bool


@dataclasses.dataclass
class SimDecodeState:
  """The slotted store's bookkeeping (no KV): per row, active, budget and KV length."""

  active: np.ndarray  # bool[slots]
  remaining: np.ndarray  # i32[slots]
  lengths: np.ndarray  # i32[slots]

  @property
  def slots(self) -> int:
    return self.active.shape[0]


class SimEngine(Engine):
  """`Engine` whose device work is a step-time model on a logical clock.

  Args:
    cfg, slots, capacity, chunk: as `Engine`.
    calibration: the step-time and transport model.
    device: the SimDevice it runs on (a colocated worker's prefill and decode engines
      share one).
    layout: "static" or "paged" (what a decode step reads).
  """

  def __init__(self, cfg: ModelConfig, *, calibration: Calibration, device: SimDevice,
               slots: int = 8, capacity: int | None = None, chunk: int = 16,
               layout: str = "static"):
    super().__init__(cfg, slots=slots, capacity=capacity, chunk=chunk)
    if layout not in LAYOUTS:
      raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    self.calibration, self.device, self.layout = calibration, device, layout

  def _check_params(self, params, arg: str) -> None:
    if params.cfg != self.cfg:
      raise ValueError(f"{arg} (tree {params.tree_id}) has config {params.cfg.name!r}, not "
                       f"this engine's {self.cfg.name!r}")

  def clock(self) -> float:
    return self.device.host

  def _run(self, module: str, work: dict, *, wait: bool) -> float:
    """Queues `work` on the device; returns when it ends (the host waits if `wait`)."""
    seconds = self.calibration.predict(module, StepFeatures(**work))
    dev = self.device
    start = max(dev.host, dev.free_at)
    seconds *= dev.contention(start)
    dev.free_at = start + seconds
    dev.busy_s += seconds
    if self.step_log is not None:
      self.step_log.append(LoggedStep(module, dict(work), seconds, start))
    if wait:
      dev.host = dev.free_at
    return dev.free_at

  # -- prefill

  def prefill(self, params, tokens, true_length: int | None = None, *,
              existing_prefix: SimPrefix | None = None, model: str = "",
              sampling: SamplingParams | None = None):
    tokens, n_cache, cached = self.check_prompt(params, tokens, true_length,
                                                existing_prefix)
    decode_first = params.last_prompt_token == "decode"
    slots_kv = 16
    if n_cache > 0:
      t_len, length = prefill_plan(n_cache, cached, self.capacity)
      if self.layout == "paged":  # exact shapes: new tokens over the real context
        t_len, length = max(n_cache - cached, 1), max(n_cache, 1)
      self._run(module_key("prefill", params), prefill_work(t_len, length, params.nbytes),
                wait=True)
      slots_kv = length if self.layout == "static" else n_cache
    first = None if decode_first else SIM_TOKEN
    prefix = SimPrefix(length=n_cache, tokens=tokens[:n_cache], producer=params.tree_id,
                       model=model, next_token=tokens[-1] if decode_first else first,
                       first_emitted=not decode_first,
                       last_prompt_token=params.last_prompt_token,
                       nbytes=slots_kv * kv_bytes_per_token(self.cfg))
    return prefix, first

  # -- decode

  def init_decode_state(self) -> SimDecodeState:
    s = self.slots
    return SimDecodeState(active=np.zeros(s, bool), remaining=np.zeros(s, np.int32),
                          lengths=np.zeros(s, np.int32))

  def insert(self, prefix: SimPrefix, decode_state: SimDecodeState, slot: int, *,
             sampling: SamplingParams, valid_producers, eos_id: int | None = None,
             verify: bool = True) -> SimDecodeState:
    _, budget, _, done = self.check_insert(prefix, slot, sampling=sampling,
                                           valid_producers=valid_producers, eos_id=eos_id,
                                           verify=verify)
    self._inserts.append(self.device.host)
    decode_state.active[slot] = not done and budget > 0
    decode_state.remaining[slot] = max(budget, 0)
    decode_state.lengths[slot] = prefix.length
    return decode_state

  def generate(self, params, decode_state: SimDecodeState, *, max_live_length: int,
               n_steps: int | None = None):
    self._check_params(params, "params")
    n = self.chunk if n_steps is None else n_steps
    ds = decode_state
    out = np.full((self.slots, self.chunk), -1, np.int32)
    live = np.flatnonzero(ds.active)
    emit = np.minimum(ds.remaining[live], n)  # tokens each live row emits in this chunk
    steps = int(emit.max()) if live.size else 0
    tokens, inserts = int(emit.sum()), len(self._inserts)
    self._inserts = []
    if self.layout == "static":
      work = decode_work(steps, tokens, self.slots * self.kv_len_for(max_live_length),
                         params.nbytes, inserts)
    else:  # paged: step j reads the KV of the rows still live, each its own length
      work = decode_work(steps, tokens, 0, params.nbytes, inserts)
      work["kv_tokens"] = float(sum(int(np.sum(np.where(emit > j, ds.lengths[live] + j + 1, 0)))
                                    for j in range(steps)))
    for row, k in zip(live, emit):
      out[row, :k] = SIM_TOKEN
      ds.remaining[row] -= k
      ds.lengths[row] += k
      ds.active[row] = ds.remaining[row] > 0
    end = self._run(module_key("decode", params), work, wait=False)
    return ds, SimChunk(tokens=out, end=end, any_active=bool(ds.active.any()))

  def warm_up(self, prefill_params=(), decode_params=(), *, sampling=None) -> int:
    return 0  # nothing to compile

  def fetch(self, chunk: SimChunk) -> np.ndarray:
    self.device.host = max(self.device.host, chunk.end)
    return chunk.tokens

  def free(self, decode_state: SimDecodeState, slot: int) -> SimDecodeState:
    decode_state.active[slot] = False
    decode_state.remaining[slot] = 0
    decode_state.lengths[slot] = 0
    return decode_state

