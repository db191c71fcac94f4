"""UniQuanF weight quantizer (jaxsun.quant.ptq.uniquanf)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsun.quant.ptq import bcq as bq
from jaxsun.quant.ptq import quantizers as qz
from jaxsun.quant.ptq import uniquanf as uq

D_IN, D_OUT = 64, 24


def _weight(seed, shape=(D_IN, D_OUT)):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 0.05


def _perturbed(params, seed, scale=0.3):
  """params with random non-zero δ1, δ2, δ3, shift and a random (unsorted) alpha."""
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(seed), 5)
  n = lambda k, a: scale * jax.random.normal(k, a.shape, jnp.float32)
  return params._replace(log_s=params.log_s + n(k1, params.log_s), d2=n(k2, params.d2),
                         d3=n(k3, params.d3), shift=params.shift + n(k4, params.shift),
                         alpha=params.alpha * jnp.exp(n(k5, params.alpha)))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _naive_levels(alpha):
  """float64 [L, G, out] of all Σ ±alpha_i, ascending."""
  alpha = np.asarray(alpha, np.float64)
  signs = np.asarray(list(itertools.product((-1.0, 1.0), repeat=alpha.shape[0])))
  return np.sort(np.einsum("li,igo->lgo", signs, alpha), axis=0)


def _naive_u(w, params, state, cfg):
  """float64 numpy T then centring: u = w / exp(δ1+δ2+δ3) + z - shift - c, f64[in, out]."""
  g = cfg.group(w.shape[0])
  rep = lambda a: np.repeat(np.asarray(a, np.float64), g, axis=0)
  wt = (np.asarray(w, np.float64) / np.exp(rep(params.log_s) + np.asarray(params.d2, np.float64)
                                           + rep(params.d3)) + rep(state.zero))
  return wt - rep(params.shift) - cfg.centre


def _naive_direct(w, params, state, cfg):
  """float64 T / direct M / D: (w_hat, idx) by brute force over all levels."""
  g = cfg.group(w.shape[0])
  rep = lambda a: np.repeat(np.asarray(a, np.float64), g, axis=0)
  u = _naive_u(w, params, state, cfg)
  lv = np.repeat(_naive_levels(params.alpha), g, axis=1)  # [L, in, out]
  idx = np.argmin(np.abs(u[None] - lv), axis=0)
  q = np.take_along_axis(lv, idx[None], 0)[0]
  w_hat = (q + rep(params.shift) + cfg.centre - rep(state.zero)) * np.exp(rep(params.log_s))
  return w_hat, idx


def _integer_zero_weight(bits, g, seed):
  """Random weights whose min-max zero point -min/s is an integer in every group, so
  the float-zero uniform grid coincides with RTN's rounded-zero grid."""
  qmax = 2**bits - 1
  rng = np.random.default_rng(seed)
  n_groups = D_IN // g
  s = rng.uniform(0.005, 0.02, (n_groups, D_OUT))
  k = rng.integers(1, qmax, (n_groups, D_OUT)).astype(np.float64)  # zero point in [1, qmax-1]
  lo, hi = -k * s, (qmax - k) * s
  u = rng.uniform(0.0, 1.0, (n_groups, g, D_OUT))
  u[:, 0], u[:, 1] = 0.0, 1.0  # every group attains its min and max
  w = lo[:, None] + u * (hi - lo)[:, None]
  return jnp.asarray(w.reshape(D_IN, D_OUT), jnp.float32)


# --- unified initialisation ---------------------------------------------------------------


@pytest.mark.parametrize("bits,group", list(itertools.product([2, 3, 4], [None, 16])))
def test_unified_init_reproduces_uniform_grid(bits, group):
  cfg = uq.UniQuanFConfig(bits=bits, group_size=group, mapping="direct")
  g = cfg.group(D_IN)
  # Integer zero point: equal to quantizers.py's RTN fake-quant.
  w = _integer_zero_weight(bits, g, seed=bits)
  params, state = uq.uniquanf_init(w, cfg, refine=False)
  np.testing.assert_array_equal(
      params.alpha[:, 0, 0], 2.0 ** (bits - 2 - np.arange(bits)))  # e.g. 4, 2, 1, 0.5
  assert not np.any(params.d2) and not np.any(params.d3) and not np.any(params.shift)
  w_hat, new_state = uq.uniquanf_quant(w, params, state, cfg, 0)
  scheme = qz.UniformScheme(bits=bits, group_size=group, symmetric=False)
  ref = qz.fake_quant(w, *qz.rtn_params(w, scheme), scheme)
  assert _rel(w_hat, ref) < 2e-6
  np.testing.assert_array_equal(new_state.idx, state.idx)
  # Generic weights: the float-zero min-max grid s * (clip(round(w / s + z)) - z).
  w = _weight(bits)
  params, state = uq.uniquanf_init(w, cfg, refine=False)
  w_hat, _ = uq.uniquanf_quant(w, params, state, cfg, 0)
  wg = np.asarray(w, np.float64).reshape(D_IN // g, g, D_OUT)
  lo, hi = wg.min(1, keepdims=True), wg.max(1, keepdims=True)
  s = (hi - lo) / (2**bits - 1)
  z = -lo / s
  ref = s * (np.clip(np.round(wg / s + z), 0, 2**bits - 1) - z)
  assert _rel(w_hat, ref.reshape(D_IN, D_OUT)) < 2e-6
  np.testing.assert_allclose(state.zero, z[:, 0], rtol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_refinement_never_worse_than_uniform(bits):
  cfg = uq.UniQuanFConfig(bits=bits, group_size=16, mapping="direct", alternating_rounds=3)
  w = _weight(10 + bits)
  errs = []
  for refine in (False, True):
    params, state = uq.uniquanf_init(w, cfg, refine=refine)
    w_hat, _ = uq.uniquanf_quant(w, params, state, cfg, 0)
    errs.append(np.sum(((np.asarray(w_hat) - np.asarray(w))**2).reshape(4, 16, D_OUT), 1))
    if refine:  # alpha is sorted by |alpha| descending
      assert np.all(np.diff(np.abs(np.asarray(params.alpha)), axis=0) <= 0)
  uniform, refined = errs
  assert np.all(refined <= uniform * (1 + 1e-5) + 1e-12)  # per group, not only in total
  if bits == 3:
    assert refined.sum() < 0.97 * uniform.sum()


# --- forward ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group", [(2, None), (3, 16), (4, 8)])
def test_forward_matches_naive_numpy(bits, group):
  cfg = uq.UniQuanFConfig(bits=bits, group_size=group, mapping="direct")
  w = _weight(20 + bits)
  params, state = uq.uniquanf_init(w, cfg, refine=False)
  params = _perturbed(params, seed=bits)
  w_hat, new_state = uq.uniquanf_quant(w, params, state, cfg, 0)
  ref, idx = _naive_direct(w, params, state, cfg)
  np.testing.assert_array_equal(new_state.idx, idx)
  assert _rel(w_hat, ref) < 1e-5


@pytest.mark.parametrize("bits", [3, 8])
def test_levels_and_nearest_mapping(bits):
  g = 8
  alpha = jax.random.normal(jax.random.key(1), (bits, D_IN // g, D_OUT))  # any signs, unsorted
  lv, codes = uq.levels(alpha)
  assert lv.shape == (2**bits, D_IN // g, D_OUT)
  assert codes.shape == (2**bits, bits, D_IN // g, D_OUT)
  assert codes.dtype == jnp.int8 and set(np.unique(codes)) == {-1, 1}
  np.testing.assert_allclose(lv, _naive_levels(alpha), rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(lv, np.einsum("igo,ligo->lgo", alpha, codes), rtol=1e-6, atol=1e-5)
  assert np.all(np.diff(np.asarray(lv), axis=0) >= 0)
  # Each group's codes are the 2^bits distinct sign patterns.
  patterns = {tuple(c) for c in np.asarray(codes[:, :, 2, 5])}
  assert len(patterns) == 2**bits
  # Nearest level vs brute force (by distance, robust to exact ties).
  u = 3.0 * jax.random.normal(jax.random.key(2), (D_IN, D_OUT))
  idx = np.asarray(jax.jit(uq._nearest)(u, lv))
  lv_w = np.repeat(np.asarray(lv), g, axis=1)  # [L, in, out]
  got = np.abs(np.asarray(u) - np.take_along_axis(lv_w, idx[None], 0)[0])
  best = np.min(np.abs(np.asarray(u)[None] - lv_w), axis=0)
  np.testing.assert_allclose(got, best, atol=1e-5)
  if bits == 3:  # levels far apart: no float32 near-ties, so the very same index
    np.testing.assert_array_equal(idx, np.argmin(np.abs(np.asarray(u)[None] - lv_w), axis=0))


def test_local_and_periodic_mapping_under_jit():
  bits = 4
  w = _weight(30)
  base, state = uq.uniquanf_init(w, uq.UniQuanFConfig(bits=bits), refine=False)
  params = _perturbed(base, seed=3, scale=1.0)  # far from init: direct moves many levels
  stale = jax.random.randint(jax.random.key(4), (D_IN, D_OUT), 0, 2**bits, jnp.int32)
  state = state._replace(idx=stale)
  _, direct_idx = _naive_direct(w, params, state, uq.UniQuanFConfig(bits=bits))
  lv = np.repeat(_naive_levels(params.alpha), D_IN, axis=1)  # [L, in, out]
  u = _naive_u(w, params, state, uq.UniQuanFConfig(bits=bits))

  def run(mapping, step):
    cfg = uq.UniQuanFConfig(bits=bits, mapping=mapping, period=3)
    # uniquanf_quant is jitted with only cfg static: one compile serves every step.
    return uq.uniquanf_quant(w, params, state, cfg, jnp.int32(step))

  # local: one step at a time, to the best of the three neighbours.
  for mapping, step in (("local", 1), ("lpmapping", 3)):
    _, st = run(mapping, step)
    idx = np.asarray(st.idx)
    assert np.max(np.abs(idx - np.asarray(stale))) == 1
    cand = np.clip(np.asarray(stale)[None] + np.arange(-1, 2)[:, None, None], 0, 2**bits - 1)
    err = np.abs(u[None] - np.take_along_axis(lv, cand, 0))
    np.testing.assert_array_equal(idx, np.take_along_axis(cand, err.argmin(0)[None], 0)[0])
  # Off-period steps reuse idx (and the forward uses those levels); on-period ones remap.
  for mapping in ("periodic", "lpmapping"):
    for step in (1, 2, 4):
      w_hat, st = run(mapping, step)
      np.testing.assert_array_equal(st.idx, stale)
      rep = lambda a: np.repeat(np.asarray(a, np.float64), D_IN, axis=0)
      q = np.take_along_axis(lv, np.asarray(stale)[None], 0)[0]
      ref = (q + rep(params.shift) + 7.5 - rep(state.zero)) * np.exp(rep(params.log_s))
      assert _rel(w_hat, ref) < 1e-5
  _, st = run("periodic", 6)
  np.testing.assert_array_equal(st.idx, direct_idx)
  assert np.max(np.abs(direct_idx - np.asarray(stale))) > 1


# --- gradients ----------------------------------------------------------------------------


def _loss_and_grads(w, params, state, cfg, r):
  def loss(p):
    w_hat, _ = uq.uniquanf_quant(w, p, state, cfg, 0)
    return jnp.sum(w_hat * r)
  return jax.jit(jax.grad(loss))(params)


def test_gradients_ste_and_alpha_analytic():
  bits, g, d_in, d_out = 2, 4, 8, 3
  w = _weight(40, (d_in, d_out))
  cfg = uq.UniQuanFConfig(bits=bits, group_size=g, mapping="direct", grad_filter=False)
  params, state = uq.uniquanf_init(w, cfg, refine=False)
  params = _perturbed(params, seed=5, scale=0.1)
  r = jax.random.normal(jax.random.key(6), (d_in, d_out))
  grads = _loss_and_grads(w, params, state, cfg, r)
  assert np.all(np.asarray(grads.d2) != 0)  # the STE reaches every per-weight divisor
  # d loss / d alpha_i = sum over the group of s * beta_i * r.
  _, idx = _naive_direct(w, params, state, cfg)
  _, codes = uq.levels(params.alpha)  # [L, bits, G, out]
  codes = np.repeat(np.asarray(codes, np.float64), g, axis=2)  # [L, bits, in, out]
  beta = np.take_along_axis(codes, idx[None, None], 0)[0]  # [bits, in, out]
  s = np.repeat(np.exp(np.asarray(params.log_s, np.float64)), g, axis=0)
  ref = (s * beta * np.asarray(r)).reshape(bits, d_in // g, g, d_out).sum(2)
  np.testing.assert_allclose(grads.alpha, ref, rtol=1e-5, atol=1e-7)
  # shift enters D directly: d loss / d shift = sum over the group of s * r.
  np.testing.assert_allclose(
      grads.shift, (s * np.asarray(r)).reshape(d_in // g, g, d_out).sum(1), rtol=1e-5)


def test_gradient_filtering_masks_exactly_far_weights():
  bits = 3
  w = _weight(50)
  cfg = uq.UniQuanFConfig(bits=bits, group_size=16, mapping="direct", alternating_rounds=3)
  params, state = uq.uniquanf_init(w, cfg)
  params = _perturbed(params, seed=7, scale=0.6)  # pushes some weights outside the levels
  r = jax.random.normal(jax.random.key(8), w.shape)
  _, st = uq.uniquanf_quant(w, params, state, cfg, 0)
  # |u - q| recomputed the way the quantizer does (float32) to match its comparisons.
  wt = w / jnp.exp(jnp.repeat(params.log_s + params.d3, 16, 0) + params.d2) + jnp.repeat(
      state.zero, 16, 0)
  u = wt - jnp.repeat(params.shift, 16, 0) - cfg.centre
  lv, _ = uq.levels(params.alpha)
  q = np.take_along_axis(np.repeat(np.asarray(lv), 16, 1), np.asarray(st.idx)[None], 0)[0]
  far = np.abs(np.asarray(u) - q) > np.repeat(np.min(np.abs(np.asarray(params.alpha)), 0), 16, 0)
  assert 0.02 < far.mean() < 0.9
  grads = _loss_and_grads(w, params, state, cfg, r)
  d2 = np.asarray(grads.d2)
  assert np.all(d2[far] == 0) and np.all(d2[~far] != 0)
  # alpha only collects gradient from the kept weights.
  _, codes = uq.levels(params.alpha)
  beta = np.take_along_axis(np.repeat(np.asarray(codes, np.float64), 16, 2),
                            np.asarray(st.idx)[None, None], 0)[0]
  s = np.repeat(np.exp(np.asarray(params.log_s, np.float64)), 16, 0)
  ref = np.where(far, 0.0, s * beta * np.asarray(r)).reshape(bits, 4, 16, D_OUT).sum(2)
  np.testing.assert_allclose(grads.alpha, ref, rtol=1e-4, atol=1e-7)
  # Control: without filtering every weight passes gradient.
  off = uq.UniQuanFConfig(bits=bits, group_size=16, mapping="direct", grad_filter=False)
  assert np.all(np.asarray(_loss_and_grads(w, params, state, off, r).d2) != 0)


def test_jitted_train_step_with_param_labels():
  w = _weight(60)
  cfg = uq.UniQuanFConfig(bits=3, group_size=16, alternating_rounds=3)
  params, state = uq.uniquanf_init(w, cfg)
  assert uq.num_params(params) == D_IN * D_OUT + (3 + 3) * (D_IN // 16) * D_OUT
  labels = uq.param_labels(params)
  assert labels == uq.UniQuanFParams("u", "u", "u", "b", "b")
  opt = optax.multi_transform({"u": optax.adam(5e-3), "b": optax.adam(5e-4)}, labels)
  x = jax.random.normal(jax.random.key(61), (32, D_IN))

  @jax.jit
  def train_step(params, state, opt_state, step):
    def loss(p):
      w_hat, st = uq.uniquanf_quant(w, p, state, cfg, step)
      return jnp.mean((x @ w_hat - x @ w) ** 2), st
    (l, st), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), st, opt_state, l

  opt_state = opt.init(params)
  losses = []
  for step in range(20):
    params, state, opt_state, l = train_step(params, state, opt_state, jnp.int32(step))
    losses.append(float(l))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


# --- export -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group", [(2, 16), (4, None)])
def test_export_is_exact_bcq(bits, group):
  w = _weight(70 + bits)
  cfg = uq.UniQuanFConfig(bits=bits, group_size=group)
  params, state = uq.uniquanf_init(w, cfg, refine=False)
  params = _perturbed(params, seed=bits, scale=0.2)
  exported = uq.uniquanf_export(w, params, state, cfg)  # state.idx is stale here
  g = cfg.group(D_IN)
  assert exported.b.shape == (bits, D_IN, D_OUT) and exported.b.dtype == jnp.int8
  assert exported.alpha.shape == (bits, D_IN // g, D_OUT) and exported.group_size == g
  direct = uq.UniQuanFConfig(bits=bits, group_size=group, mapping="direct")
  w_hat, _ = uq.uniquanf_quant(w, params, state, direct, 0)
  assert _rel(bq.dequantize(exported), w_hat) < 1e-5
  x = jax.random.normal(jax.random.key(71), (5, D_IN))
  y_ref = jnp.matmul(x, w_hat, precision=jax.lax.Precision.HIGHEST)
  assert _rel(bq.bcq_matmul_reference(x, exported), y_ref) < 1e-5
  # use_state_idx keeps the training forward's codes.
  lp_hat, lp_st = uq.uniquanf_quant(w, params, state, cfg, 1)  # off-period: stale idx
  kept = uq.uniquanf_export(w, params, lp_st, cfg, use_state_idx=True)
  assert _rel(bq.dequantize(kept), lp_hat) < 1e-5


# --- config validation --------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    ({"bits": 0}, "bits"), ({"bits": 9}, "bits"), ({"bits": 4.0}, "bits"),
    ({"mapping": "nearest"}, "mapping"), ({"period": 0}, "period"),
    ({"group_size": 0}, "group_size"), ({"alternating_rounds": -1}, "alternating_rounds"),
])
def test_bad_config_raises(kwargs, field):
  with pytest.raises(ValueError, match=f"UniQuanFConfig.{field}"):
    uq.UniQuanFConfig(**kwargs)


def test_group_not_dividing_raises():
  cfg = uq.UniQuanFConfig(group_size=24)
  with pytest.raises(ValueError, match="UniQuanFConfig.group_size"):
    uq.uniquanf_init(_weight(80), cfg)
  with pytest.raises(ValueError, match="w must be a 2-D kernel"):
    uq.uniquanf_init(jnp.ones((4, 4, 4)), uq.UniQuanFConfig())
