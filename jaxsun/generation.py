"""Generation through the split: jitted prefill, jitted decode step, sampling, `generate`.

    out = generate(split, prompts, prompt_lengths, max_new_tokens=16,
                   sampling=SamplingConfig(temperature=0.8, top_p=0.9), key=key, eos_id=2)

The prefill tree builds the KV cache from the prompts; the decode tree extends it one
token per step. Decoding runs on device in chunks of up to `DECODE_CHUNK` steps
(`decode_slots`, a `lax.while_loop` over a slotted `DecodeState`, the same step the
serving engine runs): the host syncs once per chunk, one chunk behind, and the loop on
device stops early once every row has emitted `eos_id`. `prefill`,
`decode_step` and `decode_slots` are jitted once per (model, shapes) and reused.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsun import kv_cache
from jaxsun import parallel
from jaxsun import validation
from jaxsun.nn.decoder import Mode
from jaxsun.split import SplitModel, check_split, prefill_lengths


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is drawn from the logits.

  Attributes:
    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0: off).
    top_p: keep the smallest set of most likely tokens whose probability reaches p
      (nucleus sampling; 1.0: off).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"SamplingConfig.temperature={self.temperature!r} must be >= 0")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k={self.top_k!r} must be an integer >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p={self.top_p!r} must be in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def sample_logits(logits: jax.Array, key: jax.Array | None,
                  sampling: SamplingConfig) -> jax.Array:
  """Draws one token per row. logits: f32[B, V] -> i32[B]."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    k = min(sampling.top_k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][:, -1:]  # f32[B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative mass
    kept = mass_before < sampling.top_p  # the first token is always kept
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _prefill(split: SplitModel, prompts: jax.Array, prompt_lengths: jax.Array,
             cache: kv_cache.KVCache):
  """Prefill tree over padded prompts. Returns (f32[B, V] logits of the last prefill
  position, cache with `lengths = prefill_lengths(prompt_lengths)`)."""
  pre = split.prefill_module()
  n = prefill_lengths(split, prompt_lengths)
  h, cache = pre.hidden(prompts, mode=Mode.PREFILL, cache=cache, new_lengths=n)
  last = jnp.take_along_axis(h, jnp.maximum(n - 1, 0)[:, None, None], axis=1)[:, 0]
  return pre.logits(last), cache


def _decode_step(split: SplitModel, tokens: jax.Array, cache: kv_cache.KVCache,
                 key: jax.Array | None, sampling: SamplingConfig):
  """Decode tree on one token per row (i32[B]). Returns (next i32[B], f32[B, V], cache)."""
  dec = split.decode_module()
  h, cache = dec.hidden(tokens[:, None], mode=Mode.DECODE, cache=cache)
  logits = dec.logits(h[:, 0])
  return sample_logits(logits, key, sampling), logits, cache


prefill = jax.jit(_prefill, donate_argnames="cache")
decode_step = jax.jit(_decode_step, static_argnames="sampling", donate_argnames="cache")
_sample = jax.jit(sample_logits, static_argnames="sampling")

DECODE_CHUNK = 16  # decode steps per device call


MAX_STOP_IDS = 4  # stop tokens per row kept on device (EOS included)


def kv_window(max_live_length: int, chunk: int, capacity: int) -> int:
  """Slots a chunk's attention reads: a power-of-two bucket covering every live row plus
  the chunk's own tokens, or the whole store when the bucket would not pay for itself.

  Reading a bucket means copying it out of the store and back once per chunk (about 4
  bucket-sized passes), against `chunk` steps that each skip `capacity - bucket` slots.
  """
  b = bucket(max_live_length + chunk, capacity, minimum=16)
  return b if chunk * (capacity - b) > 4 * b else capacity


def bucket(n: int, cap: int, minimum: int = 1) -> int:
  """The next power of two >= max(n, minimum), at most `cap` (bounds compiled shapes)."""
  return min(cap, 1 << max(0, int(max(n, minimum) - 1).bit_length()))


@struct.dataclass
class DecodeState:
  """The slotted decode store: `slots` rows, each one request's KV and sampling state."""

  cache: kv_cache.KVCache  # [slots, capacity, Hkv, hd] per layer; lengths i32[slots]
  tokens: jax.Array  # i32[slots] next input token of each row
  active: jax.Array  # bool[slots] rows still generating
  remaining: jax.Array  # i32[slots] output tokens still allowed
  step: jax.Array  # i32[slots] index of the next output token (its sampling key)
  keys: jax.Array  # u32[slots, 2] per-request PRNG key data
  temperature: jax.Array  # f32[slots] (0: greedy)
  top_p: jax.Array  # f32[slots]
  top_k: jax.Array  # i32[slots] (0: off)
  stop_ids: jax.Array  # i32[slots, MAX_STOP_IDS] (-1: unused)

  @property
  def slots(self) -> int:
    return self.tokens.shape[0]


@struct.dataclass
class Chunk:
  """What one `generate` call produced (device arrays; read them one chunk later).

  tokens: i32[slots, size]: the token each row emitted at each step, -1 where the row
    emitted nothing (inactive or finished).
  any_active: bool[]: whether any row is still generating after the chunk.
  """

  tokens: jax.Array
  any_active: jax.Array


def sample_rows(logits: jax.Array, keys: jax.Array, step: jax.Array, temperature: jax.Array,
                top_p: jax.Array, top_k: jax.Array) -> jax.Array:
  """Per-row sampling: f32[B, V] -> i32[B]. Greedy rows (temperature 0) take the argmax;
  the others sample with `fold_in(key_b, step_b)` after top-k and top-p filtering, so a
  request draws the same tokens whatever batch or slot it runs in."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sampled():
    v = logits.shape[-1]
    lg = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None]
    desc = jnp.sort(lg, axis=-1)[:, ::-1]
    kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, v - 1)[:, None], axis=1)
    lg = jnp.where((top_k[:, None] > 0) & (lg < kth), -jnp.inf, lg)
    desc = jnp.where((top_k[:, None] > 0) & (desc < kth), -jnp.inf, desc)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    thresh = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    lg = jnp.where(lg < thresh, -jnp.inf, lg)
    row_keys = jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s))(
        keys, step)
    draw = jax.vmap(lambda k, l: jax.random.categorical(k, l))(row_keys, lg).astype(jnp.int32)
    return jnp.where(temperature > 0, draw, greedy)

  return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


def _slice_kv(cache: kv_cache.KVCache, kv_len: int) -> kv_cache.KVCache:
  return cache.replace(layers=tuple(
      l.replace(k=l.k[:, :kv_len], v=l.v[:, :kv_len]) for l in cache.layers))


def _unslice_kv(full: kv_cache.KVCache, part: kv_cache.KVCache) -> kv_cache.KVCache:
  return part.replace(layers=tuple(
      f.replace(k=jax.lax.dynamic_update_slice_in_dim(f.k, p.k, 0, axis=1),
                v=jax.lax.dynamic_update_slice_in_dim(f.v, p.v, 0, axis=1), state=p.state)
      for f, p in zip(full.layers, part.layers)))


def _decode_slots(split: SplitModel, ds: DecodeState, n_steps: jax.Array, *, size: int,
                  kv_len: int, pad_id: int) -> tuple[DecodeState, Chunk]:
  """Up to `n_steps` (<= size) decode steps for every active row, in one `while_loop`.

  Each step feeds each active row's token to the decode tree, samples per row
  (`sample_rows`), and retires rows that emitted a stop id or spent their budget; the
  loop ends early when no row is active. Attention reads only the first `kv_len` slots
  of the store (a bucket covering every live row; the caller guarantees it). `n_steps`
  is traced: one compilation serves every chunk length.
  """
  dec = split.decode_module()
  slots = ds.tokens.shape[0]

  def cond(carry):
    j, ds, _, cache = carry
    return (j < n_steps) & jnp.any(ds.active)

  def body(carry):
    j, ds, out, cache = carry
    active = ds.active
    lengths = cache.lengths
    # Finished rows stay put: no position advance, no KV write inside their valid part.
    pos = jnp.where(active, lengths, jnp.minimum(lengths, kv_len - 1))
    new_len = jnp.where(active, lengths + 1, lengths)
    tok = jnp.where(active, ds.tokens, pad_id)
    h, cache = dec.hidden(tok[:, None], mode=Mode.DECODE, positions=pos[:, None],
                          cache=cache, new_lengths=new_len)
    logits = dec.logits(h[:, 0])
    nxt = sample_rows(logits, ds.keys, ds.step, ds.temperature, ds.top_p, ds.top_k)
    remaining = ds.remaining - active.astype(jnp.int32)
    stop = jnp.any(nxt[:, None] == ds.stop_ids, axis=1) | (remaining <= 0)
    out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(active, nxt, -1)[:, None], j,
                                              axis=1)
    ds = ds.replace(tokens=jnp.where(active, nxt, ds.tokens), active=active & ~stop,
                    remaining=remaining, step=ds.step + active.astype(jnp.int32))
    return j + 1, ds, out, cache

  out = jnp.full((slots, size), -1, jnp.int32)
  window = kv_len < ds.cache.max_len  # the whole store: no copy out and back
  small = _slice_kv(ds.cache, kv_len) if window else ds.cache
  _, ds2, out, small = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), ds, out,
                                                       small))
  return (ds2.replace(cache=_unslice_kv(ds.cache, small) if window else small),
          Chunk(tokens=out, any_active=jnp.any(ds2.active)))


decode_slots = jax.jit(_decode_slots, static_argnames=("size", "kv_len", "pad_id"),
                       donate_argnames="ds")


@struct.dataclass
class GenerateOutput:
  tokens: jax.Array  # i32[B, max_new_tokens], pad_id after each row's end
  lengths: jax.Array  # i32[B] generated tokens per row (including the EOS token)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0):
  """Right-pads a list of token lists. Returns (i32[B, P], i32[B] lengths)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("prompts must be a non-empty list of non-empty token sequences")
  width = max(len(p) for p in prompts)
  arr = np.full((len(prompts), width), pad_id, np.int32)
  for i, p in enumerate(prompts):
    arr[i, :len(p)] = np.asarray(p, np.int32)
  return arr, np.asarray([len(p) for p in prompts], np.int32)


def generate(split: SplitModel, prompts, prompt_lengths=None, *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), key: jax.Array | None = None,
             eos_id: int | None = None, pad_id: int = 0, mesh=None,
             rules=parallel.DEFAULT_RULES) -> GenerateOutput:
  """Generates continuations of a batch of prompts through the split.

  Args:
    split: the model; its prefill tree reads the prompts, its decode tree generates.
    prompts: i32[B, P] right-padded prompts, or a list of token lists.
    prompt_lengths: i32[B] true prompt lengths (default: P for every row, or the list
      lengths).
    max_new_tokens: tokens to generate per row (fewer if every row hits `eos_id`).
    sampling: greedy by default; see `SamplingConfig`.
    key: PRNG key, required unless sampling is greedy. Step i uses `fold_in(key, i)`.
    eos_id: stop a row after it emits this token; later slots hold `pad_id`.
    pad_id: filler for finished rows.
    mesh: optional `jaxsun.parallel.make_mesh` mesh: the cache and prompts are placed on
      it by `rules` (shard the model itself with `parallel.shard_split_model`).
    rules: logical-axis rules for `mesh`.

  Returns:
    GenerateOutput(tokens i32[B, max_new_tokens], lengths i32[B]).
  """
  split = check_split(split)
  prefill_module = split.prefill_module()  # merged once: for its config and its cache
  cfg = prefill_module.cfg
  if isinstance(prompts, (list, tuple)):
    if prompt_lengths is not None:
      raise ValueError("pass prompt_lengths only with an array of padded prompts")
    prompts, prompt_lengths = pad_prompts(prompts, pad_id)
  validation.check_tokens("prompts", prompts, cfg.vocab_size)
  b, p = prompts.shape
  validation.check_positive_int("max_new_tokens", max_new_tokens)
  if prompt_lengths is None:
    prompt_lengths = np.full((b,), p, np.int32)
  validation.check_lengths("prompt_lengths", prompt_lengths, b, 1, p)
  longest = int(np.max(np.asarray(prompt_lengths)))
  if p > cfg.max_len or longest > cfg.max_len:
    raise ValueError(f"prompts of length {max(p, longest)} exceed ModelConfig.max_len="
                     f"{cfg.max_len}")
  if longest + max_new_tokens > cfg.max_len:
    raise ValueError(f"max_new_tokens={max_new_tokens} with a prompt of length {longest} "
                     f"exceeds ModelConfig.max_len={cfg.max_len}")
  if not sampling.greedy and key is None:
    raise ValueError("key (a jax.random key) is required when sampling.temperature > 0")
  if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
    raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
  if not 0 <= pad_id < cfg.vocab_size:
    raise ValueError(f"pad_id={pad_id} is outside the vocabulary [0, {cfg.vocab_size})")
  step_key = (lambda i: None) if key is None else functools.partial(jax.random.fold_in, key)

  prompts = jnp.asarray(prompts, jnp.int32)
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
  cache = prefill_module.init_cache(b, min(cfg.max_len, p + max_new_tokens))
  if mesh is not None:
    cache = jax.device_put(cache, parallel.cache_shardings(cache, mesh, rules))
    prompts = jax.device_put(prompts, parallel.batch_sharding(prompts.shape, mesh, rules))
    prompt_lengths = jax.device_put(prompt_lengths,
                                    parallel.batch_sharding((b,), mesh, rules))
  logits, cache = prefill(split, prompts, prompt_lengths, cache)
  if split.last_prompt_token == "prefill":
    tok = _sample(logits, step_key(0), sampling)
  else:  # the decode tree runs the last prompt token and picks the first output
    last = jnp.take_along_axis(prompts, (prompt_lengths - 1)[:, None], axis=1)[:, 0]
    tok, _, cache = decode_step(split, last, cache, step_key(0), sampling)

  return decode_loop(split, tok, cache, max_new_tokens=max_new_tokens, sampling=sampling,
                     key=key, eos_id=eos_id, pad_id=pad_id)


def row_keys(key: jax.Array | None, b: int) -> jax.Array:
  """Per-row PRNG key data (u32[B, 2]): row r draws from `fold_in(key, r)`."""
  if key is None:
    return jnp.zeros((b, 2), jnp.uint32)
  return jax.vmap(lambda r: jax.random.key_data(jax.random.fold_in(key, r)))(
      jnp.arange(b)).astype(jnp.uint32)


def slot_state(tok: jax.Array, cache: kv_cache.KVCache, *, steps: int,
               sampling: SamplingConfig, key: jax.Array | None,
               eos_id: int | None) -> DecodeState:
  """A `DecodeState` for a batch whose first output token `tok` (i32[B]) is known: every
  row may take `steps` more decode steps (rows whose first token is EOS are done)."""
  b = tok.shape[0]
  first_done = jnp.zeros((b,), bool) if eos_id is None else tok == eos_id
  return DecodeState(
      cache=cache, tokens=jnp.array(tok, jnp.int32, copy=True),  # the state is donated
      active=~first_done & (steps > 0), remaining=jnp.full((b,), steps, jnp.int32),
      step=jnp.ones((b,), jnp.int32), keys=row_keys(key, b),
      temperature=jnp.full((b,), sampling.temperature, jnp.float32),
      top_p=jnp.full((b,), sampling.top_p, jnp.float32),
      top_k=jnp.full((b,), sampling.top_k, jnp.int32),
      stop_ids=jnp.full((b, MAX_STOP_IDS), -1, jnp.int32).at[:, 0].set(
          -1 if eos_id is None else eos_id))


def decode_loop(split: SplitModel, tok: jax.Array, cache: kv_cache.KVCache, *,
                max_new_tokens: int, sampling: SamplingConfig, key: jax.Array | None,
                eos_id: int | None, pad_id: int) -> GenerateOutput:
  """Decode steps from a first output token `tok` (i32[B]) and the cache after it.

  The serving engine's path (`decode_slots` over a `DecodeState`): chunks of up to
  `DECODE_CHUNK` steps on device, the next chunk dispatched before the previous one is
  read (the stop check runs one chunk behind). `generate`'s cache is already sized to
  prompt + max_new_tokens, so attention reads all of it (one compilation per shape; the
  engine's longer-lived store reads a `kv_window`). Row r's
  step i draws with `fold_in(fold_in(key, r), i)`; rows stop after `eos_id` and are
  filled with `pad_id`. `generate` and the shared-module paths (`jaxsun.shared_inference`)
  end here.
  """
  b = tok.shape[0]
  steps = max_new_tokens - 1
  capacity = cache.max_len
  ds = slot_state(tok, cache, steps=steps, sampling=sampling, key=key, eos_id=eos_id)
  chunks = []
  flags = [jnp.any(ds.active)]  # "any row still active" after each chunk, on device
  done_steps = 0
  while done_steps < steps:
    # The stop check reads the flag of the chunk before the one in flight (one behind);
    # only the first check waits, on the state the prefill left.
    if eos_id is not None and not bool(flags[-1] if len(flags) == 1 else flags[-2]):
      break
    n = min(DECODE_CHUNK, steps - done_steps)
    kv_len = capacity  # this cache is sized to the request already: one compilation
    ds, chunk = decode_slots(split, ds, jnp.asarray(n, jnp.int32), size=DECODE_CHUNK,
                             kv_len=kv_len, pad_id=pad_id)
    chunks.append(chunk.tokens[:, :n])
    flags.append(chunk.any_active)
    done_steps += n
  tokens = jnp.concatenate([tok[:, None]] + chunks, axis=1)
  tokens = jnp.where(tokens < 0, pad_id, tokens)
  tokens = jnp.pad(tokens, ((0, 0), (0, max_new_tokens - tokens.shape[1])),
                   constant_values=pad_id)
  if eos_id is None:
    lengths = jnp.full((b,), tokens.shape[1], jnp.int32)
  else:
    is_eos = tokens == eos_id
    lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1,
                        max_new_tokens).astype(jnp.int32)
  return GenerateOutput(tokens=tokens, lengths=lengths)
