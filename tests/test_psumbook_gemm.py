"""Psumbook GEMM: references against each other and a naive formula, every kernel against
the references (interpret mode on CPU, unchanged on a GPU), cross-lowering, bad inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import psumbook_gemm as pg
from pallas_kernels.psumbook_gemm import kernel as kernel_module
from pallas_kernels.testing import lowers_for

FORMATS = ["m1v4g128", "m2v8g128", "m1v4g32"]
TILES = pg.Tiles(block_n=128, block_k=256, block_b=8)  # several grid steps, split-K of 2


def _problem(name, b=4, k=512, n=256, seed=0):
  fmt = pg.CodebookFormat.parse(name)
  kw, kx = jax.random.split(jax.random.key(seed))
  w = pg.random_quantized(kw, fmt, k, n)
  x = jax.random.normal(kx, (b, k), jnp.float32)
  return fmt, w, x


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", FORMATS)
def test_references_agree_with_each_other_and_a_naive_formula(name):
  fmt, w, x = _problem(name, k=256, n=128)
  cb, codes, scales = (np.asarray(a, np.float64) for a in w)
  codes = codes.astype(np.int64)
  k, n = w.shape
  dense = np.zeros((k, n))
  for kk in range(k):  # W[k, n] = s[k // g, n] * sum_c C_c[code_c[k // v, n]][k % v]
    for c in range(fmt.m):
      dense[kk] += cb[c, codes[c, kk // fmt.v], kk % fmt.v]
    dense[kk] *= scales[kk // fmt.g]
  np.testing.assert_allclose(np.asarray(pg.dequantize_reference(w)), dense, rtol=1e-6,
                             atol=1e-7)
  want = np.asarray(x, np.float64) @ dense
  assert _rel(pg.dequant_matmul_reference(x, w), want) < 1e-6
  assert _rel(pg.psumbook_matmul_reference(x, w), want) < 1e-6


def test_format_facts():
  assert pg.CodebookFormat.parse("m1v4g128").bits_per_weight == 2.125
  assert pg.CodebookFormat.parse("m2v8g128").bits_per_weight == 2.125
  assert pg.CodebookFormat.parse("m1v4g32").bits_per_weight == 2.5
  w = pg.random_quantized(jax.random.key(0), pg.CodebookFormat.parse("m2v8g128"), 256, 128)
  assert w.codes.dtype == jnp.uint8 and w.fmt == pg.CodebookFormat.parse("m2v8g128")
  assert w.shape == (256, 128)


class PsumbookKernelTest:
  """Every kernel against the float32 references; INTERPRET=False runs them on a GPU."""

  INTERPRET = False
  BACKENDS = ("gather", "onehot", "dequant")

  @pytest.fixture(autouse=True)
  def _needs_device(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("compiled kernels need a GPU; the interpret-mode class runs here")

  @pytest.mark.parametrize("name", FORMATS)
  @pytest.mark.parametrize("batch", [1, 4, 16])
  def test_lookup_and_dequant_kernels_match_the_reference(self, name, batch):
    _, w, x = _problem(name, b=batch, seed=batch)
    want = pg.dequant_matmul_reference(x, w)
    for backend in self.BACKENDS:
      tiles = pg.Tiles(block_n=128, block_k=256, block_b=min(batch, 8))
      # The output buffer starts as NaN: a tile the kernel skipped would show.
      out = pg.psumbook_matmul(x, w, backend=backend, tiles=tiles, poison=float("nan"),
                               interpret=self.INTERPRET)
      assert out.shape == want.shape and out.dtype == jnp.float32
      assert np.isfinite(np.asarray(out)).all()
      assert _rel(out, want) < 2e-5, (backend, _rel(out, want))

  def test_bf16_activations(self):
    _, w, x = _problem("m1v4g128", b=2)
    xb = x.astype(jnp.bfloat16)
    want = pg.dequant_matmul_reference(xb, w)
    for backend in ("gather", "dequant"):
      out = pg.psumbook_matmul(xb, w, backend=backend, tiles=TILES, interpret=self.INTERPRET)
      assert _rel(out, want) < 2e-5

  def test_auto_picks_lookups_for_decode_and_dequant_for_prefill(self, monkeypatch):
    _, w, x = _problem("m1v4g128", b=32)
    calls = []
    real = kernel_module.dequant_matmul
    monkeypatch.setattr(kernel_module, "dequant_matmul",
                        lambda *a, **k: calls.append("dequant") or real(*a, **k))
    want = pg.dequant_matmul_reference(x, w)
    out = pg.psumbook_matmul(x, w, tiles=TILES, interpret=self.INTERPRET)
    assert calls == ["dequant"] and _rel(out, want) < 2e-5
    out = pg.psumbook_matmul(x[:4], w, tiles=TILES, interpret=self.INTERPRET)
    assert calls == ["dequant"] and _rel(out, want[:4]) < 2e-5


class TestPsumbookKernelInterpret(PsumbookKernelTest):
  INTERPRET = True


class TestPsumbookKernel(PsumbookKernelTest):
  INTERPRET = False


def test_onehot_kernel_in_tpu_interpret_mode():
  _, w, x = _problem("m2v8g128", b=2, k=256, n=128)
  # The TPU interpreter also fills uninitialized memory with NaN.
  out = pg.psumbook_matmul(x, w, backend="onehot", tiles=pg.Tiles(block_n=128, block_k=128),
                           poison=float("nan"),
                           interpret=pltpu.InterpretParams(uninitialized_memory="nan"))
  assert _rel(out, pg.dequant_matmul_reference(x, w)) < 2e-5


@pytest.mark.parametrize("platform,backend,marker", [
    ("cuda", "gather", "__gpu$xla.gpu.triton"),
    ("cuda", "dequant", "__gpu$xla.gpu.triton"),
    ("cuda", "onehot", "__gpu$xla.gpu.triton"),
    ("tpu", "onehot", "tpu_custom_call"),
])
def test_kernels_lower_for_their_platforms(platform, backend, marker):
  _, w, x = _problem("m1v4g128", b=4)
  text = lowers_for(platform, functools.partial(pg.psumbook_matmul, backend=backend,
                                                tiles=TILES), x, w)
  assert marker in text


def test_bad_inputs_are_clear_errors():
  fmt, w, x = _problem("m1v4g128", k=256, n=128)
  with pytest.raises(ValueError, match=r"codes must lie in \[0, 256\)"):
    pg.psumbook_matmul(x, w._replace(codes=w.codes.astype(jnp.int32).at[0, 0, 0].set(300)))
  with pytest.raises(ValueError, match="x has 255 inputs but the weight has K=256"):
    pg.psumbook_matmul(x[:, :255], w)
  with pytest.raises(ValueError, match="scales must be"):
    pg.psumbook_matmul(x, w._replace(scales=w.scales[:, :64]))
  with pytest.raises(ValueError, match="g=100 must be a multiple of v=8"):
    pg.CodebookFormat(m=2, v=8, g=100)
  with pytest.raises(ValueError, match="not of the form"):
    pg.CodebookFormat.parse("2x8")
  with pytest.raises(ValueError, match="not implemented by the gpu kernels"):
    pg.CodebookFormat(m=3, v=16, g=32).check_backend("gpu")
  with pytest.raises(ValueError, match="block_k=96 must divide K=256"):
    pg.psumbook_matmul(x, w, backend="gather", tiles=pg.Tiles(block_k=96), interpret=True)
  with pytest.raises(ValueError, match="backend='cuda'"):
    pg.psumbook_matmul(x, w, backend="cuda")
  with pytest.raises(ValueError, match="K=100 must be a multiple of g=128"):
    fmt.check_shape(100, 8)


def test_poison_shows_tiles_a_kernel_did_not_write():
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top

  def writes_first_tile_only(x_ref, o_ref):
    @pl.when(pl.program_id(0) == 0)
    def _():
      o_ref[...] = x_ref[...]

  x = jnp.ones((256,), jnp.float32)
  spec = pl.BlockSpec((128,), lambda i: (i,))
  out = kernel_module._call(writes_first_tile_only, (x,), [spec],
                            jax.ShapeDtypeStruct((256,), jnp.float32), spec, (2,),
                            float("nan"), True)
  assert np.all(np.asarray(out[:128]) == 1) and np.all(np.isnan(np.asarray(out[128:])))
