"""Inference that shares one module across task models: SUN's decode, PrefillShare's prefill.

**SUN: one decode batch for many task models.** Every SUN task model has its own
prefill tree and the same frozen decode tree. `sun_generate` takes a batch whose rows
carry a model index: each row's prompt is prefilled by its own task's prefill tree
(rows of one model together), the KV rows are inserted into one cache, and ONE decode
tree then runs one jitted `decode_step` per token for all rows of all models. The
decode step sees only the shared tree and the cache, so it is the same compiled
function whatever the mix of models.

    out = sun_generate([math_model, code_model], prompts, lengths,
                       model_ids=[0, 1, 1, 0], max_new_tokens=32)

**PrefillShare: one prompt KV for many task models.** PrefillShare task models share
the frozen prefill tree, so one prefill of a shared context serves all of them (a
multi-agent pattern: same context, different specialised models), and a growing
context prefills only its new suffix on top of the cached prefix:

    ctx = SharedContext.prefill(base, context_tokens, capacity=512)
    outs = ctx.generate([planner, coder, critic], max_new_tokens=64)  # one prefill
    ctx = ctx.extend(base, follow_up_tokens)                          # suffix only

The results equal separate full runs of each task model (`jaxsun.generate`), which the
tests check token for token; `SharedContext.flops` counts the prefill FLOPs run and
`flops_saved` those saved against separate full prefills.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsun import kv_cache
from jaxsun import validation
from jaxsun.config import ModelConfig
from jaxsun.generation import (GenerateOutput, SamplingConfig, _sample, bucket, decode_loop,
                               decode_step, pad_prompts, prefill)
from jaxsun.nn.decoder import Mode
from jaxsun.split import SplitModel, check_split, prefill_lengths


# ----------------------------------------------------------------------------- shared


def same_tree(a, b) -> bool:
  """Whether two parameter trees hold the same arrays (identical objects or bitwise)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if len(la) != len(lb) or jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(x is y or (x.shape == y.shape and x.dtype == y.dtype and bool((x == y).all()))
             for x, y in zip(la, lb))


def forward_flops(cfg: ModelConfig, start: int, end: int) -> float:
  """Forward FLOPs of running positions [start, end) of one sequence (causal context).

  2 FLOPs per matmul parameter per token (the `ModelConfig.flops_per_token` matmuls,
  forward only), plus the score and value matmuls over the keys each position sees.
  """
  d = cfg.d_model
  attn = d * cfg.q_dim + 2 * d * cfg.kv_dim + cfg.q_dim * d
  matmul_params = cfg.n_layers * (attn + 3 * d * cfg.d_ff) + d * cfg.vocab_size
  keys = sum(range(start + 1, end + 1))  # position p attends to p + 1 keys
  return 2.0 * matmul_params * (end - start) + 4.0 * cfg.n_layers * cfg.q_dim * keys


def _decoder_only(split: SplitModel) -> SplitModel:
  """A tied SplitModel of just `split`'s decode tree (what a decode step needs)."""
  return SplitModel(graphdef=split.decode_gd, prefill=split.decode_state,
                    last_prompt_token=split.last_prompt_token)


def _prefill_only(split: SplitModel) -> SplitModel:
  """`split`'s prefill tree alone (what a prefill needs)."""
  return SplitModel(graphdef=split.graphdef, prefill=split.prefill,
                    last_prompt_token=split.last_prompt_token)


@jax.jit
def _insert_rows(cache: kv_cache.KVCache, rows_cache: kv_cache.KVCache,
                 rows: jax.Array) -> kv_cache.KVCache:
  """Writes `rows_cache` row i into `cache` row `rows[i]` (every array is batch-major)."""
  return jax.tree.map(lambda big, small: big.at[rows].set(small.astype(big.dtype)),
                      cache, rows_cache)


def _check_sampling(sampling: SamplingConfig, key) -> None:
  if not sampling.greedy and key is None:
    raise ValueError("key (a jax.random key) is required when sampling.temperature > 0")


def _step_key(key, i):
  return None if key is None else jax.random.fold_in(key, i)


def _as_prompts(prompts, prompt_lengths, pad_id):
  if isinstance(prompts, (list, tuple)):
    if prompt_lengths is not None:
      raise ValueError("pass prompt_lengths only with an array of padded prompts")
    return pad_prompts(prompts, pad_id)
  prompts = np.asarray(prompts, np.int32)
  if prompt_lengths is None:
    prompt_lengths = np.full((prompts.shape[0],), prompts.shape[1], np.int32)
  return prompts, np.asarray(prompt_lengths, np.int32)


def _check_budget(cfg: ModelConfig, longest: int, max_new_tokens: int, eos_id, pad_id):
  validation.check_positive_int("max_new_tokens", max_new_tokens)
  if longest + max_new_tokens > cfg.max_len:
    raise ValueError(f"max_new_tokens={max_new_tokens} with a prompt of length {longest} "
                     f"exceeds ModelConfig.max_len={cfg.max_len}")
  if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
    raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
  if not 0 <= pad_id < cfg.vocab_size:
    raise ValueError(f"pad_id={pad_id} is outside the vocabulary [0, {cfg.vocab_size})")


# ----------------------------------------------------------------------------- SUN


def check_shared_decode(task_models: Sequence[SplitModel]) -> SplitModel:
  """Checks that the task models share one decode tree; returns it as a decoder-only
  split. Raises a ValueError naming the first model that differs."""
  if not task_models:
    raise ValueError("task_models is empty")
  models = [check_split(m, f"task_models[{i}]") for i, m in enumerate(task_models)]
  first = models[0]
  for i, m in enumerate(models[1:], 1):
    if m.last_prompt_token != first.last_prompt_token:
      raise ValueError(f"task_models[{i}].last_prompt_token={m.last_prompt_token!r} but "
                       f"task_models[0] has {first.last_prompt_token!r}; a shared decode "
                       "batch needs one convention")
    if m.decode_gd != first.decode_gd or not same_tree(m.decode_state, first.decode_state):
      raise ValueError(f"task_models[{i}] has a different decode tree from task_models[0]: "
                       "SUN task models must share one frozen decode tree (train them "
                       "with trainability='prefill' from the same base)")
  return _decoder_only(first)


def sun_generate(task_models: Sequence[SplitModel], prompts, prompt_lengths=None, *,
                 model_ids, max_new_tokens: int,
                 sampling: SamplingConfig = SamplingConfig(), key: jax.Array | None = None,
                 eos_id: int | None = None, pad_id: int = 0) -> GenerateOutput:
  """Generates for a batch mixing requests of several SUN task models.

  Args:
    task_models: SplitModels that share one decode tree (`check_shared_decode`); each
      has its own prefill tree.
    prompts: i32[B, P] right-padded prompts, or a list of token lists.
    prompt_lengths: i32[B] true prompt lengths (default: P, or the list lengths).
    model_ids: i32[B] index into `task_models` of each row's model.
    max_new_tokens, sampling, key, eos_id, pad_id: as in `jaxsun.generate`.

  Returns:
    GenerateOutput(tokens i32[B, max_new_tokens], lengths i32[B]); greedy tokens equal
    `jaxsun.generate(task_models[model_ids[b]], ...)` row by row.
  """
  dec = check_shared_decode(task_models)
  cfg = task_models[0].cfg
  prompts, prompt_lengths = _as_prompts(prompts, prompt_lengths, pad_id)
  validation.check_tokens("prompts", prompts, cfg.vocab_size)
  b, p = prompts.shape
  validation.check_lengths("prompt_lengths", prompt_lengths, b, 1, p)
  model_ids = np.asarray(model_ids)
  if model_ids.shape != (b,) or not np.issubdtype(model_ids.dtype, np.integer):
    raise ValueError(f"model_ids must be {b} integers (one per row), got {model_ids!r:.80}")
  if model_ids.min() < 0 or model_ids.max() >= len(task_models):
    raise ValueError(f"model_ids must index task_models (0..{len(task_models) - 1}), got "
                     f"values in [{model_ids.min()}, {model_ids.max()}]")
  _check_budget(cfg, int(prompt_lengths.max()), max_new_tokens, eos_id, pad_id)
  _check_sampling(sampling, key)

  decoder = dec.prefill_module()
  cache_len = min(cfg.max_len, p + max_new_tokens)
  cache = decoder.init_cache(b, cache_len)
  first_logits = jnp.zeros((b, cfg.vocab_size), jnp.float32)
  # Prefill: the rows of each model through that model's prefill tree, then into the cache.
  for m in np.unique(model_ids):
    rows = np.flatnonzero(model_ids == m)
    g = bucket(len(rows), b)
    rows = np.concatenate([rows, np.full(g - len(rows), rows[-1])])  # repeats: same values
    pre = _prefill_only(task_models[int(m)])
    logits_m, cache_m = prefill(pre, jnp.asarray(prompts[rows]),
                                jnp.asarray(prompt_lengths[rows]),
                                decoder.init_cache(g, cache_len))
    cache = _insert_rows(cache, cache_m, jnp.asarray(rows, jnp.int32))
    first_logits = first_logits.at[rows].set(logits_m)
  if dec.last_prompt_token == "prefill":  # each task's prefill tree picked its first token
    tok = _sample(first_logits, _step_key(key, 0), sampling)
  else:  # the shared decode tree runs the last prompt token on each task's prefill KV
    last = jnp.take_along_axis(jnp.asarray(prompts), jnp.asarray(prompt_lengths - 1)[:, None],
                               axis=1)[:, 0]
    tok, _, cache = decode_step(dec, last, cache, _step_key(key, 0), sampling)
  return decode_loop(dec, tok, cache, max_new_tokens=max_new_tokens, sampling=sampling,
                      key=key, eos_id=eos_id, pad_id=pad_id)


# ----------------------------------------------------------------------------- PrefillShare


@jax.jit
def _extend(split: SplitModel, tokens: jax.Array, n_new: jax.Array, cache: kv_cache.KVCache):
  """Prefill tree over `tokens` (i32[B, T], n_new[b] valid) appended after each row's
  cached prefix. Returns (f32[B, V] logits at each row's last new token, cache)."""
  pre = split.prefill_module()
  start = cache.lengths
  positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
  h, cache = pre.hidden(tokens, mode=Mode.PREFILL, positions=positions, cache=cache,
                        new_lengths=start + n_new)
  last = jnp.take_along_axis(h, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]
  return pre.logits(last), cache


@dataclasses.dataclass(frozen=True)
class SharedContext:
  """A context prefilled once by a shared prefill tree, for any PrefillShare task model.

  Rows are independent contexts (sessions). With `last_prompt_token == "decode"` (the
  PrefillShare regime) the cache holds every context token but the last, which each
  task model's decode tree runs itself (so the task model picks the first output
  token); with "prefill" it holds them all and `logits` give the first token.

  Attributes:
    prefill_tree: the shared prefill tree (a prefill-only SplitModel) that made the KV.
    cache: the KV cache, rows of `capacity` slots (`cache.lengths` = cached tokens).
    tokens: i32[B, L] host copy of each context, right-padded; `lengths` i32[B].
    logits: f32[B, V] prefill logits at the last cached position (for "prefill").
    flops: a running account: "prefill_run", the prefill FLOPs this context has spent
      (its first prefill and every suffix); "separate_prefill", what prefilling the full
      context separately for every consumer would have spent; "consumers", the task
      models served; `flops_saved` is the difference.
  """

  prefill_tree: SplitModel
  cache: kv_cache.KVCache
  tokens: np.ndarray
  lengths: np.ndarray
  logits: jax.Array | None
  flops: dict

  @property
  def last_prompt_token(self) -> str:
    return self.prefill_tree.last_prompt_token

  @property
  def capacity(self) -> int:
    return self.cache.max_len

  @property
  def flops_saved(self) -> float:
    """Prefill FLOPs saved against a full, separate prefill per consumer."""
    return self.flops["separate_prefill"] - self.flops["prefill_run"]

  @classmethod
  def prefill(cls, base: SplitModel, contexts, context_lengths=None, *, capacity: int,
              pad_id: int = 0) -> SharedContext:
    """Prefills contexts once with `base`'s prefill tree (the tree every consumer shares).

    Args:
      base: the base model or any task model whose prefill tree is the shared one; its
        `last_prompt_token` must match the consumers'.
      contexts: i32[B, L] right-padded, or a list of token lists.
      context_lengths: i32[B] (default: L, or the list lengths).
      capacity: cache slots per row: the longest context plus everything later turns
        and generation will add (at most `ModelConfig.max_len`).
      pad_id: filler of padded positions.
    """
    base = check_split(base, "base")
    cfg = base.cfg
    contexts, context_lengths = _as_prompts(contexts, context_lengths, pad_id)
    validation.check_tokens("contexts", contexts, cfg.vocab_size)
    b, length = contexts.shape
    validation.check_lengths("context_lengths", context_lengths, b, 1, length)
    validation.check_positive_int("capacity", capacity)
    if capacity > cfg.max_len or capacity < int(context_lengths.max()):
      raise ValueError(f"capacity={capacity} must hold the longest context "
                       f"({int(context_lengths.max())}) and be <= ModelConfig.max_len="
                       f"{cfg.max_len}")
    pre = _prefill_only(base)
    n_cached = np.asarray(prefill_lengths(base, context_lengths))
    cache = pre.prefill_module().init_cache(b, capacity)
    logits, cache = _extend(pre, jnp.asarray(contexts), jnp.asarray(n_cached, jnp.int32),
                            cache)
    run = sum(forward_flops(cfg, 0, int(n)) for n in n_cached)
    return cls(prefill_tree=pre, cache=cache, tokens=contexts.copy(),
               lengths=context_lengths.copy(), logits=logits,
               flops={"prefill_run": run, "separate_prefill": 0.0, "consumers": 0})

  def extend(self, base: SplitModel, suffixes, suffix_lengths=None, *,
             pad_id: int = 0) -> SharedContext:
    """The context grown by `suffixes` (a follow-up turn): only the new tokens (and, in
    the "decode" convention, the previous last token) run through the prefill tree.

    Args:
      base: a model with the shared prefill tree (checked against the one that made
        this context).
      suffixes: i32[B, T] right-padded new tokens per row, or a list of token lists.
      suffix_lengths: i32[B] (default: T, or the list lengths).
    """
    base = check_split(base, "base")
    if not same_tree(base.prefill, self.prefill_tree.prefill):
      raise ValueError("base has a different prefill tree from the one that built this "
                       "SharedContext; a shared KV can only be extended by its own tree")
    suffixes, suffix_lengths = _as_prompts(suffixes, suffix_lengths, pad_id)
    b = self.tokens.shape[0]
    if suffixes.shape[0] != b:
      raise ValueError(f"suffixes has {suffixes.shape[0]} rows, the context has {b}")
    validation.check_lengths("suffix_lengths", suffix_lengths, b, 1, suffixes.shape[1])
    new_lengths = self.lengths + suffix_lengths
    if int(new_lengths.max()) > self.capacity:
      raise ValueError(f"the extended context ({int(new_lengths.max())} tokens) exceeds "
                       f"capacity={self.capacity}")
    width = int(new_lengths.max())
    tokens = np.full((b, width), pad_id, np.int32)
    for r in range(b):
      n, t = int(self.lengths[r]), int(suffix_lengths[r])
      tokens[r, :n] = self.tokens[r, :n]
      tokens[r, n:n + t] = suffixes[r, :t]
    cached = np.asarray(self.cache.lengths)
    n_cached = np.asarray(prefill_lengths(self.prefill_tree, new_lengths))
    # New tokens for the prefill tree: from the first uncached one to the new boundary.
    n_new = n_cached - cached
    chunk = np.full((b, max(1, int(n_new.max()))), pad_id, np.int32)
    if int(cached.max()) + chunk.shape[1] > self.capacity:  # static chunk on every row
      raise ValueError(f"capacity={self.capacity} is too small to extend these rows at "
                       f"once (needs {int(cached.max()) + chunk.shape[1]}); extend rows of "
                       "similar length together or use a larger capacity")
    for r in range(b):
      chunk[r, :n_new[r]] = tokens[r, cached[r]:n_cached[r]]
    cache = jax.tree.map(jnp.copy, self.cache)  # this context stays usable
    logits, cache = _extend(self.prefill_tree, jnp.asarray(chunk), jnp.asarray(n_new, jnp.int32),
                            cache)
    cfg = self.prefill_tree.cfg
    run = sum(forward_flops(cfg, int(c), int(n)) for c, n in zip(cached, n_cached))
    flops = dict(self.flops, prefill_run=self.flops["prefill_run"] + run)
    return dataclasses.replace(self, cache=cache, tokens=tokens, lengths=new_lengths,
                               logits=logits, flops=flops)

  def check_consumer(self, model: SplitModel, i: int = 0) -> None:
    model = check_split(model, f"task_models[{i}]")
    if model.last_prompt_token != self.last_prompt_token:
      raise ValueError(f"task_models[{i}].last_prompt_token={model.last_prompt_token!r} "
                       f"but the context was prefilled for {self.last_prompt_token!r}")
    if model.graphdef != self.prefill_tree.graphdef or not same_tree(
        model.prefill, self.prefill_tree.prefill):
      raise ValueError(f"task_models[{i}] has a different prefill tree from the shared one: "
                       "PrefillShare task models must share the frozen prefill tree (train "
                       "them with trainability='decode' from the same base)")

  def generate(self, task_models: Sequence[SplitModel], *, max_new_tokens: int,
               sampling: SamplingConfig = SamplingConfig(), key: jax.Array | None = None,
               eos_id: int | None = None, pad_id: int = 0) -> list[GenerateOutput]:
    """Each task model continues every context from the one shared KV.

    Returns:
      One GenerateOutput per task model; greedy tokens equal `jaxsun.generate(model,
      full context)`.
    """
    if not task_models:
      raise ValueError("task_models is empty")
    for i, m in enumerate(task_models):
      self.check_consumer(m, i)
    cfg = self.prefill_tree.cfg
    _check_budget(cfg, int(self.lengths.max()), max_new_tokens, eos_id, pad_id)
    if int(self.lengths.max()) + max_new_tokens > self.capacity:
      raise ValueError(f"max_new_tokens={max_new_tokens} after a context of "
                       f"{int(self.lengths.max())} tokens exceeds capacity={self.capacity}")
    _check_sampling(sampling, key)
    outs = []
    last = jnp.asarray(self.tokens[np.arange(len(self.lengths)), self.lengths - 1])
    for m in task_models:
      dec = _decoder_only(m)
      cache = jax.tree.map(jnp.copy, self.cache)  # decode_step donates its cache
      if self.last_prompt_token == "prefill":
        tok = _sample(self.logits, _step_key(key, 0), sampling)
      else:
        tok, _, cache = decode_step(dec, last, cache, _step_key(key, 0), sampling)
      outs.append(decode_loop(dec, tok, cache, max_new_tokens=max_new_tokens,
                               sampling=sampling, key=key, eos_id=eos_id, pad_id=pad_id))
    n_cached = np.asarray(self.cache.lengths)
    separate = len(task_models) * sum(forward_flops(cfg, 0, int(n)) for n in n_cached)
    self.flops["separate_prefill"] += separate  # this context's running account
    self.flops["consumers"] += len(task_models)
    return outs
