"""FP8 matmul: y = (qa * sa) @ (qb * sb) (+ bias), float32 accumulation, scales in the
epilogue (or per K block), bf16 or f32 output.

    y = fp8_matmul(qa, sa, qb, sb, bias=None, out_dtype=jnp.bfloat16)

Operands: `qa: f8[M, K]` (activations), `qb: f8[K, N]` (weights), E4M3 or E5M2 (the same
type for both in the Pallas kernels: Triton rejects mixed fp8 operands). Scales, by shape:

    per tensor   sa f32[1, 1]        sb f32[1, 1]
    per row/col  sa f32[M, 1]        sb f32[1, N]         (tokens x output channels)
    block        sa f32[M, K/128]    sb f32[K/128, N/128] (1x128 and 128x128 tiles)

Per-tensor and per-row/column scales factor out of the K sum, so they are applied once in
the epilogue; block scales change along K, so each 128-wide K step's partial product is
scaled before it is added (DeepSeek-V3 style).

Accumulation: `promote_every=n` sums n K steps in an inner accumulator before adding it
to the float32 total; `acc_mantissa_bits=b` truncates the inner accumulator to b
mantissa bits after every step. Together they model hardware whose FP8 tensor cores
accumulate with fewer bits than float32 (Hopper's is reported at about 14) and the
"promote to CUDA cores every N steps" remedy; the defaults (None) accumulate in float32.

Backends (`BACKENDS`): "mosaic" (`mosaic.py`: the Hopper TMA + wgmma kernel on Mosaic
GPU, the primary GPU kernel), "xla" (`jnp.dot` on f8 operands, which XLA lowers to
cuBLASLt FP8 on Hopper), "pallas_triton" (the `pl.pallas_call` kernel lowered by Triton:
a fallback kept for what Mosaic does not take, block scales and the accumulation model;
jax 0.11 deprecates Pallas' Triton backend, "migrate to the Mosaic GPU backend"),
"pallas" (the same `pl.pallas_call` kernel under its old name: Mosaic TPU on TPU, the
interpreter with `interpret`, Triton on GPU), and "auto" (`choose_backend`, the table
`AUTO_TABLE`). Every backend takes any M, N and K the scales allow (block scales: K, N
multiples of 128): the kernels pad to their tiles inside and slice the result.
`fp8_matmul_reference` computes the same in float32 at the highest precision.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _util

FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
BACKENDS = ("auto", "mosaic", "xla", "pallas_triton", "pallas")
SCALE_BLOCK = 128
HIGHEST = lax.Precision.HIGHEST


def scale_mode(qa: jax.Array, sa: jax.Array, qb: jax.Array, sb: jax.Array) -> str:
  """"tensor", "rowcol" or "block" from the scale shapes; raises on anything else."""
  if qa.ndim != 2 or qb.ndim != 2 or qa.shape[1] != qb.shape[0]:
    raise ValueError(f"qa must be [M, K] and qb [K, N]; got {qa.shape} and {qb.shape}")
  for name, q in (("qa", qa), ("qb", qb)):
    if q.dtype not in FP8_DTYPES:
      raise ValueError(f"{name} must be float8_e4m3fn or float8_e5m2, got {q.dtype}")
  (m, k), n = qa.shape, qb.shape[1]
  sa_shape, sb_shape = tuple(sa.shape), tuple(sb.shape)
  if sa_shape == (1, 1) and sb_shape == (1, 1):
    return "tensor"
  if sa_shape in ((m, 1), (1, 1)) and sb_shape in ((1, n), (1, 1)):
    return "rowcol"
  if k % SCALE_BLOCK == 0 and n % SCALE_BLOCK == 0 and sa_shape == (m, k // SCALE_BLOCK) \
      and sb_shape == (k // SCALE_BLOCK, n // SCALE_BLOCK):
    return "block"
  raise ValueError(
      f"scale shapes sa{sa_shape} sb{sb_shape} match no scaling for qa{qa.shape} "
      f"qb{qb.shape}: use [1,1]/[1,1] (tensor), [M,1]/[1,N] (row/column) or "
      f"[M,K/128]/[K/128,N/128] (block; K and N multiples of 128)")


def check_bias(bias, n: int) -> None:
  """Raises unless `bias` is None or a float vector of the N = `n` outputs."""
  if bias is None:
    return
  shape = tuple(jnp.shape(bias))
  if shape != (n,):
    raise ValueError(f"bias must be [N] with N={n} (one value per output column of qb), "
                     f"got shape {shape}")
  if not jnp.issubdtype(jnp.result_type(bias), jnp.floating):
    raise ValueError(f"bias must be floating point, got {jnp.result_type(bias)}")


def _check_operands(qa, sa, qb, sb, bias) -> str:
  """`scale_mode` plus the bias check: every shape checked before any kernel runs."""
  mode = scale_mode(qa, sa, qb, sb)
  check_bias(bias, qb.shape[1])
  return mode


def _expand(s: jax.Array, rows: int, cols: int) -> jax.Array:
  return jnp.repeat(jnp.repeat(s, rows // s.shape[0], 0), cols // s.shape[1], 1)


def fp8_matmul_reference(qa, sa, qb, sb, bias=None, *, out_dtype=jnp.float32) -> jax.Array:
  """The float32 result: dequantize both operands, multiply at HIGHEST precision."""
  _check_operands(qa, sa, qb, sb, bias)
  a = qa.astype(jnp.float32) * _expand(sa.astype(jnp.float32), *qa.shape)
  b = qb.astype(jnp.float32) * _expand(sb.astype(jnp.float32), *qb.shape)
  y = jnp.dot(a, b, precision=HIGHEST)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tiling knobs of the Pallas kernel (speed only; numerics change only by float
  reassociation, except that `promote_every` and `acc_mantissa_bits` are numerics).

  Attributes:
    block_m, block_n: output tile; block scales need block_n == 128.
    block_k: K step; block scales need 128.
  """

  block_m: int = 128
  block_n: int = 128
  block_k: int = 128

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"Tiles.{name}={v!r} must be a positive integer")

  def fit(self, m: int, k: int, n: int) -> Tiles:
    """These tiles adjusted to an [m, k] x [k, n] problem (the kernel pads to them).

    Each tile is clipped to the next power of two of its dimension, but kept at least
    16 (M, N) and 32 (K): Triton loads need power-of-two sizes and its dots at least 16
    rows/columns (32 deep for fp8). `fp8_matmul_pallas` pads M, N and K up to multiples
    of the result (zero operands, unit scales, zero bias) and slices the output.
    """
    return Tiles(block_m=min(self.block_m, max(16, _util.next_pow2(m))),
                 block_n=min(self.block_n, max(16, _util.next_pow2(n))),
                 block_k=min(self.block_k, max(32, _util.next_pow2(k))))


def _truncate_mantissa(x: jax.Array, bits: int | None) -> jax.Array:
  """Keeps `bits` mantissa bits of float32 values (truncation, as an accumulator would)."""
  if bits is None or bits >= 23:
    return x
  mask = jnp.uint32((0xFFFFFFFF << (23 - bits)) & 0xFFFFFFFF)
  return lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.uint32) & mask,
                                  jnp.float32)


def _kernel(a_ref, b_ref, sa_ref, sb_ref, bias_ref, o_ref, *, mode: str, bk: int, nk: int,
            promote_every: int, acc_bits: int | None):
  # a_ref:    f8[bm, K]        b_ref: f8[K, bn]
  # sa_ref:   f32[bm, 1] | f32[1, 1] | f32[bm, K/128]
  # sb_ref:   f32[1, bn] | f32[1, 1] | f32[1, K/128, 1] (block: this N tile's scales)
  # bias_ref: f32[1, bn]           o_ref: out[bm, bn]
  bm, bn = o_ref.shape

  def group(gi, total):
    def step(kk, part):
      k = gi * promote_every + kk
      p = jnp.dot(a_ref[:, pl.ds(k * bk, bk)], b_ref[pl.ds(k * bk, bk), :],
                  preferred_element_type=jnp.float32)  # f32[bm, bn]
      if mode == "block":
        p = p * sa_ref[:, pl.ds(k, 1)] * sb_ref[0, pl.ds(k, 1), :]
      return _truncate_mantissa(part + p, acc_bits)
    return total + lax.fori_loop(0, promote_every, step, jnp.zeros((bm, bn), jnp.float32))

  acc = lax.fori_loop(0, nk // promote_every, group, jnp.zeros((bm, bn), jnp.float32))
  if mode != "block":
    acc = acc * sa_ref[...] * sb_ref[...]
  o_ref[...] = (acc + bias_ref[...]).astype(o_ref.dtype)


def fp8_matmul_pallas(qa, sa, qb, sb, bias=None, *, out_dtype=jnp.float32,
                      tiles: Tiles | None = None, promote_every: int | None = None,
                      acc_mantissa_bits: int | None = None, poison: float | None = None,
                      interpret=False) -> jax.Array:
  """The `pl.pallas_call` kernel (Triton on GPU; see the module docstring).

  Takes any M, N and K (block scales: K and N multiples of 128, their format): they are
  padded to the fitted tiles (`Tiles.fit`) with zero operands, unit scales and zero
  bias, which leave the kept outputs unchanged, and the output is sliced. `poison`
  fills the output buffer before the kernel runs (tests).
  """
  mode = _check_operands(qa, sa, qb, sb, bias)
  if qa.dtype != qb.dtype:
    raise ValueError(f"the Pallas kernel needs one fp8 type for both operands, got "
                     f"{qa.dtype} and {qb.dtype}")
  (m, k), n = qa.shape, qb.shape[1]
  t = (tiles or Tiles()).fit(m, k, n)
  bm, bn, bk = t.block_m, t.block_n, t.block_k
  if mode == "block" and (bn != SCALE_BLOCK or bk != SCALE_BLOCK):
    raise ValueError(f"block scales need Tiles.block_n == Tiles.block_k == {SCALE_BLOCK}")
  mp, np_, kp = _util.round_up(m, bm), _util.round_up(n, bn), _util.round_up(k, bk)
  nk = kp // bk
  promote_every = nk if promote_every is None else promote_every
  if promote_every < 1 or nk % promote_every:
    raise ValueError(f"promote_every={promote_every} must divide the {nk} K steps")
  # Zero operands add nothing to the K sums; padded rows/columns are sliced off below.
  qa = _util.pad_to(qa, (mp, kp))  # f8[mp, kp]
  qb = _util.pad_to(qb, (kp, np_))  # f8[kp, np_]
  sa = sa.astype(jnp.float32)
  sb = sb.astype(jnp.float32)
  bias = (jnp.zeros((1, np_), jnp.float32) if bias is None
          else _util.pad_to(bias.astype(jnp.float32).reshape(1, n), (1, np_)))
  if sa.shape == (1, 1) and mode == "rowcol":
    sa = jnp.broadcast_to(sa, (m, 1))
  if sb.shape == (1, 1) and mode == "rowcol":
    sb = jnp.broadcast_to(sb, (1, n))
  if mode == "tensor":
    sa_spec = pl.BlockSpec((1, 1), lambda i, j: (0, 0))
    sb_spec = pl.BlockSpec((1, 1), lambda i, j: (0, 0))
  elif mode == "rowcol":
    sa = _util.pad_to(sa, (mp, 1), 1.0)  # f32[mp, 1]: unit scales keep padding finite
    sb = _util.pad_to(sb, (1, np_), 1.0)  # f32[1, np_]
    sa_spec = pl.BlockSpec((bm, 1), lambda i, j: (i, 0))
    sb_spec = pl.BlockSpec((1, bn), lambda i, j: (0, j))
  else:  # block: K, N are multiples of 128 = bk = bn, so only M was padded
    sa = _util.pad_to(sa, (mp, nk), 1.0)  # f32[mp, K/128]
    sa_spec = pl.BlockSpec((bm, nk), lambda i, j: (i, 0))
    # [N/128, K/128, 1]: TPU blocks need their last two dims full (or (8, 128)-aligned).
    sb = sb.T.reshape(np_ // SCALE_BLOCK, nk, 1)
    sb_spec = pl.BlockSpec((1, nk, 1), lambda i, j: (j, 0, 0))
  kernel = functools.partial(_kernel, mode=mode, bk=bk, nk=nk, promote_every=promote_every,
                             acc_bits=acc_mantissa_bits)
  out = _util.pallas_call(
      kernel, (qa, qb, sa, sb, bias),
      [pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
       pl.BlockSpec((kp, bn), lambda i, j: (0, j)),
       sa_spec, sb_spec, pl.BlockSpec((1, bn), lambda i, j: (0, j))],
      jax.ShapeDtypeStruct((mp, np_), out_dtype), pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      (mp // bm, np_ // bn), poison, interpret)
  return out[:m, :n]  # out_dtype[M, N]


def fp8_matmul_xla(qa, sa, qb, sb, bias=None, *, out_dtype=jnp.float32) -> jax.Array:
  """`jnp.dot` on the f8 operands (cuBLASLt FP8 on Hopper), scales applied after."""
  mode = _check_operands(qa, sa, qb, sb, bias)
  if mode == "block":  # scales vary along K: dequantize (no single FP8 GEMM applies)
    return fp8_matmul_reference(qa, sa, qb, sb, bias, out_dtype=out_dtype)
  y = jnp.dot(qa, qb, preferred_element_type=jnp.float32)
  y = y * sa.astype(jnp.float32) * sb.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(out_dtype)


HOPPER_KINDS = ("H100", "H200")
MOSAIC_TILE = 128  # the Mosaic kernel's M, N and K tile (`mosaic.MosaicTiles` defaults)


@dataclasses.dataclass(frozen=True)
class AutoQuery:
  """What `choose_backend` decides on (pure data: testable off device).

  Attributes:
    platform: `jax.default_backend()`: "cpu", "gpu" or "tpu".
    device_kind: `jax.devices()[0].device_kind`, e.g. "NVIDIA H100 80GB HBM3".
    m, k, n: qa is [m, k], qb [k, n].
    mode: `scale_mode(...)`: "tensor", "rowcol" or "block".
    same_fp8_type: whether qa and qb have one fp8 dtype (the kernels need it).
    accumulation_model: whether `promote_every` or `acc_mantissa_bits` is set (only the
      Pallas kernel models them).
    interpret: whether the kernels run in interpret mode.
    mosaic_thin: whether the Mosaic kernel has its thin-GEMM (M < 128) configuration;
      without it a small M would be padded to 128 rows.
    mosaic_block: whether the Mosaic kernel takes block scales.
  """

  platform: str
  device_kind: str
  m: int
  k: int
  n: int
  mode: str
  same_fp8_type: bool = True
  accumulation_model: bool = False
  interpret: bool = False
  mosaic_thin: bool = False
  mosaic_block: bool = False

  @property
  def hopper(self) -> bool:
    return self.platform == "gpu" and any(h in self.device_kind for h in HOPPER_KINDS)

  @property
  def row_padding(self) -> int:
    """Rows the 128-row Mosaic tile would add to M."""
    return _util.round_up(self.m, MOSAIC_TILE) - self.m


def backend_takes(backend: str, q: AutoQuery) -> bool:
  """Whether `backend` can run the call `q` describes (any shape: every kernel pads).

  Mosaic GPU needs a Hopper GPU, tensor or row/column scales (block scales where
  `mosaic_block`), one fp8 type and no accumulation model; the Pallas kernel needs one
  fp8 type and a GPU, a TPU or the interpreter (its Triton form a GPU); XLA takes
  everything but the accumulation model.
  """
  if backend == "xla":
    return not q.accumulation_model
  if backend == "mosaic":
    return (q.hopper and (q.mode != "block" or q.mosaic_block) and q.same_fp8_type
            and not q.accumulation_model)
  if backend == "pallas_triton":
    return q.same_fp8_type and (q.platform == "gpu" or q.interpret)
  if backend == "pallas":
    return q.same_fp8_type and (q.platform in ("gpu", "tpu") or q.interpret)
  raise ValueError(f"backend={backend!r} is not one of {BACKENDS[1:]}")


def _mosaic_fits(q: AutoQuery) -> bool:
  """Hopper, scales Mosaic takes, one fp8 type, 128-aligned K and N (no weight padding)."""
  return (q.hopper and (q.mode != "block" or q.mosaic_block)
          and not q.k % MOSAIC_TILE and not q.n % MOSAIC_TILE)


# `fp8_matmul(backend="auto")`: the first row whose test holds picks the backend.
AUTO_TABLE = (
    ("cpu, not interpret", lambda q: q.platform == "cpu" and not q.interpret, "xla"),
    ("qa, qb of different fp8 types", lambda q: not q.same_fp8_type, "xla"),
    ("gpu, an accumulation model (promote_every / acc_mantissa_bits)",
     lambda q: q.platform == "gpu" and q.accumulation_model, "pallas_triton"),
    ("H100/H200, K, N % 128 == 0, M >= 128 and padding M to 128 adds <= M/8 rows",
     lambda q: _mosaic_fits(q) and q.m >= MOSAIC_TILE and 8 * q.row_padding <= q.m,
     "mosaic"),
    ("H100/H200, K, N % 128 == 0, M < 128 and Mosaic's thin configuration",
     lambda q: _mosaic_fits(q) and q.m < MOSAIC_TILE and q.mosaic_thin, "mosaic"),
    ("gpu, block scales that no Mosaic configuration above takes",
     lambda q: q.platform == "gpu" and q.mode == "block", "pallas_triton"),
    ("H100/H200 otherwise (M < 128 without the thin configuration, M = 130, K or N "
     "not a multiple of 128)", lambda q: q.hopper, "xla"),
    ("other gpu (no Hopper wgmma / TMA)", lambda q: q.platform == "gpu", "xla"),
    ("tpu, cpu + interpret", lambda q: True, "pallas"),
)


def choose_backend(platform: str, device_kind: str, m: int, k: int, n: int, mode: str, *,
                   same_fp8_type: bool = True, accumulation_model: bool = False,
                   interpret=False, mosaic_thin: bool = False,
                   mosaic_block: bool = False) -> str:
  """The backend `fp8_matmul(backend="auto")` runs (pure: testable off device).

  All backends take any shape their scales allow (the kernels pad inside), so the
  choice is about cost and features. Mosaic GPU and XLA (cuBLASLt) are the GPU paths;
  the Triton kernel only runs what neither takes. The rows of `AUTO_TABLE`, first match:

    platform, device   scales, types, options         shape                    backend
    cpu, no interpret  any                            any                      xla
    any                qa, qb of different fp8 types  any                      xla
    gpu                promote_every, acc_mantissa_bits any                    pallas_triton
    gpu H100 / H200    tensor, row/column (block      K, N % 128 == 0, M >= 128 mosaic
                       where `mosaic_block`)          and padding M to 128 adds
                                                      <= M / 8 rows
    gpu H100 / H200    as above                       K, N % 128 == 0, M < 128, mosaic
                                                      `mosaic_thin`
    gpu                block scales not taken above   any                      pallas_triton
    gpu H100 / H200    otherwise                      M < 128 without the thin xla
                                                      config, M = 130, K or N
                                                      not 128-aligned
    other gpu          tensor or row/column scales    any                      xla
    tpu, cpu+interpret any                            any                      pallas

  E.g. on an H100 with row scales, N = K = 8192: M = 8192 or 4000 -> mosaic; M = 16 ->
  mosaic with the thin configuration, else xla (cuBLASLt FP8); M = 130 -> xla. The pick
  always satisfies `backend_takes` (tests walk a grid of calls to check it).

  Args:
    platform, device_kind, m, k, n, mode, same_fp8_type, accumulation_model, interpret,
      mosaic_thin, mosaic_block: see `AutoQuery`.
  """
  q = AutoQuery(platform, device_kind, m, k, n, mode, same_fp8_type, accumulation_model,
                bool(interpret), mosaic_thin, mosaic_block)
  return next(backend for _, test, backend in AUTO_TABLE if test(q))


def _mosaic_features() -> tuple[bool, bool]:
  """(thin configuration, block scales) of `mosaic.py`: its `HAS_THIN_CONFIG` and
  `TAKES_BLOCK_SCALES` where set, else whether it has `ThinTiles` / `prepare_weight`."""
  from pallas_kernels.fp8_matmul import mosaic  # pylint: disable=import-outside-toplevel
  thin = getattr(mosaic, "HAS_THIN_CONFIG", hasattr(mosaic, "ThinTiles"))
  block = getattr(mosaic, "TAKES_BLOCK_SCALES", hasattr(mosaic, "prepare_weight"))
  return bool(thin), bool(block)


def _platform_and_kind() -> tuple[str, str]:
  """(default backend, its first device's kind); one place for tests to stand in for."""
  platform = jax.default_backend()
  return platform, jax.devices()[0].device_kind if platform == "gpu" else ""


def fp8_matmul(qa, sa, qb, sb, bias=None, *, out_dtype=jnp.float32, backend: str = "auto",
               tiles: Tiles | None = None, promote_every: int | None = None,
               acc_mantissa_bits: int | None = None, poison: float | None = None,
               interpret=False) -> jax.Array:
  """y = (qa * sa) @ (qb * sb) + bias (see the module docstring).

  Args:
    qa, qb: f8[M, K], f8[K, N].
    sa, sb: scales (shapes select tensor / row-column / block scaling).
    bias: optional f[N]; any other shape is a ValueError naming `bias`.
    out_dtype: float32 or bfloat16.
    backend: "mosaic" (Hopper, Mosaic GPU), "xla" (cuBLASLt FP8 on Hopper),
      "pallas_triton" (the deprecated Triton lowering: fallback only), "pallas" (the
      `pl.pallas_call` kernel on TPU or in interpret mode), or "auto" (the table in
      `choose_backend`: "mosaic" on an H100/H200 for tensor/row-column scales at
      128-aligned N, K and M >= 128 (M < 128 with its thin configuration), else "xla";
      "pallas_triton" on GPU only for block scales and the accumulation model; "pallas"
      on TPU; "xla" on CPU unless `interpret`). Every backend takes any M (1, 3, 130,
      ...), N and K the scales allow: the kernels pad to their tiles and slice.
    tiles: Pallas tiling knobs.
    promote_every, acc_mantissa_bits: accumulation model (Pallas backend).
    poison: for tests: the Pallas kernel's output buffer starts filled with it.
    interpret: run the kernel in interpret mode (Mosaic: the GPU interpreter).
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
  mode = _check_operands(qa, sa, qb, sb, bias)  # before any kernel is traced
  if backend == "auto":
    platform, kind = _platform_and_kind()
    thin, block = _mosaic_features() if platform == "gpu" else (False, False)
    backend = choose_backend(
        platform, kind, qa.shape[0], qa.shape[1], qb.shape[1], mode,
        same_fp8_type=qa.dtype == qb.dtype,
        accumulation_model=promote_every is not None or acc_mantissa_bits is not None,
        interpret=interpret, mosaic_thin=thin, mosaic_block=block)
  if backend == "xla":
    return fp8_matmul_xla(qa, sa, qb, sb, bias, out_dtype=out_dtype)
  if backend == "mosaic":
    from pallas_kernels.fp8_matmul import mosaic  # pylint: disable=import-outside-toplevel
    return mosaic.fp8_matmul_mosaic(qa, sa, qb, sb, bias, out_dtype=out_dtype,
                                    interpret=interpret)
  return fp8_matmul_pallas(qa, sa, qb, sb, bias, out_dtype=out_dtype, tiles=tiles,
                           promote_every=promote_every,
                           acc_mantissa_bits=acc_mantissa_bits, poison=poison,
                           interpret=interpret)
