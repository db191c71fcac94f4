"""The split forward: which tree runs which position, and what crosses between them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsun
from jaxsun.generation import SamplingConfig
from tests import reference
from tests.helpers import perturbed, random_tokens, rel_err, untied_split

TOL = 1e-5
BOUNDARY = jnp.array([1, 5, 9, 14], jnp.int32)  # mixed prompt lengths, incl. a 1-token prompt
S = 16

split_forward = jax.jit(jaxsun.split_forward, static_argnames="return_cache")


@pytest.mark.parametrize("which", jaxsun.LAST_PROMPT_TOKEN)
def test_shared_arrays_equal_plain_forward(model, cfg, which):
  tokens = random_tokens(0, (4, S), cfg.vocab_size)
  tied = jaxsun.SplitModel.from_model(model, last_prompt_token=which)
  plain = jax.jit(lambda t: model(t)[0])(tokens)
  assert rel_err(split_forward(tied, tokens, BOUNDARY), plain) <= TOL
  # Untied slots holding the same arrays take the two-pass path: still the same function.
  untied = tied.untie()
  assert not untied.tied and untied.decode is untied.prefill  # no copy
  assert rel_err(split_forward(untied, tokens, BOUNDARY), plain) <= TOL


@pytest.mark.parametrize("which", jaxsun.LAST_PROMPT_TOKEN)
def test_split_forward_matches_numpy_reference(model, cfg, which):
  split = untied_split(model, last_prompt_token=which)
  tokens = random_tokens(1, (4, S), cfg.vocab_size)
  logits = split_forward(split, tokens, BOUNDARY)
  pp = reference.numpy_params(split.prefill)
  pd = reference.numpy_params(split.decode)
  for b in range(4):
    n_prefill = int(BOUNDARY[b]) - (which == "decode")
    ref = reference.split_forward_row(pp, pd, cfg, np.asarray(tokens[b]), n_prefill)
    assert rel_err(logits[b], ref) <= TOL


def test_perturbing_decode_tree_leaves_prompt_kv_unchanged(model, cfg):
  split_a = untied_split(model, seed=1)
  split_b = split_a.replace(decode=perturbed(split_a.decode, seed=2))
  tokens = random_tokens(2, (4, S), cfg.vocab_size)
  logits_a, cache_a = split_forward(split_a, tokens, BOUNDARY, return_cache=True)
  logits_b, cache_b = split_forward(split_b, tokens, BOUNDARY, return_cache=True)
  prompt = (jnp.arange(S)[None, :] < BOUNDARY[:, None])  # bool[B, S]
  for la, lb in zip(cache_a.layers, cache_b.layers):
    for xa, xb in ((la.k, lb.k), (la.v, lb.v)):
      np.testing.assert_array_equal(np.asarray(xa)[prompt], np.asarray(xb)[prompt])
      assert not np.allclose(np.asarray(xa)[~prompt], np.asarray(xb)[~prompt])
  np.testing.assert_array_equal(np.asarray(logits_a)[prompt], np.asarray(logits_b)[prompt])
  assert rel_err(np.asarray(logits_a)[~prompt], np.asarray(logits_b)[~prompt]) > 1e-2


@pytest.mark.parametrize("which", jaxsun.LAST_PROMPT_TOKEN)
def test_continuation_equals_decoding_from_a_prefill_tree_cache(model, cfg, which):
  """split_forward's continuation logits == prefill-tree cache + decode-tree steps."""
  split = untied_split(model, last_prompt_token=which)
  tokens = random_tokens(3, (4, S), cfg.vocab_size)
  expected = split_forward(split, tokens, BOUNDARY)
  p = int(BOUNDARY.max())
  cache = split.prefill_module().init_cache(4, S)
  first_logits, cache = jaxsun.prefill(split, tokens[:, :p], BOUNDARY, cache)
  n_prefill = BOUNDARY - (which == "decode")
  np.testing.assert_array_equal(cache.lengths, n_prefill)
  if which == "prefill":  # the prefill tree emitted the first output token
    assert rel_err(first_logits, expected[jnp.arange(4), BOUNDARY - 1]) <= TOL
  for i in range(S - int(n_prefill.max())):
    pos = n_prefill + i  # i32[B] next position of each row
    step_tokens = jnp.take_along_axis(tokens, pos[:, None], 1)[:, 0]
    _, logits, cache = jaxsun.decode_step(split, step_tokens, cache, None, SamplingConfig())
    assert rel_err(logits, expected[jnp.arange(4), pos]) <= TOL


def test_gradient_reaches_prefill_tree_through_the_kv_cache(model, cfg):
  """With the decode tree emitting every scored token, the only path from the loss to
  the prefill tree is the prompt KV: its gradient must be non-zero and correct."""
  split = untied_split(model, last_prompt_token="decode")
  tokens = random_tokens(4, (4, S), cfg.vocab_size)

  def loss_of_prefill(prefill_tree):
    return jaxsun.next_token_loss(split.replace(prefill=prefill_tree), tokens, BOUNDARY)

  grads = jax.jit(jax.grad(loss_of_prefill))(split.prefill)
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert min(norms) >= 0 and sum(norms) > 1e-3
  k_grad = grads["layers"][cfg.n_layers - 1]["attn"]["k_proj"]["kernel"][...]
  assert float(jnp.abs(k_grad).max()) > 1e-5  # the last layer's keys matter
  # Directional derivative against a central finite difference.
  direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(9), x.shape, x.dtype),
                           split.prefill)
  eps = 1e-3
  f = jax.jit(loss_of_prefill)
  plus = f(jax.tree.map(lambda x, d: x + eps * d, split.prefill, direction))
  minus = f(jax.tree.map(lambda x, d: x - eps * d, split.prefill, direction))
  fd = (float(plus) - float(minus)) / (2 * eps)
  analytic = sum(float(jnp.vdot(g, d)) for g, d in
                 zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
  assert analytic == pytest.approx(fd, rel=2e-2)


def test_tied_gradient_is_the_sum_of_the_two_tree_gradients(model, cfg):
  tokens = random_tokens(5, (4, S), cfg.vocab_size)
  tied = jaxsun.SplitModel.from_model(model)
  grad = jax.jit(jax.grad(jaxsun.next_token_loss))
  g_tied = grad(tied, tokens, BOUNDARY)
  g_untied = grad(tied.untie(), tokens, BOUNDARY)
  for gt, gp, gd in zip(jax.tree.leaves(g_tied.prefill), jax.tree.leaves(g_untied.prefill),
                        jax.tree.leaves(g_untied.decode)):
    np.testing.assert_allclose(gt, gp + gd, rtol=1e-4, atol=1e-6)


def _windowed_loss(split, tokens, boundary, window):
  return jaxsun.next_token_loss(split, tokens, boundary, window=window)


@pytest.mark.parametrize("which", jaxsun.LAST_PROMPT_TOKEN)
def test_prefill_window_gives_the_same_logits_and_gradients(model, cfg, which):
  split = untied_split(model, last_prompt_token=which)
  s = 32
  boundary = jnp.array([9, 12, 15, 17], jnp.int32)
  tokens = random_tokens(7, (4, s), cfg.vocab_size)
  full = jaxsun.split_forward(split, tokens, boundary)
  window = jaxsun.split.prefill_window(split, np.asarray(boundary), s, bucket=4)
  lo, hi = window
  assert 0 < lo and hi < s  # a real window: each tree runs fewer than S positions
  windowed = jax.jit(jaxsun.split_forward, static_argnames="window")(
      split, tokens, boundary, window=window)
  assert rel_err(windowed, full) <= TOL
  grad = jax.jit(jax.grad(_windowed_loss), static_argnames="window")
  g_full = grad(split, tokens, boundary, None)
  g_win = grad(split, tokens, boundary, window)
  for a, b in zip(jax.tree.leaves(g_win), jax.tree.leaves(g_full)):
    b = np.asarray(b)  # some are exactly zero (e.g. the unused prefill head): atol
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(np.abs(b).max(), 1e-6))
  # Control: a window that leaves a row's boundary outside is not the same function.
  bad = (lo + 4, hi)
  wrong = jaxsun.split_forward(split, tokens, boundary, window=bad)
  assert rel_err(wrong, full) > 1e-3


def test_bad_windows_and_a_bare_decoder_are_clear_errors(model, cfg):
  split = untied_split(model)
  tokens = random_tokens(0, (4, S), cfg.vocab_size)
  with pytest.raises(ValueError, match="window"):
    jaxsun.split_forward(split, tokens, BOUNDARY, window=(5, 2))
  with pytest.raises(ValueError, match="window"):
    jaxsun.split_forward(split, tokens, BOUNDARY, window=(0, S + 1))
  for fn in (lambda: jaxsun.split_forward(model, tokens, BOUNDARY),
             lambda: jaxsun.generate(model, tokens[:, :4], max_new_tokens=2),
             lambda: jaxsun.next_token_loss(model, tokens, BOUNDARY)):
    with pytest.raises(TypeError, match=r"got a Decoder; wrap it with "
                                        r"jaxsun.SplitModel.from_model\(decoder\)"):
      fn()
  with pytest.raises(TypeError, match="must be a jaxsun.SplitModel, got dict"):
    jaxsun.split_forward({}, tokens, BOUNDARY)
