"""BCQ: exact uniform -> BCQ conversion, the alternating solver, the LUT-GEMM reference."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsun.quant.ptq import bcq as bq


def _rtn(w, bits, g):
  """Asymmetric min-max round-to-nearest per group: codes, scale, zero."""
  wg = np.asarray(w, np.float32).reshape(w.shape[0] // g, g, w.shape[1])
  lo, hi = wg.min(1), wg.max(1)  # [G, out]
  scale = ((hi - lo) / (2 ** bits - 1)).astype(np.float32)
  zero = np.round(-lo / scale).astype(np.float32)
  q = np.clip(np.round(wg / scale[:, None]) + zero[:, None], 0, 2 ** bits - 1)
  return q.reshape(w.shape).astype(np.int32), scale, zero


def _uniform_deq(q, scale, zero, g):
  rep = lambda a: np.repeat(a, g, axis=0)
  return rep(scale) * (q.astype(np.float32) - rep(zero))


def _gauss(k=256, n=48, seed=0):
  return np.asarray(jax.random.normal(jax.random.key(seed), (k, n)), np.float32) * 0.02


@pytest.mark.parametrize("bits,g", list(itertools.product([2, 3, 4, 8], [256, 32])))
def test_uniform_to_bcq_is_exact(bits, g):
  w = _gauss()
  q, scale, zero = _rtn(w, bits, g)
  ref = _uniform_deq(q, scale, zero, g)
  b = bq.uniform_to_bcq(jnp.asarray(q), jnp.asarray(scale), jnp.asarray(zero), bits, g)
  assert b.b.dtype == jnp.int8 and set(np.unique(b.b)) <= {-1, 1}
  assert b.alpha.shape == (bits, 256 // g, 48) and b.offset.shape == (256 // g, 48)
  got = np.asarray(bq.dequantize(b))
  # A few float32 roundings of values of size <= scale * 2^bits: ulp-level.
  tol = (bits + 2) * np.finfo(np.float32).eps * np.repeat(scale, g, 0) * 2 ** bits
  assert np.all(np.abs(got - ref) <= tol), np.max(np.abs(got - ref) / tol)


def _exactly_representable(bits, g, k=256, n=16, seed=1):
  ka, kb, ko = jax.random.split(jax.random.key(seed), 3)
  # alpha_i > sum_{j>i} alpha_j (ratio <= 0.45): distinct, binary-ordered levels;
  # generic ratios can leave the solver in a local minimum from the greedy init.
  base = 0.4 ** jnp.arange(bits, dtype=jnp.float32)[:, None, None]
  alpha = base * jax.random.uniform(ka, (bits, k // g, n), minval=0.9, maxval=1.1)
  b = jnp.where(jax.random.bernoulli(kb, 0.5, (bits, k, n)), 1, -1).astype(jnp.int8)
  offset = 0.1 * jax.random.normal(ko, (k // g, n))
  return bq.BCQWeight(b=b, alpha=alpha, offset=offset)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
def test_error_non_increasing_and_below_greedy(bits):
  w = jnp.asarray(_gauss(seed=bits))
  q = bq.bcq_greedy(w, bits, 32)
  errs = [float(bq.bcq_error(w, q))]
  for _ in range(8):
    q = bq.bcq_alternating_step(w, q)
    errs.append(float(bq.bcq_error(w, q)))
  assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:])), errs
  assert errs[-1] < errs[0], errs
  final = bq.bcq_alternating(w, bits, 32, iters=8)
  assert float(bq.bcq_error(w, final)) == pytest.approx(errs[-1], rel=1e-5)


def test_one_bit_closed_form():
  w = jnp.asarray(_gauss(seed=3))
  wg = np.asarray(w).reshape(8, 32, 48)
  greedy = bq.bcq_greedy(w, 1, 32)
  off = wg.mean(1)
  np.testing.assert_allclose(greedy.offset, off, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(greedy.alpha[0], np.abs(wg - off[:, None]).mean(1), rtol=1e-5)
  # Converged 1-bit BCQ is a fixed point of 2-means: offset/alpha are the mid-point /
  # half-gap of the two clusters' means and b = sign(w - offset).
  q = bq.bcq_alternating(w, 1, 32, iters=20)
  b = np.asarray(q.b[0], np.float32).reshape(8, 32, 48)
  pos = (wg * (b > 0)).sum(1) / (b > 0).sum(1)
  neg = (wg * (b < 0)).sum(1) / (b < 0).sum(1)
  np.testing.assert_allclose(q.offset, (pos + neg) / 2, atol=1e-6)
  np.testing.assert_allclose(q.alpha[0], (pos - neg) / 2, atol=1e-6)
  r = wg - np.asarray(q.offset)[:, None]
  assert np.all((b > 0) == (r >= 0) | (np.abs(r) < 1e-7))


@pytest.mark.parametrize("bits,g,frac", [(1, 64, 0.85), (2, 64, 0.85), (3, 128, 0.8),
                                         (4, 256, 0.45)])
def test_recovers_exactly_representable_weights(bits, g, frac):
  true = _exactly_representable(bits, g)
  w = bq.dequantize(true)
  # The truth is a fixed point of a round.
  assert float(bq.bcq_error(w, bq.bcq_alternating_step(w, true))) < 1e-10
  # From the greedy init, like Lloyd's k-means, a few groups may stop in a local
  # minimum (measured: 3 of 64 at 2 bits, 7 of 16 at 4 bits); most reach error ~0.
  q = bq.bcq_alternating(w, bits, g, iters=15)
  sse = np.asarray(bq._group_sse(bq._grouped(w, g), q))  # pylint: disable=protected-access
  print(f"bits={bits}: groups recovered {np.mean(sse < 1e-8 * g):.2f}")
  assert np.mean(sse < 1e-8 * g) >= frac, np.mean(sse < 1e-8 * g)
  assert float(bq.bcq_error(w, q)) < float(bq.bcq_error(w, bq.bcq_greedy(w, bits, g)))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_beats_rtn_on_gaussian(bits):
  w = _gauss(k=512, n=64, seed=7)
  q, scale, zero = _rtn(w, bits, 128)
  rtn = float(np.sum((w - _uniform_deq(q, scale, zero, 128)) ** 2) / np.sum(w ** 2))
  err = float(bq.bcq_error(jnp.asarray(w), bq.bcq_alternating(jnp.asarray(w), bits, 128)))
  print(f"bits={bits} g=128 rel sq err: RTN {rtn:.5f} BCQ {err:.5f}")
  assert err <= rtn * 1.05


@pytest.mark.parametrize("rows", [1, 3, 130])
@pytest.mark.parametrize("bits,g", [(3, 24), (4, 72)])
def test_matmul_reference_matches_dense(rows, bits, g):
  q = bq.bcq_alternating(jnp.asarray(_gauss(k=72, n=37, seed=rows)), bits, g, iters=2)
  x = jax.random.normal(jax.random.key(rows), (rows, 72))
  want = jnp.matmul(x, bq.dequantize(q), precision=jax.lax.Precision.HIGHEST)
  got = bq.bcq_matmul_reference(x, q)
  assert got.shape == (rows, 37)
  rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
  assert rel <= 1e-5, rel


def test_validation_names_the_argument():
  w = jnp.zeros((64, 8))
  with pytest.raises(ValueError, match="bits"):
    bq.bcq_alternating(w, 0, 64)
  with pytest.raises(ValueError, match="bits"):
    bq.bcq_greedy(w, 9, 64)
  with pytest.raises(ValueError, match="group_size"):
    bq.bcq_alternating(w, 2, 48)
  codes = jnp.zeros((64, 8), jnp.int32)
  s = jnp.ones((2, 8))
  with pytest.raises(ValueError, match="group_size"):
    bq.uniform_to_bcq(codes, s, s, 2, 0)
  with pytest.raises(ValueError, match="scale"):
    bq.uniform_to_bcq(codes, jnp.ones((1, 8)), s, 2, 32)
