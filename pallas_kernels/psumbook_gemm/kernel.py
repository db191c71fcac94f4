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

Backends (`BACKENDS`; `backend="auto"` picks by `AUTO_TABLE`, see `choose_backend`). On
GPU the primary path is `ffi` (CUDA C++); the Pallas kernels written for the Triton
lowering stay as fallbacks under names that say so, `gather_triton` and `dequant_triton`
(old names `gather` and `dequant` are accepted aliases): jax 0.11 deprecates Pallas'
Triton backend ("migrate to the Mosaic GPU backend"). Pallas kernels: one
`pl.pallas_call` each, split-K over the grid, partial sums reduced by a deterministic
`sum` afterwards:

* `gather_triton` (GPU, Triton lowering; deprecated, fallback): the Psumbook is built
  by XLA (one small matmul) in HBM and read with vector-index loads `p_ref[:, idx]`,
  which the Triton lowering supports (`take_along_axis` it does not).
* `onehot` (TPU, Mosaic TPU): the lookup as a one-hot matmul on the MXU (TPU has no
  pointer gathers), exact with `precision=HIGHEST`.
* `dequant_triton` (GPU, Triton lowering; deprecated, fallback): per group of g inputs,
  W's rows are gathered from the flattened codebooks, scaled, and multiplied on the tensor cores (the prefill path and the baseline).
* `ffi` (GPU, CUDA C++ through the XLA FFI, `cuda/psumbook_gemv.cu`; the primary GPU
  decode path): the CodeGEMM design, a K-tiled Psumbook built in shared memory and
  shared by the CTA's N columns, 16-byte `cp.async` code loads, split-K fused; see
  `ffi.py`.

No Mosaic GPU version: the lookup is a per-thread gather (`P[codes[n]]`, a different
index in every lane), and jax 0.11.2's Mosaic GPU lowering rejects vector-indexed loads
from both shared and global memory refs (`NotImplementedError: int_indexer_shape
non-empty`; its TMA copies move rectangular tiles). `tests/test_psumbook_gemm.py` keeps
a probe that fails once a jax release lowers such a gather, the signal to write one.
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

BACKENDS = ("auto", "ffi", "gather_triton", "dequant_triton", "onehot", "xla",
            "xla_dequant")
# Old names, still accepted: the Pallas kernels written for the (deprecated) Triton lowering.
BACKEND_ALIASES = {"gather": "gather_triton", "dequant": "dequant_triton"}
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


def ffi_takes(fmt: CodebookFormat) -> bool:
  """Whether the CUDA GEMV (`ffi.py`) implements `fmt` (any B and N: `_ffi_matmul` pads N
  and runs batches in chunks)."""
  from pallas_kernels.psumbook_gemm import ffi  # pylint: disable=import-outside-toplevel
  return fmt.num_centroids == 256 and ffi.TILE_K % fmt.v == 0 and fmt.g % ffi.TILE_K == 0


@functools.cache
def ffi_available(platform: str) -> bool:
  """Whether the CUDA GEMV is built (or builds now) for `platform` ("gpu" only).

  The first call on a GPU compiles the library with nvcc unless it is cached (seconds).
  `JAXSUN_PSUMBOOK_FFI=0` turns it off for "auto"; a failed build warns and returns
  False, so "auto" falls back to the Pallas kernels.
  """
  import os  # pylint: disable=import-outside-toplevel
  import warnings  # pylint: disable=import-outside-toplevel
  if platform != "gpu" or os.environ.get("JAXSUN_PSUMBOOK_FFI", "1") == "0":
    return False
  try:
    from pallas_kernels.psumbook_gemm import ffi  # pylint: disable=import-outside-toplevel
    ffi.build("cuda")
    return True
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(f"the CUDA Psumbook GEMV did not build ({type(e).__name__}: "
                  f"{str(e)[:300]}); backend='auto' uses the Pallas-Triton kernels")
    return False


@dataclasses.dataclass(frozen=True)
class AutoQuery:
  """What `choose_backend` decides on (pure data: testable off device).

  Attributes:
    platform: `jax.default_backend()`: "cpu", "gpu" or "tpu".
    batch: B, the rows of x.
    fmt: the weight's format.
    max_lookup_batch: the largest batch sent to a lookup (decode) kernel.
    interpret: whether the Pallas kernels run in interpret mode.
    ffi: whether the CUDA GEMV is built for this machine (`ffi_available`).
  """

  platform: str
  batch: int
  fmt: CodebookFormat
  max_lookup_batch: int = 16
  interpret: bool = False
  ffi: bool = False

  @property
  def decode(self) -> bool:
    return self.batch <= self.max_lookup_batch

  def implemented(self, platform: str) -> bool:
    """Whether the lookup kernels of "gpu" / "tpu" implement the format."""
    try:
      self.fmt.check_backend(platform)
      return True
    except ValueError:
      return False


def backend_takes(backend: str, q: AutoQuery) -> bool:
  """Whether `backend` can run the call `q` describes (B, N any: the kernels pad).

  "ffi" needs a built library (a GPU; its CPU twin runs when called by name) and b = 8,
  v | 32, 32 | g; the lookup kernels need their platform's `BACKEND_SUPPORT` and a GPU
  (Triton), a TPU (onehot; it also lowers for GPU) or the interpreter; the dequant kernel
  takes any format on a GPU or the interpreter; the XLA paths take everything.
  """
  backend = BACKEND_ALIASES.get(backend, backend)
  if backend in ("xla", "xla_dequant"):
    return True
  if backend == "ffi":
    return q.ffi and ffi_takes(q.fmt)
  if backend == "gather_triton":
    return q.implemented("gpu") and (q.platform == "gpu" or q.interpret)
  if backend == "onehot":
    return q.implemented("tpu") and (q.platform in ("gpu", "tpu") or q.interpret)
  if backend == "dequant_triton":
    return q.platform == "gpu" or q.interpret
  raise ValueError(f"backend={backend!r} is not one of {BACKENDS[1:]}")


# `psumbook_matmul(backend="auto")`: the first row whose test holds picks the backend.
AUTO_TABLE = (
    ("cpu, not interpret, B <= max_lookup_batch",
     lambda q: q.platform == "cpu" and not q.interpret and q.decode, "xla"),
    ("cpu, not interpret, B > max_lookup_batch",
     lambda q: q.platform == "cpu" and not q.interpret, "xla_dequant"),
    ("tpu, B <= max_lookup_batch, format in BACKEND_SUPPORT['tpu']",
     lambda q: q.platform == "tpu" and q.decode and q.implemented("tpu"), "onehot"),
    ("tpu, B <= max_lookup_batch, other formats",
     lambda q: q.platform == "tpu" and q.decode, "xla"),
    ("tpu, B > max_lookup_batch (no pointer gathers on TPU)",
     lambda q: q.platform == "tpu", "xla_dequant"),
    ("gpu, B <= max_lookup_batch, CUDA GEMV built and takes the format",
     lambda q: q.platform == "gpu" and q.decode and q.ffi and ffi_takes(q.fmt), "ffi"),
    ("gpu or cpu + interpret, B <= max_lookup_batch, format in BACKEND_SUPPORT['gpu']",
     lambda q: q.decode and q.implemented("gpu"), "gather_triton"),
    ("gpu or cpu + interpret, otherwise (prefill, other formats)",
     lambda q: True, "dequant_triton"),
)


def choose_backend(platform: str, batch: int, fmt: CodebookFormat, *,
                   max_lookup_batch: int = 16, interpret=False, ffi: bool = False) -> str:
  """The backend `psumbook_matmul(backend="auto")` runs (pure: testable off device).

  Every kernel pads B and N to its tiles and K is whole scale groups, so any shape the
  format allows fits every choice; what decides is the batch, whether the CUDA GEMV is
  built, and whether the platform's lookup kernel implements the format. The rows of
  `AUTO_TABLE`, first match (H100 / H200 and any other CUDA GPU alike):

    platform            B <= max_lookup_batch (decode)          B > max_lookup_batch
    cpu, no interpret   "xla"                                   "xla_dequant"
    tpu                 "onehot"; "xla" if the format is not    "xla_dequant" (no
                        in BACKEND_SUPPORT["tpu"]               pointer gathers on TPU)
    gpu                 "ffi" if built (`ffi`) and it takes     "dequant_triton"
                        the format (b=8, v | 32, 32 | g); else
                        "gather_triton"; "dequant_triton" if
                        the format is not in BACKEND_SUPPORT
    cpu + interpret     "gather_triton" / "dequant_triton" as   "dequant_triton"
                        on a GPU without the CUDA GEMV

  E.g. on an H200 with the library built, m1v4g128 (2.125 bits): B = 1..16 -> ffi, B =
  17, 130 -> dequant_triton. The pick always satisfies `backend_takes`.

  Args:
    platform, batch, fmt, max_lookup_batch, interpret, ffi: see `AutoQuery`.
  """
  q = AutoQuery(platform, batch, fmt, max_lookup_batch, bool(interpret), ffi)
  return next(backend for _, test, backend in AUTO_TABLE if test(q))


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
    backend: "ffi" (the CUDA kernel with the Psumbook in shared memory,
      `ffi.psumbook_gemv_ffi`, the primary GPU decode path; its CPU twin off GPU;
      batches over 16 run in chunks of 16), "gather_triton" (Pallas Psumbook lookups,
      Triton lowering: deprecated, fallback; alias "gather"), "dequant_triton" (Pallas,
      Triton: dequantize on chip, then matmul; alias "dequant"), "onehot" (TPU Psumbook
      as one-hot matmuls; also lowers for GPU), "xla" (the jnp Psumbook reference),
      "xla_dequant" (XLA dequantizes, then a dense dot), or "auto": see
      `choose_backend` for the table (the CUDA GEMV on a GPU where it is built and
      B <= `max_lookup_batch`, else the platform's lookup kernel, the prefill path above).
    max_lookup_batch: the largest batch "auto" sends to a lookup kernel.
    poison: for tests: the kernel's output buffer starts filled with this value (e.g.
      nan), so any tile it fails to write is visible.
    interpret: run the Pallas kernels in interpret mode (True, or an interpreter's
      params object such as `pltpu.InterpretParams()`).
  """
  backend = BACKEND_ALIASES.get(backend, backend)
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS} (or the aliases "
                     f"{sorted(BACKEND_ALIASES)})")
  fmt = _check_inputs(x, w)
  if backend == "auto":
    platform = jax.default_backend()
    backend = choose_backend(
        platform, x.shape[0], fmt, max_lookup_batch=max_lookup_batch, interpret=interpret,
        ffi=x.shape[0] <= max_lookup_batch and ffi_available(platform))
  if backend == "xla":
    return psumbook_matmul_reference(x, w)
  if backend == "xla_dequant":
    return dequant_matmul_reference(x, w)
  if backend == "ffi":
    return _ffi_matmul(x, w)
  if backend == "dequant_triton":
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
