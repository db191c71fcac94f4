"""FP8 matmul kernels against the float32 reference (interpret mode on CPU, compiled and
unchanged on a GPU), the accumulation model, cross-lowering and bad inputs."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxsun.quant import fp8
from pallas_kernels import fp8_matmul as fm
from pallas_kernels.fp8_matmul import kernel as kernel_module
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


  # Odd shapes: M a decode batch (1, 3) or just past a tile (130), N = 200, K = 1400
  # (not a multiple of 128); block scales need K, N multiples of 128: K = 1408, N = 256.
  ODD = {"row": (1400, 200), "tensor": (1400, 200), "block128": (1408, 256)}

  @pytest.mark.parametrize("m", [1, 3, 130])
  @pytest.mark.parametrize("gran", ["row", "tensor", "block128"])
  def test_pallas_kernel_takes_odd_shapes(self, gran, m):
    k, n = self.ODD[gran]
    qa, sa, qb, sb, bias = _operands("e4m3", gran, m=m, k=k, n=n, seed=m)
    want = fm.fp8_matmul_reference(qa, sa, qb, sb, bias)
    out = fm.fp8_matmul(qa, sa, qb, sb, bias, backend="pallas", poison=float("nan"),
                        interpret=self.INTERPRET)
    assert out.shape == (m, n) and np.isfinite(np.asarray(out)).all()
    assert _rel(out, want) < 1e-5, _rel(out, want)

  @pytest.mark.parametrize("m", [1, 3, 130])
  def test_mosaic_kernel_takes_odd_shapes(self, m):
    qa, sa, qb, sb, bias = _operands("e4m3", "row", m=m, k=200, n=200, seed=m)
    out = fm.fp8_matmul(qa, sa, qb, sb, bias, backend="mosaic",
                        interpret=plgpu.InterpretGPUParams() if self.INTERPRET else False)
    assert out.shape == (m, 200)
    assert _rel(out, fm.fp8_matmul_reference(qa, sa, qb, sb, bias)) < 1e-5

  @pytest.mark.parametrize("m,thin,want", [(3, False, "xla"), (3, True, "mosaic"),
                                            (256, False, "mosaic")])
  def test_auto_on_a_hopper_runs_its_choice(self, monkeypatch, m, thin, want):
    # auto with an H200 stood in for (interpreted here; the real device on a GPU run),
    # with and without the Mosaic kernel's thin configuration.
    from pallas_kernels.fp8_matmul import mosaic  # pylint: disable=g-import-not-at-top
    qa, sa, qb, sb, bias = _operands("e4m3", "row", m=m, k=256, n=128, seed=m)
    monkeypatch.setattr(kernel_module, "_platform_and_kind",
                        lambda: ("gpu", "NVIDIA H200"))
    monkeypatch.setattr(kernel_module, "_mosaic_features", lambda: (thin, False))
    ran = []
    for module, name, label in ((kernel_module, "fp8_matmul_pallas", "pallas_triton"),
                                (kernel_module, "fp8_matmul_xla", "xla"),
                                (mosaic, "fp8_matmul_mosaic", "mosaic")):
      real = getattr(module, name)
      monkeypatch.setattr(module, name,
                          functools.partial(lambda real, label, *a, **k: ran.append(label)
                                            or real(*a, **k), real, label))
    out = fm.fp8_matmul(qa, sa, qb, sb, bias,
                        interpret=plgpu.InterpretGPUParams() if self.INTERPRET
                        else self.INTERPRET)
    assert ran == [want]
    assert _rel(out, fm.fp8_matmul_reference(qa, sa, qb, sb, bias)) < 1e-5


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
  # A K tile that does not divide K is no longer an error: K is zero-padded to 576.
  out = fm.fp8_matmul(qa[:8], sa[:8], qb, sb, backend="pallas", tiles=fm.Tiles(block_k=96),
                      interpret=True)
  assert _rel(out, fm.fp8_matmul_reference(qa[:8], sa[:8], qb, sb)) < 1e-5
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


H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"


@pytest.mark.parametrize("kind", [H100, H200])
@pytest.mark.parametrize("m,want,want_thin", [
    (1, "xla", "mosaic"), (3, "xla", "mosaic"), (16, "xla", "mosaic"),
    (127, "xla", "mosaic"), (128, "mosaic", "mosaic"), (130, "xla", "xla"),
    (256, "mosaic", "mosaic"), (4000, "mosaic", "mosaic"), (8192, "mosaic", "mosaic")])
def test_auto_choice_on_hopper(kind, m, want, want_thin):
  # Without the thin configuration decode batches go to cuBLASLt (the Mosaic kernel
  # would pad them to 128 rows); M = 130 would pad to 256. The Triton kernel never runs.
  for mode in ("tensor", "rowcol"):
    assert fm.choose_backend("gpu", kind, m, 8192, 8192, mode) == want, mode
    assert fm.choose_backend("gpu", kind, m, 8192, 8192, mode, mosaic_thin=True,
                             mosaic_block=True) == want_thin, mode


def test_auto_choice_otherwise():
  choose = fm.choose_backend
  # Block scales: Mosaic where it takes them, else the Triton fallback.
  assert choose("gpu", H100, 256, 4096, 4096, "block") == "pallas_triton"
  assert choose("gpu", H100, 256, 4096, 4096, "block", mosaic_block=True) == "mosaic"
  assert choose("gpu", H100, 16, 4096, 4096, "block", mosaic_block=True) == "pallas_triton"
  assert choose("gpu", H100, 16, 4096, 4096, "block", mosaic_block=True,
                mosaic_thin=True) == "mosaic"
  assert choose("gpu", H100, 256, 4096, 200, "rowcol") == "xla"  # N % 128
  assert choose("gpu", H100, 256, 1400, 4096, "rowcol") == "xla"  # K % 128
  assert choose("gpu", H100, 256, 4096, 4096, "rowcol",
                accumulation_model=True) == "pallas_triton"
  assert choose("gpu", H100, 256, 4096, 4096, "rowcol", same_fp8_type=False) == "xla"
  assert choose("gpu", "NVIDIA A100-SXM4-80GB", 256, 4096, 4096, "rowcol") == "xla"
  assert choose("gpu", "NVIDIA A100-SXM4-80GB", 256, 4096, 4096, "block") == "pallas_triton"
  assert choose("tpu", "", 256, 4096, 4096, "rowcol") == "pallas"
  assert choose("cpu", "", 256, 4096, 4096, "rowcol") == "xla"
  assert choose("cpu", "", 256, 4096, 4096, "block", mosaic_block=True) == "xla"
  assert choose("cpu", "", 256, 4096, 4096, "rowcol", interpret=True) == "pallas"


def test_auto_never_picks_a_kernel_that_cannot_take_the_call():
  # A grid of (platform, device, shape, scales, options): the pick always passes
  # `backend_takes`, the Triton kernel only for block scales or the accumulation model,
  # and every backend named in AUTO_TABLE is a real one.
  assert {b for _, _, b in fm.AUTO_TABLE} <= set(fm.BACKENDS) - {"auto"}
  devices = [("gpu", H100), ("gpu", H200), ("gpu", "NVIDIA A100-SXM4-80GB"), ("tpu", ""),
             ("cpu", "")]
  picked = set()
  for platform, kind in devices:
    for m in (1, 3, 16, 64, 127, 128, 130, 256, 4000, 8192):
      for k, n, modes in ((8192, 8192, ("tensor", "rowcol", "block")),
                          (1408, 256, ("tensor", "rowcol", "block")),
                          (1400, 200, ("tensor", "rowcol"))):
        for mode in modes:
          for same, acc, interp, thin, block in itertools.product((True, False),
                                                                  repeat=5):
            q = fm.AutoQuery(platform, kind, m, k, n, mode, same, acc, interp, thin,
                             block)
            if acc and not (same and (platform != "cpu" or interp)):
              continue  # only the Pallas kernel models accumulation; no such call runs
            got = fm.choose_backend(platform, kind, m, k, n, mode, same_fp8_type=same,
                                    accumulation_model=acc, interpret=interp,
                                    mosaic_thin=thin, mosaic_block=block)
            picked.add(got)
            assert fm.backend_takes(got, q), q
            if got == "pallas_triton":  # the fallback: only what Mosaic and XLA lack
              assert platform == "gpu" and (acc or mode == "block"), q
  assert picked == {"xla", "mosaic", "pallas_triton", "pallas"}


def test_pallas_triton_is_the_pallas_kernel():
  qa, sa, qb, sb, bias = _operands("e4m3", "row", m=8, k=256, n=128)
  a = fm.fp8_matmul(qa, sa, qb, sb, bias, backend="pallas_triton", interpret=True)
  b = fm.fp8_matmul(qa, sa, qb, sb, bias, backend="pallas", interpret=True)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("backend", ["auto", "pallas", "mosaic", "xla"])
def test_bias_shape_is_checked_before_any_kernel(backend, monkeypatch):
  qa, sa, qb, sb, bias = _operands("e4m3", "row", m=8, k=256, n=128)
  # Any kernel launch would fail the test: the shape check has to come first.
  monkeypatch.setattr(kernel_module._util, "pallas_call",
                      lambda *a, **k: pytest.fail("a kernel ran"))
  for bad in (bias[:100], bias.reshape(1, 128), jnp.zeros((129,))):
    with pytest.raises(ValueError, match=r"bias must be \[N\] with N=128"):
      fm.fp8_matmul(qa, sa, qb, sb, bad, backend=backend, interpret=True)
  with pytest.raises(ValueError, match="bias must be floating point"):
    fm.fp8_matmul(qa, sa, qb, sb, jnp.zeros((128,), jnp.int32), backend=backend)


def test_bias_check_control():
  # Control: the right length passes, and without the check a wrong length fails inside
  # jax with a message that does not name `bias` (or silently broadcasts).
  qa, sa, qb, sb, bias = _operands("e4m3", "row", m=8, k=256, n=128)
  fm.check_bias(bias, 128)
  assert _rel(fm.fp8_matmul(qa, sa, qb, sb, bias, backend="xla"),
              fm.fp8_matmul_reference(qa, sa, qb, sb, bias)) < 1e-5
  with pytest.raises(ValueError, match="bias must be"):
    fm.check_bias(bias[:100], 128)
  y = jnp.dot(qa, qb, preferred_element_type=jnp.float32)
  with pytest.raises((TypeError, ValueError), match="Incompatible shapes") as raw:
    y + bias[:100]  # pylint: disable=expression-not-assigned
  assert "bias" not in str(raw.value)


def test_odd_shapes_lower_for_their_platforms():
  # Padded tiles keep Triton's power-of-two loads and TPU's block alignment.
  for gran, (k, n) in Fp8MatmulTest.ODD.items():
    args = _operands("e4m3", gran, m=3, k=k, n=n)
    for platform, marker in (("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")):
      text = lowers_for(platform, functools.partial(fm.fp8_matmul, backend="pallas"), *args)
      assert marker in text, (gran, platform)
  args = _operands("e4m3", "row", m=3, k=200, n=200)
  assert "mosaic_gpu" in lowers_for("cuda", functools.partial(fm.fp8_matmul,
                                                              backend="mosaic"), *args)
