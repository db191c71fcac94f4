"""FP8 matmul kernels against the float32 reference (interpret mode on CPU, compiled and
unchanged on a GPU), the accumulation model, cross-lowering and bad inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxsun.quant import fp8
from pallas_kernels import fp8_matmul as fm
from pallas_kernels.testing import lowers_for


def _operands(fmt="e4m3", gran="row", m=256, k=512, n=256, seed=0):
  ka, kb, kc = jax.random.split(jax.random.key(seed), 3)
  a = jax.random.normal(ka, (m, k)) * (1 + 5 * jax.random.uniform(kc, (m, 1)))
  b = jax.random.normal(kb, (k, n)) * 0.05
  qa, sa = fp8.quantize(a, fmt, block=fp8.block_for(gran, a.shape, operand="lhs"))
  gb = "column" if gran == "row" else gran
  qb, sb = fp8.quantize(b, fmt, block=fp8.block_for(gb, b.shape, operand="rhs"))
  bias = jax.random.normal(jax.random.key(seed + 1), (n,))
  return qa, sa, qb, sb, bias


def _rel(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


class Fp8MatmulTest:
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _needs_device(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("compiled kernels need a GPU; the interpret-mode class runs here")

  @pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
  @pytest.mark.parametrize("gran", ["tensor", "row", "block128"])
  @pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
  def test_pallas_kernel_matches_the_reference(self, fmt, gran, out_dtype):
    qa, sa, qb, sb, bias = _operands(fmt, gran)
    want = fm.fp8_matmul_reference(qa, sa, qb, sb, bias)
    out = fm.fp8_matmul(qa, sa, qb, sb, bias, out_dtype=out_dtype, backend="pallas",
                        poison=float("nan"), interpret=self.INTERPRET)
    assert out.dtype == out_dtype and out.shape == want.shape
    assert np.isfinite(np.asarray(out, np.float32)).all()  # every tile was written
    assert _rel(out, want) < (1e-5 if out_dtype == jnp.float32 else 8e-3)

  @pytest.mark.parametrize("gran", ["tensor", "row"])
  def test_mosaic_hopper_kernel_matches_the_reference(self, gran):
    qa, sa, qb, sb, bias = _operands("e4m3", gran, m=128, k=256, n=128)
    want = fm.fp8_matmul_reference(qa, sa, qb, sb, bias)
    out = fm.fp8_matmul(qa, sa, qb, sb, bias, backend="mosaic",
                        interpret=plgpu.InterpretGPUParams() if self.INTERPRET else False)
    assert _rel(out, want) < 1e-5

  def test_accumulation_promotion(self):
    # Long K, a 10-bit accumulator: promoting to float32 more often cuts the error.
    qa, sa, qb, sb, _ = _operands("e4m3", "row", m=128, k=2048, n=128, seed=3)
    want = fm.fp8_matmul_reference(qa, sa, qb, sb)
    run = functools.partial(fm.fp8_matmul, qa, sa, qb, sb, backend="pallas",
                            tiles=fm.Tiles(block_k=32), interpret=self.INTERPRET)
    errs = [float(jnp.linalg.norm(run(promote_every=pe, acc_mantissa_bits=10) - want)
                  / jnp.linalg.norm(want)) for pe in (64, 8, 1)]
    assert errs[0] > 2 * errs[1] > 4 * errs[2], errs
    exact = run(promote_every=8)  # full float32 accumulation: only reassociation
    assert _rel(exact, want) < 1e-5


class TestFp8MatmulInterpret(Fp8MatmulTest):
  INTERPRET = True


class TestFp8Matmul(Fp8MatmulTest):
  INTERPRET = False


@pytest.mark.parametrize("gran", ["tensor", "row", "block128"])
def test_xla_path_matches_the_reference(gran):
  qa, sa, qb, sb, bias = _operands("e4m3", gran)
  assert _rel(fm.fp8_matmul(qa, sa, qb, sb, bias, backend="xla"),
              fm.fp8_matmul_reference(qa, sa, qb, sb, bias)) < 1e-5


def test_reference_against_a_naive_formula():
  qa, sa, qb, sb, bias = _operands("e4m3", "block128", m=8, k=256, n=128)
  a = np.asarray(qa, np.float64) * np.repeat(np.asarray(sa), 128, axis=1)
  b = np.asarray(qb, np.float64) * np.repeat(np.repeat(np.asarray(sb), 128, 0), 128, 1)
  np.testing.assert_allclose(np.asarray(fm.fp8_matmul_reference(qa, sa, qb, sb, bias)),
                             a @ b + np.asarray(bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("platform,backend,gran,marker", [
    ("cuda", "pallas", "row", "__gpu$xla.gpu.triton"),
    ("cuda", "pallas", "block128", "__gpu$xla.gpu.triton"),
    ("cuda", "mosaic", "row", "mosaic_gpu"),
    ("tpu", "pallas", "row", "tpu_custom_call"),
    ("tpu", "pallas", "block128", "tpu_custom_call"),
])
def test_kernels_lower_for_their_platforms(platform, backend, gran, marker):
  args = _operands("e4m3", gran)
  text = lowers_for(platform, functools.partial(fm.fp8_matmul, backend=backend), *args)
  assert marker in text


def test_bad_inputs_are_clear_errors():
  qa, sa, qb, sb, bias = _operands("e4m3", "row")
  with pytest.raises(ValueError, match="qa must be float8"):
    fm.fp8_matmul(qa.astype(jnp.bfloat16), sa, qb, sb)
  with pytest.raises(ValueError, match="match no scaling"):
    fm.fp8_matmul(qa, sa[:10], qb, sb)
  with pytest.raises(ValueError, match="K=512 must be a multiple of its tile 96"):
    fm.fp8_matmul(qa, sa, qb, sb, backend="pallas", tiles=fm.Tiles(block_k=96),
                  interpret=True)
  with pytest.raises(ValueError, match="one fp8 type"):
    fm.fp8_matmul(qa, sa, qb.astype(jnp.float8_e5m2), sb, backend="pallas", interpret=True)
  with pytest.raises(ValueError, match="promote_every=3"):
    fm.fp8_matmul(qa, sa, qb, sb, backend="pallas", promote_every=3, interpret=True)
  with pytest.raises(ValueError, match="backend='triton'"):
    fm.fp8_matmul(qa, sa, qb, sb, backend="triton")
  with pytest.raises(ValueError, match="qa must be \\[M, K\\]"):
    fm.fp8_matmul(qa, sa, qb[:100], sb)


@pytest.mark.parametrize("gran", ["row", "block128"])
def test_pallas_kernel_in_tpu_interpret_mode(gran):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  qa, sa, qb, sb, bias = _operands("e4m3", gran, m=128, k=256, n=128)
  out = fm.fp8_matmul(qa, sa, qb, sb, bias, backend="pallas", poison=float("nan"),
                      interpret=pltpu.InterpretParams(uninitialized_memory="nan"))
  assert _rel(out, fm.fp8_matmul_reference(qa, sa, qb, sb, bias)) < 1e-5
