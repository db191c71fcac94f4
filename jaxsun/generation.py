"""Generation through the split: jitted prefill, jitted decode step, sampling, `generate`.

    out = generate(split, prompts, prompt_lengths, max_new_tokens=16,
                   sampling=SamplingConfig(temperature=0.8, top_p=0.9), key=key, eos_id=2)

The prefill tree builds the KV cache from the prompts; the decode tree extends it one
token per step. Decoding runs on device in chunks of up to `DECODE_CHUNK` steps
(`decode_chunk`, a `lax.fori_loop`): the host syncs once per chunk, not once per token,
and the loop on device stops early once every row has emitted `eos_id`. `prefill`,
`decode_step` and `decode_chunk` are jitted once per (model, shapes, sampling) and reused.
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

DECODE_CHUNK = 16  # at most this many decode steps per device call


def _decode_chunk(split: SplitModel, tok: jax.Array, done: jax.Array,
                  cache: kv_cache.KVCache, key: jax.Array | None, first_step: jax.Array,
                  n_steps: jax.Array, *, size: int, sampling: SamplingConfig,
                  eos_id: int | None, pad_id: int):
  """Up to `n_steps` (<= `size`) decode steps on device, stopping early once every row
  is done. Returns (i32[B, size] tokens, pad after the steps run; last token; done; cache).

  Step j feeds `tok` (pad for finished rows), draws with `fold_in(key, first_step + j)`
  and marks rows that emitted `eos_id` as done; finished rows emit `pad_id`. `n_steps`
  is a traced value, so one compilation serves every chunk length.
  """
  b = tok.shape[0]

  def cond(carry):
    j, _, done, _, _ = carry
    go = j < n_steps
    return go if eos_id is None else go & ~jnp.all(done)

  def body(carry):
    j, tok, done, cache, out = carry
    step_key = None if key is None else jax.random.fold_in(key, first_step + j)
    nxt, _, cache = _decode_step(split, jnp.where(done, pad_id, tok), cache, step_key,
                                 sampling)
    nxt = jnp.where(done, pad_id, nxt)
    if eos_id is not None:
      done = done | (nxt == eos_id)
    return j + 1, nxt, done, cache, jax.lax.dynamic_update_slice_in_dim(
        out, nxt[:, None], j, axis=1)

  out = jnp.full((b, size), pad_id, jnp.int32)
  _, tok, done, cache, out = jax.lax.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), tok, done, cache, out))
  return out, tok, done, cache


decode_chunk = jax.jit(_decode_chunk,
                       static_argnames=("size", "sampling", "eos_id", "pad_id"),
                       donate_argnames="cache")


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


def decode_loop(split: SplitModel, tok: jax.Array, cache: kv_cache.KVCache, *,
                max_new_tokens: int, sampling: SamplingConfig, key: jax.Array | None,
                eos_id: int | None, pad_id: int) -> GenerateOutput:
  """Decode steps from a first output token `tok` (i32[B]) and the cache after it.

  Step i draws with `fold_in(key, i)`; rows stop after `eos_id` and are filled with
  `pad_id`. `generate` and the shared-module paths (`jaxsun.shared_inference`) end here.
  """
  b = tok.shape[0]
  out = [tok[:, None]]
  done = jnp.zeros((b,), bool) if eos_id is None else tok == eos_id
  step, remaining = 1, max_new_tokens - 1
  while remaining > 0:
    if eos_id is not None and bool(jnp.all(done)):  # one host sync per chunk
      break
    n = min(remaining, DECODE_CHUNK)
    chunk, tok, done, cache = decode_chunk(
        split, tok, done, cache, key, jnp.asarray(step, jnp.int32), jnp.asarray(n, jnp.int32),
        size=DECODE_CHUNK, sampling=sampling, eos_id=eos_id, pad_id=pad_id)
    out.append(chunk[:, :n])
    step, remaining = step + n, remaining - n
  tokens = jnp.concatenate(out, axis=1)
  tokens = jnp.pad(tokens, ((0, 0), (0, max_new_tokens - tokens.shape[1])),
                   constant_values=pad_id)
  if eos_id is None:
    lengths = jnp.full((b,), tokens.shape[1], jnp.int32)
  else:
    is_eos = tokens == eos_id
    lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1,
                        max_new_tokens).astype(jnp.int32)
  return GenerateOutput(tokens=tokens, lengths=lengths)
