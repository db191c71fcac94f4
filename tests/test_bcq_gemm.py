"""BCQ GEMM: packing, the references against float64 numpy (and jaxsun's), every kernel
against the reference (interpret mode on CPU, compiled on a Hopper GPU / TPU),
multi-tile grids, cross-lowering, bad inputs, and a control that the comparison bites."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import bcq_gemm as bq
from pallas_kernels.bcq_gemm import kernel as kernel_module
from pallas_kernels.bcq_gemm import mosaic
from pallas_kernels.testing import lowers_for

NAN = float("nan")
# (bits, group size or None for per-channel, batch M): every bits x grouping pair once,
# each M twice (the full product would cost minutes in the interpreters).
CASES = [(2, 128, 1), (2, None, 130), (3, 128, 3), (3, None, 1), (4, 128, 130), (4, None, 3)]


def _codes(bits, k, n, g, seed=0):
  """Unpacked codes i8[bits, K, N], alpha f32[bits, K/g, N], offset f32[K/g, N]."""
  rng = np.random.default_rng(seed)
  b = np.where(rng.random((bits, k, n)) < 0.5, 1, -1).astype(np.int8)
  alpha = np.abs(rng.standard_normal((bits, k // g, n))).astype(np.float32) / 8
  offset = rng.standard_normal((k // g, n)).astype(np.float32) / 32
  return b, alpha, offset


def _problem(bits, g, m, k=512, n=200, seed=0):
  w = bq.random_bcq(jax.random.key(seed), bits, k, n, g or k)
  x = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((m, k)), jnp.float32)
  return w, x


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _dense_f64(b, alpha, offset):
  """W_hat in float64 numpy, straight from the definition."""
  b, alpha, offset = (np.asarray(a, np.float64) for a in (b, alpha, offset))
  bits, k, n = b.shape
  g = k // alpha.shape[1]
  dense = np.zeros((k, n))
  for kk in range(k):
    dense[kk] = offset[kk // g] + sum(alpha[i, kk // g] * b[i, kk] for i in range(bits))
  return dense


def test_pack_unpack_roundtrip_and_bit_layout():
  b, alpha, offset = _codes(3, 256, 40, 64)
  w = bq.pack(b, alpha, offset)
  assert w.bits_packed.dtype == jnp.uint32 and w.bits_packed.shape == (3, 8, 40)
  assert w.shape == (256, 40) and w.bits == 3 and w.group_size == 64
  np.testing.assert_array_equal(np.asarray(bq.unpack(w)), np.asarray(b))
  # LUT-GEMM's layout: bit j of word [i, w, n] is b[i, 32 w + j, n] == +1.
  words = np.asarray(w.bits_packed)
  bn = np.asarray(b)
  for i, wi, n, j in [(0, 0, 0, 0), (1, 3, 7, 31), (2, 7, 39, 17), (0, 5, 20, 8)]:
    assert (words[i, wi, n] >> j) & 1 == (bn[i, 32 * wi + j, n] == 1)


@pytest.mark.parametrize("bits,g", [(2, 32), (3, 128), (4, 256)])
def test_references_match_float64_numpy_and_jaxsun(bits, g):
  from jaxsun.quant.ptq import bcq as jbcq  # pylint: disable=g-import-not-at-top
  b, alpha, offset = _codes(bits, 256, 72, g, seed=bits)
  w = bq.pack(b, alpha, offset)
  x = jnp.asarray(np.random.default_rng(7).standard_normal((5, 256)), jnp.float32)
  dense = _dense_f64(b, alpha, offset)
  np.testing.assert_allclose(np.asarray(bq.dequantize_reference(w)), dense, rtol=1e-6,
                             atol=1e-7)
  want = np.asarray(x, np.float64) @ dense
  assert _rel(bq.bcq_matmul_reference(x, w), want) < 1e-6
  assert _rel(bq.lut_reference(x, w), want) < 1e-6
  assert _rel(bq.lut_reference(x, w, mu=4), want) < 1e-6
  ref = jbcq.bcq_matmul_reference(x, jbcq.BCQWeight(b=b, alpha=alpha, offset=offset))
  assert _rel(ref, want) < 1e-6
  assert _rel(bq.bcq_matmul(x, w), want) < 1e-6  # "auto" on CPU: the reference


class BCQKernelTest:
  """Kernels against the float32 reference; INTERPRET=False compiles them on a device."""

  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _needs_device(self):
    if not self.INTERPRET and jax.default_backend() == "cpu":
      pytest.skip("compiled kernels need a GPU or TPU; the interpret class runs here")

  def _run(self, backend, x, w, **kw):
    if not self.INTERPRET:
      kind = jax.devices()[0].device_kind
      if backend == "mosaic" and not any(h in kind for h in ("H100", "H200")):
        pytest.skip("the Mosaic kernel needs Hopper")
      if backend in ("lut", "dequant") and jax.default_backend() != "tpu":
        pytest.skip("the lut and dequant kernels are TPU kernels")
    # The output buffer starts as NaN: a tile the kernel skipped would show.
    out = bq.bcq_matmul(x, w, backend=backend, poison=NAN, interpret=self.INTERPRET, **kw)
    assert out.shape == (x.shape[0], w.shape[1]) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    return out

  @pytest.mark.parametrize("backend", ["lut", "dequant"])
  @pytest.mark.parametrize("bits,g,m", CASES)
  def test_pallas_kernels_match_the_reference(self, backend, bits, g, m):
    w, x = _problem(bits, g, m)
    out = self._run(backend, x, w, tiles=bq.Tiles(block_m=136, block_n=256))
    assert _rel(out, bq.bcq_matmul_reference(x, w)) < 1e-5

  @pytest.mark.parametrize("bits,g,m", CASES)
  def test_mosaic_kernel_matches_the_reference(self, bits, g, m):
    w, x = _problem(bits, g, m)
    out = self._run("mosaic", x, w, tiles=mosaic.MosaicTiles(tile_m=136))
    assert _rel(out, bq.bcq_matmul_reference(x, w)) < 5e-5  # bf16 hi + lo splits

  @pytest.mark.parametrize("backend", ["lut", "dequant"])
  @pytest.mark.parametrize("g,block_k", [(128, 64), (32, 128)])
  def test_pallas_multi_tile_grid(self, backend, g, block_k):
    # 3 x 2 output tiles, 4 or 2 K steps; K tiles smaller than a group, or holding several.
    w, x = _problem(3, g, 130, k=256, seed=3)
    out = self._run(backend, x, w, tiles=bq.Tiles(block_m=48, block_n=128,
                                                  block_k=block_k))
    assert _rel(out, bq.bcq_matmul_reference(x, w)) < 1e-5

  def test_mosaic_multi_tile_grid(self):
    # 4 x 2 output tiles (N=200 padded to 256, M=16 in tiles of 8), 2 pipelined K steps.
    w, x = _problem(2, 256, 16, k=1024, seed=4)
    out = self._run("mosaic", x, w, tiles=mosaic.MosaicTiles(tile_m=8))
    assert _rel(out, bq.bcq_matmul_reference(x, w)) < 5e-5

  def test_flipping_one_code_bit_is_caught(self):
    # Control: the tolerances above would catch a single wrong bit.
    w, x = _problem(3, 128, 3, seed=5)
    words = w.bits_packed.at[2, 5, 17].set(w.bits_packed[2, 5, 17] ^ jnp.uint32(1 << 9))
    bad = w._replace(bits_packed=words)
    want = bq.bcq_matmul_reference(x, w)
    assert _rel(bq.bcq_matmul_reference(x, bad), want) > 1e-4
    for backend in ("lut", "dequant"):
      out = self._run(backend, x, bad, tiles=bq.Tiles(block_m=8, block_n=256))
      assert _rel(out, want) > 1e-4 and _rel(out, bq.bcq_matmul_reference(x, bad)) < 1e-5


class TestBCQKernelInterpret(BCQKernelTest):
  INTERPRET = True


class TestBCQKernel(BCQKernelTest):
  INTERPRET = False


@pytest.mark.parametrize("backend", ["lut", "dequant"])
def test_pallas_kernels_in_tpu_interpret_mode(backend):
  # The TPU interpreter enforces TPU rules (e.g. no pointer gathers) and fills
  # uninitialized memory with nan.
  w, x = _problem(2, 128, 3, k=256, n=128)
  out = bq.bcq_matmul(x, w, backend=backend, poison=NAN,
                      interpret=pltpu.InterpretParams(uninitialized_memory="nan"))
  assert _rel(out, bq.bcq_matmul_reference(x, w)) < 1e-5


def test_mosaic_interpreter_poison_shows_unwritten_memory():
  # The Mosaic output has no aliased input to pre-fill: with `poison`, the interpreter
  # fills uninitialized memory with nan instead. A kernel writing only its first tile:
  from jax import lax  # pylint: disable=g-import-not-at-top
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top

  def first_tile_only(x_gmem, o_gmem):
    @pl.when(lax.axis_index("i") == 0)
    def _():
      o_gmem[pl.ds(0, 128)] = x_gmem[pl.ds(0, 128)]

  params = mosaic._poisoned_params(  # pylint: disable=protected-access
      plgpu.InterpretGPUParams(), NAN)
  out = plgpu.kernel(first_tile_only, out_type=jax.ShapeDtypeStruct((256,), jnp.float32),
                     grid=(2,), grid_names=("i",), interpret=params)(jnp.ones((256,)))
  assert np.all(np.asarray(out[:128]) == 1) and np.all(np.isnan(np.asarray(out[128:])))
  with pytest.raises(ValueError, match="poison=0.0"):
    mosaic.bcq_matmul_mosaic(*_problem(2, 128, 3, k=512, n=64)[::-1], poison=0.0,
                             interpret=True)


@pytest.mark.parametrize("bits", [1, 4, 8])
@pytest.mark.parametrize("precise", [False, True])
def test_mosaic_tiles_fit_shared_memory(bits, precise):
  # The interpreter does not model the 227 KB limit; the entry point must keep to it.
  for m in (1, 3, 130, 1024):
    t = mosaic.fit_tiles(mosaic.MosaicTiles(tile_m=256, stages=4), m, bits, precise)
    assert mosaic.smem_bytes(t, bits, precise) <= mosaic.SMEM_BYTES
    assert t.tile_m % 8 == 0 and t.tile_m >= min(8 * -(-m // 8), 64)


def test_auto_backend(monkeypatch):
  w, x = _problem(2, 128, 3, k=256, n=128)
  calls = []
  for name in ("lut_matmul", "dequant_matmul", "bcq_matmul_reference"):
    real = getattr(kernel_module, name)
    monkeypatch.setattr(kernel_module, name,
                        lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
  bq.bcq_matmul(x, w)
  assert calls == ["bcq_matmul_reference"]  # CPU, not interpreting
  bq.bcq_matmul(x, w, interpret=True)
  assert calls[1:] == ["lut_matmul"]  # decode
  x_prefill = jnp.ones((bq.MAX_LUT_BATCH + 1, x.shape[1]))
  bq.bcq_matmul(x_prefill, w, interpret=True)
  assert calls[2:] == ["dequant_matmul"]
  auto = kernel_module._auto_backend  # pylint: disable=protected-access
  assert auto(1, plgpu.InterpretGPUParams()) == "mosaic"


@pytest.mark.parametrize("platform,backend,kw,marker", [
    ("cuda", "mosaic", {}, "mosaic_gpu"),
    ("cuda", "mosaic", dict(a_in_registers=True), "mosaic_gpu"),
    ("cuda", "mosaic", dict(a_in_registers=True, precise=False), "mosaic_gpu"),
    ("tpu", "dequant", {}, "tpu_custom_call"),
    ("tpu", "lut", {}, "tpu_custom_call"),
])
def test_kernels_lower_for_their_platforms(platform, backend, kw, marker):
  w, x = _problem(3, 128, 130)
  if backend == "mosaic":
    f = functools.partial(mosaic.bcq_matmul_mosaic, **kw)
  else:
    f = functools.partial(bq.bcq_matmul, backend=backend)
  assert marker in lowers_for(platform, f, x, w)


@pytest.mark.parametrize("backend", ["lut", "dequant"])
def test_tpu_lowering_with_split_k_and_per_channel_groups(backend):
  w, x = _problem(2, None, 130, k=8192, n=256)
  f = functools.partial(bq.bcq_matmul, backend=backend, tiles=bq.Tiles(block_k=4096))
  assert "tpu_custom_call" in lowers_for("tpu", f, x, w)


def test_bad_inputs_are_clear_errors():
  b, alpha, offset = _codes(2, 256, 64, 64)
  w = bq.pack(b, alpha, offset)
  x = jnp.ones((2, 256))
  with pytest.raises(ValueError, match="b: K=100 must be a multiple of 32"):
    bq.pack(b[:, :100], alpha, offset)
  with pytest.raises(ValueError, match="b must hold only -1 and \\+1"):
    bq.pack(jnp.asarray(b).at[0, 0, 0].set(0), alpha, offset)
  with pytest.raises(ValueError, match="alpha must be"):
    bq.pack(b, alpha[:, :, :10], offset)
  with pytest.raises(ValueError, match="alpha must be"):
    bq.bcq_matmul(x, w._replace(alpha=alpha[:1]))
  with pytest.raises(ValueError, match="alpha: group size g=16 must be a multiple of 32"):
    bq.pack(b, jnp.ones((2, 16, 64)), jnp.ones((16, 64)))
  with pytest.raises(ValueError, match="offset must have shape"):
    bq.bcq_matmul(x, w._replace(offset=offset[:2]))
  with pytest.raises(ValueError, match="x has 128 inputs but the weight has K=256"):
    bq.bcq_matmul(x[:, :128], w)
  with pytest.raises(ValueError, match="backend='triton'"):
    bq.bcq_matmul(x, w, backend="triton")
  with pytest.raises(ValueError, match="Tiles.block_k=48"):
    bq.Tiles(block_k=48)
  with pytest.raises(ValueError, match="MosaicTiles.tile_m=12"):
    mosaic.MosaicTiles(tile_m=12)
  with pytest.raises(ValueError, match="takes MosaicTiles"):
    bq.bcq_matmul(x, w, backend="mosaic", tiles=bq.Tiles(), interpret=True)
  with pytest.raises(ValueError, match="the lut backend takes Tiles"):
    bq.bcq_matmul(x, w, backend="lut", tiles=mosaic.MosaicTiles(), interpret=True)
  with pytest.raises(ValueError, match="Tiles.unroll=3"):
    bq.Tiles(unroll=3)
