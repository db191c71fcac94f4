"""The FP8 inference study: jaxsun/quant/fp8_recipes.py, experiments/benchmarks/
fp8_thin_gemm.py, configs/fp8_inference.py and jaxsun/jobs/fp8_inference.py."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import jaxsun
from configs import fp8_inference as fp8_config
from experiments.benchmarks import fp8_thin_gemm
from jaxsun import jobs
from jaxsun.eval.perplexity import token_perplexity
from jaxsun.jobs import fp8_inference as study
from jaxsun.nn import layers
from jaxsun.quant import fp8
from jaxsun.quant import fp8_recipes as fr
from pallas_kernels.fp8_matmul import kernel as fm

HIGHEST = jax.lax.Precision.HIGHEST


def _operands(m=8, k=256, n=128, seed=0, outlier_rows=False):
  kx, kw, ko = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (m, k), jnp.float32)
  if outlier_rows:  # per-token magnitudes over four decades, as LLM activations have
    x = x * 10.0 ** jax.random.uniform(ko, (m, 1), minval=-3.0, maxval=1.0)
  w = 0.05 * jax.random.normal(kw, (k, n), jnp.float32)
  return x, w


# ------------------------------------------------------------ recipes vs references


def _np_quantize(x: np.ndarray, block: tuple[int, int], fmax: float):
  """An independent numpy quantizer: per-block amax / fmax scales, ml_dtypes E4M3 cast."""
  m, k = x.shape
  a, b = block
  s = np.abs(x.reshape(m // a, a, k // b, b)).max(axis=(1, 3)) / fmax
  s = np.where(s > 0, s, 1.0).astype(np.float32)
  full = np.repeat(np.repeat(s, a, 0), b, 1)
  q = np.clip(x / full, -fmax, fmax).astype(ml_dtypes.float8_e4m3fn)
  return q.astype(np.float32) * full


# granularity -> (activation block, weight block) for x: [8, 256], w: [256, 128]
_NP_BLOCKS = {"tensor": ((8, 256), (256, 128)), "row": ((1, 256), (256, 128)),
              "channel": ((8, 256), (256, 1)), "rowchannel": ((1, 256), (256, 1)),
              "block128": ((1, 128), (128, 128))}


@pytest.mark.parametrize("fmt, fmax", [("e4m3", 448.0), ("e4m3_g2", 240.0)])
@pytest.mark.parametrize("granularity", fr.GRANULARITIES)
def test_f32_accumulation_matches_an_independent_numpy_reference(granularity, fmt, fmax):
  x, w = _operands(outlier_rows=True)
  ab, wb = _NP_BLOCKS[granularity]
  xq, wq = _np_quantize(np.asarray(x), ab, fmax), _np_quantize(np.asarray(w), wb, fmax)
  want = xq @ wq
  got = fr.recipe_dot(x, w, fr.Fp8Recipe(granularity, fmt))
  # f32 sums in another order differ by rounding relative to sum |terms|, not to the
  # (possibly cancelled) result: bound the error by that condition number.
  bound = 1e-5 * (np.abs(xq) @ np.abs(wq)) + 1e-7
  err = np.abs(np.asarray(got) - want)
  assert np.all(err <= bound), (err / bound).max()
  # Error budget against the exact product (qwix-style, per recipe).
  exact = np.asarray(jnp.dot(x, w, precision=HIGHEST))
  rel = np.linalg.norm(np.asarray(got) - exact) / np.linalg.norm(exact)
  assert rel < {"tensor": 0.5, "channel": 0.5}.get(granularity, 0.05), rel


def test_finer_scales_rescue_tokens_beyond_the_e4m3_range():
  """Per-token magnitudes over 6 decades (E4M3 spans about 4.5 normal decades): a
  per-tensor scale flushes the small tokens, per-token and 1x128 scales do not, and the
  Gaudi 2 range (one binade less) flushes more. Over 3 decades they all agree."""
  def errors(decades):
    x, w = study.outlier_operands("token_scales", 64, 512, 128, token_decades=decades)
    exact = jnp.dot(x, w, precision=HIGHEST)
    return {(g, f): study.row_rel_error(fr.recipe_dot(x, w, fr.Fp8Recipe(g, f)), exact)
            for g in fr.GRANULARITIES for f in ("e4m3", "e4m3_g2")}
  wide = errors(6.0)
  for g in ("row", "rowchannel", "block128"):
    assert wide[(g, "e4m3")] < wide[("tensor", "e4m3")] / 2, wide
  assert wide[("tensor", "e4m3_g2")] > 1.2 * wide[("tensor", "e4m3")], wide
  narrow = errors(3.0)
  assert max(narrow.values()) < 1.1 * min(narrow.values()), narrow


def test_block_scales_pad_k_and_n_like_the_kernels():
  x, w = _operands(m=4, k=192, n=64)  # K = 1.5 blocks, N = half a block
  qa, sa, qb, sb = fr.quantize_operands(x, w, "block128", "e4m3")
  assert qa.shape == (4, 256) and qb.shape == (256, 128)
  assert sa.shape == (4, 2) and sb.shape == (2, 1)
  # The padded blocks' scales are their real parts' amax (zeros add no magnitude).
  np.testing.assert_allclose(float(sb[1, 0]), float(jnp.max(jnp.abs(w[128:]))) / 448.0,
                             rtol=1e-6)
  got = fr.recipe_dot(x, w, fr.Fp8Recipe("block128"))
  assert got.shape == (4, 64)
  np.testing.assert_allclose(got, fm.fp8_matmul_reference(qa, sa, qb, sb)[:, :64], rtol=1e-6)


# ----------------------------------------------------------- accumulation model


@pytest.mark.parametrize("bits, promote", [(14, 1), (14, 4), (14, None), (8, 2)])
@pytest.mark.parametrize("granularity", ["tensor", "rowchannel", "block128"])
def test_accumulation_simulation_equals_the_pallas_kernel(granularity, bits, promote):
  """The jnp promotion model against `fp8_matmul_pallas` in interpret mode: the same
  steps, truncation and promotion, so the same float32 bits."""
  x, w = _operands(m=8, k=512, n=128)
  qa, sa, qb, sb = fr.quantize_operands(x, w, granularity, "e4m3")
  step = 128 if granularity == "block128" else 32  # the kernel's block scales need 128
  got = fr.fp8_dot_sim(qa, sa, qb, sb, acc_mantissa_bits=bits, promote_every=promote,
                       step_k=step)
  want = fm.fp8_matmul_pallas(qa, sa, qb, sb, tiles=fm.Tiles(block_k=step),
                              promote_every=promote, acc_mantissa_bits=bits, interpret=True)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_the_kernel_comparison_can_fail():
  """Control: a different promotion interval gives different bits, so the equality
  above is a real check."""
  x, w = _operands(m=8, k=512, n=128)
  qa, sa, qb, sb = fr.quantize_operands(x, w, "rowchannel", "e4m3")
  got = fr.fp8_dot_sim(qa, sa, qb, sb, acc_mantissa_bits=14, promote_every=1, step_k=32)
  other = fm.fp8_matmul_pallas(qa, sa, qb, sb, tiles=fm.Tiles(block_k=32),
                               promote_every=None, acc_mantissa_bits=14, interpret=True)
  assert not np.array_equal(np.asarray(got), np.asarray(other))


def test_accumulation_error_grows_with_the_steps_of_an_inner_sum():
  x, w = _operands(m=16, k=4096, n=64)
  qa, sa, qb, sb = fr.quantize_operands(x, w, "rowchannel", "e4m3")
  f32 = fr.fp8_dot_sim(qa, sa, qb, sb)
  np.testing.assert_array_equal(f32, fm.fp8_matmul_reference(qa, sa, qb, sb))

  def rel(**kw):
    y = fr.fp8_dot_sim(qa, sa, qb, sb, acc_mantissa_bits=14, step_k=32, **kw)
    return float(jnp.linalg.norm(y - f32) / jnp.linalg.norm(f32))

  e1, e4, ek = rel(promote_every=1), rel(promote_every=4), rel(promote_every=None)
  assert 0 < e1 < e4 < ek and ek > 10 * e1, (e1, e4, ek)  # 128 steps never promoted


# ------------------------------------------------------------ Gaudi 2 vs OCP range


def test_gaudi2_range_clips_above_240_and_agrees_below():
  x = jnp.array([[300.0, 200.0, -448.0, 1.0]], jnp.float32)
  one = jnp.ones((1, 1), jnp.float32)
  ocp = fp8.quantize_with_scale(x, one, fp8.FP8_FORMATS["e4m3"], (1, 4)).astype(jnp.float32)
  g2 = fp8.quantize_with_scale(x, one, fp8.FP8_FORMATS["e4m3_g2"], (1, 4)).astype(jnp.float32)
  np.testing.assert_array_equal(ocp, [[288.0, 192.0, -448.0, 1.0]])
  np.testing.assert_array_equal(g2, [[240.0, 192.0, -240.0, 1.0]])  # same grid below 240


def test_the_two_ranges_give_different_recipes():
  """Control for the study's format axis: with current scaling the Gaudi 2 range puts
  every block's amax at 240 instead of 448, so the products differ."""
  x, w = _operands(outlier_rows=True)
  a = fr.recipe_dot(x, w, fr.Fp8Recipe("tensor", "e4m3"))
  b = fr.recipe_dot(x, w, fr.Fp8Recipe("tensor", "e4m3_g2"))
  assert not np.allclose(a, b, rtol=1e-4)
  exact = jnp.dot(x, w, precision=HIGHEST)
  err = [float(jnp.linalg.norm(y - exact) / jnp.linalg.norm(exact)) for y in (a, b)]
  assert err[1] > err[0], err  # fewer binades below the amax: more small values flushed


@pytest.mark.parametrize("kwargs, match", [
    (dict(granularity="colum"), r"Fp8Recipe\.granularity='colum'"),
    (dict(fmt="e4m3x"), r"unknown FP8 format 'e4m3x'"),
    (dict(acc_mantissa_bits=0), r"Fp8Recipe\.acc_mantissa_bits=0"),
    (dict(acc_mantissa_bits=14, promote_every=0), r"Fp8Recipe\.promote_every=0"),
    (dict(granularity="block128", step_k=48), r"Fp8Recipe\.step_k=48"),
])
def test_bad_recipes_name_the_field(kwargs, match):
  with pytest.raises(ValueError, match=match):
    fr.Fp8Recipe(**kwargs)


def test_accumulation_names():
  assert fr.parse_accumulation("f32", mantissa_bits=14)["acc_mantissa_bits"] is None
  assert fr.parse_accumulation("promote4", mantissa_bits=14)["promote_every"] == 4
  assert fr.parse_accumulation("promoteK", mantissa_bits=14)["promote_every"] is None
  for bad in ("promote0", "promote", "bf16"):
    with pytest.raises(ValueError, match=repr(bad)):
      fr.parse_accumulation(bad, mantissa_bits=14)
  r = fr.Fp8Recipe("row", "e4m3_g2", **fr.parse_accumulation("promote4", mantissa_bits=14))
  assert r.label == "row:e4m3_g2:promote4@14b/32" and r.accumulation == "promote4"


# ------------------------------------------------------------------------ models


def test_apply_recipe_swaps_the_projections_of_a_copy(model):
  ref = fr.with_compute_dtype(model, "bfloat16")
  before = jax.tree.map(np.asarray, nnx.state(ref))
  q = fr.apply_recipe(ref, fr.Fp8Recipe("rowchannel", "e4m3"))
  swapped = [p for p, m in nnx.iter_modules(q) if isinstance(m, fr.Fp8RecipeLinear)]
  plain = [p for p, m in nnx.iter_modules(ref) if type(m) is layers.Linear]
  assert len(swapped) == 7 * model.cfg.n_layers  # q k v o, gate up down
  assert len(plain) == len(swapped)  # the reference keeps its Linears
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray,
                                                                   nnx.state(ref)))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, model.cfg.vocab_size)
  lr = study._log_probs(*nnx.split(ref), tokens)  # pylint: disable=protected-access

  def kl(m):
    lm = study._log_probs(*nnx.split(m), tokens)  # pylint: disable=protected-access
    return float(jnp.mean(jnp.sum(jnp.exp(lr) * (lr - lm), -1)))
  # FP8 moves the (peaked, init_std 0.25) logits more than float32 vs bf16 compute does,
  # and far less than a change of model would.
  assert kl(fr.with_compute_dtype(model, "float32")) < kl(q) < 0.2, kl(q)
  with pytest.raises(ValueError, match="no Linear layer's path matches"):
    fr.apply_recipe(ref, fr.Fp8Recipe(), regex="nothing/.*")


def test_evaluate_follows_the_perplexity_protocol(model, monkeypatch):
  """The study's perplexity equals `token_perplexity` on the same stream (a batch count
  that leaves a partial last batch), and a model agrees with itself exactly."""
  ids = np.asarray(jax.random.randint(jax.random.key(2), (5 * 24 + 7,), 0,
                                      model.cfg.vocab_size))
  windows = study.windows_of(ids, 24)
  ref = study.Reference(model, windows, batch_size=2, vocab=model.cfg.vocab_size)
  m = study.evaluate(model, ref)
  want = token_perplexity(jaxsun.SplitModel.from_model(model), ids, seq_len=24,
                          batch_size=2)
  assert m["windows"] == 5 and m["tokens"] == want.n_tokens == 5 * 23
  np.testing.assert_allclose(m["ppl"], want.perplexity, rtol=1e-5)
  assert m["top1_agreement"] == 1.0 and abs(m["kl_mean"]) < 1e-6
  monkeypatch.setattr(study, "REF_CACHE_BYTES", 0)  # a large vocabulary: recomputed
  uncached = study.Reference(model, windows, batch_size=2, vocab=model.cfg.vocab_size)
  assert uncached.cache is None
  np.testing.assert_allclose(study.evaluate(model, uncached)["ppl"], m["ppl"], rtol=1e-6)


# --------------------------------------------------------------------- benchmark


def test_thin_gemm_analysis_by_hand():
  """Utilisation, roofline bound and thin / square ratios on hand-made timings."""
  def row(kind, m, k, n, tflops):
    flops, nbytes = 2 * m * k * n, (m * k + k * n) * 2 + m * n * 4
    return {"op": "gemm", "dtype": "bfloat16", "kind": kind, "m": m, "k": k, "n": n,
            "supported": True, "flops": flops, "bytes": nbytes,
            "intensity": flops / nbytes, "tflops": tflops}
  result = {"machine": {"device_kind": "NVIDIA H100 80GB HBM3"},
            "bandwidth": {"gbps": 3350.0, "of": "stated HBM"},
            "gemm": [row("square", 8192, 8192, 8192, 700.0),
                     row("thin", 1, 8192, 8192, 3.0)]}
  fp8_thin_gemm.analyse(result)
  sq, th = result["gemm"]
  assert sq["peak_tflops"] == 989.0 and sq["peak_of"] == "stated peak"
  assert sq["utilisation"] == pytest.approx(700 / 989) and sq["bound_by"] == "compute"
  # 1 x 8192 x 8192 in bf16: 2*8192^2 FLOPs over (8192 + 8192^2) * 2 + 8192 * 4 bytes.
  ai = 2 * 8192**2 / ((8192 + 8192**2) * 2 + 8192 * 4)
  assert th["intensity"] == pytest.approx(ai) and th["bound_by"] == "memory"
  assert th["bound_tflops"] == pytest.approx(ai * 3350 / 1e3)
  assert th["fraction_of_bound"] == pytest.approx(3.0 / (ai * 3.35))
  s = result["summary"]["bfloat16"]
  assert s["thin"][0]["thin_over_square"] == pytest.approx((3 / 989) / (700 / 989))


# ------------------------------------------------------------------ config, job


@pytest.mark.parametrize("variant", fp8_config.VARIANTS)
def test_every_variant_builds_and_validates(variant):
  c = fp8_config.get_config(variant)
  assert c.job == "fp8_inference" and c.variant == variant
  study.check_config(c)
  with pytest.raises(AttributeError):
    c.recipes.granularity = ("tensor",)  # locked: the key is `granularities`
  grid = study.recipes(c)
  assert len({r.label for r in grid}) == len(grid)
  if variant != "smoke":
    assert len(grid) == 5 * 2 * 4
  assert jobs.get_job("fp8_inference") is study.run


def test_unknown_variant_names_it():
  with pytest.raises(ValueError, match="'huge'.*:tiny"):
    fp8_config.get_config("huge")


@pytest.mark.parametrize("key, value, match", [
    ("recipes.granularities", ("colum",), r"config\.recipes\.granularities: 'colum'"),
    ("recipes.formats", ("e4m3x",), r"config\.recipes\.formats: 'e4m3x'"),
    ("recipes.accumulations", ("promote0",), r"config\.recipes\.accumulations.*'promote0'"),
    ("recipes.step_k", 48, r"config\.recipes\.step_k=48"),
    ("recipes.mantissa_bits", 0, r"config\.recipes\.mantissa_bits=0"),
    ("eval.max_tokens", 10, r"config\.eval\.max_tokens=10"),
    ("gemm.methods", ("int4",), r"config\.gemm\.methods: 'int4'"),
    ("gemm.thin_m", (), r"config\.gemm\.thin_m"),
    ("accum_error.k", (), r"config\.accum_error\.k"),
    ("outliers.token_decades", (0.0,), r"config\.outliers\.token_decades=\(0\.0,\)"),
    ("outliers.outlier_channels", 10_000, r"config\.outliers\.outlier_channels=10000"),
    ("reference_dtype", "float8", r"config\.reference_dtype='float8'"),
])
def test_bad_values_name_the_key(key, value, match):
  c = fp8_config.get_config("smoke")
  section, _, leaf = key.rpartition(".")
  (c[section] if section else c)[leaf] = value
  with pytest.raises(ValueError, match=match):
    study.check_config(c)


def test_unknown_and_missing_keys_name_the_key():
  c = fp8_config.get_config("smoke")
  c.unlock()
  c.recipes.granularity = ("tensor",)
  with pytest.raises(ValueError, match=r"config\.recipes\.granularity is not a key"):
    study.check_config(c)
  c = fp8_config.get_config("smoke")
  c.unlock()
  del c.gemm["thin_kn"]
  with pytest.raises(ValueError, match=r"config\.gemm\.thin_kn is missing"):
    study.check_config(c)


def test_smoke_run_writes_its_files(tmp_path):
  c = fp8_config.get_config("smoke")
  out = jobs.run(c, tmp_path)
  for name in ("results.json", "table.md", "fp8_inference.png", "COMMAND.md"):
    assert (tmp_path / name).stat().st_size > 0, name
  saved = json.loads((tmp_path / "results.json").read_text())
  assert list(saved["recipes"]) == [r.label for r in study.recipes(c)] == list(out["recipes"])
  for r in saved["recipes"].values():
    for stream in ("id", "ood"):
      m = r[stream]
      assert np.isfinite(m["ppl"]) and 0.0 <= m["top1_agreement"] <= 1.0
      assert m["kl_mean"] >= -1e-6 and m["delta_nll"]["n"] == m["windows"]
  assert saved["reference"]["id"]["top1_agreement"] == 1.0
  assert [r["k"] for r in saved["accumulation_error"]] == list(c.accum_error.k)
  assert len(saved["outlier_error"]) == 2 + len(c.outliers.token_decades)
  g = saved["gemm"]
  assert {r["kind"] for r in g["gemm"]} == {"square", "thin"}
  assert set(g["summary"]) == set(c.gemm.methods)
  table = (tmp_path / "table.md").read_text()
  assert "block128 | e4m3_g2 | promote1" in table and "Thin / square" in table
  assert "configs/fp8_inference.py:smoke" in (tmp_path / "COMMAND.md").read_text()
