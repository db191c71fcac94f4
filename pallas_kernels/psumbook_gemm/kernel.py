"""Psumbook GEMM (CodeGEMM): `y = x @ W` for a codebook-quantized W, without dequantizing.

For decode batches the product is computed from a **Psumbook**: the partial sums of every
activation chunk with every centroid,

    P[b, j, c, i] = sum_t x[b, j*v + t] * codebooks[c, i, t]          f32[B, K/v, m, 2**b]
    y[b, n]       = sum_G scales[G, n] * sum_{j in G, c} P[b, j, c, codes[c, j, n]]

so each code costs one lookup and one add instead of v multiply-adds, and centroid x
activation products shared by many outputs are computed once. For larger batches
(prefill) the kernel dequantizes a tile of W on chip and multiplies on the tensor cores.

Entry points (all take `interpret`, and any batch and N; K a multiple of g):

    psumbook_matmul(x, w, *, tiles=None, backend="auto", interpret=False)  # any batch
    dequant_matmul(x, w, *, tiles=None, interpret=False)     # the AQLM-style baseline

References in jnp float32, beside the kernels: `dequantize_reference`,
`dequant_matmul_reference`, `psumbook_matmul_reference` (tests check them against each
other and the kernels against them).

Kernel designs (one `pl.pallas_call` each, split-K over the grid, partial sums reduced
by a deterministic `sum` afterwards):

* `gather` (GPU, Triton lowering): the Psumbook is built by XLA (one small matmul) and
  read with vector-index loads `p_ref[:, idx]`, which the Triton lowering supports
  (`take_along_axis` it does not). A K-tiled Psumbook kept in shared memory needs Mosaic
  GPU or a CUDA FFI kernel; that is the GPU tuning step, measured with the benchmark.
* `onehot` (TPU, Mosaic TPU): the lookup as a one-hot matmul on the MXU (TPU has no
  pointer gathers), exact with `precision=HIGHEST`.
* `dequant`: per group of g inputs, W's rows are gathered from the flattened codebooks,
  scaled, and multiplied on the tensor cores (the prefill path and the baseline).
* `ffi` (GPU, CUDA C++ through the XLA FFI, `cuda/psumbook_gemv.cu`): the CodeGEMM
  design, a K-tiled Psumbook built in shared memory, 32-bit code loads, deterministic
  split-K; see `ffi.py`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _util
from pallas_kernels.psumbook_gemm.format import CodebookFormat, QuantizedWeight, validate

BACKENDS = ("auto", "gather", "onehot", "dequant", "ffi", "xla", "xla_dequant")
HIGHEST = lax.Precision.HIGHEST


# ------------------------------------------------------------------------- references


def dequantize_reference(w: QuantizedWeight) -> jax.Array:
  """f32[K, N]: the dense weight (see `format.py`)."""
  cb, codes, scales = (jnp.asarray(a) for a in w)
  m, _, v = cb.shape
  _, j, n = codes.shape
  cb = cb.astype(jnp.float32)
  codes = codes.astype(jnp.int32)
  # gathered[c, j, n, t] = cb[c, codes[c, j, n], t]
  gathered = jax.vmap(lambda table, idx: table[idx])(cb, codes)  # f32[m, J, N, v]
  w_jnv = gathered.sum(axis=0)  # f32[J, N, v]
  dense = jnp.transpose(w_jnv, (0, 2, 1)).reshape(j * v, n)  # f32[K, N]
  g = (j * v) // scales.shape[0]
  return dense * jnp.repeat(scales.astype(jnp.float32), g, axis=0)


def dequant_matmul_reference(x: jax.Array, w: QuantizedWeight) -> jax.Array:
  """f32[B, N] = x @ dequantize(w), in float32 at the highest precision."""
  return jnp.dot(x.astype(jnp.float32), dequantize_reference(w), precision=HIGHEST)


def psumbook(x: jax.Array, codebooks: jax.Array) -> jax.Array:
  """f32[B, K/v, m, 2**b]: every activation chunk's dot product with every centroid."""
  m, c, v = codebooks.shape
  b, k = x.shape
  xv = x.astype(jnp.float32).reshape(b, k // v, v)  # f32[B, J, v]
  return jnp.einsum("bjt,cit->bjci", xv, codebooks.astype(jnp.float32), precision=HIGHEST)


def psumbook_matmul_reference(x: jax.Array, w: QuantizedWeight) -> jax.Array:
  """f32[B, N] through the Psumbook: gather partial sums by code, sum, scale per group."""
  cb, codes, scales = w
  p = psumbook(x, cb)  # f32[B, J, m, C]
  bsz, j, m, _ = p.shape
  n = codes.shape[2]
  idx = jnp.transpose(codes.astype(jnp.int32), (1, 0, 2))  # i32[J, m, N]
  # gathered[b, j, c, n] = P[b, j, c, codes[c, j, n]]: one lookup per code.
  gathered = jnp.take_along_axis(p, jnp.broadcast_to(idx[None], (bsz, j, m, n)), axis=-1)
  # gathered: f32[B, J, m, N]
  groups = scales.shape[0]
  per_group = gathered.sum(axis=2).reshape(bsz, groups, j // groups, n).sum(axis=2)
  return jnp.einsum("bgn,gn->bn", per_group, scales.astype(jnp.float32), precision=HIGHEST)


# ------------------------------------------------------------------------- tiling


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tiling knobs (they change speed, never the numbers beyond float reassociation).

  Attributes:
    block_n: outputs per grid step (a multiple of 128 on TPU).
    block_k: inputs per grid step (split-K); a multiple of the format's g.
    block_b: batch rows per grid step (dequant kernel; the gather kernels take the whole
      batch, which is small for decode).
  """

  block_n: int = 256
  block_k: int = 1024
  block_b: int = 64

  def __post_init__(self):
    for name in ("block_n", "block_k", "block_b"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"Tiles.{name}={value!r} must be a positive integer")

  def fit(self, fmt: CodebookFormat, b: int, k: int, n: int) -> Tiles:
    """These tiles adjusted to a [b, k] x [k, n] problem (the entry points pad to them).

    * block_k becomes the largest `g * 2**j` that is <= block_k and divides K, so K is
      never padded (K is a multiple of g: a format constraint) and Triton loads keep
      power-of-two sizes; e.g. K=1408, g=128 takes 128 (11 splits).
    * block_n and block_b are clipped to the next power of two of N and B; the entry
      points pad N (codes 0, scales 0) and B (zero rows) up to multiples of them and
      slice the result, so N=200 or B=3 work.

    Raises:
      ValueError: if block_k < g (no K tile of whole scale groups fits under it).
    """
    if self.block_k < fmt.g:
      raise ValueError(f"Tiles.block_k={self.block_k} must divide K={k} and be at least "
                       f"(a multiple of) g={fmt.g}")
    bk = fmt.g
    while bk * 2 <= self.block_k and k % (bk * 2) == 0:
      bk *= 2
    bn = min(self.block_n, _util.next_pow2(n))
    bb = min(self.block_b, _util.next_pow2(b))
    return Tiles(block_n=bn, block_k=bk, block_b=bb)


def _pad_outputs(w: QuantizedWeight, n: int) -> QuantizedWeight:
  """`w` with N padded to `n` outputs: code 0 (a valid centroid) times scale 0."""
  cb, codes, scales = w
  m, j, _ = codes.shape
  return QuantizedWeight(cb, _util.pad_to(codes, (m, j, n)),
                         _util.pad_to(scales, (scales.shape[0], n)))


def _check_inputs(x: jax.Array, w: QuantizedWeight) -> CodebookFormat:
  fmt = validate(w)
  if x.ndim != 2:
    raise ValueError(f"x must be [B, K], got shape {x.shape}")
  k, _ = w.shape
  if x.shape[1] != k:
    raise ValueError(f"x has {x.shape[1]} inputs but the weight has K={k}")
  return fmt


# ------------------------------------------------------------------------- kernels


def _gather_kernel(p_ref, codes_ref, s_ref, o_ref, *, fmt: CodebookFormat, bk: int):
  # p_ref:     f32[(bk/v) * m * C, B]  this K tile's Psumbook, rows flattened (j, c, i)
  # codes_ref: u8/i32[m, bk/v, bn]
  # s_ref:     f[bk/g, bn]
  # o_ref:     f32[1, bn, B]           this K tile's partial sums (outputs major)
  m, c, gv = fmt.m, fmt.num_centroids, fmt.g // fmt.v
  bn, bsz = codes_ref.shape[2], p_ref.shape[1]

  def group(gi, acc):
    def chunk(jj, g_acc):
      j = gi * gv + jj
      for cb in range(m):  # static: m is 1 or 2
        idx = codes_ref[cb, j, :].astype(jnp.int32) + (j * m + cb) * c  # i32[bn]
        g_acc = g_acc + p_ref[idx, :]  # f32[bn, B]: one row lookup per code
      return g_acc
    g_acc = lax.fori_loop(0, gv, chunk, jnp.zeros((bn, bsz), jnp.float32))
    return acc + g_acc * s_ref[gi, :].astype(jnp.float32)[:, None]

  o_ref[0] = lax.fori_loop(0, bk // fmt.g, group, jnp.zeros((bn, bsz), jnp.float32))


def _onehot_kernel(p_ref, codes_ref, s_ref, o_ref, *, fmt: CodebookFormat, bk: int):
  # p_ref:     f32[B, (bk/v) * m * C]
  # codes_ref: i32[m, bk/v, bn]
  # s_ref:     f[1, bk/g, bn]
  # o_ref:     f32[1, B, bn]
  m, c, gv = fmt.m, fmt.num_centroids, fmt.g // fmt.v
  bsz, bn = p_ref.shape[0], codes_ref.shape[2]
  iota = lax.broadcasted_iota(jnp.int32, (c, bn), 0)

  def group(gi, acc):
    def chunk(jj, g_acc):
      j = gi * gv + jj
      for cb in range(m):
        onehot = (codes_ref[cb, pl.ds(j, 1), :] == iota).astype(jnp.float32)  # f32[C, bn]
        p = p_ref[:, pl.ds((j * m + cb) * c, c)]  # f32[B, C]
        g_acc = g_acc + jnp.dot(p, onehot, precision=HIGHEST,
                                preferred_element_type=jnp.float32)
      return g_acc
    g_acc = lax.fori_loop(0, gv, chunk, jnp.zeros((bsz, bn), jnp.float32))
    return acc + g_acc * s_ref[0, pl.ds(gi, 1), :].astype(jnp.float32)

  o_ref[0] = lax.fori_loop(0, bk // fmt.g, group, jnp.zeros((bsz, bn), jnp.float32))


_call = _util.pallas_call


def _flat_psumbook(x, w: QuantizedWeight, fmt: CodebookFormat, t: Tiles):
  """(f32[B, (K/v) * m * C] Psumbook rows, splits, per-split width) for the lookups."""
  splits = x.shape[1] // t.block_k
  tile_p = (t.block_k // fmt.v) * fmt.m * fmt.num_centroids
  return psumbook(x, w.codebooks).reshape(x.shape[0], splits * tile_p), splits, tile_p


def _gather_call(x, w: QuantizedWeight, fmt: CodebookFormat, t: Tiles, poison, interpret):
  _, codes, scales = w
  b, n, bn, bk = x.shape[0], codes.shape[2], t.block_n, t.block_k
  p, splits, tile_p = _flat_psumbook(x, w, fmt, t)
  p = p.T  # f32[(K/v) * m * C, B]: one row per (chunk, codebook, centroid)
  partial = _call(
      functools.partial(_gather_kernel, fmt=fmt, bk=bk), (p, codes, scales),
      [pl.BlockSpec((tile_p, b), lambda i, s: (s, 0)),
       pl.BlockSpec((fmt.m, bk // fmt.v, bn), lambda i, s: (0, s, i)),
       pl.BlockSpec((bk // fmt.g, bn), lambda i, s: (s, i))],
      jax.ShapeDtypeStruct((splits, n, b), jnp.float32),
      pl.BlockSpec((1, bn, b), lambda i, s: (s, i, 0)), (n // bn, splits), poison, interpret)
  return partial.sum(axis=0).T  # deterministic split-K reduction


def _onehot_call(x, w: QuantizedWeight, fmt: CodebookFormat, t: Tiles, poison, interpret):
  _, codes, scales = w
  b, n, bn, bk = x.shape[0], codes.shape[2], t.block_n, t.block_k
  p, splits, tile_p = _flat_psumbook(x, w, fmt, t)  # f32[B, (K/v) * m * C]
  # TPU blocks need their last two dims full or (8, 128)-aligned: give scales a split axis.
  scales3 = scales.reshape(splits, bk // fmt.g, n)
  partial = _call(
      functools.partial(_onehot_kernel, fmt=fmt, bk=bk),
      (p, codes.astype(jnp.int32), scales3),  # int32 codes: TPU vregs hold 32-bit lanes
      [pl.BlockSpec((b, tile_p), lambda i, s: (0, s)),
       pl.BlockSpec((fmt.m, bk // fmt.v, bn), lambda i, s: (0, s, i)),
       pl.BlockSpec((1, bk // fmt.g, bn), lambda i, s: (s, 0, i))],
      jax.ShapeDtypeStruct((splits, b, n), jnp.float32),
      pl.BlockSpec((1, b, bn), lambda i, s: (s, 0, i)), (n // bn, splits), poison, interpret)
  return partial.sum(axis=0)


def _dequant_kernel(x_ref, cb_ref, codes_ref, s_ref, o_ref, *, fmt: CodebookFormat,
                    bk: int):
  # x_ref:     f[bb, v, bk/v]    activations with x[b, j*v + t] at [b, t, j]
  # cb_ref:    f32[m * C * v]    all codebooks, flattened (c, i, t)
  # codes_ref: u8/i32[m, bk/v, bn]
  # s_ref:     f[bk/g, bn]
  # o_ref:     f32[1, bb, bn]
  m, c, v, gv = fmt.m, fmt.num_centroids, fmt.v, fmt.g // fmt.v
  bb, bn = x_ref.shape[0], codes_ref.shape[2]

  def group(gi, acc):
    rows = pl.ds(gi * gv, gv)
    codes = [codes_ref[cb, rows, :].astype(jnp.int32) for cb in range(m)]  # i32[gv, bn]
    scale = s_ref[pl.ds(gi, 1), :].astype(jnp.float32)  # f32[1, bn]
    for t in range(v):  # static: W's rows t, t+v, t+2v, ... of this group
      w_t = sum(cb_ref[(cb * c + codes[cb]) * v + t] for cb in range(m))  # f32[gv, bn]
      xt = x_ref[:, t, rows].astype(jnp.float32)  # f32[bb, gv]
      acc = acc + jnp.dot(xt, w_t * scale, preferred_element_type=jnp.float32)
    return acc

  o_ref[0] = lax.fori_loop(0, bk // fmt.g, group, jnp.zeros((bb, bn), jnp.float32))


def dequant_matmul(x: jax.Array, w: QuantizedWeight, *, tiles: Tiles | None = None,
                   poison: float | None = None, interpret=False) -> jax.Array:
  """f32[B, N] = x @ W, dequantizing W tile by tile inside the kernel (AQLM-style).

  The prefill path of `psumbook_matmul` and the baseline of the benchmark. `poison`,
  `tiles` and `interpret` are as in `psumbook_matmul`.
  """
  fmt = _check_inputs(x, w)
  b, k = x.shape
  n = w.shape[1]
  t = (tiles or Tiles()).fit(fmt, b, k, n)
  bb, bn, bk = t.block_b, t.block_n, t.block_k
  # Any B and N: pad to the tile grid (zero rows; code 0 x scale 0), slice at the end.
  bp, n_pad = _util.round_up(b, bb), _util.round_up(n, bn)
  x = _util.pad_to(x, (bp, k))  # f[bp, K]
  cb, codes, scales = _pad_outputs(w, n_pad)  # codes [m, K/v, n_pad], scales [K/g, n_pad]
  splits = k // bk
  # x[b, j*v + t] -> xt[b, t, j]: each W row phase t multiplies a contiguous x slice.
  xt = x.reshape(bp, k // fmt.v, fmt.v).transpose(0, 2, 1)
  partial = _call(
      functools.partial(_dequant_kernel, fmt=fmt, bk=bk),
      (xt, cb.astype(jnp.float32).reshape(-1), codes, scales),
      [pl.BlockSpec((bb, fmt.v, bk // fmt.v), lambda r, i, s: (r, 0, s)),
       pl.BlockSpec((cb.size,), lambda r, i, s: (0,)),
       pl.BlockSpec((fmt.m, bk // fmt.v, bn), lambda r, i, s: (0, s, i)),
       pl.BlockSpec((bk // fmt.g, bn), lambda r, i, s: (s, i))],
      jax.ShapeDtypeStruct((splits, bp, n_pad), jnp.float32),
      pl.BlockSpec((1, bb, bn), lambda r, i, s: (s, r, i)), (bp // bb, n_pad // bn, splits),
      poison, interpret)
  return partial.sum(axis=0)[:b, :n]


def choose_backend(platform: str, batch: int, fmt: CodebookFormat, *,
                   max_lookup_batch: int = 16, interpret=False) -> str:
  """The backend `psumbook_matmul(backend="auto")` runs (pure: testable off device).

  Every kernel pads B and N to its tiles and K is whole scale groups, so any shape the
  format allows fits every choice; what decides is the batch and whether the platform's
  lookup kernel implements the format (`BACKEND_SUPPORT`):

    platform              B <= max_lookup_batch                B > max_lookup_batch
    cpu, not interpret    "xla"                                "xla_dequant"
    gpu (cpu+interpret)   "gather"; "dequant" if (m, v) not    "dequant"
                          in BACKEND_SUPPORT["gpu"] or b != 8
    tpu                   "onehot"; "xla" if not in            "xla_dequant" (no pointer
                          BACKEND_SUPPORT["tpu"] or b != 8     gathers on TPU)

  Args:
    platform: `jax.default_backend()`: "cpu", "gpu" or "tpu".
    batch: B, the rows of x.
    fmt: the weight's format.
    max_lookup_batch: the largest batch sent to a lookup kernel.
    interpret: whether the Pallas kernels run in interpret mode.
  """
  if platform == "cpu" and not interpret:  # Pallas kernels need a GPU/TPU or interpret
    return "xla" if batch <= max_lookup_batch else "xla_dequant"
  on_tpu = platform == "tpu"
  try:
    fmt.check_backend("tpu" if on_tpu else "gpu")
    lookups_take_format = True
  except ValueError:
    lookups_take_format = False
  if batch <= max_lookup_batch:
    if lookups_take_format:
      return "onehot" if on_tpu else "gather"
    return "xla" if on_tpu else "dequant"
  # Prefill: dequantize on chip (GPU); TPU lets XLA dequantize (no pointer gathers there).
  return "xla_dequant" if on_tpu else "dequant"


def _ffi_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
  """The CUDA GEMV for any B and N: N padded to its multiple, B in chunks it takes."""
  from pallas_kernels.psumbook_gemm import ffi  # pylint: disable=import-outside-toplevel
  b, n = x.shape[0], w.shape[1]
  wp = _pad_outputs(w, _util.round_up(n, ffi.N_MULTIPLE))
  ys = [ffi.psumbook_gemv_ffi(x[i:i + ffi.MAX_BATCH], wp)
        for i in range(0, b, ffi.MAX_BATCH)]  # f32[<=16, n_pad] each
  return jnp.concatenate(ys, axis=0)[:, :n]


def psumbook_matmul(x: jax.Array, w: QuantizedWeight, *, tiles: Tiles | None = None,
                    backend: str = "auto", max_lookup_batch: int = 16,
                    poison: float | None = None, interpret=False) -> jax.Array:
  """f32[B, N] = x @ W for a codebook-quantized W.

  Every backend takes any B >= 1 and any N, and any K the format allows (a multiple of
  g): B and N are padded to the tile grid inside (zero activation rows; code 0 with
  scale 0 for padded outputs) and the result is sliced, and `Tiles.fit` picks a K tile
  dividing K. Shapes already on the grid are not copied.

  Args:
    x: f32/bf16[B, K] activations.
    w: the `QuantizedWeight`.
    tiles: tiling knobs (`Tiles`); `Tiles.fit` adjusts them to the problem.
    backend: "gather" (GPU Psumbook lookups), "ffi" (the CUDA kernel with the Psumbook
      in shared memory, `ffi.psumbook_gemv_ffi`; its CPU twin off GPU; batches over 16
      run in chunks of 16), "onehot" (TPU Psumbook as one-hot matmuls; also lowers for
      GPU), "dequant" (GPU: dequantize on chip, then matmul), "xla" (the jnp Psumbook
      reference), "xla_dequant" (XLA dequantizes, then a dense dot), or "auto": see
      `choose_backend` for the table (the platform's lookup kernel while
      B <= `max_lookup_batch` and it implements the format, the prefill path above).
    max_lookup_batch: the largest batch "auto" sends to a lookup kernel.
    poison: for tests: the kernel's output buffer starts filled with this value (e.g.
      nan), so any tile it fails to write is visible.
    interpret: run the Pallas kernels in interpret mode (True, or an interpreter's
      params object such as `pltpu.InterpretParams()`).
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
  fmt = _check_inputs(x, w)
  if backend == "auto":
    backend = choose_backend(jax.default_backend(), x.shape[0], fmt,
                             max_lookup_batch=max_lookup_batch, interpret=interpret)
  if backend == "xla":
    return psumbook_matmul_reference(x, w)
  if backend == "xla_dequant":
    return dequant_matmul_reference(x, w)
  if backend == "ffi":
    return _ffi_matmul(x, w)
  if backend == "dequant":
    return dequant_matmul(x, w, tiles=tiles, poison=poison, interpret=interpret)
  fmt.check_backend("tpu" if backend == "onehot" else "gpu")
  b, k = x.shape
  n = w.shape[1]
  t = (tiles or Tiles()).fit(fmt, b, k, n)
  # The lookups take the whole batch as one block: a power of two of rows (Triton loads
  # need power-of-two sizes); N padded to the tile grid. Padded outputs are sliced off.
  xp = _util.pad_to(x, (_util.next_pow2(b), k))  # f[B_pad, K]
  wp = _pad_outputs(w, _util.round_up(n, t.block_n))
  call = _onehot_call if backend == "onehot" else _gather_call
  return call(xp, wp, fmt, t, poison, interpret)[:b, :n]
