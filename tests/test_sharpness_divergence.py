"""Logit sharpness (jaxsun.analysis.sharpness) and divergence detection (stability)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsun.analysis import sharpness, stability


def _problem(b=3, v=4, seed=0, scale=2.0):
  logits = scale * jax.random.normal(jax.random.key(seed), (b, v))
  targets = jax.random.randint(jax.random.key(seed + 1), (b,), 0, v)
  return logits, targets


def _brute_force_phi(logits, targets, eps):
  """max over every vertex of the box (cross-entropy is convex: a vertex is optimal)."""
  x = np.asarray(logits, np.float64)
  r = eps * (np.abs(x) + 1.0)
  t = np.asarray(targets)

  def ce(z):
    z = z - z.max(-1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(len(t)), t]))

  f0 = ce(x)
  best = max(ce(x + np.reshape(s, x.shape) * r)
             for s in itertools.product((-1.0, 1.0), repeat=x.size))
  return 100.0 * (best - f0) / (1.0 + f0)


@pytest.mark.parametrize("eps", [1e-3, 5e-2, 0.5])
def test_sharpness_matches_brute_force_maximisation(eps):
  logits, targets = _problem(seed=int(eps * 1000))
  phi = float(sharpness.last_token_sharpness(logits, targets, eps=eps))
  want = _brute_force_phi(logits, targets, eps)
  assert want > 0
  np.testing.assert_allclose(phi, want, rtol=2e-4)
  # Random points of the box never beat it (the maximum is the maximum).
  x = np.asarray(logits, np.float64)
  r = eps * (np.abs(x) + 1.0)
  rng = np.random.default_rng(0)
  f = lambda z: float(sharpness.mean_cross_entropy(jnp.asarray(z, jnp.float32), targets))
  f0 = f(x)
  for _ in range(20):
    y = rng.uniform(-1, 1, x.shape) * r
    assert 100 * (f(x + y) - f0) / (1 + f0) <= phi * (1 + 1e-4) + 1e-6


def test_sharpness_is_zero_for_a_constant_loss():
  x = jax.random.normal(jax.random.key(3), (4, 8))
  const = lambda z: jnp.float32(2.5) + 0.0 * z.sum()
  assert float(sharpness.logit_sharpness(const, x, eps=0.1)) == 0.0


def test_sharpness_orders_flat_and_sharp_points_and_never_falls_with_steps():
  logits, targets = _problem(b=8, v=16, seed=5, scale=1.0)
  # A non-monotone loss: steps after the first can still find more.
  wavy = lambda z, t: jnp.mean(jnp.sin(3.0 * z)) + sharpness.mean_cross_entropy(z, t)
  phis = [float(sharpness.logit_sharpness(wavy, logits, targets, eps=0.2, steps=k))
          for k in (1, 2, 5, 20)]
  assert all(b >= a - 1e-7 for a, b in zip(phis, phis[1:])), phis
  # Control: the same targets with 8x larger logits (a confident, sharper point).
  flat = float(sharpness.last_token_sharpness(logits, targets, eps=0.05))
  sharp = float(sharpness.last_token_sharpness(8.0 * logits, targets, eps=0.05))
  assert sharp > 1.5 * flat > 0, (flat, sharp)
  # [B, T, V] input: the last position is used.
  seq = jnp.stack([jnp.zeros_like(logits), logits], axis=1)
  np.testing.assert_allclose(float(sharpness.last_token_sharpness(seq, targets, eps=0.05)),
                             flat, rtol=1e-6)


@pytest.mark.parametrize("kw, match", [
    (dict(eps=0.0), "eps=0.0"), (dict(steps=0), "steps=0"),
    (dict(step_size=-1.0), "step_size=-1.0")])
def test_sharpness_bad_arguments(kw, match):
  logits, targets = _problem()
  with pytest.raises(ValueError, match=match):
    sharpness.last_token_sharpness(logits, targets, **kw)


def test_sharpness_bad_shapes():
  logits, targets = _problem()
  with pytest.raises(ValueError, match="targets must have shape"):
    sharpness.last_token_sharpness(logits, targets[:2])
  with pytest.raises(ValueError, match="logits must be"):
    sharpness.last_token_sharpness(logits[0], targets)


def _falling(n=60, seed=0):
  rng = np.random.default_rng(seed)
  return 3.0 * np.exp(-np.arange(n) / 20) + 1.0 + 0.02 * rng.standard_normal(n)


def test_divergence_fires_on_an_injected_nan():
  x = _falling()
  assert not stability.divergence(x, margin=0.5).diverged  # control: a healthy run
  x[37] = np.nan
  d = stability.divergence(x, margin=0.5)
  assert d.diverged and d.index == 37 and d.reason == "nonfinite"
  x[40] = np.inf
  assert stability.divergence(x).index == 37  # the first one


def test_divergence_fires_on_an_injected_spike_and_patience_filters_it():
  x = _falling()
  x[30] += 2.0  # one step, then recovery
  d = stability.divergence(x, margin=1.0)
  assert d.diverged and (d.index, d.reason) == (30, "above_min")
  assert d.running_min[30] == pytest.approx(np.min(x[:30]))  # the spike never lowers it
  assert not stability.divergence(x, margin=1.0, patience=2).diverged
  assert not stability.divergence(x, margin=2.5).diverged  # below the margin
  # A sustained blow-up from step 45 is a divergence at 45 with any patience.
  y = _falling()
  y[45:] = np.min(y) + 1.5 + np.arange(15)
  for p in (1, 3, 10):
    d = stability.divergence(y, margin=1.0, patience=p)
    assert (d.index, d.reason) == (45, "above_min")
  assert d.to_dict(steps=np.arange(60) * 10)["step"] == 450


def test_divergence_bad_arguments():
  with pytest.raises(ValueError, match="margin=0"):
    stability.divergence([1.0, 2.0], margin=0)
  with pytest.raises(ValueError, match="patience=0"):
    stability.divergence([1.0, 2.0], patience=0)
  with pytest.raises(ValueError, match="losses must be a 1-D"):
    stability.divergence(np.ones((2, 2)))


def test_grad_norm_stats():
  g = np.abs(np.random.default_rng(1).standard_normal(200)) + 0.5
  g_bad = np.concatenate([g, [np.nan, np.inf]])
  s = stability.grad_norm_stats(g_bad)
  assert s["count"] == 200 and s["nonfinite"] == 2
  assert s["mean"] == pytest.approx(g.mean()) and s["std"] == pytest.approx(g.std())
  assert s["max"] == pytest.approx(g.max()) and s["p99"] == pytest.approx(np.percentile(g, 99))
  assert stability.grad_norm_stats([np.nan])["mean"] is None
