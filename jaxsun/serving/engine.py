"""The engine API (JetStream-style) over split models: prefill, insert, generate, free.

Parameters are passed per call, as in JetStream's `Engine`, so one engine serves any
parameter tree of its architecture; every tree carries an id (`Params.tree_id`, a
fingerprint of its arrays), which is how SUN and PrefillShare are told apart from a
mistake:

    engine = Engine(cfg, slots=8, capacity=256)
    prefix, first = engine.prefill(prefill_params, tokens, true_length,
                                   existing_prefix=cached)      # only the suffix runs
    state = engine.init_decode_state()
    state = engine.insert(prefix, state, slot=3, sampling=SamplingParams(max_tokens=32),
                          valid_producers={prefill_params.tree_id})
    state, chunk = engine.generate(decode_params, state)        # up to `chunk` steps on device
    state = engine.free(state, slot=3)

* A `Prefix` is one sequence's KV plus where it came from: the producing tree's id, the
  task model, its length and a digest of its KV (computed on device). `insert` refuses a
  KV whose producer is not valid for the decode module (under SUN: any task model's
  prefill tree that pairs with this decode tree; under PrefillShare: the shared base
  prefill tree) and a KV whose digest no longer matches (a corrupted transfer).
* The decode state is a slotted KV store (`slots` rows of `capacity` tokens) plus
  per-slot next token, sampling parameters, PRNG key, step and budget. Rows of different
  task models share one decode step when they share the decode tree (SUN): nothing in
  the step is per-model.
* `generate` runs up to `chunk` decode steps in one `lax.while_loop` on device: per-row
  EOS / stop-token / `max_tokens` checks happen inside the loop, so the host syncs once
  per chunk, and it may dispatch the next chunk before reading this one (stop checks one
  chunk behind, as JetStream does). Attention reads only the first `kv_len` slots of the
  store, a power-of-two bucket covering every live row, not the whole capacity.

Which tree runs the last prompt token follows `SplitModel.last_prompt_token`: with
"prefill" the prefill tree emits the first token (returned by `prefill`); with "decode"
the prefix holds every prompt token but the last, which the decode tree consumes as its
first step (`prefill` returns None for the first token).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import struct

from jaxsun import kv_cache
from jaxsun.config import ModelConfig
from jaxsun.generation import (MAX_STOP_IDS, Chunk, DecodeState, bucket, decode_slots,
                               kv_window, sample_rows)
from jaxsun.nn.decoder import Mode
from jaxsun.serving.request import RequestError, SamplingParams
from jaxsun.split import SplitModel, check_split

MIN_BUCKET = 16
_sample_rows = jax.jit(sample_rows)


# ----------------------------------------------------------------------------- parameters


def tree_fingerprint(state) -> str:
  """A content id of a parameter tree: sha256 over structure, shapes, dtypes and bytes.

  Two trees holding the same arrays get the same id, so PrefillShare task models (one
  frozen prefill tree) hit each other's prefix-cache entries and SUN task models (one
  frozen decode tree) land in one decode pool, without anyone declaring it.
  """
  h = hashlib.sha256()
  leaves, treedef = jax.tree.flatten(state)
  h.update(str(treedef).encode())
  for x in leaves:
    a = np.asarray(x)
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
  return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True, eq=False)
class Params:
  """One parameter tree as an engine runs it: a tied SplitModel plus its id.

  Attributes:
    tree_id: fingerprint of the tree (`tree_fingerprint`).
    split: a tied SplitModel of this tree alone (prefill and decode use the same arrays).
  """

  tree_id: str
  split: SplitModel
  variant: str = ""  # the weights' format when it is not the model's own ("int8", ...)

  @property
  def cfg(self) -> ModelConfig:
    return self.split.cfg

  @functools.cached_property
  def nbytes(self) -> int:
    """Bytes of the tree's arrays: what one forward pass reads (the step-time model's
    `weight_bytes`)."""
    return int(sum(x.nbytes for x in jax.tree.leaves(self.split.prefill)))

  @property
  def last_prompt_token(self) -> str:
    return self.split.last_prompt_token

  @classmethod
  def prefill_of(cls, model: SplitModel, tree_id: str | None = None) -> Params:
    """The prefill tree of `model`."""
    model = check_split(model, "model")
    split = SplitModel(graphdef=model.graphdef, prefill=model.prefill,
                       last_prompt_token=model.last_prompt_token)
    return cls(tree_id or tree_fingerprint(model.prefill), split)

  @classmethod
  def decode_of(cls, model: SplitModel, tree_id: str | None = None) -> Params:
    """The decode tree of `model`."""
    model = check_split(model, "model")
    split = SplitModel(graphdef=model.decode_gd, prefill=model.decode_state,
                       last_prompt_token=model.last_prompt_token)
    return cls(tree_id or tree_fingerprint(model.decode_state), split)


# ----------------------------------------------------------------------------- prefixes


def _bits_u32(x: jax.Array) -> jax.Array:
  """The raw bits of a float/int array as uint32 (exact, any 8/16/32-bit dtype)."""
  width = x.dtype.itemsize * 8
  if width == 32:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if width == 16:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if width == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  raise TypeError(f"cannot digest dtype {x.dtype}")


@jax.jit
def kv_digest(cache: kv_cache.KVCache) -> jax.Array:
  """A position-weighted checksum of each row's valid KV slots and state: u32[B].

  Every bit of every valid slot enters with its own odd multiplier, so a flipped bit,
  a swapped pair of slots or a changed length changes the digest. Slots past a row's
  length are ignored (they are scratch space for the next write).
  """
  lengths = cache.lengths
  total = lengths.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)
  for i, layer in enumerate(cache.layers):
    for j, x in enumerate((layer.k, layer.v)):
      b, s = x.shape[:2]
      bits = _bits_u32(x).reshape(b, s, -1)
      idx = jnp.arange(bits.shape[1] * bits.shape[2], dtype=jnp.uint32).reshape(bits.shape[1:])
      salt = jnp.uint32((2 * (2 * i + j) + 1) * 0x85EBCA6B & 0xFFFFFFFF)
      mult = idx * jnp.uint32(0x27D4EB2F) + salt | jnp.uint32(1)
      valid = jnp.arange(s)[None, :, None] < lengths[:, None, None]
      total = total + jnp.sum(jnp.where(valid, bits * mult, 0), axis=(1, 2), dtype=jnp.uint32)
    for name in sorted(layer.state):
      x = layer.state[name]
      bits = _bits_u32(x).reshape(x.shape[0], -1)
      idx = jnp.arange(bits.shape[1], dtype=jnp.uint32)
      total = total + jnp.sum(bits * (idx * jnp.uint32(0x165667B1) | jnp.uint32(1)), axis=1,
                              dtype=jnp.uint32)
  return total


@dataclasses.dataclass(frozen=True, eq=False)
class Prefix:
  """One sequence's prefilled KV and its provenance.

  Attributes:
    kv: a batch-1 KVCache of `bucket(length)` slots; `kv.lengths == [length]`.
    length: tokens whose KV is cached (the prompt, minus its last token when the decode
      tree runs that token).
    tokens: those tokens (what a prefix cache keys on).
    producer: tree id of the prefill tree that computed `kv`.
    model: the task model the request was for.
    digest: `kv_digest(kv)` at production time (an int).
    next_token: the token the first decode step consumes: the first output token
      (last_prompt_token "prefill") or the last prompt token ("decode").
    first_emitted: whether `next_token` is already an output token (it was sampled by
      the prefill tree).
    last_prompt_token: "prefill" or "decode", the convention it was made under.
  """

  kv: kv_cache.KVCache
  length: int
  tokens: tuple[int, ...]
  producer: str
  model: str
  digest: int
  next_token: int | None
  first_emitted: bool
  last_prompt_token: str

  @property
  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self.kv))

  def verify(self) -> bool:
    """Whether the KV still has the digest it was produced with."""
    return int(kv_digest(self.kv)[0]) == self.digest

  def truncated(self, n: int) -> Prefix:
    """The first `n` cached tokens of this prefix (same arrays, shorter length)."""
    if not 0 < n <= self.length:
      raise ValueError(f"n={n} must be in (0, {self.length}]")
    if n == self.length:  # the same KV: its digest holds (no device call)
      return dataclasses.replace(self, next_token=None, first_emitted=False)
    # Placed like the KV it describes; running state (affine attention's sum of V) is
    # rebuilt for the shorter length.
    kv = kv_cache.truncate(self.kv, self.kv.lengths * 0 + n)
    return dataclasses.replace(self, kv=kv, length=n, tokens=self.tokens[:n],
                               digest=int(kv_digest(kv)[0]), next_token=None,
                               first_emitted=False)


class InsertError(RequestError):
  """`insert` refused a prefix (wrong producer, wrong convention, corrupt KV, no room)."""


class KVCorrupted(InsertError):
  """A prefix whose KV no longer matches its digest (e.g. a corrupted transfer)."""


# ----------------------------------------------------------------------------- decode state


@functools.partial(jax.jit, donate_argnames="ds")
def _insert(ds: DecodeState, kv: kv_cache.KVCache, slot: jax.Array, row: dict) -> DecodeState:
  """Writes a batch-1 prefix KV into row `slot` and sets that row's sampling state."""
  def put(big, small):
    return jax.lax.dynamic_update_slice(big, small.astype(big.dtype),
                                        (slot,) + (0,) * (big.ndim - 1))

  layers = []
  for big, small in zip(ds.cache.layers, kv.layers):
    layers.append(big.replace(
        k=put(big.k, small.k), v=put(big.v, small.v),
        state={n: put(big.state[n], small.state[n]) for n in big.state}))
  cache = ds.cache.replace(layers=tuple(layers),
                           lengths=ds.cache.lengths.at[slot].set(kv.lengths[0]))
  return ds.replace(cache=cache, **{k: getattr(ds, k).at[slot].set(v) for k, v in row.items()})


@functools.partial(jax.jit, donate_argnames="ds")
def _free(ds: DecodeState, slot: jax.Array) -> DecodeState:
  return ds.replace(active=ds.active.at[slot].set(False),
                    remaining=ds.remaining.at[slot].set(0),
                    cache=ds.cache.replace(lengths=ds.cache.lengths.at[slot].set(0)))


@jax.jit
def _prefill_call(split: SplitModel, cache: kv_cache.KVCache, tokens: jax.Array,
                  n_new: jax.Array):
  """Prefill tree over `tokens` (i32[1, T], n_new valid) after the cached prefix."""
  pre = split.prefill_module()
  start = cache.lengths
  positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
  h, cache = pre.hidden(tokens, mode=Mode.PREFILL, positions=positions, cache=cache,
                        new_lengths=start + n_new)
  last = jnp.take_along_axis(h, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]
  return pre.logits(last), cache


@functools.partial(jax.jit, static_argnames=("length",))
def _resize(kv: kv_cache.KVCache, *, length: int) -> kv_cache.KVCache:
  """A batch-1 cache padded or cut to `length` slots (valid slots are kept)."""
  def fit(x):
    if x.shape[1] >= length:
      return x[:, :length]
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1])) + ((0, 0),) * (x.ndim - 2))

  return kv.replace(layers=tuple(l.replace(k=fit(l.k), v=fit(l.v)) for l in kv.layers))


def request_key(seed: int) -> np.ndarray:
  """The PRNG key data (u32[2]) of a request's seed."""
  return np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)


# ----------------------------------------------------------------------------- shapes and work


def prefill_plan(n_cache: int, cached: int, capacity: int) -> tuple[int, int]:
  """The shapes one prefill call computes: (query tokens t_len, KV slots `length`).

  `n_cache` prompt tokens go into the KV, `cached` of them are already there; the rest
  run padded to a power-of-two bucket (few compilations), attending over a KV bucket.
  When the whole prompt is cached the last position is recomputed (one query token).
  """
  new = max(n_cache - cached, 1)
  t_len = bucket(new, capacity, minimum=8)
  if cached + t_len > capacity:
    t_len = capacity - cached
  return t_len, bucket(cached + t_len, capacity, minimum=MIN_BUCKET)


def prefill_work(t_len: int, length: int, weight_bytes: int) -> dict[str, float]:
  """Step-time features of one prefill call (`jaxsun.serving.sim.stepmodel.FEATURES`)."""
  return dict(calls=1.0, steps=0.0, prefill_tokens=float(t_len),
              prefill_attn=float(t_len * length), decode_rows=0.0, kv_tokens=0.0,
              weight_bytes=float(weight_bytes), inserts=0.0)


def decode_work(steps: int, tokens: int, kv_tokens: int, weight_bytes: int,
                inserts: int = 0) -> dict[str, float]:
  """Step-time features of one decode chunk: `steps` steps that emitted `tokens` tokens
  in all (the decode batch summed over steps: host work per token scales with it), read
  `kv_tokens` KV slots per step (this engine computes every slot over its window:
  slots * window), after admitting `inserts` requests into the batch."""
  return dict(calls=1.0, steps=float(steps), prefill_tokens=0.0, prefill_attn=0.0,
              decode_rows=float(tokens), kv_tokens=float(steps * kv_tokens),
              weight_bytes=float(steps * weight_bytes), inserts=float(inserts))


@dataclasses.dataclass
class LoggedStep:
  """One device call of an engine, as `Engine.step_log` records it.

  Attributes:
    module: "prefill" or "decode", with ":<variant>" for a tree in another format.
    work: step-time features (`prefill_work` / `decode_work`).
    seconds: measured: a prefill call's wall time (it ends in a host sync); a decode
      chunk's time from when the device could start it (its dispatch or the previous
      chunk's end, whichever is later) to when its tokens were read.
    start: `clock()` when it started.
  """

  module: str
  work: dict
  seconds: float
  start: float


def module_key(phase: str, params: Params) -> str:
  variant = getattr(params, "variant", "")
  return f"{phase}:{variant}" if variant else phase


# ----------------------------------------------------------------------------- the engine


class Engine:
  """Prefill / insert / generate / free for one architecture (any of its trees).

  Args:
    cfg: the architecture (every Params passed must have it).
    slots: decode rows (the continuous batch).
    capacity: KV slots per row (prompt + output must fit; <= cfg.max_len).
    chunk: decode steps per `generate` call.
    pad_id: filler token of inactive rows.
  """

  def __init__(self, cfg: ModelConfig, *, slots: int = 8, capacity: int | None = None,
               chunk: int = 16, pad_id: int = 0):
    capacity = cfg.max_len if capacity is None else capacity
    for name, v in (("slots", slots), ("capacity", capacity), ("chunk", chunk)):
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"Engine {name}={v!r} must be a positive integer")
    if capacity > cfg.max_len:
      raise ValueError(f"Engine capacity={capacity} exceeds ModelConfig.max_len={cfg.max_len}")
    if not 0 <= pad_id < cfg.vocab_size:
      raise ValueError(f"Engine pad_id={pad_id} is outside the vocabulary")
    self.cfg, self.slots, self.capacity, self.chunk, self.pad_id = (cfg, slots, capacity,
                                                                    chunk, pad_id)
    self.step_log: list[LoggedStep] | None = None  # set to [] to record every device call
    self._dispatched: dict[int, tuple] = {}  # id(chunk tokens) -> what its log entry needs
    self._inserts: list[float] = []  # when each insert since the last chunk began
    self._last_fetch = 0.0

  def clock(self) -> float:
    """The time workers stamp events with (a simulated engine has a logical one)."""
    return time.monotonic()

  def fetch(self, chunk: Chunk) -> np.ndarray:
    """A chunk's tokens on the host (i32[slots, chunk]): the one sync per chunk."""
    tokens = np.asarray(chunk.tokens)
    entry = self._dispatched.pop(id(chunk.tokens), None)
    if entry is not None:
      dispatched, module, kv_tokens, wbytes, inserts = entry
      end = time.monotonic()
      start = max(dispatched, self._last_fetch)
      self._last_fetch = end
      steps = int(np.sum(np.any(tokens >= 0, axis=0)))
      work = decode_work(steps, int(np.sum(tokens >= 0)), kv_tokens, wbytes, len(inserts))
      self.step_log.append(LoggedStep(module, work, end - start, start))
    return tokens

  def _check_params(self, params: Params, arg: str) -> None:
    if not isinstance(params, Params):
      raise TypeError(f"{arg} must be jaxsun.serving.engine.Params, got "
                      f"{type(params).__name__}")
    if params.cfg != self.cfg:
      raise ValueError(f"{arg} (tree {params.tree_id}) has config {params.cfg.name!r}, not "
                       f"this engine's {self.cfg.name!r}")

  # -- prefill

  def prefill(self, params: Params, tokens, true_length: int | None = None, *,
              existing_prefix: Prefix | None = None, model: str = "",
              sampling: SamplingParams | None = None) -> tuple[Prefix, int | None]:
    """Runs the prefill tree over a prompt, reusing `existing_prefix`'s KV if given.

    Args:
      params: the prefill tree.
      tokens: the prompt (a sequence of ids, or an array; the first `true_length` count).
      true_length: prompt length (default: all of `tokens`).
      existing_prefix: a cached prefix by the same tree whose tokens start the prompt;
        only the remaining tokens run.
      model: the task model id recorded in the prefix.
      sampling: how to pick the first token (last_prompt_token "prefill"); greedy if None.

    Returns:
      (prefix, first token or None when the decode tree picks it).
    """
    tokens, n_cache, cached = self.check_prompt(params, tokens, true_length, existing_prefix)
    decode_first = params.last_prompt_token == "decode"
    base = None
    if existing_prefix is not None:
      base = existing_prefix.kv if cached else None
    t0 = time.monotonic()
    work = None
    if n_cache == 0:  # a one-token prompt under "decode": nothing for the prefill tree
      kv = self._empty_kv(MIN_BUCKET)
      logits = None
    else:
      new = n_cache - cached
      t_len, length = prefill_plan(n_cache, cached, self.capacity)
      work = prefill_work(t_len, length, params.nbytes)
      if base is None:
        kv = self._empty_kv(length)
      else:
        kv = _resize(base, length=length)
        kv = kv.replace(lengths=kv.lengths * 0 + cached)
      chunk = np.full((1, t_len), self.pad_id, np.int32)
      chunk[0, :new] = tokens[cached:n_cache]
      if new == 0:  # the whole prompt is cached: recompute the last position for logits
        kv = kv.replace(lengths=kv.lengths * 0 + (cached - 1))
        chunk[0, 0] = tokens[cached - 1]
        new = 1
      logits, kv = _prefill_call(params.split, kv, jnp.asarray(chunk),
                                 jnp.full((1,), new, jnp.int32))
    first = None
    if decode_first:
      next_token = tokens[-1]
    else:
      sp = sampling or SamplingParams()
      first = int(_sample_rows(logits, jnp.asarray(request_key(_seed(sp)))[None],
                              jnp.zeros((1,), jnp.int32),
                              jnp.full((1,), sp.temperature, jnp.float32),
                              jnp.full((1,), sp.top_p, jnp.float32),
                              jnp.full((1,), sp.top_k, jnp.int32))[0])
      next_token = first
    prefix = Prefix(kv=kv, length=n_cache, tokens=tokens[:n_cache], producer=params.tree_id,
                    model=model, digest=int(kv_digest(kv)[0]), next_token=next_token,
                    first_emitted=not decode_first,
                    last_prompt_token=params.last_prompt_token)
    if self.step_log is not None and work is not None:  # the digest above synced
      self.step_log.append(LoggedStep(module_key("prefill", params), work,
                                      time.monotonic() - t0, t0))
    return prefix, first

  def check_prompt(self, params, tokens, true_length: int | None,
                   existing_prefix=None) -> tuple[tuple[int, ...], int, int]:
    """What `prefill` checks (RequestError / InsertError naming the argument) and derives:
    (the prompt's tokens, how many go into the KV, how many of those are cached)."""
    self._check_params(params, "params")
    tokens = tuple(int(t) for t in np.asarray(tokens).reshape(-1))
    n = len(tokens) if true_length is None else int(true_length)
    if not 0 < n <= len(tokens):
      raise RequestError("prompt", f"true_length={n} must be in [1, {len(tokens)}]")
    tokens = tokens[:n]
    if max(tokens) >= self.cfg.vocab_size:
      raise RequestError("prompt", f"token id {max(tokens)} is outside the vocabulary "
                         f"[0, {self.cfg.vocab_size})")
    if n > self.capacity:
      raise RequestError("prompt", f"{n} tokens exceed the KV capacity {self.capacity}")
    n_cache = n - 1 if params.last_prompt_token == "decode" else n
    cached = 0
    if existing_prefix is not None:
      if existing_prefix.producer != params.tree_id:
        raise InsertError("existing_prefix", f"was produced by tree "
                          f"{existing_prefix.producer}, not by {params.tree_id}")
      cached = min(existing_prefix.length, n_cache)
      if existing_prefix.tokens[:cached] != tokens[:cached]:
        raise InsertError("existing_prefix", "its tokens do not start the prompt")
    return tokens, n_cache, cached

  def _empty_kv(self, length: int) -> kv_cache.KVCache:
    return _empty_cache(self.cfg, length)

  # -- decode

  def init_decode_state(self) -> DecodeState:
    """An empty slotted store (every row free)."""
    s = self.slots
    cache = _empty_cache(self.cfg, self.capacity, batch=s)
    # Committed to the device, like every store a chunk returns: one signature (one
    # compilation) for insert / generate / free whatever the store has been through.
    return jax.device_put(DecodeState(
        cache=cache, tokens=jnp.zeros((s,), jnp.int32), active=jnp.zeros((s,), bool),
        remaining=jnp.zeros((s,), jnp.int32), step=jnp.zeros((s,), jnp.int32),
        keys=jnp.zeros((s, 2), jnp.uint32), temperature=jnp.zeros((s,), jnp.float32),
        top_p=jnp.ones((s,), jnp.float32), top_k=jnp.zeros((s,), jnp.int32),
        stop_ids=jnp.full((s, MAX_STOP_IDS), -1, jnp.int32)), jax.devices()[0])

  def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int, *,
             sampling: SamplingParams, valid_producers, eos_id: int | None = None,
             verify: bool = True) -> DecodeState:
    """Puts a prefix into decode row `slot`; the row is active from the next step.

    Args:
      prefix: the KV and first token from `prefill` (possibly after a transfer).
      decode_state: the store (donated: use the returned state).
      slot: the row.
      sampling: the request's sampling and budget (`max_tokens` counts the first token
        if the prefill tree already emitted it).
      valid_producers: tree ids whose KV this decode tree may consume.
      eos_id: the model's EOS (ignored with `sampling.ignore_eos`).
      verify: recompute the KV digest and refuse a mismatch (`KVCorrupted`).

    Raises:
      InsertError: the producer is not valid here, the convention differs, or the
        request does not fit; KVCorrupted: the digest does not match.
    """
    if not isinstance(prefix, Prefix):
      raise TypeError(f"prefix must be a Prefix, got {type(prefix).__name__}")
    if self.step_log is not None:
      self._inserts.append(time.monotonic())
    if prefix.kv.max_len > self.capacity:
      raise InsertError("prefix", f"KV of {prefix.kv.max_len} slots > capacity {self.capacity}")
    emitted, budget, stops, done = self.check_insert(prefix, slot, sampling=sampling,
                                                     valid_producers=valid_producers,
                                                     eos_id=eos_id, verify=verify)
    row = dict(tokens=jnp.int32(prefix.next_token), active=jnp.bool_(not done),
               remaining=jnp.int32(max(budget, 0)), step=jnp.int32(emitted),
               keys=jnp.asarray(request_key(_seed(sampling))),
               temperature=jnp.float32(sampling.temperature),
               top_p=jnp.float32(sampling.top_p), top_k=jnp.int32(sampling.top_k),
               stop_ids=jnp.asarray(stops + [-1] * (MAX_STOP_IDS - len(stops)), jnp.int32))
    return _insert(decode_state, prefix.kv, jnp.int32(slot), row)

  def check_insert(self, prefix, slot: int, *, sampling: SamplingParams, valid_producers,
                   eos_id: int | None = None, verify: bool = True
                   ) -> tuple[int, int, list[int], bool]:
    """What `insert` checks (raising InsertError / KVCorrupted) and derives for the row:
    (tokens already emitted, decode budget, stop ids, whether the row is done already)."""
    if prefix.producer not in valid_producers:
      raise InsertError("prefix", f"KV produced by tree {prefix.producer} (model "
                        f"{prefix.model!r}) is not valid for this decode module; valid "
                        f"producers: {sorted(valid_producers)}")
    if not 0 <= slot < self.slots:
      raise InsertError("slot", f"slot={slot} is outside [0, {self.slots})")
    emitted = 1 if prefix.first_emitted else 0
    budget = sampling.max_tokens - emitted
    if prefix.length + budget > self.capacity:  # every decode step writes one KV slot
      raise InsertError("max_tokens", f"{prefix.length} cached tokens + {sampling.max_tokens} "
                        f"new tokens exceed the KV capacity {self.capacity}")
    if verify and not prefix.verify():
      raise KVCorrupted("prefix", f"KV digest mismatch for model {prefix.model!r}: the KV "
                        "changed after it was produced (corrupted transfer?)")
    stops = [] if (eos_id is None or sampling.ignore_eos) else [eos_id]
    stops += list(sampling.stop_token_ids)
    if len(stops) > MAX_STOP_IDS:
      raise InsertError("stop_token_ids", f"at most {MAX_STOP_IDS - 1} stop tokens besides EOS")
    # A first token that already stops the request leaves nothing to decode.
    done = bool(emitted and (budget <= 0 or prefix.next_token in stops))
    return emitted, budget, stops, done

  def kv_len_for(self, max_live_length: int) -> int:
    """The attention window of a chunk (`jaxsun.generation.kv_window`)."""
    return kv_window(max_live_length, self.chunk, self.capacity)

  def generate(self, params: Params, decode_state: DecodeState, *, max_live_length: int,
               n_steps: int | None = None) -> tuple[DecodeState, Chunk]:
    """Up to `n_steps` (default `chunk`) decode steps for all active rows, on device.

    Args:
      params: the decode tree.
      decode_state: the store (donated).
      max_live_length: an upper bound on the longest active row's KV length now (the host
        knows it from the tokens it has seen); attention reads a bucket covering it.
      n_steps: steps to run at most (rows stop earlier on EOS, stop ids, max_tokens).

    Returns:
      (new state, Chunk); nothing is read back to the host here.
    """
    self._check_params(params, "params")
    n = self.chunk if n_steps is None else n_steps
    kv_len = self.kv_len_for(max_live_length)
    state, chunk = decode_slots(params.split, decode_state, jnp.asarray(n, jnp.int32),
                                size=self.chunk, kv_len=kv_len, pad_id=self.pad_id)
    if self.step_log is not None:
      # The chunk's work starts with the admissions before it (their host work).
      t0 = min([time.monotonic(), *self._inserts])
      self._dispatched[id(chunk.tokens)] = (t0, module_key("decode", params),
                                            self.slots * kv_len, params.nbytes, self._inserts)
    self._inserts = []
    return state, chunk

  def warm_up(self, prefill_params=(), decode_params=(), *, sampling=None) -> int:
    """Compiles every shape serving can meet, so no request waits for a compilation:
    each prefill (query bucket, KV bucket) with and without a cached prefix, each KV
    window of a decode chunk, and the inserts of every prefix size. Compilations are
    cached per tree structure, so one engine warms every worker of its shapes.

    Returns:
      the number of calls made.
    """
    sampling = sampling or SamplingParams(max_tokens=1, ignore_eos=True)
    log, self.step_log = self.step_log, None
    calls, by_size = 0, {}  # KV slots -> a prefix of that size
    sizes = sorted({bucket(n, self.capacity, minimum=8) for n in range(1, self.capacity + 1)})
    try:
      for p in prefill_params:
        tok = (self.pad_id + 1) % self.cfg.vocab_size
        extra = 1 if p.last_prompt_token == "decode" else 0  # the decode tree's token
        mine = {}
        for cached in sorted({0, *sizes, *(s - 1 for s in sizes)}):
          if cached + extra >= self.capacity:
            continue
          hit = self.prefill(p, (tok,) * (cached + extra))[0] if cached else None
          for new in [1, *sizes]:
            if cached + new + extra <= self.capacity:
              prefix, _ = self.prefill(p, (tok,) * (cached + new + extra), existing_prefix=hit)
              mine.setdefault(prefix.kv.max_len, prefix)
              calls += 1
        by_size = {**mine, **by_size}
        # Hits cut from longer entries (a prefix cache truncates what it stores).
        for _, big in sorted(mine.items()):
          for cached in (c for c in sorted({1, *sizes}) if c < big.length):
            hit = big.truncated(cached)
            for new in (n for n in [1, *sizes] if cached + n + extra <= self.capacity):
              self.prefill(p, (tok,) * (cached + new + extra), existing_prefix=hit)
              calls += 1
      windows = {self.kv_len_for(n): n for n in range(self.capacity - self.chunk + 1)}
      for d in decode_params:
        for live in windows.values():
          state = self.init_decode_state()
          for slot, size in enumerate(sorted(by_size)[:self.slots]):
            state = self.insert(by_size[size], state, slot, sampling=sampling,
                                valid_producers={by_size[size].producer})
          state, chunk = self.generate(d, state, max_live_length=live)
          self.fetch(chunk)
          calls += 1
        # A store a chunk returned is committed to its device: another signature for
        # insert and free than a fresh one's.
        for slot, size in enumerate(sorted(by_size)):
          state = self.insert(by_size[size], state, slot % self.slots, sampling=sampling,
                              valid_producers={by_size[size].producer})
          state = self.free(state, slot % self.slots)
          calls += 2
    finally:
      self.step_log = log
    return calls

  def free(self, decode_state: DecodeState, slot: int) -> DecodeState:
    """Releases row `slot` (its KV is overwritten by the next insert)."""
    return _free(decode_state, jnp.int32(slot))


@functools.lru_cache(maxsize=None)
def _zeros_fn(cfg: ModelConfig, length: int, batch: int):
  from jaxsun.nn.decoder import Decoder

  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  return jax.jit(lambda: abstract.init_cache(batch, length))


def _empty_cache(cfg: ModelConfig, length: int, batch: int = 1) -> kv_cache.KVCache:
  return _zeros_fn(cfg, length, batch)()


def _seed(sampling: SamplingParams) -> int:
  return 0 if sampling.seed is None else int(sampling.seed)
