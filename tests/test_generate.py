"""Generation through the split: greedy == teacher-forced argmax, sampling, EOS, traces."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsun
from jaxsun import generation as gen
from jaxsun.generation import SamplingConfig, sample_logits
from tests.helpers import random_tokens, untied_split

split_forward = jax.jit(jaxsun.split_forward)


@pytest.mark.parametrize("which", jaxsun.LAST_PROMPT_TOKEN)
def test_greedy_generate_equals_teacher_forced_argmax_rollout(model, cfg, which):
  split = untied_split(model, last_prompt_token=which)
  prompts = random_tokens(0, (3, 9), cfg.vocab_size)
  lengths = jnp.array([9, 4, 1], jnp.int32)
  n_new = 10
  out = jaxsun.generate(split, prompts, lengths, max_new_tokens=n_new)
  assert out.tokens.shape == (3, n_new)
  np.testing.assert_array_equal(out.lengths, [n_new] * 3)
  for b in range(3):  # rebuild each sequence and score it teacher-forced
    seq = jnp.concatenate([prompts[b, :lengths[b]], out.tokens[b]])[None]
    logits = split_forward(split, seq, lengths[b:b + 1])
    rollout = jnp.argmax(logits[0, lengths[b] - 1:-1], axis=-1)
    np.testing.assert_array_equal(rollout, out.tokens[b])


def test_the_decode_tree_generates(model, cfg):
  """Same prefill tree, different decode trees -> different greedy continuations."""
  a = untied_split(model, seed=1)
  b = untied_split(model, seed=2)
  prompts = random_tokens(1, (4, 6), cfg.vocab_size)
  ta = jaxsun.generate(a, prompts, max_new_tokens=8).tokens
  tb = jaxsun.generate(b, prompts, max_new_tokens=8).tokens
  np.testing.assert_array_equal(ta[:, 0], tb[:, 0])  # first token: the prefill tree's
  assert not np.array_equal(ta[:, 1:], tb[:, 1:])


def test_eos_stops_a_row_and_pads_after_it(model, cfg):
  split = jaxsun.SplitModel.from_model(model)
  prompts = random_tokens(2, (2, 5), cfg.vocab_size)
  free = jaxsun.generate(split, prompts, max_new_tokens=8).tokens
  eos = int(free[0, 3])  # the token row 0 emits at step 3 (maybe earlier too)
  first = int(np.argmax(np.asarray(free[0]) == eos))
  pad = (eos + 1) % cfg.vocab_size
  out = jaxsun.generate(split, prompts, max_new_tokens=8, eos_id=eos, pad_id=pad)
  assert int(out.lengths[0]) == first + 1
  np.testing.assert_array_equal(out.tokens[0, :first + 1], free[0, :first + 1])
  assert (np.asarray(out.tokens[0, first + 1:]) == pad).all()
  row1_hits = np.flatnonzero(np.asarray(free[1]) == eos)
  expected1 = row1_hits[0] + 1 if row1_hits.size else 8
  assert int(out.lengths[1]) == expected1
  np.testing.assert_array_equal(out.tokens[1, :expected1], free[1, :expected1])


def test_all_rows_finished_stops_early(model, cfg, monkeypatch):
  split = jaxsun.SplitModel.from_model(model)
  prompts = random_tokens(3, (1, 4), cfg.vocab_size)
  first = int(jaxsun.generate(split, prompts, max_new_tokens=1).tokens[0, 0])
  calls = []
  for name in ("decode_step", "decode_slots"):
    real = getattr(gen, name)
    monkeypatch.setattr(gen, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
  out = jaxsun.generate(split, prompts, max_new_tokens=20, eos_id=first)
  assert int(out.lengths[0]) == 1 and not calls


def test_list_prompts_are_padded(model, cfg):
  split = jaxsun.SplitModel.from_model(model)
  out = jaxsun.generate(split, [[5, 6, 7], [8]], max_new_tokens=4)
  ref = jaxsun.generate(split, jnp.array([[5, 6, 7], [8, 0, 0]]), jnp.array([3, 1]),
                        max_new_tokens=4)
  np.testing.assert_array_equal(out.tokens, ref.tokens)


def test_decode_chunk_is_traced_once(model, cfg, monkeypatch):
  # 24 new tokens: the first from prefill, then on-device chunks of 16 and 7 steps, one
  # compiled function (the chunk length is a traced value; the KV bucket is the same).
  counted = chex.assert_max_traces(gen._decode_slots, n=1)
  monkeypatch.setattr(gen, "decode_slots", jax.jit(
      counted, static_argnames=("size", "kv_len", "pad_id"), donate_argnames="ds"))
  split = untied_split(model)
  prompts = random_tokens(4, (2, 5), cfg.vocab_size)
  key = jax.random.key(0)
  sampling = SamplingConfig(temperature=0.7, top_k=20)
  jaxsun.generate(split, prompts, max_new_tokens=24, sampling=sampling, key=key)
  # A second call with other values but the same shapes reuses the trace too.
  jaxsun.generate(split, prompts + 1, max_new_tokens=24, sampling=sampling,
                  key=jax.random.key(1))
  with pytest.raises(AssertionError, match="traced"):  # the guard itself works
    jaxsun.generate(split, random_tokens(4, (3, 5), cfg.vocab_size), max_new_tokens=2,
                    sampling=sampling, key=key)
  chex.clear_trace_counter()


def test_sampling_is_reproducible_with_explicit_keys(model, cfg):
  split = untied_split(model)
  prompts = random_tokens(5, (4, 3), cfg.vocab_size)
  sampling = SamplingConfig(temperature=1.5)
  run = lambda k: jaxsun.generate(split, prompts, max_new_tokens=10, sampling=sampling,
                                  key=jax.random.key(k)).tokens
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0), run(1))


N_DRAWS = 20_000
LOGITS = jnp.array([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5]])


def _frequencies(sampling):
  keys = jax.random.split(jax.random.key(0), N_DRAWS)
  draws = jax.jit(jax.vmap(lambda k: sample_logits(LOGITS, k, sampling)[0]))(keys)
  return np.bincount(np.asarray(draws), minlength=LOGITS.shape[1]) / N_DRAWS


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def test_temperature_sampling_follows_the_softmax():
  for t in (0.5, 1.0, 2.0):
    expected = _softmax(np.asarray(LOGITS[0], np.float64) / t)
    np.testing.assert_allclose(_frequencies(SamplingConfig(temperature=t)), expected,
                               atol=0.015)


def test_top_k_keeps_the_k_best_renormalised():
  logits = np.asarray(LOGITS[0], np.float64)
  top3 = np.argsort(-logits)[:3]
  expected = np.zeros_like(logits)
  expected[top3] = _softmax(logits[top3])
  np.testing.assert_allclose(_frequencies(SamplingConfig(temperature=1.0, top_k=3)),
                             expected, atol=0.015)


def test_top_p_keeps_the_nucleus_renormalised():
  logits = np.asarray(LOGITS[0], np.float64)
  probs = _softmax(logits)
  order = np.argsort(-probs)
  cum = np.cumsum(probs[order])
  n_keep = int(np.searchsorted(cum, 0.8) + 1)  # smallest prefix reaching 0.8
  expected = np.zeros_like(probs)
  expected[order[:n_keep]] = probs[order[:n_keep]] / probs[order[:n_keep]].sum()
  freq = _frequencies(SamplingConfig(temperature=1.0, top_p=0.8))
  np.testing.assert_allclose(freq, expected, atol=0.015)
  assert (freq[order[n_keep:]] == 0).all()


def test_greedy_is_argmax():
  logits = jax.random.normal(jax.random.key(0), (5, 50))
  np.testing.assert_array_equal(sample_logits(logits, None, SamplingConfig()),
                                jnp.argmax(logits, -1))
