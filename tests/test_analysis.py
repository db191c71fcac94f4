"""jaxsun.analysis: attention statistics, stability measures and figures, checked
against independent float64 NumPy references and exact closed forms."""

import json
import math

import numpy as np
import pytest

from jaxsun import analysis

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- references and builders (float64 NumPy, written independently of the module) ---


def causal_mask(t, s=None):
  s = t if s is None else s
  return np.arange(s)[None, :] <= np.arange(t)[:, None] + (s - t)  # bool[T, S]


def causal_softmax(logits):
  """float64 softmax over visible keys of logits [..., T, T]; 0 on invisible keys."""
  t = logits.shape[-1]
  x = np.where(causal_mask(t), logits, -np.inf)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def ref_entropy(row):
  a = np.abs(np.asarray(row, np.float64))
  p = a / a.sum()
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def ref_jsd(row_a, row_b):
  """Jensen-Shannon divergence in the KL form (the module uses the entropy form)."""
  p = np.abs(row_a) / np.abs(row_a).sum()
  q = np.abs(row_b) / np.abs(row_b).sum()
  m = 0.5 * (p + q)

  def kl(x, y):
    nz = x > 0
    return float((x[nz] * np.log(x[nz] / y[nz])).sum())

  return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def ref_cosine_diversity(rows):
  """1 - mean over ordered pairs i != j of cos(rows[i], rows[j]); rows [H, S]."""
  h = rows.shape[0]
  sims = [np.dot(rows[i], rows[j]) / (np.linalg.norm(rows[i]) * np.linalg.norm(rows[j]))
          for i in range(h) for j in range(h) if i != j]
  return 1.0 - float(np.mean(sims))


def random_softmax_weights(seed, shape=(2, 2, 3, 7), scale=2.0):
  """f64[L, B, H, T, T] causal softmax weights from random logits."""
  rng = np.random.default_rng(seed)
  l, b, h, t = shape
  return causal_softmax(scale * rng.normal(size=(l, b, h, t, t)))


def affine_weights(seed, shape=(2, 2, 3, 7)):
  """alpha * p + beta on visible keys (0 elsewhere), with the alpha, beta used."""
  rng = np.random.default_rng(seed)
  l, b, h, t = shape
  p = random_softmax_weights(seed, shape)
  alpha = rng.uniform(0.0, 1.0, size=(l, b, h, t, 1))
  beta = rng.uniform(-0.2, 0.1, size=(l, b, h, t, 1))  # some weights come out negative
  w = np.where(causal_mask(t), alpha * p + beta, 0.0)
  return w, alpha[..., 0], beta[..., 0]


# --- attention entropy --------------------------------------------------------------------


def test_entropy_of_uniform_causal_attention_is_log_t_plus_1_per_query():
  l, b, h, t = 2, 2, 3, 9
  uniform = causal_mask(t) / np.arange(1, t + 1)[:, None]  # row t: 1/(t+1) on s <= t
  w = np.broadcast_to(uniform, (l, b, h, t, t)).astype(np.float32)
  for q in range(t):  # one valid query at a time gives that query's entropy
    valid = np.zeros((b, t), bool)
    valid[:, q] = True
    np.testing.assert_allclose(analysis.attention_entropy(w, valid),
                               np.full((l, h), math.log(q + 1)), rtol=1e-6, atol=1e-6)
  # All queries: the mean of log(t + 1).
  np.testing.assert_allclose(analysis.attention_entropy(w),
                             np.full((l, h), np.mean(np.log(np.arange(1, t + 1)))), rtol=1e-6)


def test_entropy_of_one_hot_attention_is_zero():
  rng = np.random.default_rng(1)
  l, b, h, t = 2, 2, 3, 8
  w = np.zeros((l, b, h, t, t), np.float32)
  for idx in np.ndindex(l, b, h, t):
    w[idx + (rng.integers(0, idx[-1] + 1),)] = 1.0  # one visible key per query
  np.testing.assert_array_equal(analysis.attention_entropy(w), np.zeros((l, h)))


@pytest.mark.parametrize("kind", ["softmax", "affine"])
def test_entropy_matches_float64_reference(kind):
  w = random_softmax_weights(2) if kind == "softmax" else affine_weights(2)[0]
  if kind == "affine":
    assert (w < 0).any()  # the |w| normalisation is exercised
  l, b, h, t, _ = w.shape
  ref = np.zeros((l, h))
  for li, bi, hi, ti in np.ndindex(l, b, h, t):
    ref[li, hi] += ref_entropy(w[li, bi, hi, ti]) / (b * t)
  got = analysis.attention_entropy(w.astype(np.float32))
  assert got.shape == (l, h) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


# --- first-token mass ---------------------------------------------------------------------


def test_first_token_mass_of_a_known_matrix_excludes_query_0():
  l, b, h, t = 2, 1, 2, 5
  w = np.zeros((l, b, h, t, t), np.float32)
  # w[l, 0, h, q, 0] = (l + 1) * (h + 1) * q / 10: the mean over q = 1..4 is
  # (l + 1)(h + 1) * 2.5 / 10.
  for li, hi, q in np.ndindex(l, h, t):
    w[li, 0, hi, q, 0] = (li + 1) * (hi + 1) * q / 10
    w[li, 0, hi, q, q] += 0.5  # mass elsewhere does not count
  w[:, :, :, 0, 0] = 100.0  # query 0 sees only key 0 and is left out
  expected = np.array([[(li + 1) * (hi + 1) * 0.25 for hi in range(h)] for li in range(l)])
  np.testing.assert_allclose(analysis.first_token_mass(w), expected, rtol=1e-6)

  valid = np.array([[True, True, True, False, False]])  # queries 1, 2 only
  expected = np.array([[(li + 1) * (hi + 1) * 0.15 for hi in range(h)] for li in range(l)])
  np.testing.assert_allclose(analysis.first_token_mass(w, valid), expected, rtol=1e-6)


def test_first_token_mass_is_nan_with_only_query_0():
  w = np.ones((1, 1, 2, 1, 1), np.float32)
  assert np.isnan(analysis.first_token_mass(w)).all()


# --- query mass ---------------------------------------------------------------------------


def test_query_mass_of_softmax_is_one_everywhere():
  w = random_softmax_weights(3).astype(np.float32)
  qm = analysis.query_mass(w)
  l, b, h, t, _ = w.shape
  assert qm.values.shape == (l, h, b * t)
  np.testing.assert_allclose(qm.values, 1.0, rtol=1e-6)
  np.testing.assert_allclose(qm.mean, 1.0, rtol=1e-6)
  np.testing.assert_allclose(qm.std, 0.0, atol=1e-6)
  np.testing.assert_allclose(qm.quantiles, 1.0, rtol=1e-6)


def test_query_mass_of_affine_weights_is_alpha_plus_beta_times_t_plus_1():
  w, alpha, beta = affine_weights(4)
  l, b, h, t, _ = w.shape
  valid = np.ones((b, t), bool)
  valid[1, 4:] = False  # right padding on row 1
  qm = analysis.query_mass(w.astype(np.float32), valid)
  expected = alpha + beta * np.arange(1, t + 1)  # f64[L, B, H, T]
  expected = np.transpose(expected, (0, 2, 1, 3))[:, :, valid]  # [L, H, N], (b, t) order
  assert qm.values.shape == expected.shape == (l, h, valid.sum())
  np.testing.assert_allclose(qm.values, expected, rtol=1e-5, atol=1e-6)
  flat = expected.reshape(l, -1)
  np.testing.assert_allclose(qm.mean, flat.mean(1), rtol=1e-5)
  np.testing.assert_allclose(qm.std, flat.std(1), rtol=1e-4)
  np.testing.assert_allclose(qm.quantiles, np.quantile(flat, qm.q, axis=1).T, rtol=1e-5,
                             atol=1e-6)
  d = qm.to_dict()
  assert set(d["quantiles"]) == {"0.05", "0.25", "0.5", "0.75", "0.95"}


# --- head diversity -----------------------------------------------------------------------


def test_head_diversity_is_zero_for_identical_heads_and_positive_otherwise():
  one_head = random_softmax_weights(5, shape=(2, 2, 1, 6))
  same = np.repeat(one_head, 4, axis=2).astype(np.float32)
  for metric in ("jsd", "cosine"):
    np.testing.assert_allclose(analysis.head_diversity(same, metric=metric), 0.0, atol=1e-6)
  different = random_softmax_weights(6, shape=(2, 2, 4, 6)).astype(np.float32)
  for metric in ("jsd", "cosine"):
    assert (analysis.head_diversity(different, metric=metric) > 1e-3).all()
  # One head: no pair to compare.
  assert np.isnan(analysis.head_diversity(one_head.astype(np.float32))).all()


def test_head_diversity_of_disjoint_heads_is_log_2():
  # Head 0 attends key 0, head 1 attends key t: disjoint rows for t >= 1 (JSD = log 2),
  # the same row for t = 0 (JSD = 0).
  t = 6
  w = np.zeros((1, 1, 2, t, t), np.float32)
  w[0, 0, 0, :, 0] = 1.0
  w[0, 0, 1, np.arange(t), np.arange(t)] = 1.0
  np.testing.assert_allclose(analysis.head_diversity(w), [math.log(2) * (t - 1) / t],
                             rtol=1e-6)


@pytest.mark.parametrize("kind", ["softmax", "affine"])
def test_head_diversity_matches_float64_reference(kind):
  w = random_softmax_weights(7) if kind == "softmax" else affine_weights(7)[0]
  l, b, h, t, _ = w.shape
  valid = np.ones((b, t), bool)
  valid[0, 5:] = False
  ref_jsd_layers, ref_cos_layers = np.zeros(l), np.zeros(l)
  n = valid.sum()
  for li, bi, ti in np.ndindex(l, b, t):
    if not valid[bi, ti]:
      continue
    rows = w[li, bi, :, ti]
    pairs = [ref_jsd(rows[i], rows[j]) for i in range(h) for j in range(i + 1, h)]
    ref_jsd_layers[li] += np.mean(pairs) / n
    ref_cos_layers[li] += ref_cosine_diversity(rows) / n
  w32 = w.astype(np.float32)
  np.testing.assert_allclose(analysis.head_diversity(w32, valid), ref_jsd_layers, rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(analysis.head_diversity(w32, valid, metric="cosine"),
                             ref_cos_layers, rtol=1e-5, atol=1e-6)
  assert (analysis.head_diversity(w32, valid) <= math.log(2)).all()


# --- summary and masking ------------------------------------------------------------------


def test_padded_queries_do_not_change_the_summary():
  w, _, _ = affine_weights(8, shape=(2, 3, 2, 8))
  w = w.astype(np.float32)
  valid = np.ones((3, 8), bool)
  valid[1, 5:] = False  # right padding
  valid[2, :2] = False  # left padding
  base = analysis.summarize(w, valid)
  garbage = np.random.default_rng(9).normal(size=w.shape).astype(np.float32) * 10
  w2 = w.copy()
  for bi, ti in zip(*np.nonzero(~valid)):
    w2[:, bi, :, ti, :] = garbage[:, bi, :, ti, :]
  assert analysis.summarize(w2, valid) == base
  # ...and the padded rows do change it when they are not masked.
  assert analysis.summarize(w2) != analysis.summarize(w)

  # The summary agrees with the per-function results and is plain JSON.
  np.testing.assert_allclose(base["entropy"]["per_layer_head"],
                             analysis.attention_entropy(w, valid), rtol=1e-6)
  np.testing.assert_allclose(base["head_diversity"]["jsd"],
                             analysis.head_diversity(w, valid), rtol=1e-6)
  assert base["shape"] == {"layers": 2, "batch": 3, "heads": 2, "queries": 8, "keys": 8,
                           "valid_queries": int(valid.sum())}
  json.dumps(base, allow_nan=False)


def test_summary_writes_nan_as_none():
  w = random_softmax_weights(10, shape=(1, 1, 1, 4)).astype(np.float32)  # one head
  s = analysis.summarize(w)
  assert s["head_diversity"] == {"jsd": [None], "cosine": [None]}
  json.dumps(s, allow_nan=False)


def test_input_errors_name_the_argument():
  w = np.zeros((1, 1, 1, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"w must have shape \[layers, batch"):
    analysis.attention_entropy(w[0])
  with pytest.raises(ValueError, match=r"valid must have shape"):
    analysis.attention_entropy(w, np.ones((1, 4), bool))
  with pytest.raises(ValueError, match=r"valid marks no query"):
    analysis.attention_entropy(w, np.zeros((1, 3), bool))
  with pytest.raises(ValueError, match=r"metric="):
    analysis.head_diversity(w, metric="kl")


# --- model integration --------------------------------------------------------------------


class _FakeModel:
  """Duck-typed stand-in for a Decoder with attention_weights."""

  class cfg:  # pylint: disable=invalid-name
    attention = "affine"

  def __init__(self, w):
    self.w = w
    self.calls = []

  def attention_weights(self, tokens, **kwargs):
    self.calls.append((tokens.shape, kwargs))
    return self.w


def test_attention_summary_calls_attention_weights_and_summarises():
  w = affine_weights(11, shape=(2, 2, 2, 5))[0].astype(np.float32)
  tokens = np.zeros((2, 5), np.int32)
  valid = np.ones((2, 5), bool)
  valid[0, 3:] = False
  model = _FakeModel(w)
  got = analysis.attention_summary(model, tokens, valid)
  assert model.calls == [((2, 5), {})]
  assert got == {"attention": "affine", **analysis.summarize(w, valid)}
  with pytest.raises(ValueError, match=r"returned shape"):
    analysis.attention_summary(_FakeModel(w[:, :1]), tokens)
  with pytest.raises(TypeError, match=r"no attention_weights"):
    analysis.attention_summary(object(), tokens)


def test_attention_summary_of_a_decoder(request):
  from jaxsun.nn.decoder import Decoder  # pylint: disable=import-outside-toplevel
  if not hasattr(Decoder, "attention_weights"):
    pytest.skip("Decoder.attention_weights is not there yet")
  # Built after the check, so that the skip does not pay for the model.
  cfg, model = request.getfixturevalue("cfg"), request.getfixturevalue("model")
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  b, t = 2, 12
  tokens = jnp.asarray(np.random.default_rng(12).integers(0, cfg.vocab_size, (b, t)),
                       jnp.int32)
  w = np.asarray(model.attention_weights(tokens))
  assert w.shape == (cfg.n_layers, b, cfg.n_heads, t, t)
  assert (w[..., ~causal_mask(t)] == 0).all()
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)  # the fixture's softmax model
  valid = np.ones((b, t), bool)
  valid[1, 8:] = False
  s = analysis.attention_summary(model, tokens, valid)
  assert s["shape"]["layers"] == cfg.n_layers and s["shape"]["valid_queries"] == 20
  np.testing.assert_allclose(s["query_mass"]["mean"], 1.0, rtol=1e-5)
  np.testing.assert_allclose(s["entropy"]["per_layer_head"],
                             analysis.attention_entropy(w, valid), rtol=1e-6)
  # Entropy is at most uniform attention's log(t + 1), averaged over the valid queries.
  bound = np.mean(np.log(np.nonzero(valid)[1] + 1.0))
  assert (np.asarray(s["entropy"]["per_layer_head"]) <= bound + 1e-5).all()


# --- stability: spikes --------------------------------------------------------------------


SPIKES_AT = [120, 240, 241, 377, 560]


def noisy_decreasing_loss(seed, n=700, spikes=(), size=0.5, amp=1.0, tau=300.0):
  rng = np.random.default_rng(seed)
  step = np.arange(n)
  loss = 2.0 + amp * np.exp(-step / tau) + 0.01 * rng.normal(size=n)
  loss[list(spikes)] += size
  return loss


def ref_trailing_threshold(x, k, window, min_history, scale=1.0):
  """Naive loop: median + k * scale * MAD of x[i - window:i] (finite values)."""
  thr = np.full(x.size, np.nan)
  for i in range(x.size):
    ref = x[max(0, i - window):i]
    ref = ref[np.isfinite(ref)]
    if ref.size < min(min_history, window):
      continue
    med = np.median(ref)
    thr[i] = med + k * scale * np.median(np.abs(ref - med))
  return thr


def test_loss_spikes_finds_exactly_the_injected_spikes():
  loss = noisy_decreasing_loss(0, spikes=SPIKES_AT)
  for k in (6, 9):
    s = analysis.loss_spikes(loss, k)
    assert s.indices.tolist() == SPIKES_AT, k
    assert s.count == len(SPIKES_AT)
  # Control: the same curve without injected spikes has none.
  assert analysis.loss_spikes(noisy_decreasing_loss(0), 6).count == 0


def test_loss_spikes_k9_is_a_subset_of_k6():
  rng = np.random.default_rng(13)
  loss = 3.0 - 0.001 * np.arange(800) + 0.02 * rng.standard_t(df=2, size=800)  # heavy tails
  k6 = set(analysis.loss_spikes(loss, 6).indices.tolist())
  k9 = set(analysis.loss_spikes(loss, 9).indices.tolist())
  assert k9 <= k6 and len(k9) < len(k6)


@pytest.mark.parametrize("window,min_history,scale", [(50, 10, 1.0), (30, 30, 1.4826),
                                                      (20, 1, 1.0)])
def test_loss_spike_thresholds_match_a_naive_numpy_loop(window, min_history, scale):
  rng = np.random.default_rng(14)
  loss = 3.0 - 0.002 * np.arange(300) + 0.05 * rng.standard_t(df=3, size=300)
  s = analysis.loss_spikes(loss, 6, window, scale=scale, min_history=min_history)
  ref = ref_trailing_threshold(loss, 6, window, min_history, scale)
  np.testing.assert_allclose(s.threshold, ref, rtol=1e-12, equal_nan=True)
  tested = np.nan_to_num(ref, nan=np.inf)  # untested steps can never exceed it
  np.testing.assert_array_equal(s.indices, np.flatnonzero(loss > tested))
  assert s.count > 0


def test_loss_spikes_global_and_detrended_definitions():
  rng = np.random.default_rng(15)
  x = rng.normal(size=200)
  x[[50, 150]] += 20
  s = analysis.loss_spikes(x, 6, window=None)
  med = np.median(x)
  mad = np.median(np.abs(x - med))
  assert analysis.mad(x) == pytest.approx(mad, rel=1e-12)
  assert analysis.mad(x, scale=1.4826) == pytest.approx(1.4826 * mad, rel=1e-12)
  np.testing.assert_allclose(s.threshold, med + 6 * mad, rtol=1e-12)
  np.testing.assert_array_equal(s.indices, np.flatnonzero(x > med + 6 * mad))
  assert s.indices.tolist() == [50, 150]

  # Detrended: residual against the median of the 20 previous losses, then the global
  # rule on the residuals; thresholds come back in loss units.
  loss = noisy_decreasing_loss(16, n=400, spikes=[90, 300], size=0.3)
  d = analysis.loss_spikes(loss, 6, window=None, detrend=20, min_history=5)
  base = np.full(loss.size, np.nan)
  for i in range(5, loss.size):
    base[i] = np.median(loss[max(0, i - 20):i])
  r = loss - base
  rf = r[np.isfinite(r)]
  rmed = np.median(rf)
  rmad = np.median(np.abs(rf - rmed))
  np.testing.assert_allclose(d.threshold, base + rmed + 6 * rmad, rtol=1e-12, equal_nan=True)
  assert d.indices.tolist() == [90, 300]
  # Without detrending, the global rule on a falling loss misses them: the trend
  # inflates the MAD.
  assert analysis.loss_spikes(loss, 6, window=None).count == 0


def test_detrending_catches_spikes_the_trailing_window_misses_on_a_steep_curve():
  # Early in training the loss falls fast: the trailing median lags ~window/2 steps
  # behind and the trend inflates the MAD, so the plain rule misses step 120.
  loss = noisy_decreasing_loss(0, spikes=SPIKES_AT, amp=3.0, tau=150.0)
  assert 120 not in analysis.loss_spikes(loss, 6).indices
  assert analysis.loss_spikes(loss, 9, detrend=10).indices.tolist() == SPIKES_AT
  assert set(SPIKES_AT) <= set(analysis.loss_spikes(loss, 6, detrend=10).indices.tolist())


def test_nonfinite_losses_are_reported_not_counted():
  loss = noisy_decreasing_loss(0, spikes=SPIKES_AT)
  with_nan = loss.copy()
  with_nan[300] = np.nan
  with_nan[301] = np.inf
  s = analysis.loss_spikes(with_nan, 6)
  assert s.indices.tolist() == SPIKES_AT
  assert s.nonfinite.tolist() == [300, 301]
  assert np.isnan(s.threshold[300])


# --- stability: gradient-norm variance and summary --------------------------------------


def test_grad_norm_variance_is_np_var_on_the_window():
  rng = np.random.default_rng(17)
  g = np.abs(rng.normal(1.0, 0.5, size=1000))
  assert analysis.grad_norm_variance(g, start=0, stop=501) == pytest.approx(np.var(g[:501]),
                                                                            rel=1e-12)
  assert analysis.grad_norm_variance(g) == pytest.approx(np.var(g), rel=1e-12)
  assert analysis.grad_norm_variance(g, start=100, stop=200) == pytest.approx(
      np.var(g[100:200]), rel=1e-12)
  # Logged every 10 steps: the window is over step values, not positions.
  steps = np.arange(0, 10_000, 10)
  assert analysis.grad_norm_variance(g, start=0, stop=501, steps=steps) == pytest.approx(
      np.var(g[:51]), rel=1e-12)
  # Rolling variance: np.var of each full window; window= averages it.
  rv = analysis.rolling_variance(g[:60], 25)
  np.testing.assert_allclose(rv, [np.var(g[i:i + 25]) for i in range(36)], rtol=1e-10)
  assert analysis.grad_norm_variance(g, window=25, stop=60) == pytest.approx(rv.mean(),
                                                                             rel=1e-12)
  with pytest.raises(ValueError, match=r"window=80 is longer"):
    analysis.rolling_variance(g[:60], 80)
  with pytest.raises(ValueError, match=r"no grad norm has a step"):
    analysis.grad_norm_variance(g, start=2000)


def test_stability_summary_counts_spikes_in_the_step_range():
  loss = noisy_decreasing_loss(0, spikes=SPIKES_AT)
  g = np.abs(np.random.default_rng(18).normal(1.0, 0.3, size=loss.size))
  s = analysis.stability_summary(loss, g, ks=(6, 9), start=0, stop=501)
  assert s["loss_spikes"]["6"]["steps"] == [120, 240, 241, 377]
  assert s["loss_spikes"]["9"]["count"] == 4
  assert s["loss_spikes"]["6"]["window"] == 50
  assert s["grad_norm_variance"] == pytest.approx(np.var(g[:501]), rel=1e-12)
  assert s["grad_norm_mean"] == pytest.approx(np.mean(g[:501]), rel=1e-12)
  assert s["steps"] == {"start": 0, "stop": 501, "count": 501}
  json.dumps(s, allow_nan=False)
  # With logged step numbers, spike steps are reported as steps.
  s2 = analysis.stability_summary(loss, None, ks=(6,), steps=np.arange(loss.size) * 2)
  assert s2["loss_spikes"]["6"]["steps"] == [2 * i for i in SPIKES_AT]
  assert s2["grad_norm_variance"] is None


# --- plots --------------------------------------------------------------------------------


def _assert_png(path):
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC and len(data) > 2000
  assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def variants():
  soft = random_softmax_weights(20, shape=(3, 2, 4, 10)).astype(np.float32)
  aff = affine_weights(21, shape=(3, 2, 4, 10))[0].astype(np.float32)
  return {"softmax": soft, "affine": aff}


def test_plot_per_layer_figures(tmp_path, variants):
  summaries = {name: analysis.summarize(w) for name, w in variants.items()}
  _assert_png(analysis.plot_entropy_per_layer(summaries, tmp_path / "entropy.png"))
  arrays = {name: analysis.first_token_mass(w) for name, w in variants.items()}
  _assert_png(analysis.plot_first_token_mass_per_layer(arrays, tmp_path / "first.png"))
  _assert_png(analysis.plot_head_diversity_per_layer(summaries, tmp_path / "div.png"))
  per_layer = {name: analysis.head_diversity(w, metric="cosine")
               for name, w in variants.items()}
  _assert_png(analysis.plot_head_diversity_per_layer(per_layer, tmp_path / "cos.png",
                                                     metric="cosine"))


def test_plot_query_mass_and_attention_maps(tmp_path, variants):
  masses = {name: analysis.query_mass(w) for name, w in variants.items()}  # softmax: constant
  _assert_png(analysis.plot_query_mass_distribution(masses, tmp_path / "mass.png"))
  _assert_png(analysis.plot_query_mass_distribution(masses, tmp_path / "mass2.png",
                                                    layers=[0, 2]))
  _assert_png(analysis.plot_attention_maps(variants, tmp_path / "maps.png", layer=1,
                                           heads=[0, 3]))
  _assert_png(analysis.plot_attention_maps({"softmax": variants["softmax"][0, 0, 0]},
                                           tmp_path / "one.png"))


def test_plot_training_curves(tmp_path):
  runs = {
      "softmax": {"loss": np.stack([noisy_decreasing_loss(s, spikes=SPIKES_AT[:2])
                                    for s in range(3)]),
                  "grad_norm": np.abs(np.random.default_rng(0).normal(1, .2, (3, 700)))},
      "affine": {"loss": noisy_decreasing_loss(5), "steps": np.arange(700) * 10},
  }
  _assert_png(analysis.plot_training_curves(runs, tmp_path / "sub" / "curves.png",
                                            log_grad_norm=True, title="tiny"))


def test_variant_colors_are_stable_and_distinct():
  a = analysis.variant_colors(["affine", "mine", "softmax", "theirs"])
  b = analysis.variant_colors(["softmax", "Affine", "Off-by-one"])
  assert a["affine"] == b["Affine"] and a["softmax"] == b["softmax"]
  assert b["Off-by-one"] == analysis.plots.KNOWN_COLORS["off_by_one"]
  assert len(set(a.values())) == 4
  assert analysis.variant_colors(["x"], {"x": "red"}) == {"x": "red"}


def test_importing_the_package_does_not_import_matplotlib():
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = "import sys, jaxsun.analysis; print('matplotlib' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "False"
