"""Psumbook GEMM: references against each other and a naive formula, every kernel against
the references (interpret mode on CPU, unchanged on a GPU), cross-lowering, bad inputs."""

import functools
import itertools

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


  @pytest.mark.parametrize("batch", [1, 3, 130])
  def test_odd_shapes_with_default_tiles(self, batch):
    # K = 1408 = 11 groups of 128 (no power-of-two K tile of default size divides it),
    # N = 200 (not a tile multiple), B odd: the entry points pad and slice.
    _, w, x = _problem("m1v4g128", b=batch, k=1408, n=200, seed=batch)
    want = pg.dequant_matmul_reference(x, w)
    backends = [*self.BACKENDS, "auto"] if batch <= 16 else ["dequant", "auto"]
    for backend in backends:
      out = pg.psumbook_matmul(x, w, backend=backend, poison=float("nan"),
                               interpret=self.INTERPRET)
      assert out.shape == (batch, 200) and out.dtype == jnp.float32
      assert np.isfinite(np.asarray(out)).all(), backend
      assert _rel(out, want) < 2e-5, (backend, _rel(out, want))

  def test_odd_shapes_other_formats(self):
    # m2v8 (two codebooks) and g=32 (K tile 128 = 4 groups) at B=3, N=200, K=1408.
    for name in ("m2v8g128", "m1v4g32"):
      _, w, x = _problem(name, b=3, k=1408, n=200, seed=7)
      want = pg.dequant_matmul_reference(x, w)
      for backend in self.BACKENDS:
        out = pg.psumbook_matmul(x, w, backend=backend, poison=float("nan"),
                                 interpret=self.INTERPRET)
        assert _rel(out, want) < 2e-5, (name, backend, _rel(out, want))


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


def test_tiles_fit_adjusts_instead_of_rejecting():
  m1v4g128, m1v4g32 = pg.CodebookFormat.parse("m1v4g128"), pg.CodebookFormat.parse("m1v4g32")
  # K = 1408 = 11 * 128: the K tile falls to 128; N, B clip to the next power of two.
  assert pg.Tiles().fit(m1v4g128, 3, 1408, 200) == pg.Tiles(block_n=256, block_k=128,
                                                              block_b=4)
  assert pg.Tiles().fit(m1v4g32, 130, 1408, 4096) == pg.Tiles(block_n=256, block_k=128,
                                                                block_b=64)
  # A block_k that is no g * 2**j is clipped down to one that divides K.
  assert pg.Tiles(block_k=1000).fit(m1v4g128, 1, 2048, 128).block_k == 512
  assert pg.Tiles().fit(m1v4g128, 1, 4096, 14336) == pg.Tiles(block_b=1)  # unchanged


@pytest.mark.parametrize("batch,want,want_ffi", [
    (1, "gather_triton", "ffi"), (3, "gather_triton", "ffi"), (16, "gather_triton", "ffi"),
    (17, "dequant_triton", "dequant_triton"), (130, "dequant_triton", "dequant_triton"),
    (256, "dequant_triton", "dequant_triton")])
def test_auto_choice_on_an_h100(batch, want, want_ffi):
  # The CUDA GEMV takes decode batches where it is built; the Triton kernels otherwise.
  fmt = pg.CodebookFormat.parse("m1v4g128")  # 2.125 bits per weight
  assert pg.choose_backend("gpu", batch, fmt) == want
  assert pg.choose_backend("gpu", batch, fmt, ffi=True) == want_ffi


def test_auto_choice_by_platform_and_format():
  fmt = pg.CodebookFormat.parse("m2v8g128")
  odd = pg.CodebookFormat(m=3, v=16, g=32)  # no lookup kernel implements it
  no_ffi = pg.CodebookFormat(m=1, v=4, g=16)  # g not a multiple of the GEMV's 32
  assert [pg.choose_backend("tpu", b, fmt) for b in (3, 130)] == ["onehot", "xla_dequant"]
  assert [pg.choose_backend("cpu", b, fmt) for b in (3, 130)] == ["xla", "xla_dequant"]
  assert pg.choose_backend("cpu", 3, fmt, ffi=True) == "xla"
  assert pg.choose_backend("cpu", 3, fmt, interpret=True) == "gather_triton"
  assert pg.choose_backend("gpu", 3, odd) == "dequant_triton"
  assert pg.choose_backend("gpu", 3, odd, ffi=True) == "ffi"  # b=8, v | 32, 32 | g
  assert pg.choose_backend("gpu", 3, no_ffi, ffi=True) == "gather_triton"
  assert pg.choose_backend("tpu", 3, odd) == "xla"
  assert pg.choose_backend("gpu", 8, fmt, max_lookup_batch=4) == "dequant_triton"
  assert pg.choose_backend("gpu", 8, fmt, max_lookup_batch=4, ffi=True) == "dequant_triton"


def test_auto_never_picks_a_kernel_that_cannot_take_the_call():
  assert {b for _, _, b in kernel_module.AUTO_TABLE} <= set(pg.BACKENDS) - {"auto"}
  formats = [pg.CodebookFormat.parse(n) for n in ("m1v4g128", "m2v8g128", "m1v4g32")]
  formats += [pg.CodebookFormat(m=3, v=16, g=32), pg.CodebookFormat(m=1, v=4, g=16),
              pg.CodebookFormat(m=1, b=4, v=4, g=128)]
  picked = set()
  for platform in ("gpu", "tpu", "cpu"):
    for fmt in formats:
      for batch in (1, 3, 16, 17, 130):
        for interp, ffi in itertools.product((False, True), repeat=2):
          q = kernel_module.AutoQuery(platform, batch, fmt, 16, interp, ffi)
          got = pg.choose_backend(platform, batch, fmt, interpret=interp, ffi=ffi)
          picked.add(got)
          assert kernel_module.backend_takes(got, q), (got, q)
          if got.endswith("_triton"):  # the fallbacks: no CUDA GEMV for the call
            assert platform in ("gpu", "cpu") and not (
                platform == "gpu" and batch <= 16 and kernel_module.backend_takes("ffi", q))
  assert picked == {"ffi", "gather_triton", "dequant_triton", "onehot", "xla", "xla_dequant"}


def test_old_backend_names_are_aliases():
  _, w, x = _problem("m1v4g128", b=2, k=256, n=128)
  for old, new in kernel_module.BACKEND_ALIASES.items():
    a = pg.psumbook_matmul(x, w, backend=old, tiles=TILES, interpret=True)
    b = pg.psumbook_matmul(x, w, backend=new, tiles=TILES, interpret=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_odd_shapes_lower_for_their_platforms():
  # Triton loads need power-of-two sizes; TPU blocks (8, 128)-aligned or full.
  _, w, x = _problem("m1v4g128", b=3, k=1408, n=200)
  for platform, backend, marker in [("cuda", "gather", "__gpu$xla.gpu.triton"),
                                    ("cuda", "dequant", "__gpu$xla.gpu.triton"),
                                    ("tpu", "onehot", "tpu_custom_call")]:
    text = lowers_for(platform, functools.partial(pg.psumbook_matmul, backend=backend), x, w)
    assert marker in text, (platform, backend)


def test_control_without_padding_the_odd_shape_check_fails(monkeypatch):
  # Control: with N left unpadded (the kernel reads a 256-wide tile from 200 outputs),
  # the comparison used by the odd-shape tests does fail.
  _, w, x = _problem("m1v4g128", b=3, k=1408, n=200)
  want = pg.dequant_matmul_reference(x, w)
  monkeypatch.setattr(kernel_module, "_pad_outputs", lambda w, n: w)
  out = np.asarray(pg.psumbook_matmul(x, w, backend="gather", poison=float("nan"),
                                      interpret=True))
  assert not (np.isfinite(out).all() and _rel(out, want) < 2e-5)


def test_mosaic_gpu_still_cannot_lower_a_shared_memory_gather():
  """Why there is no Mosaic GPU Psumbook kernel (kernel.py's docstring): a lane-varying
  load from shared memory does not lower. When this fails, jax learned the gather: write
  the Mosaic GPU version."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

  def kernel(table_ref, idx_ref, o_ref):
    def body(t_smem, i_smem, bar):
      plgpu.copy_gmem_to_smem(table_ref, t_smem, bar.at[0])
      plgpu.copy_gmem_to_smem(idx_ref, i_smem, bar.at[0])
      plgpu.barrier_wait(bar.at[0])
      o_ref[...] = t_smem[i_smem[...]]  # f32[128]: out[i] = table[idx[i]]
    pl.run_scoped(body, plgpu.SMEM((256,), jnp.float32), plgpu.SMEM((128,), jnp.int32),
                  plgpu.Barrier(num_arrivals=2, num_barriers=1), collective_axes="wg")

  def gather(table, idx):
    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((128,), jnp.float32),
                        grid=(1,), grid_names=("x",), num_threads=1,
                        thread_name="wg")(table, idx)

  table = jax.random.normal(jax.random.key(0), (256,), jnp.float32)
  idx = jax.random.randint(jax.random.key(1), (128,), 0, 256, jnp.int32)
  with pytest.raises(NotImplementedError, match="int_indexer_shape"):
    lowers_for("cuda", gather, table, idx)
