"""BCQ GEMM (LUT-GEMM's weight format): `y = x @ W_hat` for a binary-coding-quantized W.

    W_hat[k, n] = sum_i alpha[i, k // g, n] * b[i, k, n] + offset[k // g, n],  b in {-1, +1}

`PackedBCQ` stores the codes as LUT-GEMM does: 32 binary weights of consecutive k packed
in one 32-bit word, bit j of word w holding k = 32 * w + j (1 = +1, 0 = -1).

Entry point (every backend takes `interpret`):

    bcq_matmul(x, w, *, backend="auto", tiles=None, interpret=False, poison=None)

References in jnp float32 (HIGHEST), beside the kernels: `dequantize_reference`,
`bcq_matmul_reference` (bit plane by bit plane, as LUT-GEMM computes it) and
`lut_reference` (through the lookup tables, any mu dividing 32).

Algorithms, by backend:

* "lut" (`pl.pallas_call`, the decode kernel; TPU, `interpret=True`): LUT-GEMM. XLA
  builds, per batch row and per 8 consecutive inputs, the table of all 256 signed sums
  +-x_k (`lut_tables`, f32[M, K/8, 256]); the kernel reads each code byte (8 weights of
  one bit plane) and looks its entry up, sums the lookups of a group per bit plane,
  scales them by alpha and adds offset x (the group's sum of x). The lookup is a lane
  gather (`take_along_axis` over one 128-entry half-table, then a select on the byte's
  top bit): what Mosaic TPU lowers, with source and index tiles of one shape, so outputs
  go in tiles of 128. One lookup replaces 8 multiply-adds per bit plane.
* "dequant" (`pl.pallas_call`; the TPU prefill kernel, also `interpret=True`): per grid
  step one (rows, outputs, K tile); for each group of g inputs and each bit phase j < 32
  the kernel unpacks bit j of the group's code words into a +-alpha tile in registers
  (`W_hat` rows k = 32 w + j, offset added) and multiplies it with the matching
  activation columns (`x` is pre-permuted so those columns are contiguous), float32 at
  HIGHEST precision.
* "mosaic" (`mosaic.py`, Mosaic GPU on Hopper): the same bit-phase dequantization,
  feeding `wgmma` with the dequantized tile as operand A and the activations as the
  shared-memory operand B, i.e. `y^T = W_hat^T x^T`, so decode batches pad to 8
  columns, not 64. bf16 hi + lo operand splits, float32 accumulation (see `mosaic.py`).
  No LUT: Mosaic GPU has no vector-gather lowering.
* "xla": `bcq_matmul_reference`.
* "auto": "xla" on CPU unless `interpret`, and on GPUs other than Hopper; "mosaic" on a
  Hopper GPU or under `plgpu.InterpretGPUParams`; on TPU or with `interpret=True` "lut"
  for batches up to `MAX_LUT_BATCH`, "dequant" above. None of this is measured yet.

The Pallas kernels split K over the grid; partial sums are reduced by a deterministic
`sum` afterwards. They are TPU kernels, not for the deprecated Triton GPU lowering
(cross-lowered for cuda: "lut" fails on the gather, "dequant" on a non-power-of-2 pre-
permuted x block; unneeded, as "mosaic" is the GPU path).

Shapes: any batch M and N (padded inside to the tiles and sliced back), K a multiple of
32 and of g, g a multiple of 32 (a code word never straddles two groups).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _util

BACKENDS = ("auto", "lut", "dequant", "mosaic", "xla")
MAX_LUT_BATCH = 8  # the largest batch "auto" sends to the LUT kernel (decode)
HIGHEST = lax.Precision.HIGHEST
WORD = 32  # binary weights per packed word


# ------------------------------------------------------------------------- format


class PackedBCQ(NamedTuple):
  """A BCQ weight for `y = x @ W`, `W: f[K, N]`, codes bit-packed along K.

  Attributes:
    bits_packed: u32[bits, K // 32, N]; bit j of word [i, w, n] is b[i, 32 w + j, n] == +1.
    alpha: f32[bits, K // g, N] scale per bit, group of g inputs and output.
    offset: f32[K // g, N] offset per group and output.
  """

  bits_packed: jax.Array
  alpha: jax.Array
  offset: jax.Array

  @property
  def bits(self) -> int:
    return self.bits_packed.shape[0]

  @property
  def shape(self) -> tuple[int, int]:
    """(K, N) of the dense weight."""
    return self.bits_packed.shape[1] * WORD, self.bits_packed.shape[2]

  @property
  def group_size(self) -> int:
    return self.shape[0] // self.alpha.shape[1]


def validate(w: PackedBCQ) -> PackedBCQ:
  """Checks shapes and dtypes; raises ValueError naming the offending field."""
  words, alpha, offset = w
  if words.ndim != 3 or words.dtype not in (jnp.uint32, jnp.int32):
    raise ValueError(f"bits_packed must be u32[bits, K // 32, N], got {words.dtype}"
                     f"{list(words.shape)}")
  bits, kw, n = words.shape
  k = kw * WORD
  if not 1 <= bits <= 8:
    raise ValueError(f"bits_packed holds bits={bits} planes; BCQ takes 1..8")
  if alpha.ndim != 3 or alpha.shape[0] != bits or alpha.shape[2] != n \
      or alpha.shape[1] < 1 or k % alpha.shape[1]:
    raise ValueError(f"alpha must be f32[bits={bits}, K // g, N={n}] with g dividing "
                     f"K={k}, got shape {alpha.shape}")
  groups = alpha.shape[1]
  if (k // groups) % WORD:
    raise ValueError(f"alpha: group size g={k // groups} must be a multiple of {WORD} "
                     f"(a packed word must not straddle two groups)")
  if offset.shape != (groups, n):
    raise ValueError(f"offset must have shape {(groups, n)}, got {offset.shape}")
  return w


def pack(b: jax.Array, alpha: jax.Array, offset: jax.Array) -> PackedBCQ:
  """Packs unpacked codes into LUT-GEMM's layout.

  Args:
    b: int[bits, K, N] codes in {-1, +1} (jaxsun's `BCQWeight.b`); K a multiple of 32.
    alpha: f[bits, K // g, N].
    offset: f[K // g, N].

  Returns:
    The `PackedBCQ` (alpha and offset as float32).
  """
  if b.ndim != 3:
    raise ValueError(f"b must be [bits, K, N], got shape {b.shape}")
  bits, k, n = b.shape
  if k % WORD:
    raise ValueError(f"b: K={k} must be a multiple of {WORD} to pack")
  if not isinstance(b, jax.core.Tracer):
    values = np.unique(np.asarray(b))
    if not set(values.tolist()) <= {-1, 1}:
      raise ValueError(f"b must hold only -1 and +1, got values {values[:8]}")
  w = PackedBCQ(_pack_words(b), jnp.asarray(alpha, jnp.float32),
                jnp.asarray(offset, jnp.float32))
  return validate(w)


@jax.jit
def _pack_words(b: jax.Array) -> jax.Array:
  """u32[bits, K/32, N] from i8[bits, K, N] codes."""
  bits, k, n = b.shape
  t = (b > 0).astype(jnp.uint32).reshape(bits, k // WORD, WORD, n)  # u32[bits, K/32, 32, N]
  shifts = jnp.arange(WORD, dtype=jnp.uint32)[None, None, :, None]
  return jnp.sum(t << shifts, axis=2, dtype=jnp.uint32)  # disjoint bits: sum == or


@jax.jit
def unpack(w: PackedBCQ) -> jax.Array:
  """i8[bits, K, N] codes in {-1, +1}."""
  words = w.bits_packed.astype(jnp.uint32)
  bits, kw, n = words.shape
  shifts = jnp.arange(WORD, dtype=jnp.uint32)[None, None, :, None]
  t = (words[:, :, None, :] >> shifts) & 1  # u32[bits, K/32, 32, N]
  return (2 * t.astype(jnp.int8) - 1).reshape(bits, kw * WORD, n)


def random_bcq(key: jax.Array, bits: int, k: int, n: int, group_size: int) -> PackedBCQ:
  """A random `PackedBCQ` (tests and benchmarks): alpha_i ~ 2^-i |N(0, 1)| / 8."""
  if k % group_size:
    raise ValueError(f"group_size={group_size} must divide K={k}")
  return pack(*_random_codes(key, bits, k, n, group_size))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _random_codes(key, bits, k, n, group_size):
  kb, ka, ko = jax.random.split(key, 3)
  b = jnp.where(jax.random.bernoulli(kb, 0.5, (bits, k, n)), 1, -1).astype(jnp.int8)
  decay = 2.0 ** -jnp.arange(bits, dtype=jnp.float32)[:, None, None]
  alpha = jnp.abs(jax.random.normal(ka, (bits, k // group_size, n))) * decay / 8
  offset = jax.random.normal(ko, (k // group_size, n)) / 32
  return b, alpha, offset


# ------------------------------------------------------------------------- references


@jax.jit
def dequantize_reference(w: PackedBCQ) -> jax.Array:
  """f32[K, N]: sum_i alpha_i * b_i + offset."""
  validate(w)
  k, n = w.shape
  g = w.group_size
  b = unpack(w).astype(jnp.float32).reshape(w.bits, k // g, g, n)  # f32[bits, G, g, N]
  dense = jnp.sum(w.alpha[:, :, None, :] * b, axis=0) + w.offset[:, None, :]
  return dense.reshape(k, n)


@jax.jit
def bcq_matmul_reference(x: jax.Array, w: PackedBCQ) -> jax.Array:
  """f32[M, N] = x @ W_hat bit plane by bit plane (LUT-GEMM's order), float32 HIGHEST."""
  validate(w)
  k, n = w.shape
  g = w.group_size
  xg = x.astype(jnp.float32).reshape(x.shape[0], k // g, g)  # f32[M, G, g]
  b = unpack(w).astype(jnp.float32).reshape(w.bits, k // g, g, n)  # f32[bits, G, g, N]
  partial = jnp.einsum("mgk,igkn->mign", xg, b, precision=HIGHEST)  # f32[M, bits, G, N]
  y = jnp.sum(partial * w.alpha[None], axis=(1, 2))
  return y + jnp.einsum("mg,gn->mn", xg.sum(-1), w.offset, precision=HIGHEST)


@functools.partial(jax.jit, static_argnames="mu")
def lut_reference(x: jax.Array, w: PackedBCQ, mu: int = 8) -> jax.Array:
  """f32[M, N] through LUT-GEMM's tables: per mu inputs all 2^mu signed sums of x, one
  lookup per code byte (mu bits), scaled by alpha; plus offset times each group's sum."""
  validate(w)
  k, n = w.shape
  if WORD % mu:
    raise ValueError(f"mu={mu} must divide {WORD}")
  m, g = x.shape[0], w.group_size
  lut = lut_tables(x, mu)  # f32[M, K/mu, 2^mu]
  words = w.bits_packed.astype(jnp.uint32)  # u32[bits, K/32, N]
  shifts = (mu * jnp.arange(WORD // mu, dtype=jnp.uint32))[None, None, :, None]
  idx = ((words[:, :, None, :] >> shifts) & (2 ** mu - 1)).reshape(w.bits, k // mu, n)
  looked = jax.vmap(lambda i: jnp.take_along_axis(lut, i.astype(jnp.int32)[None], axis=2),
                    in_axes=2, out_axes=3)(idx.transpose(1, 0, 2))  # [M, K/mu, bits, N]
  per_group = looked.reshape(m, k // g, g // mu, w.bits, n).sum(axis=2)  # [M, G, bits, N]
  y = jnp.einsum("mgin,ign->mn", per_group, w.alpha, precision=HIGHEST)
  xsum = x.astype(jnp.float32).reshape(m, k // g, g).sum(-1)
  return y + jnp.einsum("mg,gn->mn", xsum, w.offset, precision=HIGHEST)


# ------------------------------------------------------------------------- tiling


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tiling knobs of the "dequant" kernel (speed only, never the numbers beyond float
  reassociation).

  Attributes:
    block_m: batch rows per grid step (a multiple of 8; M is padded to it).
    block_n: outputs per grid step (a multiple of 128; N is padded to it).
    block_k: largest K tile (split-K); a multiple of 32. The kernel takes the largest
      multiple of 32 up to it that divides K and is a multiple or divisor of g. On TPU
      block_k / 32 should be a multiple of 128 or all of K / 32.
    unroll: unroll factor of the loop over the 32 bit phases (1 keeps interpret-mode
      compiles small; a device may prefer more, to be measured).
  """

  block_m: int = 128
  block_n: int = 256
  block_k: int = 2048
  unroll: int = 1

  def __post_init__(self):
    if not isinstance(self.unroll, int) or self.unroll < 1 or WORD % self.unroll:
      raise ValueError(f"Tiles.unroll={self.unroll!r} must be a positive divisor of {WORD}")
    for name, mult in (("block_m", 8), ("block_n", 128), ("block_k", WORD)):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1 or value % mult:
        raise ValueError(f"Tiles.{name}={value!r} must be a positive multiple of {mult}")

  def fit(self, m: int, k: int, n: int, g: int) -> tuple[int, int, int]:
    """(bm, bn, bk) for this problem: bm, bn clipped to the padded sizes, bk as above."""
    bm = min(self.block_m, _util.round_up(m, 8))
    bn = min(self.block_n, _util.round_up(n, 128))
    bk = min(self.block_k, k)
    while k % bk or (bk % g and g % bk):  # ends: 32 divides K and g
      bk -= WORD
    return bm, bn, bk


# ------------------------------------------------------------------------- kernels


def _dequant_kernel(x_ref, w_ref, a_ref, off_ref, o_ref, *, gw: int, ng: int,
                    unroll: int):
  # x_ref:   f32[32, bm, bk/32]   x_ref[j, r, w] = x[r, 32 w + j] of this K tile
  # w_ref:   i32[bits, bk/32, bn] packed codes
  # a_ref:   f32[ng, bits, bn]    alpha of this tile's groups
  # off_ref: f32[ng, 1, bn]       offset of this tile's groups
  # o_ref:   f32[1, bm, bn]       this K tile's partial sums
  bits, bn = w_ref.shape[0], w_ref.shape[2]
  bm = x_ref.shape[1]

  def group(gi, acc):
    rows = pl.ds(gi * gw, gw)
    words = [w_ref[i, rows, :] for i in range(bits)]  # i32[gw, bn] each
    alpha = a_ref[gi]  # f32[bits, bn]
    offset = off_ref[gi]  # f32[1, bn]

    def phase(j, acc):  # W_hat rows 32 w + j of this group
      w_j = offset
      for i in range(bits):  # static
        a_i = alpha[i:i + 1, :]  # f32[1, bn]
        w_j = w_j + jnp.where(((words[i] >> j) & 1) == 1, a_i, -a_i)  # f32[gw, bn]
      return acc + jnp.dot(x_ref[j, :, rows], w_j, precision=HIGHEST,
                           preferred_element_type=jnp.float32)  # f32[bm, bn]

    return lax.fori_loop(0, WORD, phase, acc, unroll=unroll)

  o_ref[0] = lax.fori_loop(0, ng, group, jnp.zeros((bm, bn), jnp.float32))


def _pad_to(a: jax.Array, axis: int, size: int) -> jax.Array:
  """`a` zero-padded along one axis up to `size` (`_util.pad_to` on that axis)."""
  shape = list(a.shape)
  shape[axis] = size
  return _util.pad_to(a, shape)


def dequant_matmul(x: jax.Array, w: PackedBCQ, *, tiles: Tiles | None = None,
                   poison: float | None = None, interpret=False) -> jax.Array:
  """f32[M, N] = x @ W_hat with the `pl.pallas_call` dequant kernel (module docstring).

  `tiles`, `poison` and `interpret` are as in `bcq_matmul`.
  """
  _check_inputs(x, w)
  (m, k), n, g, bits = x.shape, w.shape[1], w.group_size, w.bits
  t = tiles or Tiles()
  if not isinstance(t, Tiles):
    raise ValueError(f"tiles={t!r}: the dequant backend takes Tiles")
  bm, bn, bk = t.fit(m, k, n, g)
  mp, np_ = _util.round_up(m, bm), _util.round_up(n, bn)
  splits, bkw = k // bk, bk // WORD
  ng, gw = (bk // g, g // WORD) if bk >= g else (1, bkw)
  per_group = max(1, g // bk)  # K tiles per group (when bk < g)
  # x[r, 32 w + j] -> x3[j, r, w]: W_hat's rows of bit phase j meet a contiguous x slice.
  x3 = _pad_to(x.astype(jnp.float32), 0, mp).reshape(mp, k // WORD, WORD).transpose(2, 0, 1)
  words = _pad_to(lax.bitcast_convert_type(w.bits_packed, jnp.int32), 2, np_)
  alpha = _pad_to(w.alpha, 2, np_).transpose(1, 0, 2)  # f32[G, bits, Np]
  offset = _pad_to(w.offset, 1, np_)[:, None, :]  # f32[G, 1, Np]
  partial = _util.pallas_call(
      functools.partial(_dequant_kernel, gw=gw, ng=ng, unroll=t.unroll), (x3, words, alpha, offset),
      [pl.BlockSpec((WORD, bm, bkw), lambda r, c, s: (0, r, s)),
       pl.BlockSpec((bits, bkw, bn), lambda r, c, s: (0, s, c)),
       pl.BlockSpec((ng, bits, bn), lambda r, c, s: (s // per_group, 0, c)),
       pl.BlockSpec((ng, 1, bn), lambda r, c, s: (s // per_group, 0, c))],
      jax.ShapeDtypeStruct((splits, mp, np_), jnp.float32),
      pl.BlockSpec((1, bm, bn), lambda r, c, s: (s, r, c)), (mp // bm, np_ // bn, splits),
      poison, interpret)
  return partial.sum(axis=0)[:m, :n]  # deterministic split-K reduction


LANES = 128  # TPU lanes: the lookup gathers from one 128-entry half-table at a time


def lut_tables(x: jax.Array, mu: int = 8) -> jax.Array:
  """f32[M, K/mu, 2^mu]: LUT-GEMM's tables, entry e of chunk c = sum_t +-x[32..][c mu + t]
  with sign + where bit t of e is set (the order a code byte's bits address)."""
  m, k = x.shape
  xc = x.astype(jnp.float32).reshape(m, k // mu, mu)  # f32[M, K/mu, mu]
  entries = jnp.arange(2 ** mu, dtype=jnp.uint32)
  signs = 2.0 * ((entries[:, None] >> jnp.arange(mu, dtype=jnp.uint32)) & 1) - 1.0
  return jnp.einsum("mct,et->mce", xc, signs, precision=HIGHEST)


def _lut_kernel(t_ref, xs_ref, w_ref, a_ref, off_ref, o_ref, *, gw: int, ng: int):
  # t_ref:   f32[bk/4, bm, 128]   tables: row 2c + h holds entries [128 h, 128 h + 128) of
  #                               byte chunk c (8 inputs) of this K tile, per batch row
  # xs_ref:  f32[ng, bm, 1]       sum of x over each group's part in this tile
  # w_ref:   i32[bits, bk/32, bn] packed codes (bn == 128)
  # a_ref:   f32[ng, bits, bn]    alpha
  # off_ref: f32[ng, 1, bn]       offset
  # o_ref:   f32[1, bm, bn]       this K tile's partial sums
  bits, bn = w_ref.shape[0], w_ref.shape[2]
  bm = t_ref.shape[1]

  def group(gi, acc):
    def word(ww, sums):  # one 32-bit word per bit plane: 4 code bytes, 4 lookups each
      w = gi * gw + ww
      sums = list(sums)
      for i in range(bits):  # static
        code_word = jnp.broadcast_to(w_ref[i, pl.ds(w, 1), :], (bm, bn))  # i32[bm, bn]
        for q in range(WORD // 8):  # static: byte q addresses chunk c = 4 w + q
          code = (code_word >> (8 * q)) & 0xFF  # i32[bm, bn]
          low = code & (LANES - 1)
          row = 2 * (4 * w + q)
          lo = jnp.take_along_axis(t_ref[row], low, axis=1, mode="promise_in_bounds")
          hi = jnp.take_along_axis(t_ref[row + 1], low, axis=1, mode="promise_in_bounds")
          sums[i] = sums[i] + jnp.where(code >= LANES, hi, lo)  # f32[bm, bn]
      return tuple(sums)

    zeros = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in range(bits))
    sums = lax.fori_loop(0, gw, word, zeros)
    alpha = a_ref[gi]  # f32[bits, bn]
    for i in range(bits):
      acc = acc + sums[i] * alpha[i:i + 1, :]
    return acc + xs_ref[gi] * off_ref[gi]  # offset times the group's sum of x

  o_ref[0] = lax.fori_loop(0, ng, group, jnp.zeros((bm, bn), jnp.float32))


def lut_matmul(x: jax.Array, w: PackedBCQ, *, tiles: Tiles | None = None,
               poison: float | None = None, interpret=False) -> jax.Array:
  """f32[M, N] = x @ W_hat with the `pl.pallas_call` LUT kernel (module docstring).

  Outputs go in tiles of 128 (`Tiles.block_n` is ignored); `tiles`, `poison` and
  `interpret` are otherwise as in `bcq_matmul`.
  """
  _check_inputs(x, w)
  (m, k), n, g, bits = x.shape, w.shape[1], w.group_size, w.bits
  t = tiles or Tiles()
  if not isinstance(t, Tiles):
    raise ValueError(f"tiles={t!r}: the lut backend takes Tiles")
  bm, _, bk = t.fit(m, k, n, g)
  bn = LANES
  mp, np_ = _util.round_up(m, bm), _util.round_up(n, bn)
  splits, bkw = k // bk, bk // WORD
  ng, gw = (bk // g, g // WORD) if bk >= g else (1, bkw)
  per_group = max(1, g // bk)
  xp = _pad_to(x.astype(jnp.float32), 0, mp)
  # f32[K/8 * 2, Mp, 128]: the 256-entry table of each byte chunk as two lane-wide halves.
  tables = lut_tables(xp).reshape(mp, k // 8 * 2, LANES).transpose(1, 0, 2)
  seg = min(bk, g)  # inputs of one group inside one K tile
  xsum = xp.reshape(mp, k // seg, seg).sum(-1).T[:, :, None]  # f32[K/seg, Mp, 1]
  words = _pad_to(lax.bitcast_convert_type(w.bits_packed, jnp.int32), 2, np_)
  alpha = _pad_to(w.alpha, 2, np_).transpose(1, 0, 2)  # f32[G, bits, Np]
  offset = _pad_to(w.offset, 1, np_)[:, None, :]  # f32[G, 1, Np]
  partial = _util.pallas_call(
      functools.partial(_lut_kernel, gw=gw, ng=ng), (tables, xsum, words, alpha, offset),
      [pl.BlockSpec((bk // 4, bm, LANES), lambda r, c, s: (s, r, 0)),
       pl.BlockSpec((ng, bm, 1), lambda r, c, s: (s, r, 0)),
       pl.BlockSpec((bits, bkw, bn), lambda r, c, s: (0, s, c)),
       pl.BlockSpec((ng, bits, bn), lambda r, c, s: (s // per_group, 0, c)),
       pl.BlockSpec((ng, 1, bn), lambda r, c, s: (s // per_group, 0, c))],
      jax.ShapeDtypeStruct((splits, mp, np_), jnp.float32),
      pl.BlockSpec((1, bm, bn), lambda r, c, s: (s, r, c)), (mp // bm, np_ // bn, splits),
      poison, interpret)
  return partial.sum(axis=0)[:m, :n]


# ------------------------------------------------------------------------- entry point


def _check_inputs(x: jax.Array, w: PackedBCQ) -> None:
  validate(w)
  if x.ndim != 2:
    raise ValueError(f"x must be [M, K], got shape {x.shape}")
  if x.shape[1] != w.shape[0]:
    raise ValueError(f"x has {x.shape[1]} inputs but the weight has K={w.shape[0]}")


def _is_gpu_interpret(interpret) -> bool:
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  return isinstance(interpret, plgpu.InterpretGPUParams)


def _auto_backend(batch: int, interpret) -> str:
  platform = jax.default_backend()
  if _is_gpu_interpret(interpret):
    return "mosaic"
  if platform == "cpu" and not interpret:  # Pallas kernels need a GPU/TPU or interpret
    return "xla"
  if platform == "gpu" and not interpret:
    hopper = any(h in jax.devices()[0].device_kind for h in ("H100", "H200", "H800"))
    return "mosaic" if hopper else "xla"
  return "lut" if batch <= MAX_LUT_BATCH else "dequant"


def bcq_matmul(x: jax.Array, w: PackedBCQ, *, backend: str = "auto",
               tiles: Tiles | None = None, interpret=False,
               poison: float | None = None) -> jax.Array:
  """f32[M, N] = x @ W_hat for a `PackedBCQ` weight.

  Args:
    x: f32/bf16[M, K] activations, any M.
    w: the `PackedBCQ` (N any; K a multiple of 32 and of g).
    backend: "lut" (`pl.pallas_call` LUT-GEMM lookups, TPU / interpret), "dequant"
      (`pl.pallas_call` dequantize-and-dot, TPU / interpret), "mosaic" (Mosaic GPU,
      Hopper), "xla" (the jnp reference) or "auto" (see the module docstring).
    tiles: tiling knobs of the "lut" and "dequant" kernels (`Tiles`); the Mosaic kernel
      takes `mosaic.MosaicTiles` here.
    interpret: run the kernel in interpret mode: True, or an interpreter's params object
      (`pltpu.InterpretParams()`; `plgpu.InterpretGPUParams()` for "mosaic", where True
      also means the GPU interpreter).
    poison: for tests: the kernel's output buffer starts filled with this value (e.g.
      nan), so any tile it fails to write is visible.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
  _check_inputs(x, w)
  if backend == "auto":
    backend = _auto_backend(x.shape[0], interpret)
  if backend == "xla":
    return bcq_matmul_reference(x, w)
  if backend == "mosaic":
    from pallas_kernels.bcq_gemm import mosaic  # pylint: disable=import-outside-toplevel
    return mosaic.bcq_matmul_mosaic(x, w, tiles=tiles, poison=poison, interpret=interpret)
  call = lut_matmul if backend == "lut" else dequant_matmul
  return call(x, w, tiles=tiles, poison=poison, interpret=interpret)
