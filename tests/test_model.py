"""The decoder against an independent float64 reference, and the modes against each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsun
from jaxsun.nn import Mode, apply_rope
from tests import reference
from tests.helpers import jitted, perturbed, random_tokens, rel_err

TOL = 1e-5


@pytest.mark.parametrize("tie", [True, False])
def test_forward_matches_numpy_reference(cfg, tie):
  cfg = cfg.replace(tie_embeddings=tie, rope_theta=500.0)
  model = jaxsun.Decoder(cfg, rngs=nnx.Rngs(3))
  graphdef, state = nnx.split(model)
  state = perturbed(state, seed=4)  # norm scales away from 1 as well
  model = nnx.merge(graphdef, state)
  tokens = random_tokens(5, (2, 12), cfg.vocab_size)
  logits, _ = jitted(model)(tokens)
  params = reference.numpy_params(state)
  for b in range(2):
    ref = reference.forward_row(params, cfg, np.asarray(tokens[b]))
    assert rel_err(logits[b], ref) <= TOL


def test_bfloat16_compute_stays_close_to_float32(cfg):
  tokens = random_tokens(0, (2, 16), cfg.vocab_size)
  f32 = jitted(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))(tokens)[0]
  bf16 = jitted(jaxsun.Decoder(cfg.replace(compute_dtype="bfloat16"), rngs=nnx.Rngs(0)))(tokens)[0]
  assert bf16.dtype == jnp.float32  # logits are float32 whatever the compute dtype
  assert 1e-4 < rel_err(bf16, f32) < 5e-2  # bf16 really ran, and is still close
  stored = jaxsun.Decoder(cfg.replace(param_dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert {x.dtype for x in jax.tree.leaves(nnx.state(stored))} == {jnp.dtype(jnp.bfloat16)}
  assert 0 < rel_err(jitted(stored)(tokens)[0], f32) < 5e-2


def test_rope_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
  def score(m, n):
    qm = apply_rope(q, jnp.array([[m]]), 10_000.0)
    kn = apply_rope(k, jnp.array([[n]]), 10_000.0)
    return float(jnp.sum(qm * kn))
  assert score(7, 3) == pytest.approx(score(24, 20), rel=1e-5)
  assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)


def _prefill_then_decode(model, tokens, prefix):
  b, s = tokens.shape
  cache = model.init_cache(b, s)
  apply = jitted(model)
  logits, cache = apply(tokens[:, :prefix], mode=Mode.PREFILL, cache=cache)
  out = [logits]
  for t in range(prefix, s):
    step_logits, cache = apply(tokens[:, t:t + 1], mode=Mode.DECODE, cache=cache)
    out.append(step_logits)
  return jnp.concatenate(out, axis=1), cache


@pytest.mark.parametrize("prefix", [1, 9, "max_len-1"])
def test_full_forward_equals_prefill_then_decode(cfg, prefix):
  cfg = cfg.replace(max_len=20)
  model = jaxsun.Decoder(cfg, rngs=nnx.Rngs(0))
  prefix = cfg.max_len - 1 if prefix == "max_len-1" else prefix
  tokens = random_tokens(1, (3, cfg.max_len), cfg.vocab_size)
  full, _ = jitted(model)(tokens, mode=Mode.TRAIN)
  stepped, cache = _prefill_then_decode(model, tokens, prefix)
  assert rel_err(stepped, full) <= TOL
  np.testing.assert_array_equal(cache.lengths, [cfg.max_len] * 3)


def test_mixed_prompt_lengths_in_one_batch(model, cfg):
  """Each row is prefilled to its own length, then all rows decode in lockstep."""
  s = 24
  tokens = random_tokens(2, (4, s), cfg.vocab_size)
  lengths = jnp.array([3, 11, 1, 16], jnp.int32)
  apply = jitted(model)
  full, _ = apply(tokens)
  cache = model.init_cache(4, s)
  logits, cache = apply(tokens[:, :16], mode=Mode.PREFILL, cache=cache, new_lengths=lengths)
  np.testing.assert_array_equal(cache.lengths, lengths)
  for b in range(4):  # prompt positions of each row
    assert rel_err(logits[b, :lengths[b]], full[b, :lengths[b]]) <= TOL
  for i in range(s - 16):
    pos = lengths + i
    step, cache = apply(jnp.take_along_axis(tokens, pos[:, None], 1), mode="decode",
                        cache=cache)
    expected = jnp.take_along_axis(full, pos[:, None, None], 1)
    assert rel_err(step, expected) <= TOL
  np.testing.assert_array_equal(cache.lengths, lengths + s - 16)


def test_chunked_prefill_equals_full_forward(model, cfg):
  tokens = random_tokens(3, (2, 30), cfg.vocab_size)
  apply = jitted(model)
  full, _ = apply(tokens)
  cache = model.init_cache(2, 32)
  a, cache = apply(tokens[:, :13], mode="prefill", cache=cache)
  b, cache = apply(tokens[:, 13:], mode="prefill", cache=cache)
  assert rel_err(jnp.concatenate([a, b], 1), full) <= TOL


def test_train_mode_equals_prefill_mode(model, cfg):
  tokens = random_tokens(4, (2, 16), cfg.vocab_size)
  apply = jitted(model)
  train, none = apply(tokens, mode="train")
  prefill, cache = apply(tokens, mode="prefill", cache=model.init_cache(2, 16))
  assert none is None and isinstance(cache, jaxsun.KVCache)
  assert rel_err(prefill, train) <= TOL


def test_segment_ids_isolate_packed_sequences(model, cfg):
  a = random_tokens(5, (1, 7), cfg.vocab_size)
  b = random_tokens(6, (1, 9), cfg.vocab_size)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.array([[0] * 7 + [1] * 9])
  pos = jnp.array([list(range(7)) + list(range(9))])
  apply = jitted(model)
  logits, _ = apply(packed, positions=pos, segment_ids=seg)
  assert rel_err(logits[:, 7:], apply(b)[0]) <= TOL
  assert rel_err(logits[:, :7], apply(a)[0]) <= TOL


def test_kv_cache_is_a_pytree_that_jit_passes_through(model, cfg):
  @jax.jit
  def step(state, tokens, cache):
    return nnx.merge(graphdef, state)(tokens, mode="prefill", cache=cache)
  graphdef, state = nnx.split(model)
  tokens = random_tokens(7, (2, 5), cfg.vocab_size)
  logits, cache = step(state, tokens, model.init_cache(2, 8))
  assert cache.max_len == 8 and cache.batch_size == 2
  assert cache.layers[0].k.shape == (2, 8, cfg.n_kv_heads, cfg.head_dim)
  assert rel_err(logits, jitted(model)(tokens)[0]) <= TOL
