"""Perplexity protocol: closed form on a uniform model, a naive per-window reference,
remainder dropping, batch padding, and the prefill/decode boundary of a split."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsun
from jaxsun.data import tokenizers
from jaxsun.eval import perplexity


def naive_nll(decoder, windows):
  """Mean next-token NLL over all windows, from a plain forward, in float64 numpy."""
  logits = np.asarray(decoder(jnp.asarray(windows))[0], np.float64)[:, :-1]
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = windows[:, 1:]
  return -np.mean(np.take_along_axis(logp, targets[..., None], -1))


@pytest.fixture
def ids(cfg):
  return np.asarray(jax.random.randint(jax.random.key(7), (5 * 32 + 11,), 0, cfg.vocab_size))


def test_uniform_model_has_perplexity_vocab_size(cfg):
  cfg = cfg.replace(tie_embeddings=False)
  model = jaxsun.Decoder(cfg, rngs=nnx.Rngs(0))
  model.lm_head.kernel[...] = jnp.zeros_like(model.lm_head.kernel[...])  # logits all 0
  split = jaxsun.SplitModel.from_model(model)
  ids = np.arange(100) % cfg.vocab_size
  res = perplexity.token_perplexity(split, ids, seq_len=16, batch_size=4)
  assert res.perplexity == pytest.approx(cfg.vocab_size, rel=1e-5)
  assert res.n_windows == 6 and res.dropped_tokens == 4 and res.n_tokens == 6 * 15


def test_matches_a_naive_reference_and_drops_the_remainder(model, ids):
  split = jaxsun.SplitModel.from_model(model)
  res = perplexity.token_perplexity(split, ids, seq_len=32, batch_size=2)  # 5 windows: pads
  windows = ids[: 5 * 32].reshape(5, 32)
  want = naive_nll(model, windows)
  assert res.nll == pytest.approx(want, rel=1e-5)
  assert res.perplexity == pytest.approx(math.exp(want), rel=1e-5)
  assert (res.n_windows, res.dropped_tokens, res.n_tokens) == (5, 11, 5 * 31)
  # Control: keeping the remainder as a short extra window would change the number.
  with_tail = naive_nll(model, np.concatenate([windows, ids[-32:][None]]))
  assert abs(with_tail - want) > 1e-4
  # Batch size does not matter.
  again = perplexity.token_perplexity(split, ids, seq_len=32, batch_size=8)
  assert again.nll == pytest.approx(res.nll, rel=1e-6)


def test_boundary_chooses_the_tree(model, ids):
  base = jaxsun.SplitModel.from_model(model)
  other = jax.tree.map(lambda x: x * 1.3, base.prefill)
  task = base.untie().replace(decode=other)
  decode_alone = jaxsun.SplitModel.from_model(nnx.merge(base.graphdef, other))
  p_all = perplexity.token_perplexity(task, ids, seq_len=32)
  assert p_all.nll == pytest.approx(
      perplexity.token_perplexity(base, ids, seq_len=32).nll, rel=1e-6)
  p_dec = perplexity.token_perplexity(task, ids, seq_len=32, boundary=4)
  # Reference through the decoder's own modes: the prefill tree fills the cache with the
  # first 4 tokens, the decode tree runs the rest of the window on top of it.
  windows = jnp.asarray(ids[: 5 * 32].reshape(5, 32))
  pre, dec = base.prefill_module(), decode_alone.prefill_module()
  logits_pre, cache = pre(windows[:, :4], mode="prefill", cache=pre.init_cache(5, 32))
  logits_dec, _ = dec(windows[:, 4:], mode="prefill", cache=cache)
  logp = jax.nn.log_softmax(jnp.concatenate([logits_pre, logits_dec], 1)[:, :-1])
  want = -float(jnp.mean(jnp.take_along_axis(logp, windows[:, 1:, None], -1)))
  assert p_dec.nll == pytest.approx(want, rel=1e-5)
  assert abs(p_dec.nll - p_all.nll) > 1e-3
  assert abs(p_dec.nll - perplexity.token_perplexity(decode_alone, ids, seq_len=32).nll) > 1e-3


def test_text_perplexity_joins_and_tokenizes(model):
  split = jaxsun.SplitModel.from_model(model.__class__(
      model.cfg.replace(vocab_size=259), rngs=nnx.Rngs(1)))
  tok = tokenizers.ByteTokenizer()
  texts = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind"]
  res = perplexity.text_perplexity(split, texts, tok, seq_len=16)
  direct = perplexity.token_perplexity(split, tok.encode("\n\n".join(texts)), seq_len=16)
  assert res == direct and res.n_windows == len("\n\n".join(texts).encode()) // 16


def test_bad_arguments_are_named(model):
  split = jaxsun.SplitModel.from_model(model)
  with pytest.raises(ValueError, match="fewer than one window"):
    perplexity.token_perplexity(split, [1, 2, 3], seq_len=8)
  with pytest.raises(ValueError, match="max_len"):
    perplexity.token_perplexity(split, np.zeros(1000, np.int32), seq_len=model.cfg.max_len + 1)
  with pytest.raises(ValueError, match="boundary"):
    perplexity.token_perplexity(split, np.zeros(100, np.int32), seq_len=8, boundary=9)
  with pytest.raises(TypeError, match="sequence of strings"):
    perplexity.text_perplexity(split, "one string", tokenizers.ByteTokenizer(), seq_len=8)
