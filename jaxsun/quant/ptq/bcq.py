"""Binary-coding quantization (BCQ) of a weight `W: f[in, out]` (y = x @ W).

A BCQ weight is `W_hat = sum_i alpha_i * b_i + offset` with binary codes
`b_i in {-1, +1}` and, per group of `g` consecutive input rows and per output column,
one scale per bit and one offset (LUT-GEMM's `bWeight`, `alpha`, `q_bias`).

* `uniform_to_bcq`: the exact conversion of an asymmetric uniform weight
  `s * (q - z)`, `q = sum_i 2^i t_i`, `b_i = 2 t_i - 1`:
  `alpha_i = (s / 2) * 2^i`, `offset = s * ((2^bits - 1) / 2 - z)` (UniQuanF's
  unification theorem: uniform quantization is a special case of BCQ).
* `bcq_alternating`: the alternating solver (Xu et al. 2018; LUT-GEMM `bcq.py`):
  greedy residual binarisation, then rounds of {least-squares alpha and offset given
  b, re-pick b given alpha}, never accepting a worse group.
* `bcq_matmul_reference`: y = x @ W_hat computed bit plane by bit plane, as LUT-GEMM.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

HIGHEST = jax.lax.Precision.HIGHEST
MAX_EXHAUSTIVE_BITS = 4  # 2^bits candidate levels per weight are materialised.


@struct.dataclass
class BCQWeight:
  """A BCQ-quantized weight for jaxsun's `W: f[in, out]` layout.

  Codes are stored unpacked as int8 (-1 / +1), one byte per bit per weight: simple and
  exact for reference code; bit packing (LUT-GEMM's uint32[in / 32, bits, out]) is a
  kernel's concern.
  """

  b: jax.Array  # i8[bits, in, out] in {-1, +1}
  alpha: jax.Array  # f32[bits, in // g, out]
  offset: jax.Array  # f32[in // g, out]

  @property
  def bits(self) -> int:
    return self.b.shape[0]

  @property
  def group_size(self) -> int:
    return self.b.shape[1] // self.alpha.shape[1]


def _check(bits: int, group_size: int, in_features: int) -> None:
  if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
    raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
  if (not isinstance(group_size, (int, np.integer)) or group_size < 1
      or in_features % group_size):
    raise ValueError(f"group_size must be a positive divisor of in={in_features}, "
                     f"got {group_size!r}")


def _grouped(w: jax.Array, g: int) -> jax.Array:
  """f[..., in, out] -> f[..., in // g, g, out] (groups of consecutive input rows)."""
  *lead, k, n = w.shape
  return w.reshape(*lead, k // g, g, n)


def dequantize(bcq: BCQWeight) -> jax.Array:
  """Returns `sum_i alpha_i * b_i + offset`: f32[in, out]."""
  g = bcq.group_size
  b = _grouped(bcq.b.astype(jnp.float32), g)  # f32[bits, G, g, out]
  w = jnp.sum(bcq.alpha[:, :, None, :] * b, axis=0) + bcq.offset[:, None, :]
  return w.reshape(bcq.b.shape[1:])  # f32[in, out]


def uniform_to_bcq(codes: jax.Array, scale: jax.Array, zero: jax.Array, bits: int,
                   group_size: int) -> BCQWeight:
  """Converts an asymmetric uniform weight `scale * (codes - zero)` to BCQ exactly.

  Args:
    codes: int[in, out] integer levels in [0, 2^bits - 1] (not checked: may be traced).
    scale: f[in // group_size, out] step per group.
    zero: f[in // group_size, out] zero point per group (integer or float).
    bits: bit width, 1..8.
    group_size: input rows per group (`in` for per-output-channel).

  Returns:
    The `BCQWeight` with `alpha_i = scale * 2^(i - 1)` and
    `offset = scale * ((2^bits - 1) / 2 - zero)`.
  """
  if codes.ndim != 2:
    raise ValueError(f"codes must be [in, out], got shape {codes.shape}")
  k, n = codes.shape
  _check(bits, group_size, k)
  for name, a in (("scale", scale), ("zero", zero)):
    if a.shape != (k // group_size, n):
      raise ValueError(f"{name} must have shape {(k // group_size, n)}, got {a.shape}")
  q = codes.astype(jnp.int32)  # i32[in, out]
  t = (q[None] >> jnp.arange(bits)[:, None, None]) & 1  # i32[bits, in, out] in {0, 1}
  b = (2 * t - 1).astype(jnp.int8)  # i8[bits, in, out]
  scale = scale.astype(jnp.float32)
  # Powers of two: alpha_i is exactly representable whenever scale is.
  alpha = scale[None] * (2.0 ** (jnp.arange(bits, dtype=jnp.float32) - 1))[:, None, None]
  offset = scale * ((2 ** bits - 1) / 2 - zero.astype(jnp.float32))  # f32[G, out]
  return BCQWeight(b=b, alpha=alpha, offset=offset)


def bcq_error(w: jax.Array, bcq: BCQWeight) -> jax.Array:
  """Relative squared reconstruction error ||w - W_hat||^2 / ||w||^2 (scalar f32)."""
  w = w.astype(jnp.float32)
  return jnp.sum((w - dequantize(bcq)) ** 2) / jnp.sum(w ** 2)


def _group_sse(wg: jax.Array, bcq: BCQWeight) -> jax.Array:
  """Squared error per group and column: f32[G, out]; wg: f32[G, g, out]."""
  return jnp.sum((wg - _grouped(dequantize(bcq), wg.shape[1])) ** 2, axis=1)


def _binarise_greedy(r: jax.Array, alpha: jax.Array) -> jax.Array:
  """Codes i8[bits, G, g, out] for residual r f32[G, g, out], alpha f32[bits, G, out]."""
  # Largest |alpha| first, so each bit corrects what the bigger ones left.
  order = jnp.argsort(-jnp.abs(alpha), axis=0)  # i32[bits, G, out]
  a = jnp.take_along_axis(alpha, order, axis=0)  # f32[bits, G, out]
  codes = []
  for i in range(alpha.shape[0]):
    bi = jnp.where(r * jnp.sign(a[i])[:, None] >= 0, 1.0, -1.0)  # f32[G, g, out]
    r = r - a[i][:, None] * bi
    codes.append(bi)
  codes = jnp.stack(codes)  # f32[bits, G, g, out] in sorted order
  inv = jnp.argsort(order, axis=0)[:, :, None, :]  # back to the original bit order
  return jnp.take_along_axis(codes, jnp.broadcast_to(inv, codes.shape), axis=0)


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def bcq_greedy(w: jax.Array, bits: int, group_size: int) -> BCQWeight:
  """Greedy BCQ: offset = group mean, then b_i = sign(r), alpha_i = mean|r| in turn.

  Args:
    w: f[in, out] weight.
    bits: number of binary codes, 1..8.
    group_size: input rows sharing one alpha vector and offset.

  Returns:
    The greedy `BCQWeight` (for bits=1 the closed form alpha = mean|w - mean(w)|).
  """
  _check(bits, group_size, w.shape[0])
  wg = _grouped(w.astype(jnp.float32), group_size)  # f32[G, g, out]
  offset = jnp.mean(wg, axis=1)  # f32[G, out]
  r = wg - offset[:, None]
  codes, alphas = [], []
  for _ in range(bits):
    bi = jnp.where(r >= 0, 1.0, -1.0)  # f32[G, g, out]
    ai = jnp.mean(jnp.abs(r), axis=1)  # f32[G, out]
    r = r - ai[:, None] * bi
    codes.append(bi)
    alphas.append(ai)
  b = jnp.stack(codes).reshape(bits, *w.shape).astype(jnp.int8)  # i8[bits, in, out]
  return BCQWeight(b=b, alpha=jnp.stack(alphas), offset=offset)


@jax.jit
def bcq_alternating_step(w: jax.Array, bcq: BCQWeight) -> BCQWeight:
  """One round: least-squares (alpha, offset) given b, then b given (alpha, offset).

  Each half is kept per group and column only where it does not raise the error, so
  the reconstruction error never increases.
  """
  bits, g = bcq.bits, bcq.group_size
  wg = _grouped(w.astype(jnp.float32), g)  # f32[G, g, out]
  # 1. Least squares on the design [b_0 .. b_{n-1}, 1] per group and column.
  bg = _grouped(bcq.b.astype(jnp.float32), g)  # f32[bits, G, g, out]
  a = jnp.concatenate([bg, jnp.ones_like(bg[:1])], axis=0)  # f32[bits + 1, G, g, out]
  gram = jnp.einsum("igko,jgko->goij", a, a, precision=HIGHEST)  # f32[G, out, n+1, n+1]
  rhs = jnp.einsum("igko,gko->goi", a, wg, precision=HIGHEST)  # f32[G, out, n+1]
  # pinv: codes can be collinear (b_i == +-b_j, or constant in a group).
  sol = jnp.einsum("goij,goj->goi", jnp.linalg.pinv(gram, hermitian=True), rhs,
                   precision=HIGHEST)  # f32[G, out, n+1]
  cand = BCQWeight(b=bcq.b, alpha=jnp.moveaxis(sol[..., :bits], -1, 0),
                   offset=sol[..., bits])
  bcq = _keep_better(wg, bcq, cand)
  # 2. Codes given scales: the nearest of the 2^bits levels, or greedy for many bits.
  r = wg - bcq.offset[:, None]  # f32[G, g, out]
  if bits <= MAX_EXHAUSTIVE_BITS:
    combos = jnp.asarray(list(itertools.product((-1.0, 1.0), repeat=bits)))  # f32[L, bits]
    levels = jnp.einsum("li,igo->lgo", combos, bcq.alpha, precision=HIGHEST)  # f32[L, G, out]
    idx = jnp.argmin(jnp.abs(r[None] - levels[:, :, None]), axis=0)  # i32[G, g, out]
    new = jnp.moveaxis(combos[idx], -1, 0)  # f32[bits, G, g, out]
  else:
    new = _binarise_greedy(r, bcq.alpha)
  cand = bcq.replace(b=new.reshape(bcq.b.shape).astype(jnp.int8))
  return _keep_better(wg, bcq, cand)


def _keep_better(wg: jax.Array, old: BCQWeight, new: BCQWeight) -> BCQWeight:
  """Per group and column, `new` where its error is <= old's (and finite), else old."""
  e_old, e_new = _group_sse(wg, old), _group_sse(wg, new)  # f32[G, out]
  take = e_new <= e_old  # False for NaN
  g = wg.shape[1]
  take_b = jnp.repeat(take, g, axis=0)[None]  # bool[1, in, out]
  return BCQWeight(b=jnp.where(take_b, new.b, old.b),
                   alpha=jnp.where(take[None], new.alpha, old.alpha),
                   offset=jnp.where(take, new.offset, old.offset))


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "iters"))
def bcq_alternating(w: jax.Array, bits: int, group_size: int,
                    iters: int = 15) -> BCQWeight:
  """Alternating BCQ: `bcq_greedy`, then `iters` rounds of `bcq_alternating_step`.

  Args:
    w: f[in, out] weight.
    bits: number of binary codes, 1..8 (codes re-picked exhaustively for bits <= 4,
      greedily above).
    group_size: input rows sharing one alpha vector and offset (`in`: per column).
    iters: alternating rounds (LUT-GEMM's and UniQuanF's default: 15).

  Returns:
    The `BCQWeight`; its error is <= the greedy one's.
  """
  if iters < 0:
    raise ValueError(f"iters must be >= 0, got {iters}")
  bcq = bcq_greedy(w, bits, group_size)
  return jax.lax.fori_loop(0, iters, lambda _, q: bcq_alternating_step(w, q), bcq)


def bcq_matmul_reference(x: jax.Array, bcq: BCQWeight) -> jax.Array:
  """y = x @ dequantize(bcq) the LUT-GEMM way: one binary matmul per bit plane.

  Args:
    x: f[..., in] activations.
    bcq: the weight.

  Returns:
    f32[..., out].
  """
  g = bcq.group_size
  xg = _grouped(x.astype(jnp.float32)[..., None], g)[..., 0]  # f32[..., G, g]
  bg = _grouped(bcq.b.astype(jnp.float32), g)  # f32[bits, G, g, out]
  # Per bit and group: sum_k x_k * b_ik (a LUT lookup in the kernel), then scale.
  partial = jnp.einsum("...gk,igko->...igo", xg, bg, precision=HIGHEST)  # f32[..., bits, G, out]
  y = jnp.sum(partial * bcq.alpha, axis=(-3, -2))  # f32[..., out]
  # Offset term: each group's offset times the group's sum of x.
  return y + jnp.einsum("...g,go->...o", jnp.sum(xg, -1), bcq.offset, precision=HIGHEST)
