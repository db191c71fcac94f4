"""The Hopper BCQ GEMM on Mosaic GPU (`plgpu.kernel`): bit-phase dequantization feeding
`wgmma`, codes and activations pipelined through shared memory by TMA.

Computes `y^T = W_hat^T x^T`, so the dequantized weight is wgmma's operand A (`[64
outputs, K]`: A is the operand that may come from registers) and the activations are its
shared-memory operand B (`[K, tile_m]`): the batch is wgmma's N dimension, so a decode
batch pads to 8 columns, not 64.

Layout (made by `bcq_matmul_mosaic` from `PackedBCQ`; a model would store it once):

    words   u32[bits, N, K/32]        the packed codes, output-major (a row per output)
    alpha_w f32[bits, N, K/32]        alpha repeated per code word (g/32 words per group)
    off_w   f32[N, K/32]              offset repeated per code word
    x3      bf16[parts * 32, M, K/32] x3[p * 32 + j, r, w] = part p of x[r, 32 w + j]

Per pipeline step (tile_kw = 16 code words, 512 inputs) and bit phase j < 32 (a loop),
the kernel forms `A_j[n, w] = offset + sum_i (+-alpha_i)` from bit j of the words (W_hat's
rows k = 32 w + j) in registers, casts it to bf16 and issues `wgmma(acc, A_j, x3[j]^T)`.
By default A_j goes through a shared-memory scratch (what the GPU interpreter runs and
the tests check); `a_in_registers=True` feeds it from registers (lowers; the interpreter
cannot run register-A wgmma, so it is only cross-lowered here).

Precision: with `precise=True` (default) both operands are split into bf16 high and low
parts and three wgmmas per phase (hi*hi + hi*lo + lo*hi) keep about 16 mantissa bits
(measured ~1e-5 relative to max|y|); `precise=False` is one bf16 wgmma (~3e-3).

Shared memory (227 KB on Hopper) bounds the tiles: per stage the x tile takes
parts * 32 * tile_m * 16 * 2 bytes, codes and alpha bits * 64 * 16 * 8; the entry point
lowers `stages`, then `tile_m`, until it fits (`smem_bytes`).

Not measured on a GPU. Tuning steps: loading alpha per group instead of per word (it
now streams as many bytes as the codes), unrolling the phase loop, two warpgroups.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _util
from pallas_kernels.bcq_gemm import kernel as _k

WORD = _k.WORD
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per block


@dataclasses.dataclass(frozen=True)
class MosaicTiles:
  """Mosaic GPU tiling knobs (speed only).

  Attributes:
    tile_n: outputs per CTA: 64 (one warpgroup's wgmma M).
    tile_m: largest batch columns per CTA (wgmma N): a multiple of 8 up to 256; clipped
      to the batch rounded up to 8, and lowered to fit shared memory.
    tile_kw: code words per pipeline step (32 * tile_kw inputs): 16 (one bf16 wgmma K).
    stages: largest TMA pipeline depth (lowered to fit shared memory first).
  """

  tile_n: int = 64
  tile_m: int = 64
  tile_kw: int = 16
  stages: int = 2

  def __post_init__(self):
    if self.tile_n != 64:
      raise ValueError(f"MosaicTiles.tile_n={self.tile_n} must be 64")
    if not isinstance(self.tile_m, int) or self.tile_m % 8 or not 8 <= self.tile_m <= 256:
      raise ValueError(f"MosaicTiles.tile_m={self.tile_m!r} must be a multiple of 8 in "
                       f"[8, 256]")
    if self.tile_kw != 16:
      raise ValueError(f"MosaicTiles.tile_kw={self.tile_kw} must be 16")
    if not isinstance(self.stages, int) or self.stages < 1:
      raise ValueError(f"MosaicTiles.stages={self.stages!r} must be a positive integer")


def smem_bytes(tiles: MosaicTiles, bits: int, precise: bool) -> int:
  """Shared memory the kernel allocates with these tiles."""
  parts = 2 if precise else 1
  tn, tm, tkw = tiles.tile_n, tiles.tile_m, tiles.tile_kw
  stage = parts * WORD * tm * tkw * 2 + bits * tn * tkw * 8 + tn * tkw * 4
  return tiles.stages * stage + parts * tn * tkw * 2 + tn * tm * 4


def fit_tiles(tiles: MosaicTiles, m: int, bits: int, precise: bool) -> MosaicTiles:
  """`tiles` with tile_m clipped to the batch, then stages and tile_m lowered until the
  kernel fits in shared memory."""
  m8 = _util.round_up(m, 8)
  t = dataclasses.replace(tiles, tile_m=min(tiles.tile_m, m8))
  while smem_bytes(t, bits, precise) > SMEM_BYTES:
    if t.stages > 1:
      t = dataclasses.replace(t, stages=t.stages - 1)
    elif t.tile_m > 8:
      t = dataclasses.replace(t, tile_m=t.tile_m - 8)
    else:
      raise ValueError(f"no Mosaic tiles fit {SMEM_BYTES} bytes of shared memory for "
                       f"bits={bits}")
  return t


def _split(v: jax.Array, precise: bool) -> list[jax.Array]:
  hi = v.astype(jnp.bfloat16)
  if not precise:
    return [hi]
  return [hi, (v - hi.astype(jnp.float32)).astype(jnp.bfloat16)]


def mosaic_bcq_nt(x3: jax.Array, words: jax.Array, alpha_w: jax.Array, off_w: jax.Array, *,
                  tiles: MosaicTiles, precise: bool, a_in_registers: bool = False,
                  interpret=None) -> jax.Array:
  """f32[N, M] = W_hat^T x^T from the kernel layout (module docstring); M, N and K/32
  multiples of the tiles. `a_in_registers`: feed the dequantized tile to wgmma from
  registers (no shared-memory round trip; lowers, but the GPU interpreter cannot run it)
  instead of through a shared-memory scratch."""
  (_, m, kw), (bits, n, _) = x3.shape[:3], words.shape
  tn, tkw = tiles.tile_n, tiles.tile_kw
  tm = min(tiles.tile_m, m)
  for name, size, tile in (("M", m, tm), ("N", n, tn), ("K/32", kw, tkw)):
    if size % tile:
      raise ValueError(f"{name}={size} must be a multiple of {tile} for the Mosaic kernel")
  swizzle = tkw * 2  # one bf16 row of tile_kw elements, in bytes
  x_transforms = (plgpu.TilingTransform((8, tkw)), plgpu.SwizzleTransform(swizzle))
  parts = 2 if precise else 1

  def body(x_gmem, w_gmem, a_gmem, off_gmem, o_gmem, o_smem, a_smem):
    # a_smem: bf16[parts, tn, tkw], the dequantized tile (wgmma's A) when not in registers
    # o_smem: f32[tn, tm], the output tile
    pid_n, pid_m = lax.axis_index("n"), lax.axis_index("m")

    def acc_scope(acc_ref):
      def step(_, *smem):
        # x_smem: bf16[parts * 32, tm, tkw]  w_smem: u32[bits, tn, tkw]
        # al_smem: f32[bits, tn, tkw]        off_smem: f32[tn, tkw]
        x_smem, w_smem, al_smem, off_smem = smem
        words_i = [w_smem[i] for i in range(bits)]  # u32[tn, tkw] each
        alpha_i = [al_smem[i] for i in range(bits)]  # f32[tn, tkw] each
        offset = off_smem[...]  # f32[tn, tkw]
        @pl.loop(0, WORD)
        def _phase(j):  # W_hat's rows k = 32 w + j
          a_j = offset
          for i in range(bits):  # static
            bit = (words_i[i] >> j.astype(jnp.uint32)) & jnp.uint32(1)
            a_j = a_j + jnp.where(bit == jnp.uint32(1), alpha_i[i], -alpha_i[i])
          a_parts = _split(a_j, precise)  # bf16[tn, tkw] each
          if a_in_registers:
            operands = a_parts
          else:  # through shared memory: what the GPU interpreter can run
            for pa, a_part in enumerate(a_parts):
              a_smem[pa] = a_part
            plgpu.commit_smem()  # make the stores visible to wgmma (async proxy)
            operands = [a_smem.at[pa] for pa in range(parts)]
          for pa, a_op in enumerate(operands):
            for px in range(parts - pa):  # hi*hi (+ hi*lo + lo*hi)
              plgpu.wgmma(acc_ref, a_op, x_smem.at[px * WORD + j].T)
          plgpu.wgmma_wait(0)  # a_smem is rewritten by the next phase

      plgpu.emit_pipeline(
          step, grid=(kw // tkw,), max_concurrent_steps=tiles.stages,
          in_specs=[
              plgpu.BlockSpec((parts * WORD, tm, tkw), lambda s: (0, pid_m, s),
                              transforms=x_transforms),
              plgpu.BlockSpec((bits, tn, tkw), lambda s: (0, pid_n, s)),
              plgpu.BlockSpec((bits, tn, tkw), lambda s: (0, pid_n, s)),
              plgpu.BlockSpec((tn, tkw), lambda s: (pid_n, s)),
          ],
      )(x_gmem, w_gmem, a_gmem, off_gmem)
      return acc_ref[...]

    o_smem[...] = pl.run_scoped(acc_scope, plgpu.ACC((tn, tm), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(pid_n * tn, tn), pl.ds(pid_m * tm, tm)])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((n, m), jnp.float32),
      scratch_types=dict(o_smem=plgpu.SMEM((tn, tm), jnp.float32),
                         a_smem=plgpu.SMEM((parts, tn, tkw), jnp.bfloat16,
                                           transforms=x_transforms)),
      grid=(n // tn, m // tm), grid_names=("n", "m"), interpret=interpret)(
          x3, words, alpha_w, off_w)


def _poisoned_params(params: plgpu.InterpretGPUParams,
                     poison: float) -> plgpu.InterpretGPUParams:
  """The interpreter's params with uninitialized memory (the output) filled with nan."""
  if poison == poison:  # not nan
    raise ValueError(f"poison={poison!r}: the GPU interpreter can only poison with nan")
  return dataclasses.replace(params, uninitialized_memory="nan")


def bcq_matmul_mosaic(x: jax.Array, w: _k.PackedBCQ, *, tiles: MosaicTiles | None = None,
                      precise: bool = True, a_in_registers: bool = False,
                      poison: float | None = None, interpret=False) -> jax.Array:
  """f32[M, N] = x @ W_hat on the Hopper path; pads M, N and K to the tiles.

  Args:
    x: f32/bf16[M, K].
    w: the `PackedBCQ`.
    tiles: `MosaicTiles` (None: the defaults).
    precise: split both operands into bf16 hi + lo parts (three wgmmas per phase).
    a_in_registers: wgmma reads the dequantized tile from registers (see
      `mosaic_bcq_nt`; not runnable in the interpreter).
    poison: with the interpreter, it must be nan and uninitialized memory is filled with
      nan (the output has no aliased input to pre-fill); ignored on a device.
    interpret: True or `plgpu.InterpretGPUParams(...)` for the Mosaic GPU interpreter.
  """
  _k._check_inputs(x, w)  # pylint: disable=protected-access
  tiles = tiles or MosaicTiles()
  if not isinstance(tiles, MosaicTiles):
    raise ValueError(f"tiles={tiles!r}: the Mosaic backend takes MosaicTiles")
  if interpret is True:
    interpret = plgpu.InterpretGPUParams()
  params = interpret or None
  if params is not None and poison is not None:
    params = _poisoned_params(params, poison)
  (m, k), n, g = x.shape, w.shape[1], w.group_size
  tiles = fit_tiles(tiles, m, w.bits, precise)
  tm = tiles.tile_m
  mp = _util.round_up(m, tm)
  np_ = _util.round_up(n, tiles.tile_n)
  kwp = _util.round_up(k // WORD, tiles.tile_kw)
  pad = _k._pad_to  # pylint: disable=protected-access
  # Padded inputs are zero, so padded K contributes nothing whatever the codes.
  xf = pad(pad(x.astype(jnp.float32), 0, mp), 1, kwp * WORD)
  xf = xf.reshape(mp, kwp, WORD).transpose(2, 0, 1)  # f32[32, Mp, Kw]
  x3 = jnp.concatenate(_split(xf, precise), axis=0)  # bf16[parts * 32, Mp, Kw]
  words = lax.bitcast_convert_type(w.bits_packed, jnp.uint32).transpose(0, 2, 1)
  words = pad(pad(words, 1, np_), 2, kwp)  # u32[bits, Np, Kw]
  per = g // WORD
  alpha_w = pad(pad(jnp.repeat(w.alpha, per, axis=1).transpose(0, 2, 1), 1, np_), 2, kwp)
  off_w = pad(pad(jnp.repeat(w.offset, per, axis=0).T, 0, np_), 1, kwp)
  yt = mosaic_bcq_nt(x3, words, alpha_w, off_w, tiles=tiles,
                     precise=precise, a_in_registers=a_in_registers, interpret=params)
  return yt.T[:m, :n]
