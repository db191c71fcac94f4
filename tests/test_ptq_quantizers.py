"""RTN, FlexRound and LRQ quantizers (jaxsun.quant.ptq.quantizers)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsun.quant.ptq import quantizers as qz
from jaxsun.quant.ptq.quantizers import UniformScheme

D_IN, D_OUT = 64, 48


def _weight(seed, shape=(D_IN, D_OUT)):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 0.05


def _naive_rtn(w, bits, group, symmetric):
  """float64 numpy RTN, one group (a column slice of `group` rows) at a time."""
  w = np.asarray(w, np.float64)
  d_in, d_out = w.shape
  out = np.empty_like(w)
  codes = np.empty(w.shape, np.int64)
  for j in range(d_out):
    for k in range(0, d_in, group):
      v = w[k:k + group, j]
      if symmetric:
        qmin, qmax = -2**(bits - 1), 2**(bits - 1) - 1
        s, z = max(np.abs(v).max() / qmax, 1e-8), 0.0
      else:
        qmin, qmax = 0, 2**bits - 1
        lo, hi = min(v.min(), 0.0), max(v.max(), 0.0)
        s = max((hi - lo) / qmax, 1e-8)
        z = np.round(-lo / s)
      q = np.clip(np.round(v / s) + z, qmin, qmax)
      codes[k:k + group, j] = q
      out[k:k + group, j] = s * (q - z)
  return out, codes


CASES = [(b, g, sym) for b in (2, 3, 4, 8) for g in (None, 16) for sym in (False, True)]


@pytest.mark.parametrize("bits,group,symmetric", CASES)
def test_rtn_matches_naive_float64(bits, group, symmetric):
  scheme = UniformScheme(bits, group, symmetric)
  w = _weight(bits * 10 + (group or 0) + symmetric)
  scale, zero = qz.rtn_params(w, scheme)
  n_groups = D_IN // (group or D_IN)
  assert scale.shape == zero.shape == (n_groups, D_OUT)
  w_hat = qz.fake_quant(w, scale, zero, scheme)
  q = qz.quantize(w, scale, zero, scheme)
  ref, ref_codes = _naive_rtn(w, bits, group or D_IN, symmetric)
  # f32 vs f64 may round a value sitting on a .5 tie differently: allow a few, by 1 code.
  diff = np.abs(np.asarray(q, np.int64) - ref_codes)
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
  same = diff == 0
  np.testing.assert_allclose(np.asarray(w_hat)[same], ref[same], rtol=1e-5, atol=1e-7)
  # Codes in range and stored in the scheme's dtype.
  assert q.dtype == (jnp.int8 if symmetric else jnp.uint8)
  qi = np.asarray(q, np.int64)
  assert qi.min() >= scheme.qmin and qi.max() <= scheme.qmax
  # The grid is used: extremes of a column hit (or nearly hit) the ends of the range.
  assert qi.max() - qi.min() >= scheme.qmax - scheme.qmin - 1
  # Round trip through integer codes is bitwise the fake-quantized weight.
  np.testing.assert_array_equal(qz.dequantize(q, scale, zero, scheme), w_hat)
  # RTN error is at most half a step per weight.
  step = np.repeat(np.asarray(scale), group or D_IN, axis=0)
  assert np.all(np.abs(np.asarray(w_hat - w)) <= 0.5 * step * (1 + 1e-5))


def test_rtn_zero_group_and_exact_zero():
  w = _weight(1).at[:, 0].set(0.0).at[3, 1].set(0.0)
  for sym in (False, True):
    scheme = UniformScheme(4, None, sym)
    w_hat = qz.fake_quant(w, *qz.rtn_params(w, scheme), scheme)
    assert np.all(np.isfinite(w_hat))
    assert np.all(np.asarray(w_hat[:, 0]) == 0.0) and w_hat[3, 1] == 0.0


def test_bad_configs_name_the_field():
  for bits in (0, 1, 9):
    with pytest.raises(ValueError, match="UniformScheme.bits"):
      UniformScheme(bits=bits)
  with pytest.raises(ValueError, match="UniformScheme.group_size"):
    UniformScheme(bits=4, group_size=0)
  with pytest.raises(ValueError, match=r"group_size=24 must divide the input dimension in=64"):
    qz.rtn_params(_weight(0), UniformScheme(4, 24))
  with pytest.raises(ValueError, match="rank"):
    qz.lrq_init(_weight(0), UniformScheme(4), 0, jax.random.key(0))
  with pytest.raises(ValueError, match="2-D"):
    qz.rtn_params(jnp.zeros((4, 4, 4)), UniformScheme(4))


def _flex(w, scheme, key):
  return qz.flexround_init(w, scheme, input_scale=True), qz.flexround_quant


def _lrq(w, scheme, key):
  return qz.lrq_init(w, scheme, 4, key), qz.lrq_quant


@pytest.mark.parametrize("make", [_flex, _lrq], ids=["flexround", "lrq"])
@pytest.mark.parametrize("bits,group,symmetric", [(2, None, False), (3, 16, True),
                                                  (4, 16, False), (8, None, True)])
def test_init_equals_rtn_bitwise(make, bits, group, symmetric):
  scheme = UniformScheme(bits, group, symmetric)
  w = _weight(7 + bits)
  params, quant = make(w, scheme, jax.random.key(1))
  rtn = qz.fake_quant(w, *qz.rtn_params(w, scheme), scheme)
  np.testing.assert_array_equal(quant(w, params, scheme), rtn)
  np.testing.assert_array_equal(jax.jit(quant, static_argnums=2)(w, params, scheme), rtn)


def _recon_loss(quant, w, x, scheme):
  y = x @ w

  def loss(params):
    return jnp.mean(jnp.sum((x @ quant(w, params, scheme) - y) ** 2, axis=-1))

  return loss


@pytest.mark.parametrize("make", [_flex, _lrq], ids=["flexround", "lrq"])
def test_gradients_reach_every_parameter(make):
  scheme = UniformScheme(3, 16, False)
  w = _weight(3)
  x = jax.random.normal(jax.random.key(4), (128, D_IN))
  params, quant = make(w, scheme, jax.random.key(5))
  grad = jax.grad(_recon_loss(quant, w, x, scheme))
  g0 = grad(params)
  # The STE passes gradients through round(); the zero-init LRQ factor B is the one
  # exception at step 0 (d(A@B)/dA = dS @ B^T = 0), so check again after one step.
  opt = optax.adam(1e-3)
  p1, _ = opt.update(g0, opt.init(params), params)
  g1 = grad(optax.apply_updates(params, p1))
  for name, a0, a1 in zip(params._fields, g0, g1):
    if a0 is None:
      continue
    assert np.all(np.isfinite(a0)), name
    if not (quant is qz.lrq_quant and name == "a"):
      assert float(jnp.abs(a0).max()) > 0, name
    assert float(jnp.abs(a1).max()) > 0, name
    # Most entries get a signal (only clamped weights are blocked).
    assert float((a1 != 0).mean()) > 0.5, name


def _activations(seed, n=256):
  """Correlated inputs with channel scales spanning e^3 (like LLM activations).

  With isotropic inputs the output error is just ||W_hat - W||_F^2, which RTN already
  minimises per weight; anisotropy is what gives learned rounding something to win.
  """
  k1, k2 = jax.random.split(jax.random.key(seed))
  mix = jax.random.normal(k2, (D_IN, D_IN)) / D_IN**0.5
  return jax.random.normal(k1, (n, D_IN)) @ mix * jnp.exp(jnp.linspace(-1.5, 1.5, D_IN))


@pytest.mark.parametrize("make", [_flex, _lrq], ids=["flexround", "lrq"])
@pytest.mark.parametrize("seed", [11, 21])
def test_adam_lowers_reconstruction_error_below_rtn(make, seed):
  scheme = UniformScheme(3, None, False)
  w = _weight(seed)
  x = _activations(seed + 1)
  params, quant = make(w, scheme, jax.random.key(seed + 2))
  loss = _recon_loss(quant, w, x, scheme)
  rtn = qz.fake_quant(w, *qz.rtn_params(w, scheme), scheme)
  rtn_err = float(jnp.mean(jnp.sum((x @ rtn - x @ w) ** 2, axis=-1)))
  # Control: the learned quantizer starts exactly at RTN's error.
  assert float(loss(params)) == pytest.approx(rtn_err, rel=1e-6)
  steps = 150
  opt = optax.adam(optax.cosine_decay_schedule(3e-3, steps))

  @jax.jit
  def step(params, state):
    value, g = jax.value_and_grad(loss)(params)
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state, value

  state = opt.init(params)
  for _ in range(steps):
    params, state, _ = step(params, state)
  final = float(loss(params))
  # Measured: about -38% (FlexRound) and -32% (LRQ) for seed 11.
  assert final < 0.85 * rtn_err, (final, rtn_err)
  # Still a weight on the (learned) grid: at most 2^b levels per column.
  w_hat = np.asarray(quant(w, params, scheme))
  assert max(len(np.unique(w_hat[:, j])) for j in range(D_OUT)) <= 2**scheme.bits


def test_param_counts():
  d_in, d_out, rank, g = 256, 384, 8, 32
  w = _weight(0, (d_in, d_out))
  scheme = UniformScheme(4, g, False)
  n_s1 = (d_in // g) * d_out
  flex = qz.num_params(qz.flexround_init(w, scheme))
  flex4 = qz.num_params(qz.flexround_init(w, scheme, input_scale=True))
  lrq = qz.num_params(qz.lrq_init(w, scheme, rank, jax.random.key(0)))
  assert flex == d_in * d_out + d_out + n_s1
  assert flex4 == flex + d_in
  assert lrq == rank * (d_in + d_out) + d_in + d_out + n_s1
  # The learnable rounding part (s1 aside): LRQ is ~18x smaller here.
  assert (lrq - n_s1) * 15 < flex - n_s1
